"""Shard-by-shard tensor reading and writing, and atomic output directories."""
