"""SFT and DPO training throughput: the AlignmentRun job's TRL settings against the same TRL trainer with its
defaults, in the same run, on the same model, data and batch.

    python bench/align.py                               # CPU smoke shape: a 2-layer 64-wide Llama, seconds
    python bench/align.py --shape cpu-small --steps 20  # CPU: 4 layers, 256 wide, 8k vocabulary
    python bench/align.py --shape gpu --steps 40        # one GPU: a ~0.4B Llama, bf16, 32k vocabulary

"lmforge" is :func:`lmforge_jobs.align.trainers.training_args` for a spec with the same batch: no activation
checkpointing (TRL turns it on by default), SFT packing (best-fit decreasing, padding-free), Liger kernels
where they apply (GPU + liger-kernel installed), DPO reference log-probs computed once when training for more
than one epoch. "trl" is ``SFTConfig`` / ``DPOConfig`` with only the run length, batch, max length, learning
rate and precision set. Tokens are real (non-padding) tokens as TRL counts them (``num_tokens``); the rate is
measured after ``--warmup`` steps. Prints one JSON line per measurement and a summary with the speedups.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
SHAPES = {
    # layers, hidden, heads, kv heads, ffn, vocab (the embedding may be larger than the tokenizer)
    "cpu": dict(layers=2, hidden=64, heads=4, kv_heads=2, ffn=192, vocab=512),
    "cpu-small": dict(layers=4, hidden=256, heads=4, kv_heads=2, ffn=768, vocab=8192),
    "gpu": dict(layers=16, hidden=1024, heads=16, kv_heads=8, ffn=2816, vocab=32768),
}


def tokenizer(out: Path) -> Any:
    """A byte-level BPE tokenizer with bos/eos/pad, trained on the example data (offline, sub-second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for path in sorted(DATA.glob("*.jsonl")):
        texts.extend(path.read_text(encoding="utf-8").splitlines())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    from lmforge_jobs.align.models import DEFAULT_CHAT_TEMPLATE

    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def model_dir(out: Path, shape: dict[str, int]) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer(out)
    config = LlamaConfig(
        vocab_size=max(shape["vocab"], len(tok)),
        hidden_size=shape["hidden"],
        intermediate_size=shape["ffn"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return str(out)


def records(method: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n training records in TRL's conversational shape (the job's conversion), lengths mixed."""
    from lmforge_jobs.align.config import DatasetFormat
    from lmforge_jobs.align.data import convert

    rng = random.Random(seed)
    if method == "sft":
        rows = [json.loads(line) for line in (DATA / "sft.jsonl").read_text().splitlines()]
        out = []
        for i in range(n):
            messages = rows[i % len(rows)]["messages"]
            # mixed lengths, as in real SFT data: some answers repeated a few times
            answer = " ".join([messages[1]["content"]] * rng.choice([1, 1, 2, 4, 8]))
            rec = {"messages": [messages[0], {"role": "assistant", "content": answer}]}
            out.append(convert(DatasetFormat.messages, rec, f"record {i}"))
        return out
    rows = [json.loads(line) for line in (DATA / "pairs.jsonl").read_text().splitlines()]
    return [convert(DatasetFormat.preference, rows[i % len(rows)], f"record {i}") for i in range(n)]


class Meter:
    """Trainer callback: (time, num_tokens) at every log, for the rate after the warmup steps."""

    def __init__(self, warmup: int):
        from transformers import TrainerCallback

        meter = self

        class _Cb(TrainerCallback):
            def on_log(
                self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any
            ) -> None:
                if logs and "num_tokens" in logs and "loss" in logs:
                    meter.points.append((state.global_step, time.perf_counter(), float(logs["num_tokens"])))

        self.warmup = warmup
        self.points: list[tuple[int, float, float]] = []
        self.callback = _Cb()

    def rate(self) -> float:
        pts = [p for p in self.points if p[0] >= self.warmup]
        if len(pts) < 2:
            pts = self.points
        (_, t0, n0), (_, t1, n1) = pts[0], pts[-1]
        return (n1 - n0) / max(t1 - t0, 1e-9)


def run_one(method: str, variant: str, base: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from lmforge_jobs.align.config import AlignmentRunSpec
    from lmforge_jobs.align.trainers import training_args

    gpu = torch.cuda.is_available()
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16 if gpu else torch.float32)
    data = Dataset.from_list(records(method, args.examples))
    steps = args.steps
    common = dict(max_steps=steps, logging_steps=1, report_to="none", disable_tqdm=True, save_strategy="no")
    lr = 1e-5 if method == "sft" else 1e-6
    cfg_cls = SFTConfig if method == "sft" else DPOConfig
    if variant == "trl":
        cfg = cfg_cls(
            output_dir=str(out / f"{method}-{variant}"),
            per_device_train_batch_size=args.batch,
            max_length=args.max_length,
            learning_rate=lr,
            bf16=gpu,  # TRL's default; bf16 autocast on CPU would only measure the CPU's bf16 support
            use_cpu=not gpu,
            **common,
        )
    else:
        spec = AlignmentRunSpec.model_validate(
            {
                "base": {"path": base},
                "method": method,
                "dataset": {
                    "path": "unused.jsonl",
                    "format": "messages" if method == "sft" else "preference",
                },
                "hyperparameters": {
                    "lr": lr,
                    "maxSteps": steps,
                    "batchSize": args.batch,
                    "microBatchSize": args.batch,
                    "maxLength": args.max_length,
                    "packing": method == "sft",
                },
                "precision": "bf16" if gpu else "fp32",
            }
        )
        extra = {"packing": True, "completion_only_loss": True} if method == "sft" else {"beta": 0.1}
        cfg = training_args(spec, cfg_cls, str(out / f"{method}-{variant}"), **extra)
        cfg.save_strategy, cfg.logging_steps = "no", 1
    meter = Meter(args.warmup)
    trainer_cls: Any = SFTTrainer if method == "sft" else DPOTrainer
    trainer = trainer_cls(
        model=model, args=cfg, train_dataset=data, processing_class=tok, callbacks=[meter.callback]
    )
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    result = {
        "method": method,
        "variant": variant,
        "tokensPerSecond": round(meter.rate(), 1),
        "steps": steps,
        "wallSeconds": round(wall, 2),
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "gradientCheckpointing": bool(cfg.gradient_checkpointing),
        "packing": bool(getattr(cfg, "packing", False)),
        "liger": bool(cfg.use_liger_kernel),
    }
    if gpu:
        result["peakMemoryGiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), default=None, help="model shape (default: gpu if CUDA)"
    )
    parser.add_argument("--methods", default="sft,dpo")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the rate")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--examples", type=int, default=512)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    shape_name = args.shape or ("gpu" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-align-") as tmp:
        out = Path(tmp)
        base = model_dir(out / "base", SHAPES[shape_name])
        results = {}
        for method in args.methods.split(","):
            for variant in ("trl", "lmforge"):
                results[(method, variant)] = run_one(method, variant, base, args, out)
        summary = {
            "shape": shape_name,
            **{
                f"{m}Speedup": round(
                    results[(m, "lmforge")]["tokensPerSecond"]
                    / max(results[(m, "trl")]["tokensPerSecond"], 1e-9),
                    3,
                )
                for m in args.methods.split(",")
            },
        }
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
