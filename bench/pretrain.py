"""Pretraining throughput: lmforge's trainer against a plain Hugging Face transformers loop, same run.

    python bench/pretrain.py                    # on a GPU: GPT-2-124M shape and a ~1B Llama shape, bf16
    python bench/pretrain.py --shapes tiny      # on CPU (the default without CUDA): a tiny shape, fp32
    python bench/pretrain.py --json out.json    # also write the numbers

For every shape both contestants train the same model size on the same random token batches for
``--steps`` timed steps after ``--warmup`` untimed ones (compile happens in the warmup):

* **lmforge**: the job's own pieces — the native ``Transformer`` (RMSNorm, RoPE, SwiGLU, GQA through
  scaled_dot_product_attention), ``parallelize`` (per-block torch.compile), bf16 autocast, fused AdamW;
* **reference**: ``transformers.LlamaForCausalLM`` with ``attn_implementation="sdpa"``, bf16 autocast,
  ``torch.optim.AdamW`` with its defaults (foreach), the same fp32 cross-entropy on its logits.

Reported: tokens/s, MFU = (training FLOPs per token, attention included — the planner's formula) ×
tokens/s ÷ device peak (dense bf16, from the planner's device table, or ``--peak-tflops``), peak memory,
and lmforge's speed-up over the reference. Targets on one H100: ≥ 45 % MFU at 124M, ≥ 40 % at
1B, ≥ 1.3× the reference's tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))

import torch

from lmforge_jobs.pretrain.metrics import flops_per_token, peak_flops
from lmforge_jobs.pretrain.model import ModelArgs, Transformer
from lmforge_jobs.pretrain.parallelize import MeshDims, parallelize

SHAPES = {
    # GPT-2 small's size: SwiGLU 3·768·2048 has the parameters of GPT-2's 2·768·3072 MLP.
    "gpt2-124m": dict(
        layers=12,
        hidden=768,
        heads=12,
        kv_heads=12,
        ffn_hidden=2048,
        vocab_size=50304,
        seq_len=1024,
        micro_batch=16,
    ),
    # Llama-3.2-1B's shape (untied here so both models count the same weights).
    "llama-1b": dict(
        layers=16,
        hidden=2048,
        heads=32,
        kv_heads=8,
        ffn_hidden=8192,
        vocab_size=128256,
        seq_len=2048,
        micro_batch=4,
    ),
    "tiny": dict(
        layers=2, hidden=64, heads=4, kv_heads=2, ffn_hidden=192, vocab_size=512, seq_len=64, micro_batch=8
    ),
}


def model_args(shape: dict) -> ModelArgs:
    return ModelArgs(
        "decoder",
        shape["vocab_size"],
        shape["layers"],
        shape["hidden"],
        shape["heads"],
        shape["kv_heads"],
        shape["ffn_hidden"],
        shape["seq_len"],
    )


def batches(
    shape: dict, n: int, device: torch.device, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = torch.randint(0, shape["vocab_size"], (shape["micro_batch"], shape["seq_len"] + 1), generator=g)
        out.append((t[:, :-1].to(device), t[:, 1:].to(device)))
    return out


def time_loop(step, data, warmup: int, steps: int, device: torch.device) -> float:
    """Seconds per step over ``steps`` timed steps after ``warmup`` untimed ones."""
    for i in range(warmup):
        step(*data[i % len(data)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        step(*data[i % len(data)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def lmforge_step(args: ModelArgs, device: torch.device, bf16: bool, compile: bool):
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights(0)
    model.to(device)
    model = parallelize(
        model,
        dims=MeshDims(),
        device=device,
        bf16=bf16,
        compile=compile,
        activation_checkpointing=False,
    ).model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def reference_step(args: ModelArgs, device: torch.device, bf16: bool):
    import transformers

    from lmforge_jobs.pretrain.model import hf_config

    torch.manual_seed(0)
    config = hf_config(args)
    config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(config).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run_shape(
    name: str,
    shape: dict,
    device: torch.device,
    bf16: bool,
    compile: bool,
    warmup: int,
    steps: int,
    peak: float | None,
) -> dict:
    args = model_args(shape)
    per_token = flops_per_token(args, 0)  # the decoder's count comes from the planner, exact for the shape
    tokens = shape["micro_batch"] * shape["seq_len"]
    data = batches(shape, 4, device)
    row: dict = {
        "shape": name,
        **shape,
        "device": str(device),
        "bf16": bf16,
        "compile": compile,
        "flopsPerToken": per_token,
    }
    for label, make in (
        ("lmforge", lambda: lmforge_step(args, device, bf16, compile)),
        ("reference", lambda: reference_step(args, device, bf16)),
    ):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        step = make()
        seconds = time_loop(step, data, warmup, steps, device)
        tps = tokens / seconds
        row[label] = {
            "tokensPerSecond": tps,
            "secondsPerStep": seconds,
            "mfu": per_token * tps / peak if peak else None,
            "peakMemoryGiB": torch.cuda.max_memory_allocated(device) / 2**30
            if device.type == "cuda"
            else None,
        }
        del step
    row["speedup"] = row["lmforge"]["tokensPerSecond"] / row["reference"]["tokensPerSecond"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument(
        "--shapes",
        default="gpt2-124m,llama-1b" if cuda else "tiny",
        help=f"comma list of {', '.join(SHAPES)}",
    )
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16" if cuda else "fp32")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=cuda,
        help="torch.compile lmforge's blocks",
    )
    parser.add_argument("--warmup", type=int, default=5 if cuda else 2)
    parser.add_argument("--steps", type=int, default=20 if cuda else 10)
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="device peak for MFU (default: planner's table on GPU)",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    opts = parser.parse_args(argv)
    device = torch.device(opts.device)
    if device.type == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    peak = opts.peak_tflops * 1e12 if opts.peak_tflops else peak_flops(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows = []
    for name in opts.shapes.split(","):
        row = run_shape(
            name, SHAPES[name], device, opts.precision == "bf16", opts.compile, opts.warmup, opts.steps, peak
        )
        rows.append(row)
        for label in ("lmforge", "reference"):
            r = row[label]
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a (give --peak-tflops)"
            mem = f", peak {r['peakMemoryGiB']:.1f} GiB" if r["peakMemoryGiB"] is not None else ""
            print(f"{name:10s} {label:9s} {r['tokensPerSecond']:>12,.0f} tokens/s  MFU {mfu}{mem}")
        print(f"{name:10s} speed-up  {row['speedup']:.2f}× (lmforge / reference)")
    if opts.json:
        Path(opts.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
