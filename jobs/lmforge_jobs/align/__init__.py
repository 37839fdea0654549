"""The align stage: its spec (config.py) and, later, its job (python -m lmforge_jobs.align)."""
