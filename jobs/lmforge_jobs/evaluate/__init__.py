"""The evaluate stage: its spec (config.py) and its job, ``python -m lmforge_jobs.evaluate --manifest F``.

Modules: ``job`` (the loop and results.json), ``perplexity``, ``benchmarks`` (lm-evaluation-harness),
``judge`` (pairwise LLM-as-judge), ``arena`` (Bradley–Terry ratings), ``models`` (loading, secrets).
Only ``config`` is imported by the operator; the others import torch and friends.
"""
