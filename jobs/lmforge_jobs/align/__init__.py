"""The align stage: its spec (config.py) and its job, ``python -m lmforge_jobs.align --manifest FILE``.

Modules: config (spec), data (records checked and converted for TRL), models (load, PEFT, save), trainers
(sft / reward / dpo through TRL), ppo (RLHF written here), storage (fsspec inputs, staged outputs),
job (the run, top to bottom).
"""
