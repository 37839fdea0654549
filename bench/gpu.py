"""The GPU check: lmforge's training paths against plain references on one GPU, in one run of < 8 minutes.

    bash bench/gpu.sh                              # on a GPU machine (installs carried wheels, then this)
    python bench/gpu.py --out bench/results/x      # the same without the wrapper
    python bench/gpu.py --smoke --out /tmp/smoke   # CPU, tiny shapes, a few steps: proves the script runs

Each measurement runs in a subprocess of its own with its own time budget (``--deadline`` caps the whole
run): a compile that hangs, a CUDA error or an out-of-memory kills one measurement, never the run. A
measurement past its budget is a row "skipped: time budget"; one that fails is a row with its error text.

Measurements (GPU shapes; ``--smoke`` shrinks every one of them):

* ``pretrain-124m``: the GPT-2-124M shape (12 × 768, SwiGLU 2048 = GPT-2's MLP parameters, tied embeddings,
  vocabulary 50304, seq 1024, micro-batch 16, bf16, torch.compile). *lmforge* is the PretrainRun job's own
  ``Trainer`` (``setup_world`` → ``Trainer``: model build, ``parallelize``, compile, fused AdamW) timing its
  ``train_step``; *transformers* is ``GPT2LMHeadModel`` from config (SDPA, dropout 0), bf16 autocast, torch
  AdamW, on the same batch in the same run.
* ``pretrain-1b``: Llama-3.2-1B's shape (seq 2048, micro-batch 4) against ``LlamaForCausalLM``.
* ``fp8-1b``: the same 1B Trainer with ``precision: fp8`` (torchao float8) against its bf16 run.
* ``fsdp2-124m``: the 124M model wrapped by lmforge's ``apply_fsdp`` (FSDP2) over a one-process group,
  against the plain 124M Trainer (FSDP's overhead with nothing to shard).
* ``sft`` / ``dpo``: ``bench/align.py``'s AlignmentRun settings against TRL's defaults (a ~0.4B Llama).
* ``nvml``: the GPU utilisation the 124M Trainer's Prometheus endpoint serves (``Telemetry`` on a free port).

MFU = training FLOPs per token (the planner's formula) × tokens/s ÷ the device's dense bf16 peak, taken
from :data:`PEAKS` by device-name substring; an unknown device gets no MFU, said so in the output.
Outputs ``gpu.json`` and ``gpu.md`` in ``--out`` (default ``bench/results/gpu-<UTC date>/``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "jobs"))
sys.path.insert(0, str(ROOT / "bench"))

EXIT_NO_GPU = 2
DEFAULT_DEADLINE_S = 470.0
"""The whole run's budget: eight minutes less the wrapper's setup."""

# Dense bf16 peak TFLOP/s by device-name substring, first match wins (more specific names first).
PEAKS: list[tuple[str, str, float]] = [
    ("h100 pcie", "H100 PCIe", 756.0),
    ("h100 nvl", "H100 NVL", 835.0),
    ("h100", "H100 SXM", 989.0),
    ("h200", "H200", 989.0),
    ("gh200", "GH200", 989.0),
    ("a100", "A100", 312.0),
    ("l40s", "L40S", 362.0),
    ("l4", "L4", 121.0),
]

GOALS = {"mfu-124m": 0.45, "mfu-1b": 0.40, "speedup-transformers": 1.3, "speedup-trl": 1.2}

SHAPES: dict[str, dict[str, Any]] = {
    # GPT-2 small: SwiGLU 3·768·2048 has the parameters of GPT-2's 2·768·3072 MLP; tied as GPT-2's
    "124m": dict(
        layers=12, hidden=768, heads=12, kvHeads=12, ffnHidden=2048, vocabSize=50304, seqLen=1024,
        microBatch=16, tie=True,
    ),
    # Llama-3.2-1B's shape, untied (both models then count the same weights)
    "1b": dict(
        layers=16, hidden=2048, heads=32, kvHeads=8, ffnHidden=8192, vocabSize=128256, seqLen=2048,
        microBatch=4, tie=False,
    ),
    "smoke": dict(
        layers=2, hidden=64, heads=4, kvHeads=2, ffnHidden=192, vocabSize=512, seqLen=64, microBatch=4,
        tie=True,
    ),
    "smoke-untied": dict(
        layers=2, hidden=64, heads=4, kvHeads=2, ffnHidden=192, vocabSize=512, seqLen=64, microBatch=4,
        tie=False,
    ),
}  # fmt: skip


# ============================================================================ measurements (subprocess side)
def device_and_settings(smoke: bool) -> tuple[Any, bool, bool]:
    import torch

    if smoke:
        return torch.device("cpu"), False, False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return torch.device("cuda", torch.cuda.current_device()), True, True


def timed_steps(step: Any, opts: argparse.Namespace, started: float, device: Any) -> tuple[float, int]:
    """Seconds per step: ``opts.warmup`` untimed steps (compile happens there), then up to ``opts.steps``
    timed ones, fewer (at least 3) when the measurement's budget is running out."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(opts.warmup):
        step()
    sync()
    begin = time.perf_counter()
    done = 0
    while done < opts.steps:
        step()
        done += 1
        if done >= 3 and time.perf_counter() - started > 0.85 * opts.budget:
            sync()
            break
    sync()
    return (time.perf_counter() - begin) / done, done


