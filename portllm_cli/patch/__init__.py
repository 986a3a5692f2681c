"""The patch format (see format.py)."""
