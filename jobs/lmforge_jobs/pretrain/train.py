"""The PretrainRun job: build → parallelize → resume → loop (LR, micro-steps, clip, step, eval, checkpoint)
→ export. See ``python -m lmforge_jobs.pretrain --help``.

Run with torchrun for several processes (``--nnodes=M --nproc-per-node=N``, c10d rendezvous) or as one
plain process. On SIGTERM/SIGINT every rank finishes its current step, a checkpoint is saved and the job
exits 0; the next start resumes from the newest complete checkpoint in spec.output.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lmforge_jobs.entry import ConfigError
from lmforge_jobs.manifest import Resource
from lmforge_jobs.pretrain import checkpoint as ckpt
from lmforge_jobs.pretrain import export as exp
from lmforge_jobs.pretrain.config import PretrainRunSpec
from lmforge_jobs.pretrain.data import TokenBatches
from lmforge_jobs.pretrain.inputs import load_tokenizer, model_args, resolve_init
from lmforge_jobs.pretrain.metrics import GpuStats, flops_per_token, peak_flops
from lmforge_jobs.pretrain.model import build_model, count_parameters
from lmforge_jobs.pretrain.parallelize import parallelize, uses_autocast
from lmforge_jobs.resolve import expected_outputs
from lmforge_jobs.secrets import read_secret
from lmforge_jobs.shards import ShardError, TokenStream
from lmforge_jobs.telemetry import Telemetry

KIND = "PretrainRun"
MAX_NONFINITE_STEPS = 5
"""Fail after this many optimizer steps in a row with a non-finite loss or gradient ($LMFORGE_MAX_NONFINITE_STEPS)."""


# ------------------------------------------------------------------------------------------ schedules
def lr_multiplier(step: int, total: int, opt: Any) -> float:
    """Learning rate at ``step`` (0-based) as a fraction of optimizer.lr: linear warmup, then the schedule."""
    warm = opt.warmup_steps
    if step < warm:
        return (step + 1) / warm
    lo = opt.min_lr_ratio
    schedule = opt.schedule.value
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay = round(opt.decay_fraction * total)
        if decay <= 0:  # decayFraction 0 (or under one step): warmup-stable only, decayed later
            return 1.0
        start = max(warm, total - decay)
        if step < start:
            return 1.0
        return 1.0 - (1.0 - lo) * min(1.0, (step - start + 1) / max(1, total - start))
    progress = min(1.0, (step - warm) / max(1, total - warm - 1))
    if schedule == "linear":
        return 1.0 - (1.0 - lo) * progress
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))


class NonFiniteGuard:
    """Skip optimizer steps whose loss or gradient norm is NaN/inf; fail after ``limit`` in a row."""

    def __init__(self, limit: int = MAX_NONFINITE_STEPS):
        self.limit = limit
        self.in_a_row = 0
        self.skipped = 0

    def check(self, *values: float) -> bool:
        """True when the step may be applied; raises FloatingPointError after ``limit`` bad steps in a row."""
        if all(math.isfinite(v) for v in values):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        if self.in_a_row >= self.limit:
            raise FloatingPointError(
                f"{self.in_a_row} steps in a row with a non-finite loss or gradient norm; lower optimizer.lr, "
                "raise optimizer.warmupSteps or check the data"
            )
        return False


def total_steps(spec: PretrainRunSpec, parameters: int) -> int:
    budget, per_step = spec.budget, spec.batch.global_tokens
    if budget.steps is not None:
        return int(budget.steps)
    tokens = budget.tokens if budget.tokens is not None else round(budget.tokens_per_parameter * parameters)
    return max(1, -(-int(tokens) // per_step))


# --------------------------------------------------------------------------------------- environment
@dataclass
class World:
    rank: int
    local_rank: int
    size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.size > 1


def setup_world(spec: PretrainRunSpec) -> World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and spec.parallelism.gpus_per_node > 0
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return World(rank, local, size, device)


# ------------------------------------------------------------------------------------------------ job
class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it (agreed across ranks) after each step."""

    def __init__(self) -> None:
        self.set = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        self.set = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run(resource: Resource[Any, Any], args: Any) -> int:
    spec: PretrainRunSpec = resource.spec
    if spec.data is None:
        raise ConfigError("data", "data (tokens, tokenizer) must be given or resolved from corpus")
    check_batch(spec, int(os.environ.get("WORLD_SIZE", "1")))  # before any rendezvous: fail fast
    world = setup_world(spec)
    try:
        return _train(spec, world)
    finally:
        if world.distributed and dist.is_initialized():
            dist.destroy_process_group()