def write_token_data(root: Path, tokens: int) -> dict[str, str]:
    """A tokenizer (byte-level BPE, 320 ids, offline) and random-token shards in datatrove's format: the
    speed of a step does not depend on what the tokens say."""
    import numpy as np

    from lmforge_jobs.pretrain.testing import synthetic_texts, train_tokenizer

    train_tokenizer(synthetic_texts(200), 320, root / "tokenizer")
    rng = np.random.default_rng(0)
    shards = root / "tokens"
    shards.mkdir(parents=True, exist_ok=True)
    count = -(-tokens // 1024) * 1024  # documents of 1024 tokens
    rng.integers(0, 320, size=count, dtype=np.uint16).tofile(shards / "00000_bench.ds")
    np.arange(1024, count + 1, 1024, dtype=np.uint64).tofile(shards / "00000_bench.ds.index")
    (shards / "00000_bench.ds.metadata").write_text(f"bench|2\n{count}\n{count}", encoding="utf-8")
    return {"tokens": str(shards), "tokenizer": str(root / "tokenizer")}


def pretrain_spec(
    shape: dict[str, Any], data: dict[str, str], output: Path, precision: str, smoke: bool
) -> Any:
    from lmforge_jobs.pretrain.config import PretrainRunSpec

    return PretrainRunSpec.model_validate(
        {
            "data": data,
            "model": {
                "architecture": "decoder",
                **{k: shape[k] for k in ("layers", "hidden", "heads", "kvHeads", "ffnHidden", "seqLen")},
                "vocabSize": shape["vocabSize"],
                "tieEmbeddings": shape["tie"],
            },
            "budget": {"steps": 1_000_000},  # never reached: the bench calls train_step itself
            "optimizer": {"lr": 1e-4, "warmupSteps": 10},
            "batch": {
                "globalTokens": shape["seqLen"] * shape["microBatch"],
                "microBatchSize": shape["microBatch"],
            },
            "precision": precision,
            "parallelism": {
                "nodes": 1,
                "gpusPerNode": 0 if smoke else 1,
                "strategy": "ddp",
                "compile": not smoke,
            },
            "checkpoint": {"everySteps": 1_000_000, "keep": 1},
            "output": str(output),
        }
    )


def scrape(port: int | None, names: list[str]) -> dict[str, Any]:
    """The values of ``names`` on the Prometheus endpoint at 127.0.0.1:port (None when absent)."""
    import urllib.request

    if port is None:
        return {"error": "the Trainer's telemetry serves no metrics port"}
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values: dict[str, Any] = {name: None for name in names}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in values:
            values[parts[0]] = float(parts[1])
    return {"port": port, "values": values}


def measure_trainer(opts: argparse.Namespace, started: float) -> dict[str, Any]:
    """PretrainRun's own path (as ``lmforge_jobs.pretrain.train.run`` does it) with its train_step timed,
    then one metrics report scraped from the Trainer's Prometheus endpoint."""
    import torch

    from lmforge_jobs.pretrain.parallelize import MeshDims, check_gpu_only
    from lmforge_jobs.pretrain.train import StepResult, Trainer, check_batch, setup_world
    from lmforge_jobs.telemetry import metric_name

    device, _, _ = device_and_settings(opts.smoke)
    shape = SHAPES[opts.shape]
    work = Path(opts.work)
    data = write_token_data(work / "data", max(64 * 1024, 8 * shape["seqLen"] * shape["microBatch"]))
    spec = pretrain_spec(shape, data, work / "run", opts.precision, opts.smoke)
    dims = MeshDims.from_spec(spec.parallelism, 1)
    check_batch(spec, dims.dp)
    world = setup_world(spec)
    check_gpu_only(dims, spec.precision.value, world.device)
    trainer = Trainer(spec, world)
    holder: dict[str, Any] = {}

    def step() -> None:
        holder["result"] = trainer.train_step(stop_requested=False)

    seconds, steps = timed_steps(step, opts, started, world.device)
    result: StepResult = holder["result"]
    trainer.report_metrics(result)
    gauges = [metric_name("PretrainRun", k) for k in ("gpuUtilization", "tokensPerSecond", "gpuMemoryBytes")]
    out = {
        "secondsPerStep": seconds,
        "timedSteps": steps,
        "tokensPerStep": shape["seqLen"] * shape["microBatch"],
        "parameters": trainer.parameters,
        "flopsPerToken": trainer.flops_per_token,
        "loss": result.mean_loss,
        "prometheus": scrape(trainer.telemetry.port, gauges),
    }
    if device.type == "cuda":
        out["peakMemoryGiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def random_batch(shape: dict[str, Any], device: Any) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 320, (shape["microBatch"], shape["seqLen"] + 1), generator=g)
    return t[:, :-1].to(device), t[:, 1:].to(device)


def measure_transformers(opts: argparse.Namespace, started: float) -> dict[str, Any]:
    """A plain transformers loop: the model from config (GPT2LMHeadModel for the tied GPT-2 shape,
    LlamaForCausalLM otherwise), SDPA attention, bf16 autocast, torch AdamW with its defaults."""
    import torch
    import transformers

    device, bf16, _ = device_and_settings(opts.smoke)
    shape = SHAPES[opts.shape]
    torch.manual_seed(0)
    if shape["tie"]:
        config = transformers.GPT2Config(
            vocab_size=shape["vocabSize"], n_positions=shape["seqLen"], n_embd=shape["hidden"],
            n_layer=shape["layers"], n_head=shape["heads"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        with device:  # initialised where it trains (a 1B model's init on the CPU takes many seconds)
            model = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
    else:
        config = transformers.LlamaConfig(
            vocab_size=shape["vocabSize"], hidden_size=shape["hidden"], intermediate_size=shape["ffnHidden"],
            num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
            num_key_value_heads=shape["kvHeads"], max_position_embeddings=shape["seqLen"],
            tie_word_embeddings=False,
        )  # fmt: skip
        with device:
            model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    x, y = random_batch(shape, device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds, steps = timed_steps(step, opts, started, device)
    out = {
        "secondsPerStep": seconds,
        "timedSteps": steps,
        "tokensPerStep": shape["seqLen"] * shape["microBatch"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "model": type(model).__name__,
    }
    if device.type == "cuda":
        out["peakMemoryGiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure_fsdp2(opts: argparse.Namespace, started: float) -> dict[str, Any]:
    """The 124M model through lmforge's build, compile and ``apply_fsdp`` (FSDP2, bf16 MixedPrecisionPolicy,
    no autocast, as the Trainer runs it when sharded) over a one-process group (nccl, gloo on CPU)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lmforge_jobs.pretrain.metrics import flops_per_token
    from lmforge_jobs.pretrain.model import ModelArgs, build_model, count_parameters
    from lmforge_jobs.pretrain.parallelize import apply_compile, apply_fsdp
    from lmforge_jobs.pretrain.train import build_optimizer, plain

    device, bf16, compile_ = device_and_settings(opts.smoke)
    shape = SHAPES[opts.shape]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{free_port()}",
        rank=0,
        world_size=1,
    )
    try:
        spec = pretrain_spec(
            shape, {"tokens": "unused", "tokenizer": "unused"}, Path(opts.work), "bf16", opts.smoke
        )
        args = ModelArgs.from_shape(
            spec.model, shape["vocabSize"], tokenizer_vocab=320, special_ids={"eos": 0, "pad": 0}
        )
        torch.manual_seed(0)
        model = build_model(args)
        model.init_weights(0)
        model.to(device)
        if compile_:
            apply_compile(model)
        apply_fsdp(model, init_device_mesh(device.type, (1,), mesh_dim_names=("dp_shard_cp",)), bf16)
        opt = build_optimizer(model, spec)
        x, y = random_batch(shape, device)

        def step() -> None:
            loss = plain(model(input_ids=x, labels=y))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        seconds, steps = timed_steps(step, opts, started, device)
        out = {
            "secondsPerStep": seconds,
            "timedSteps": steps,
            "tokensPerStep": shape["seqLen"] * shape["microBatch"],
            "parameters": count_parameters(model),
            "flopsPerToken": flops_per_token(args, 0),
        }
        if device.type == "cuda":
            out["peakMemoryGiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        return out
    finally:
        dist.destroy_process_group()


def measure_align(opts: argparse.Namespace, started: float) -> dict[str, Any]:
    """``bench/align.py``'s run_one: one AlignmentRun-configured (lmforge) or default (trl) TRL trainer."""
    import align as align_bench

    method, variant = opts.method.split("/")
    shape = "cpu" if opts.smoke else "gpu"
    work = Path(opts.work)
    # the four SFT/DPO measurements train copies of one base model, written by the first
    shared = work.parent / "align-base"
    if (shared / "config.json").exists():
        base = str(shared)
    else:
        base = align_bench.model_dir(shared, align_bench.SHAPES[shape])
    steps, warmup = min(opts.steps, 12), min(opts.warmup, 3)  # bench/align.py's defaults at most
    args = argparse.Namespace(
        steps=steps + warmup,
        warmup=warmup,
        batch=4 if opts.smoke else 8,
        max_length=64 if opts.smoke else 512,
        examples=64 if opts.smoke else 512,
    )
    result = align_bench.run_one(method, variant, base, args, work)
    return {"tokensPerSecond": result["tokensPerSecond"], **result}


MEASURE = {
    "trainer": measure_trainer,
    "transformers": measure_transformers,
    "fsdp2": measure_fsdp2,
    "align": measure_align,
}


def run_measurement(opts: argparse.Namespace) -> int:
    """The subprocess side: one measurement, its result (or error) as JSON in ``opts.result``."""
    started = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        out = {"ok": True, **MEASURE[opts.measure](opts, started)}
    except BaseException as exc:  # the parent turns it into a row with this text
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    out["wallSeconds"] = time.perf_counter() - started
    Path(opts.result).write_text(json.dumps(out, default=str), encoding="utf-8")
    return 0


# ============================================================================================ the run (parent)
@dataclass
class Measurement:
    name: str
    measure: str
    budget_s: float
    extra: list[str] = field(default_factory=list)
    gpu_only: str | None = None
    """Why the measurement cannot run on the CPU (the smoke run reports this instead)."""


def measurements(smoke: bool) -> list[Measurement]:
    """In priority order: a run short of time loses the last ones."""
    s124, s1b = ("smoke", "smoke-untied") if smoke else ("124m", "1b")
    fp8_cpu = "unsupported on cpu: torchao float8 needs an NVIDIA GPU of compute capability 8.9+"
    return [
        Measurement("pretrain-124m/lmforge", "trainer", 110, ["--shape", s124]),
        Measurement("pretrain-124m/transformers", "transformers", 45, ["--shape", s124]),
        Measurement("pretrain-1b/lmforge", "trainer", 110, ["--shape", s1b]),
        Measurement("pretrain-1b/transformers", "transformers", 60, ["--shape", s1b]),
        Measurement("fsdp2-124m/lmforge", "fsdp2", 70, ["--shape", s124]),
        Measurement("fp8-1b/lmforge", "trainer", 100, ["--shape", s1b, "--precision", "fp8"], fp8_cpu),
        Measurement("sft/lmforge", "align", 60, ["--method", "sft/lmforge"]),
        Measurement("sft/trl", "align", 50, ["--method", "sft/trl"]),
        Measurement("dpo/lmforge", "align", 60, ["--method", "dpo/lmforge"]),
        Measurement("dpo/trl", "align", 60, ["--method", "dpo/trl"]),
    ]


def launch(m: Measurement, opts: argparse.Namespace, budget: float, work: Path) -> dict[str, Any]:
    result = work / f"{m.name.replace('/', '_')}.json"
    log = work / f"{m.name.replace('/', '_')}.log"
    steps, warmup = (3, 1) if opts.smoke else (opts.steps, opts.warmup)
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--measure", m.measure, "--result", str(result),
        "--work", str(work / m.name.replace("/", "_")), "--budget", str(budget),
        "--steps", str(steps), "--warmup", str(warmup), *(["--smoke"] if opts.smoke else []), *m.extra,
    ]  # fmt: skip
    env = dict(os.environ, LMFORGE_METRICS_PORT="0", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if opts.peak_tflops:
        env["LMFORGE_PEAK_TFLOPS"] = str(opts.peak_tflops)
    env.pop("LMFORGE_TERMINATION_LOG", None)
    env.pop("LMFORGE_RUN_DIR", None)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    begin = time.perf_counter()
    with log.open("w") as out:
        # a session of its own so a timeout kills the compile workers too
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            return {"ok": False, "skipped": "skipped: time budget", "budgetSeconds": round(budget, 1)}
    wall = time.perf_counter() - begin
    if result.exists():
        return {**json.loads(result.read_text(encoding="utf-8")), "processSeconds": wall}
    tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
    return {"ok": False, "error": f"exit {proc.returncode}: " + " | ".join(tail)}


def device_info(smoke: bool, peak_override: float | None) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "host": socket.gethostname(),
    }
    if smoke:
        info.update(device="cpu", peakTflops=None, peakSource="unknown peak, MFU not computed (cpu)")
        return info
    name = torch.cuda.get_device_name(torch.cuda.current_device())
    info["device"] = name
    info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    if peak_override:
        info.update(peakTflops=peak_override, peakSource="--peak-tflops")
        return info
    for key, label, tflops in PEAKS:
        if key in name.lower():
            info.update(peakTflops=tflops, peakSource=f"table: {label} dense bf16")
            return info
    info.update(peakTflops=None, peakSource=f"unknown peak, MFU not computed ({name} is not in the table)")
    return info


# ------------------------------------------------------------------------------------------ rows
def tokens_per_second(r: dict[str, Any]) -> float | None:
    if not r.get("ok"):
        return None
    if "tokensPerSecond" in r:
        return float(r["tokensPerSecond"])
    return r["tokensPerStep"] / r["secondsPerStep"]


def why(r: dict[str, Any]) -> str:
    return r.get("skipped") or r.get("unsupported") or r.get("error") or "no result"


def row(name: str, what: str, **kw: Any) -> dict[str, Any]:
    out = {"name": name, "what": what, "value": None, "unit": "", "goal": None, "met": None, "reason": None}
    out.update(kw)
    return out


def throughput_row(name: str, what: str, r: dict[str, Any], flops: float | None, peak: float | None,
                   goal: float | None) -> dict[str, Any]:  # fmt: skip
    tps = tokens_per_second(r)
    if tps is None:
        return row(name, what, reason=why(r), goal=f"MFU ≥ {goal:.0%}" if goal else None)
    mfu = flops * tps / (peak * 1e12) if flops and peak else None
    out = row(name, what, value=round(tps, 1), unit="tokens/s", mfu=mfu, peakMemoryGiB=r.get("peakMemoryGiB"))
    if goal is not None:
        out["goal"] = f"MFU ≥ {goal:.0%}"
        out["met"] = None if mfu is None else mfu >= goal
        if mfu is None:
            out["reason"] = "unknown peak, MFU not computed"
    return out


def ratio_row(
    name: str, what: str, ours: dict[str, Any], ref: dict[str, Any], goal: float | None
) -> dict[str, Any]:
    a, b = tokens_per_second(ours), tokens_per_second(ref)
    g = f"≥ {goal}×" if goal else None
    if a is None or b is None:
        missing = why(ours) if a is None else why(ref)
        return row(name, what, goal=g, reason=missing)
    ratio = a / b
    return row(
        name, what, value=round(ratio, 3), unit="×", goal=g, met=None if goal is None else ratio >= goal
    )


def shape_text(name: str) -> str:
    s = SHAPES[name]
    return f"{s['layers']}×{s['hidden']}, vocab {s['vocabSize']}, seq {s['seqLen']}, micro-batch {s['microBatch']}"


def build_rows(res: dict[str, dict[str, Any]], info: dict[str, Any], smoke: bool) -> list[dict[str, Any]]:
    peak = info.get("peakTflops")
    s124, s1b = ("smoke", "smoke-untied") if smoke else ("124m", "1b")
    mode = "fp32, eager (smoke)" if smoke else "bf16, compile"
    flops_124 = res["pretrain-124m/lmforge"].get("flopsPerToken") or res["fsdp2-124m/lmforge"].get(
        "flopsPerToken"
    )
    flops_1b = res["pretrain-1b/lmforge"].get("flopsPerToken") or res["fp8-1b/lmforge"].get("flopsPerToken")
    made: list[tuple[str, str, Any]] = [
        ("pretrain-124m/lmforge", "", lambda: throughput_row("pretrain-124m/lmforge",
            f"PretrainRun Trainer, GPT-2-124M shape ({shape_text(s124)}), {mode}",
            res["pretrain-124m/lmforge"], flops_124, peak, GOALS["mfu-124m"])),
        ("pretrain-124m/transformers", "", lambda: throughput_row("pretrain-124m/transformers",
            "GPT2LMHeadModel loop, same shape and batch", res["pretrain-124m/transformers"], flops_124, peak, None)),
        ("pretrain-124m/ratio", "", lambda: ratio_row("pretrain-124m/ratio", "lmforge ÷ transformers tokens/s at 124M",
            res["pretrain-124m/lmforge"], res["pretrain-124m/transformers"], GOALS["speedup-transformers"])),
        ("pretrain-1b/lmforge", "", lambda: throughput_row("pretrain-1b/lmforge",
            f"PretrainRun Trainer, Llama-1B shape ({shape_text(s1b)}), {mode}",
            res["pretrain-1b/lmforge"], flops_1b, peak, GOALS["mfu-1b"])),
        ("pretrain-1b/transformers", "", lambda: throughput_row("pretrain-1b/transformers",
            "LlamaForCausalLM loop, same shape and batch", res["pretrain-1b/transformers"], flops_1b, peak, None)),
        ("pretrain-1b/ratio", "", lambda: ratio_row("pretrain-1b/ratio", "lmforge ÷ transformers tokens/s at 1B",
            res["pretrain-1b/lmforge"], res["pretrain-1b/transformers"], GOALS["speedup-transformers"])),
        ("fp8-1b/ratio", "", lambda: ratio_row("fp8-1b/ratio", "precision fp8 (torchao float8) ÷ bf16, the 1B Trainer",
            res["fp8-1b/lmforge"], res["pretrain-1b/lmforge"], None)),
        ("fsdp2-124m/ratio", "", lambda: ratio_row("fsdp2-124m/ratio",
            "FSDP2 (apply_fsdp, world size 1) ÷ plain Trainer at 124M",
            res["fsdp2-124m/lmforge"], res["pretrain-124m/lmforge"], None)),
        ("sft/ratio", "", lambda: ratio_row("sft/ratio", "SFT tokens/s: AlignmentRun settings ÷ TRL defaults",
            res["sft/lmforge"], res["sft/trl"], GOALS["speedup-trl"])),
        ("dpo/ratio", "", lambda: ratio_row("dpo/ratio", "DPO tokens/s: AlignmentRun settings ÷ TRL defaults",
            res["dpo/lmforge"], res["dpo/trl"], GOALS["speedup-trl"])),
        ("nvml", "GPU utilisation on the 124M Trainer's Prometheus endpoint (NVML)",
            lambda: nvml_row(res["pretrain-124m/lmforge"], smoke)),
    ]  # fmt: skip
    rows = []
    for name, what, make in made:
        try:
            rows.append(make())
        except Exception as exc:  # a bug in the report must not lose the other rows
            rows.append(row(name, what, reason=f"report error: {type(exc).__name__}: {exc}"))
    if res["fp8-1b/lmforge"].get("ok") and rows[6]["name"] == "fp8-1b/ratio":
        rows[6]["peakMemoryGiB"] = res["fp8-1b/lmforge"].get("peakMemoryGiB")
    if smoke:  # tiny CPU shapes say nothing about the GPU goals
        for r in rows:
            if r["goal"] and r["met"] is not None:
                r["met"], r["reason"] = None, "smoke: the goal is judged on a GPU only"
            elif r["goal"] and r["reason"] == "unknown peak, MFU not computed":
                r["reason"] = "smoke: unknown peak on cpu, MFU not computed"
    return rows


def nvml_row(trainer: dict[str, Any], smoke: bool) -> dict[str, Any]:
    from lmforge_jobs.telemetry import metric_name

    name, what = "nvml", "GPU utilisation on the 124M Trainer's Prometheus endpoint (NVML)"
    goal = "> 0"
    if not trainer.get("ok"):
        return row(name, what, goal=goal, reason=f"needs pretrain-124m/lmforge: {why(trainer)}")
    prom = trainer.get("prometheus") or {}
    if "error" in prom:
        return row(name, what, goal=goal, reason=prom["error"])
    values = prom.get("values", {})
    util = values.get(metric_name("PretrainRun", "gpuUtilization"))
    served = values.get(metric_name("PretrainRun", "tokensPerSecond"))
    if smoke:
        return row(
            name, what, goal=goal, scraped=served is not None,
            reason="unsupported on cpu: NVML needs a GPU (the endpoint answered"
            + (f", tokens/s {served:.0f})" if served is not None else " without tokens/s)"),
        )  # fmt: skip
    if util is None:
        return row(
            name, what, goal=goal, reason="no GPU utilisation on the endpoint (nvidia-ml-py missing or MIG?)"
        )
    return row(name, what, value=util, unit="ratio", goal=goal, met=util > 0)


def markdown(report: dict[str, Any]) -> str:
    info = report["environment"]
    lines = [
        f"# GPU check {report['date']}{' (smoke, cpu)' if report['smoke'] else ''}",
        "",
        f"Device: {info['device']}; torch {info['torch']}, CUDA {info['cuda']}; "
        f"peak for MFU: {info['peakTflops'] or '—'} TFLOP/s ({info['peakSource']}). "
        f"Wall time {report['wallSeconds']:.0f} s.",
        "",
        "| row | what | value | MFU | goal | met | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        value = "—" if r["value"] is None else f"{r['value']:,.3g} {r['unit']}".strip()
        if r["unit"] == "tokens/s" and r["value"] is not None:
            value = f"{r['value']:,.0f} tokens/s"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "—"
        met = {True: "met", False: "not met", None: "—"}[r["met"]]
        lines.append(
            f"| {r['name']} | {r['what']} | {value} | {mfu} | {r['goal'] or '—'} | {met} | "
            f"{(r['reason'] or '').replace('|', '/')[:200]} |"
        )
    return "\n".join(lines) + "\n"


def run_all(opts: argparse.Namespace) -> int:
    import torch

    if not opts.smoke and not torch.cuda.is_available():
        print(
            "error: no CUDA GPU visible to torch (torch.cuda.is_available() is False); this check needs one GPU. "
            "Use --smoke for the CPU run.",
            file=sys.stderr,
        )
        return EXIT_NO_GPU
    started = time.perf_counter()
    out_dir = Path(opts.out or ROOT / "bench" / "results" / f"gpu-{datetime.now(timezone.utc):%Y-%m-%d}")
    out_dir.mkdir(parents=True, exist_ok=True)
    info = device_info(opts.smoke, opts.peak_tflops)
    print(
        f"device {info['device']}, torch {info['torch']}, CUDA {info['cuda']}; {info['peakSource']}",
        flush=True,
    )
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="lmforge-gpu-bench-") as tmp:
        for m in measurements(opts.smoke):
            left = opts.deadline - (time.perf_counter() - started)
            if opts.smoke and m.gpu_only:
                results[m.name] = {"ok": False, "unsupported": m.gpu_only}
            elif left < 5:
                results[m.name] = {"ok": False, "skipped": "skipped: time budget (the run's deadline)"}
            else:
                try:
                    results[m.name] = launch(m, opts, min(m.budget_s * opts.budget_scale, left), Path(tmp))
                except Exception as exc:  # the launch itself broke: the row says how, the rest go on
                    results[m.name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            r = results[m.name]
            shown = f"{tokens_per_second(r):,.0f} tokens/s" if r.get("ok") else why(r)
            print(f"{m.name:28s} {shown}", flush=True)
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "smoke": opts.smoke,
        "environment": info,
        "goals": GOALS,
        "deadlineSeconds": opts.deadline,
        "wallSeconds": time.perf_counter() - started,
        "rows": build_rows(results, info, opts.smoke),
        "measurements": {k: {n: v for n, v in r.items() if n != "traceback"} for k, r in results.items()},
        "tracebacks": {k: r["traceback"] for k, r in results.items() if "traceback" in r},
    }
    (out_dir / "gpu.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    (out_dir / "gpu.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    print(f"wrote {out_dir / 'gpu.json'} and {out_dir / 'gpu.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, a few steps")
    parser.add_argument("--out", default=None, help="output directory (default bench/results/gpu-<date>/)")
    parser.add_argument(
        "--deadline", type=float, default=DEFAULT_DEADLINE_S, help="seconds for the whole run"
    )
    parser.add_argument(
        "--budget-scale", type=float, default=None, help="multiply every measurement's budget (smoke: 4)"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement (at most)")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps first (compile happens there)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU, over the table")
    # the subprocess side (one measurement)
    parser.add_argument("--measure", choices=sorted(MEASURE), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, default=60.0, help=argparse.SUPPRESS)
    parser.add_argument("--shape", default="124m", choices=sorted(SHAPES), help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="bf16", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="sft/lmforge", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.smoke and opts.precision == "bf16" and opts.measure == "trainer":
        opts.precision = "fp32"  # bf16 autocast on a CPU measures the CPU's bf16 support, not lmforge
    if opts.measure:
        return run_measurement(opts)
    if opts.budget_scale is None:  # a loaded CI machine is slower than a GPU at the tiny shapes
        opts.budget_scale = 4.0 if opts.smoke else 1.0
    if opts.smoke and opts.deadline == DEFAULT_DEADLINE_S:
        opts.deadline = 4 * DEFAULT_DEADLINE_S
    return run_all(opts)


if __name__ == "__main__":
    sys.exit(main())
