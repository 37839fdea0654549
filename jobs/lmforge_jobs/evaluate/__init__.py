"""The evaluate stage: its spec (config.py) and its job, ``python -m lmforge_jobs.evaluate --manifest F``.

Modules: ``job`` (the loop and results.json), ``perplexity``, ``benchmarks`` (lm-evaluation-harness),
``judge`` (pairwise LLM-as-judge), ``arena`` (Bradley–Terry ratings), ``models`` (loading, secrets),
``human`` (the human voting page, ``lmforge arena serve``; the arena extra, no torch).
The operator imports ``config``, and ``human`` lazily for ``lmforge arena``; the others import torch.
"""