def check_batch(spec: PretrainRunSpec, processes: int) -> int:
    """Gradient-accumulation steps; a ConfigError when the processes cannot split the global batch."""
    per_pass = spec.model.seq_len * spec.batch.micro_batch_size * processes
    if spec.batch.global_tokens % per_pass:
        raise ConfigError(
            "batch.globalTokens",
            f"{spec.batch.global_tokens} is not a multiple of seqLen × microBatchSize × {processes} processes "
            f"= {per_pass}: the GPU (process) count must divide the global batch",
        )
    return spec.batch.global_tokens // per_pass


def _train(spec: PretrainRunSpec, world: World) -> int:
    # spec.output is a local path or a URI (checkpoints and the export go there through fsspec); the
    # progress files of the local runner exist only for a local output
    remote = ckpt.is_remote(str(spec.output))
    output = str(spec.output).rstrip("/")
    local_output = None if remote else Path(output.removeprefix("file://"))
    accum = check_batch(spec, world.size)
    try:
        train_stream = TokenStream(spec.data.tokens)
    except ShardError as exc:
        raise ConfigError("data.tokens", str(exc)) from None
    held_stream = None
    if spec.data.held_out:
        try:
            held_stream = TokenStream(spec.data.held_out)
        except ShardError as exc:
            raise ConfigError("data.heldOut", str(exc)) from None
    tokenizer, tok_file = load_tokenizer(spec.data.tokenizer)
    margs, objective = model_args(spec, tokenizer, tok_file)
    for field, stream in (("data.tokens", train_stream), ("data.heldOut", held_stream)):
        if stream is not None and stream.max_token() >= objective.tokenizer_vocab:
            raise ConfigError(
                field,
                f"token id {stream.max_token()} is outside the tokenizer's {objective.tokenizer_vocab} ids: "
                "the shards were made with a different tokenizer than data.tokenizer",
            )
    init_path = resolve_init(spec)
    if spec.export.push is not None:
        read_secret(spec.export.push.token, "export.push.token")
    mb = spec.batch.micro_batch_size
    try:
        batches = TokenBatches(train_stream, objective, mb, accum, world.rank, world.size, spec.seed)
    except ValueError as exc:
        raise ConfigError("data.tokens", str(exc)) from None
    held = None
    if held_stream is not None:
        try:
            held = TokenBatches(
                held_stream, objective, mb, 1, world.rank, world.size, spec.seed, shuffle=False
            )
        except ValueError as exc:
            raise ConfigError("data.heldOut", str(exc)) from None

    # ---- model: built for one device, then parallelism. FSDP builds the decoder on the meta device and
    # initialises the shards in place (no rank ever holds the whole model); otherwise every rank
    # initialises the full model identically from the seed.
    torch.manual_seed(spec.seed)
    bf16 = spec.precision.value == "bf16"
    strategy = spec.parallelism.strategy.value
    meta_init = (
        strategy == "fsdp"
        and world.size > 1
        and margs.architecture == "decoder"
        and init_path is None
        and not margs.tie_embeddings  # to_empty would give the tied weight two storages
    )
    if meta_init:
        with torch.device("meta"):
            model = build_model(margs)
    else:
        model = build_model(margs)
        model.init_weights(spec.seed)
        if init_path is not None:
            try:
                exp.load_hf_into(model, margs, init_path)
            except ValueError as exc:
                raise ConfigError("model.init", str(exc)) from None
        model.to(world.device)
    parameters = count_parameters(model)
    use_compile = spec.parallelism.compile and os.environ.get("LMFORGE_COMPILE", "1") != "0"
    model = parallelize(
        model,
        strategy=strategy,
        world=world.size,
        device=world.device,
        bf16=bf16,
        compile=use_compile,
        activation_checkpointing=spec.parallelism.activation_checkpointing,
    )
    if meta_init:
        model.to_empty(device=world.device)
        model.init_weights(spec.seed)
    autocast = uses_autocast(strategy, world.size, bf16)
    opt_spec = spec.optimizer
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt_spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=opt_spec.lr,
        betas=(opt_spec.beta1, opt_spec.beta2),
        eps=opt_spec.eps,
        fused=True,  # one kernel per step, no optimizer temporaries (CUDA and CPU)
    )
    total = total_steps(spec, parameters)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, total, opt_spec))
    guard = NonFiniteGuard(int(os.environ.get("LMFORGE_MAX_NONFINITE_STEPS", MAX_NONFINITE_STEPS)))

    # ---- resume
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    checkpoints = ckpt.Checkpointer(
        f"{output}/checkpoints", spec.checkpoint.keep, world.rank, world.distributed
    )
    checkpoints.prepare(exp.tokenizer_files(spec.data.tokenizer))
    meta = {
        "modelArgs": margs.to_dict(),
        "tokenizer": str(exp.tokenizer_json(spec.data.tokenizer).parent),
        "precision": spec.precision.value,
        "worldSize": world.size,
    }
    train_state: dict[str, Any] = {"step": 0, "tokens": 0, "skipped": 0}
    found = ckpt.latest(str(checkpoints.root))

    def state() -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        return {
            "model": model_sd,
            "optimizer": optim_sd,
            "train": train_state,
            "scheduler": scheduler.state_dict(),
        }

    if found is not None:
        theirs = ckpt.read_meta(found[1]).get("modelArgs", {})
        changed = [k for k, v in margs.to_dict().items() if k in theirs and theirs[k] != v]
        if changed:
            raise ConfigError(
                "output",
                f"{output} holds checkpoints of a different model ({', '.join(changed)} differ, "
                f"e.g. {changed[0]} {theirs[changed[0]]} there, {getattr(margs, changed[0])} now); "
                "use a new output to start over",
            )
        st = state()
        checkpoints.load(found[1], st)
        set_state_dict(model, optimizer, model_state_dict=st["model"], optim_state_dict=st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        train_state.update(st["train"])
        guard.skipped = int(train_state.get("skipped", 0))
        if world.rank == 0:
            print(f"resumed from {found[1]} at step {found[0]}", flush=True)
    start = int(train_state["step"])

    tel = Telemetry(
        KIND,
        str(local_output) if world.rank == 0 and local_output else None,
        enabled=world.local_rank == 0,
        total_steps=total,
    )
    gpu = GpuStats(world.device)
    per_token = flops_per_token(margs, parameters)
    peak = peak_flops(world.device)
    if world.rank == 0:
        print(
            f"{margs.architecture} model, {parameters:,} parameters, vocab {margs.vocab_size}; {total} steps × "
            f"{spec.batch.global_tokens} tokens ({accum} accumulation × {world.size} processes); device "
            f"{world.device.type}; {strategy}{' + compile' if use_compile else ''}",
            flush=True,
        )
    tel.update(step=start, total_steps=total, tokens=int(train_state["tokens"]), stage="Training", force=True)

    def to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(world.device, non_blocking=True) for k, v in batch.items()}

    def amp() -> Any:
        return (
            torch.autocast(world.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        )

    def evaluate() -> float | None:
        if held is None:
            return None
        model.eval()
        n = held.held_out_batches(spec.eval.batches)
        total_loss = torch.zeros((), device=world.device, dtype=torch.float64)
        with torch.no_grad(), amp():
            for k in range(n):
                total_loss += model(**to_device(held.held_out(k))).double()
        model.train()
        if world.distributed:
            dist.all_reduce(total_loss)
        return float(total_loss) / (n * world.size)

    def save(step: int) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            checkpoints.save(step, state(), meta)

    no_sync = getattr(model, "no_sync", None)
    set_sync = getattr(model, "set_requires_gradient_sync", None)
    params = [p for p in model.parameters() if p.requires_grad]
    log_every = max(1, int(os.environ.get("LMFORGE_LOG_EVERY", "1")))
    last_time, last_step = time.perf_counter(), start
    step = start
    stopped = False
    eval_loss = None
    mean_loss: float | None = None
    with StopFlag() as stop:
        model.train()
        while step < total:
            loss_sum = torch.zeros((), device=world.device, dtype=torch.float32)
            for micro in range(accum):
                last = micro == accum - 1
                if set_sync is not None:
                    set_sync(last)
                ctx = no_sync() if no_sync is not None and not last else contextlib.nullcontext()
                with ctx, amp():
                    loss = model(**to_device(batches.train(step, micro))) / accum
                loss.backward()
                loss_sum += loss.detach().float()
            norm = torch.nn.utils.clip_grad_norm_(
                params, opt_spec.grad_clip if opt_spec.grad_clip > 0 else float("inf")
            )
            if hasattr(norm, "full_tensor"):
                norm = norm.full_tensor()
            report = torch.stack([loss_sum, torch.tensor(float(stop.set), device=world.device)])
            if world.distributed:
                dist.all_reduce(report)
            mean_loss, stop_votes = float(report[0]) / world.size, float(report[1])
            if guard.check(mean_loss, float(norm)):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            train_state.update(
                step=step, tokens=int(train_state["tokens"]) + spec.batch.global_tokens, skipped=guard.skipped
            )

            metrics: dict[str, float] = {}
            if step % log_every == 0 or step == total:
                if world.device.type == "cuda":
                    torch.cuda.synchronize()
                now = time.perf_counter()
                tps = (step - last_step) * spec.batch.global_tokens / max(now - last_time, 1e-9)
                last_time, last_step = now, step
                metrics = {
                    "loss": mean_loss,
                    "gradNorm": float(norm),
                    "learningRate": scheduler.get_last_lr()[0],
                    "tokensPerSecond": tps,
                    "skippedSteps": guard.skipped,
                    **gpu.read(),
                }
                if peak:
                    metrics["mfu"] = per_token * tps / (peak * world.size)
            if held is not None and (step % spec.eval.every_steps == 0 or step == total):
                eval_loss = evaluate()
                metrics.update(evalLoss=eval_loss, perplexity=math.exp(min(eval_loss, 80.0)))
                # evaluation time is not training throughput: the next window starts after it
                last_time, last_step = time.perf_counter(), step
            if metrics:
                tel.update(step=step, tokens=int(train_state["tokens"]), metrics=metrics, stage="Training")
                if world.rank == 0:
                    shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                    print(f"step {step}/{total} {shown}", flush=True)
            stopping = stop_votes > 0
            if step % spec.checkpoint.every_steps == 0 or step == total or stopping:
                save(step)
                last_time, last_step = time.perf_counter(), step
            if stopping:
                stopped = True
                break

    if stopped:
        tel.update(step=step, stage="Stopped", force=True)
        if world.rank == 0:
            print(
                f"stopped by signal after step {step}; checkpoint saved, resume by running again", flush=True
            )
        return 0

    # ---- export
    outputs = expected_outputs(KIND, str(spec.output))
    if spec.export.huggingface or spec.export.quantize != "none" or spec.export.push is not None:
        tel.update(stage="Exporting", force=True)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if world.rank == 0:
            import tempfile

            staging = Path(tempfile.mkdtemp(prefix="lmforge-export-")) if remote else local_output
            model_dir = staging / "model"
            exp.write_hf(margs, full, spec.data.tokenizer, model_dir)
            if spec.export.quantize == "int8":
                # beside the model (status.outputs has no key for it): <spec.output>/model-int8
                exp.write_int8(model_dir, staging / exp.INT8_DIR)
            if remote:
                exp.upload(model_dir, outputs["model"])
                if spec.export.quantize == "int8":
                    exp.upload(staging / exp.INT8_DIR, f"{output}/{exp.INT8_DIR}")
            if spec.export.push is not None:
                print(f"pushed: {exp.push_to_hub(model_dir, spec.export.push)}", flush=True)
    else:
        outputs.pop("model", None)
        outputs.pop("tokenizer", None)
    if world.distributed:
        dist.barrier()
    final = {"loss": mean_loss} if mean_loss is not None else {}
    if eval_loss is not None:
        final.update(evalLoss=eval_loss, perplexity=math.exp(min(eval_loss, 80.0)))
    tel.update(step=step, tokens=int(train_state["tokens"]), metrics=final, stage="Done", force=True)
    tel.finish(outputs)
    return 0


__all__ = ["MAX_NONFINITE_STEPS", "NonFiniteGuard", "lr_multiplier", "run", "total_steps"]
