"""The pretrain stage: ``torchrun … -m lmforge_jobs.pretrain --manifest run.yaml`` (see ``__main__``).

config.py the spec · model.py the models, written for one device · parallelize.py AC → compile → FSDP2/DDP
· inputs.py shards, tokenizer, model shape and model.init, checked · data.py deterministic, resumable
batches from token shards · train.py the loop · metrics.py throughput, MFU, GPU stats · checkpoint.py DCP
checkpoints with a completion marker · export.py Hugging Face / int8 export, hub push, HF import ·
testing.py tiny offline data for tests and benchmarks.
"""
