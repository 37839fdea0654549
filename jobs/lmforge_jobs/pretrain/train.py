"""The PretrainRun job: ``run`` builds a ``Trainer`` (inputs → model → parallelism → optimizer → resume)
and ``Trainer.train`` loops ``train_step`` (micro-steps of ``forward_backward_step``, clip, step, LR) with
metrics, evaluation and checkpoints between steps, then exports. See ``python -m lmforge_jobs.pretrain
--help``.

Run with torchrun for several processes (``--nnodes=M --nproc-per-node=N``, c10d rendezvous) or as one
plain process. On SIGTERM/SIGINT every rank finishes its current step, a checkpoint is saved and the job
exits 143 (``EXIT_STOPPED``: not finished, never success); the next start resumes from the newest complete
checkpoint in spec.output.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lmforge_jobs.entry import ConfigError
from lmforge_jobs.launch import StopFlag, record_exit
from lmforge_jobs.manifest import Resource
from lmforge_jobs.pretrain import checkpoint as ckpt
from lmforge_jobs.pretrain import export as exp
from lmforge_jobs.pretrain.config import PretrainRunSpec
from lmforge_jobs.pretrain.inputs import Inputs, build_inputs
from lmforge_jobs.pretrain.metrics import GpuStats, ThroughputWindow, flops_per_token, peak_flops, perplexity
from lmforge_jobs.pretrain.model import build_model, count_parameters, next_token_loss
from lmforge_jobs.pretrain.parallelize import (
    MeshDims,
    apply_fp8,
    check_gpu_only,
    cp_context,
    loss_context,
    parallelize,
)
from lmforge_jobs.resolve import expected_outputs
from lmforge_jobs.spec import EXIT_STOPPED
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


def plain(loss: torch.Tensor) -> torch.Tensor:
    """The loss as a plain tensor: a loss-parallel cross-entropy gives a replicated DTensor."""
    return loss.full_tensor() if hasattr(loss, "full_tensor") else loss


def check_batch(spec: PretrainRunSpec, processes: int) -> int:
    """Gradient-accumulation steps; a ConfigError when the data-parallel ``processes`` (those that read
    different data: all of them but the tensor-, pipeline- and context-parallel groups) cannot split the
    global batch."""
    per_pass = spec.model.seq_len * spec.batch.micro_batch_size * processes
    if spec.batch.global_tokens % per_pass:
        raise ConfigError(
            "batch.globalTokens",
            f"{spec.batch.global_tokens} is not a multiple of seqLen × microBatchSize × {processes} data-parallel "
            f"processes = {per_pass}: the data-parallel process count must divide the global batch",
        )
    return spec.batch.global_tokens // per_pass


# ------------------------------------------------------------------------------------------------ job
def run(resource: Resource[Any, Any], args: Any) -> int:
    spec: PretrainRunSpec = resource.spec
    if spec.data is None:
        raise ConfigError("data", "data (tokens, tokenizer) must be given or resolved from corpus")
    dims = MeshDims.from_spec(spec.parallelism, int(os.environ.get("WORLD_SIZE", "1")))
    check_batch(spec, dims.dp)  # before any rendezvous: fail fast
    world = setup_world(spec)
    check_gpu_only(dims, spec.precision.value, world.device, spec.parallelism.async_tensor_parallel)
    try:
        return Trainer(spec, world).train()
    finally:
        if world.distributed and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class TrainState:
    """Where training is, saved in every checkpoint (as "train") beside model, optimizer and scheduler:
    the optimizer steps taken (which is also the position in the data: batches are indexed by step), the
    tokens trained on and the steps skipped by the non-finite guard."""

    step: int = 0
    tokens: int = 0
    skipped: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "skipped": self.skipped}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.step = int(saved["step"])
        self.tokens = int(saved["tokens"])
        self.skipped = int(saved.get("skipped", 0))


@dataclass
class StepResult:
    mean_loss: float
    """The step's loss, averaged over micro-batches and processes."""
    grad_norm: float
    stop_agreed: bool
    """Some rank got SIGTERM/SIGINT: every rank saves this step and stops."""


class Trainer:
    """One PretrainRun on this process: the model, optimizer, LR schedule, data and checkpoints, built and
    resumed by the constructor; ``train`` runs the remaining steps and the export."""

    def __init__(self, spec: PretrainRunSpec, world: World):
        self.spec, self.world = spec, world
        # spec.output is a local path or a URI (checkpoints and the export go there through fsspec); the
        # progress files of the local runner exist only for a local output
        self.output = str(spec.output).rstrip("/")
        self.remote_output = ckpt.is_remote(str(spec.output))
        self.local_output = None if self.remote_output else Path(self.output.removeprefix("file://"))
        self.dims = MeshDims.from_spec(spec.parallelism, world.size)
        self.accumulation = check_batch(spec, self.dims.dp)
        # ranks that compute a loss (the last pipeline stage's); tensor-parallel ranks hold the same one
        self.loss_ranks = world.size // self.dims.pp
        inputs = build_inputs(spec, self.dims.dp_rank(world.rank), self.dims.dp, self.accumulation)
        self.model_args = inputs.model_args
        self.train_batches, self.eval_batches = inputs.train_batches, inputs.held_out_batches

        self.strategy = spec.parallelism.strategy.value
        self.compile = spec.parallelism.compile and os.environ.get("LMFORGE_COMPILE", "1") != "0"
        self.model, self.parameters = self.build_parallel_model(inputs)
        self.optimizer = build_optimizer(self.model, spec)
        self.total_steps = total_steps(spec, self.parameters)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_multiplier(step, self.total_steps, spec.optimizer)
        )
        self.guard = NonFiniteGuard(int(os.environ.get("LMFORGE_MAX_NONFINITE_STEPS", MAX_NONFINITE_STEPS)))
        self.state = TrainState()

        self.checkpoints = ckpt.Checkpointer(
            f"{self.output}/checkpoints", spec.checkpoint.keep, world.rank, world.distributed
        )
        self.checkpoints.prepare(exp.tokenizer_files(spec.data.tokenizer))
        self.checkpoint_meta = {
            "modelArgs": self.model_args.to_dict(),
            "tokenizer": str(exp.tokenizer_json(spec.data.tokenizer).parent),
            "precision": spec.precision.value,
            "worldSize": world.size,
            "mesh": self.dims.sizes,
        }
        self.resume()

        self.telemetry = Telemetry(
            KIND,
            str(self.local_output) if world.rank == 0 and self.local_output else None,
            enabled=world.local_rank == 0,
            total_steps=self.total_steps,
        )
        self.gpu_stats = GpuStats(world.device)
        self.flops_per_token = flops_per_token(self.model_args, self.parameters)
        self.peak_flops = peak_flops(world.device)
        self.log_every = max(1, int(os.environ.get("LMFORGE_LOG_EVERY", "1")))
        self.last_loss: float | None = None
        self.last_eval_loss: float | None = None
        # the data-parallel wrapper's switch for gradient synchronisation (DDP: no_sync, FSDP2:
        # set_requires_gradient_sync), used to synchronise only on the last micro-batch
        self.no_sync = getattr(self.model, "no_sync", None)
        self.set_gradient_sync = getattr(self.model, "set_requires_gradient_sync", None)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.announce()
        self.throughput = ThroughputWindow(self.state.step, spec.batch.global_tokens)

    # ---------------------------------------------------------------------------------------- the loop
    def train(self) -> int:
        """Train the remaining steps: 0 when done, EXIT_STOPPED when stopped by a signal (checkpoint saved)."""
        stopped = False
        with StopFlag() as stop:
            self.model.train()
            while self.state.step < self.total_steps and not stopped:
                result = self.train_step(stop_requested=stop.set)
                self.report_metrics(result)
                stopped = result.stop_agreed
                if stopped or self.checkpoint_due():
                    self.save_checkpoint()
        if stopped:
            self.report_stopped()
            record_exit(EXIT_STOPPED)  # under torchrun, the launcher keeps it as the pod's exit code
            return EXIT_STOPPED
        self.export_and_finish()
        return 0

    def train_step(self, stop_requested: bool) -> StepResult:
        """One optimizer step over ``accumulation`` micro-batches; skipped when the loss or gradient norm is
        not finite. One all-reduce agrees on the mean loss and on whether to stop."""
        loss_sum = torch.zeros((), device=self.world.device, dtype=torch.float32)
        for micro in range(self.accumulation):
            loss_sum += self.forward_backward_step(micro)
        grad_norm = self.clip_gradients()
        report = torch.stack([loss_sum, torch.tensor(float(stop_requested), device=self.world.device)])
        if self.world.distributed:
            dist.all_reduce(report)
        mean_loss, stop_votes = float(report[0]) / self.loss_ranks, float(report[1])
        if self.guard.check(mean_loss, float(grad_norm)):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.step += 1
        self.state.tokens += self.spec.batch.global_tokens
        self.state.skipped = self.guard.skipped
        self.last_loss = mean_loss
        return StepResult(mean_loss, float(grad_norm), stop_votes > 0)

    def clip_gradients(self) -> torch.Tensor:
        """Clip the global gradient norm to optimizer.gradClip (0: only measure it); the norm before."""
        grad_clip = self.spec.optimizer.grad_clip
        max_norm = grad_clip if grad_clip > 0 else float("inf")
        if self.pipeline is None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
            return plain(grad_norm)  # a DTensor under FSDP2 and tensor parallel
        # each pipeline rank holds some of the parameters: the norm is summed over the stages
        grads = [p.grad for p in self.trainable if p.grad is not None]
        norm = (
            plain(torch.nn.utils.get_total_norm(grads))
            if grads
            else torch.zeros((), device=self.world.device)
        )
        squared = norm.float() ** 2
        dist.all_reduce(squared, group=self.pipeline.pp_group)
        total = squared.sqrt()
        torch.nn.utils.clip_grads_with_norm_(self.trainable, max_norm, total)
        return total

    def forward_backward_step(self, micro: int) -> torch.Tensor:
        """Forward and backward of one micro-batch of the current step; gradients are synchronised across
        ranks only on the last one. Returns its share of the step's loss."""
        if self.pipeline is not None:
            return self.pipeline_step(micro)
        last = micro == self.accumulation - 1
        if self.set_gradient_sync is not None:
            self.set_gradient_sync(last)
        skip_sync = self.no_sync() if self.no_sync is not None and not last else contextlib.nullcontext()
        batch = self.to_device(self.train_batches.train(self.state.step, micro))
        with skip_sync, cp_context(self.mesh, self.dims, self.model, batch), loss_context(self.loss_parallel):
            with self.autocast_context():
                loss = self.model(**batch) / self.accumulation
            loss.backward()
        return plain(loss.detach().float())

    def pipeline_step(self, micro: int) -> torch.Tensor:
        """One micro-batch through the pipeline schedule, cut into parallelism.microBatches pieces (the
        schedule runs the forwards and backwards); its loss on the last stage, zero elsewhere."""
        batch = self.to_device(self.train_batches.train(self.state.step, micro))
        return self.run_pipeline(batch, train=True)

    def run_pipeline(self, batch: dict[str, torch.Tensor], train: bool) -> torch.Tensor:
        assert self.pipeline is not None
        losses: list[torch.Tensor] = []
        inputs = (batch["input_ids"],) if self.pipeline.first else ()
        target = batch["labels"] if self.pipeline.last else None
        with loss_context(self.loss_parallel), self.autocast_context():
            if train:
                self.pipeline.schedule.step(*inputs, target=target, losses=losses)
            else:
                self.pipeline.schedule.eval(*inputs, target=target, losses=losses)
        if not losses:
            return torch.zeros((), device=self.world.device)
        return plain(torch.stack([plain(loss) for loss in losses]).sum().detach().float())

    def pipeline_loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The last stage's loss of one pipeline piece, as its share of the step's loss (the pieces and
        micro-steps of a step sum to its mean loss)."""
        pieces = self.spec.parallelism.pipeline_micro_batches
        return next_token_loss(output, labels) / (self.accumulation * pieces)

    # ------------------------------------------------------------------------------ metrics and eval
    def report_metrics(self, result: StepResult) -> None:
        """Training metrics every $LMFORGE_LOG_EVERY steps and the held-out loss every eval.everySteps (both
        at the last step), to telemetry and, on rank 0, as a ``step N/T name value …`` line."""
        step = self.state.step
        metrics: dict[str, float] = {}
        if step % self.log_every == 0 or step == self.total_steps:
            metrics = self.training_metrics(result)
        if self.eval_batches is not None and (
            step % self.spec.eval.every_steps == 0 or step == self.total_steps
        ):
            self.last_eval_loss = self.evaluate()
            metrics.update(evalLoss=self.last_eval_loss, perplexity=perplexity(self.last_eval_loss))
            self.throughput.restart(step)  # evaluation time is not training throughput
        if metrics:
            self.telemetry.update(step=step, tokens=self.state.tokens, metrics=metrics, stage="Training")
            if self.world.rank == 0:
                shown = " ".join(f"{name} {value:.4g}" for name, value in metrics.items())
                print(f"step {step}/{self.total_steps} {shown}", flush=True)

    def training_metrics(self, result: StepResult) -> dict[str, float]:
        if self.world.device.type == "cuda":
            torch.cuda.synchronize()
        tokens_per_second = self.throughput.close(self.state.step)
        metrics = {
            "loss": result.mean_loss,
            "gradNorm": result.grad_norm,
            "learningRate": self.scheduler.get_last_lr()[0],
            "tokensPerSecond": tokens_per_second,
            "skippedSteps": self.guard.skipped,
            **self.gpu_stats.read(),
        }
        if self.peak_flops:
            metrics["mfu"] = self.flops_per_token * tokens_per_second / (self.peak_flops * self.world.size)
        return metrics

    def evaluate(self) -> float:
        """Mean loss over eval.batches held-out batches on every rank (the same batches at every eval)."""
        assert self.eval_batches is not None
        self.model.eval()
        batches = self.eval_batches.held_out_batches(self.spec.eval.batches)
        loss_sum = torch.zeros((), device=self.world.device, dtype=torch.float64)
        with torch.no_grad():
            for index in range(batches):
                batch = self.to_device(self.eval_batches.held_out(index))
                if self.pipeline is not None:  # the schedule's loss is divided by the accumulation steps
                    loss_sum += self.run_pipeline(batch, train=False).double() * self.accumulation
                    continue
                with loss_context(self.loss_parallel), self.autocast_context():
                    loss_sum += plain(self.model(**batch)).double()
        self.model.train()
        if self.world.distributed:
            dist.all_reduce(loss_sum)
        return float(loss_sum) / (batches * self.loss_ranks)

    # --------------------------------------------------------------------------------------- checkpoints
    def checkpoint_due(self) -> bool:
        step = self.state.step
        return step % self.spec.checkpoint.every_steps == 0 or step == self.total_steps

    def checkpoint_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return {
            "model": model_state,
            "optimizer": optimizer_state,
            "train": self.state.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def save_checkpoint(self) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            self.checkpoints.save(self.state.step, self.checkpoint_state(), self.checkpoint_meta)
        self.telemetry.saved()
        self.throughput.restart(self.state.step)  # saving is not training time either

    def resume(self) -> None:
        """Load the newest complete checkpoint in spec.output, if any (a ConfigError when it holds another
        model): weights, optimizer, LR schedule, step, tokens and skipped steps, and this rank's RNGs."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        found = ckpt.latest(str(self.checkpoints.root))
        if found is None:
            return
        found_step, found_dir = found
        theirs = ckpt.read_meta(found_dir).get("modelArgs", {})
        ours = self.model_args.to_dict()
        changed = [key for key, value in ours.items() if key in theirs and theirs[key] != value]
        if changed:
            raise ConfigError(
                "output",
                f"{self.output} holds checkpoints of a different model ({', '.join(changed)} differ, "
                f"e.g. {changed[0]} {theirs[changed[0]]} there, {getattr(self.model_args, changed[0])} now); "
                "use a new output to start over",
            )
        saved = self.checkpoint_state()
        self.checkpoints.load(found_dir, saved)
        set_state_dict(
            self.model, self.optimizer, model_state_dict=saved["model"], optim_state_dict=saved["optimizer"]
        )
        self.scheduler.load_state_dict(saved["scheduler"])
        self.state.load_state_dict(saved["train"])
        self.guard.skipped = self.state.skipped
        if self.world.rank == 0:
            print(f"resumed from {found_dir} at step {found_step}", flush=True)

    # -------------------------------------------------------------------------------- start and end
    def announce(self) -> None:
        if self.world.rank == 0:
            args = self.model_args
            print(
                f"{args.architecture} model, {self.parameters:,} parameters, vocab {args.vocab_size}; "
                f"{self.total_steps} steps × {self.spec.batch.global_tokens} tokens ({self.accumulation} "
                f"accumulation × {self.world.size} processes); device {self.world.device.type}; "
                f"{self.strategy} ({self.dims.describe()}){' + compile' if self.compile else ''}",
                flush=True,
            )
        self.telemetry.update(
            step=self.state.step,
            total_steps=self.total_steps,
            tokens=self.state.tokens,
            stage="Training",
            force=True,
        )

    def report_stopped(self) -> None:
        self.telemetry.update(step=self.state.step, stage="Stopped", force=True)
        if self.world.rank == 0:
            print(
                f"stopped by signal after step {self.state.step}; checkpoint saved, resume by running again",
                flush=True,
            )

    def export_and_finish(self) -> None:
        """Export (Hugging Face, int8, hub push) when the spec asks for it, then report the final metrics
        and the outputs."""
        outputs = expected_outputs(KIND, str(self.spec.output))
        export = self.spec.export
        if export.huggingface or export.quantize != "none" or export.push is not None:
            self.telemetry.update(stage="Exporting", force=True)
            self.export(outputs["model"])
        else:
            outputs.pop("model", None)
            outputs.pop("tokenizer", None)
        if self.world.distributed:
            dist.barrier()
        final = {"loss": self.last_loss} if self.last_loss is not None else {}
        if self.last_eval_loss is not None:
            final.update(evalLoss=self.last_eval_loss, perplexity=perplexity(self.last_eval_loss))
        self.telemetry.update(
            step=self.state.step, tokens=self.state.tokens, metrics=final, stage="Done", force=True
        )
        self.telemetry.finish(outputs)

    def export(self, model_uri: str) -> None:
        """Gather the full weights (every rank takes part) and write them on rank 0 as a Hugging Face model
        in <output>/model (uploaded when the output is remote), its int8 copy beside it, and push it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        pipelined = self.pipeline is not None
        # cpu_offload keeps the gathered weights on rank 0 only; under pipeline parallel every rank keeps
        # its stages' and sends them to rank 0
        full = get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=not pipelined)
        )
        if pipelined:  # each pipeline rank holds some blocks: rank 0 gathers them all
            full = {name: tensor.cpu() for name, tensor in full.items()}
            parts: list[Any] | None = [None] * self.world.size if self.world.rank == 0 else None
            dist.gather_object(full, parts, dst=0)
            full = {name: tensor for part in parts or [] for name, tensor in part.items()}
        if self.world.rank != 0:
            return
        import tempfile

        spec = self.spec
        staging = (
            Path(tempfile.mkdtemp(prefix="lmforge-export-")) if self.remote_output else self.local_output
        )
        assert staging is not None
        model_dir = staging / "model"
        exp.write_hf(self.model_args, full, spec.data.tokenizer, model_dir)
        if spec.export.quantize == "int8":
            # beside the model (status.outputs has no key for it): <spec.output>/model-int8
            exp.write_int8(model_dir, staging / exp.INT8_DIR)
        if self.remote_output:
            exp.upload(model_dir, model_uri)
            if spec.export.quantize == "int8":
                exp.upload(staging / exp.INT8_DIR, f"{self.output}/{exp.INT8_DIR}")
        if spec.export.push is not None:
            print(f"pushed: {exp.push_to_hub(model_dir, spec.export.push)}", flush=True)

    # ------------------------------------------------------------------------------------------ building
    def build_parallel_model(self, inputs: Inputs) -> tuple[torch.nn.Module, int]:
        """The model on this rank's device with its parallelism, and its parameter count. FSDP builds the
        decoder on the meta device and initialises the shards in place (no rank ever holds the whole
        model); otherwise every rank initialises the full model identically from the seed."""
        spec, world, args = self.spec, self.world, inputs.model_args
        torch.manual_seed(spec.seed)
        meta_init = (
            self.strategy == "fsdp"
            and world.size > 1
            and args.architecture == "decoder"
            and inputs.init_path is None
            and not args.tie_embeddings  # to_empty would give the tied weight two storages
        )
        if meta_init:
            with torch.device("meta"):
                model = build_model(args)
        else:
            model = build_model(args)
            model.init_weights(spec.seed)
            if inputs.init_path is not None:
                try:
                    exp.load_hf_into(model, args, inputs.init_path)
                except ValueError as exc:
                    raise ConfigError("model.init", str(exc)) from None
            model.to(world.device)
        parameters = count_parameters(model)
        if spec.precision.value == "fp8":  # before tensor parallel and FSDP, as torchtitan converts
            apply_fp8(model)
        parallel = parallelize(
            model,
            dims=self.dims,
            device=world.device,
            bf16=spec.precision.value in ("bf16", "fp8"),
            compile=self.compile,
            activation_checkpointing=spec.parallelism.activation_checkpointing,
            rank=world.rank,
            pipeline_schedule=spec.parallelism.pipeline_schedule.value,
            stages_per_rank=spec.parallelism.pipeline_schedule.stages_per_rank,
            micro_batches=spec.parallelism.pipeline_micro_batches,
            loss_fn=self.pipeline_loss,
            async_tp=spec.parallelism.async_tensor_parallel,
        )
        model, self.mesh, self.pipeline = parallel.model, parallel.mesh, parallel.pipeline
        self.loss_parallel, self.autocast = parallel.loss_parallel, parallel.autocast
        if meta_init:
            model.to_empty(device=world.device)
            model.init_weights(spec.seed)
        return model, parameters

    def autocast_context(self) -> Any:
        if self.autocast:
            return torch.autocast(self.world.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: tensor.to(self.world.device, non_blocking=True) for name, tensor in batch.items()}


def build_optimizer(model: torch.nn.Module, spec: PretrainRunSpec) -> torch.optim.Optimizer:
    """AdamW with weight decay on the matrices only (not on norms and biases)."""
    settings = spec.optimizer
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(settings.beta1, settings.beta2),
        eps=settings.eps,
        fused=True,  # one kernel per step, no optimizer temporaries (CUDA and CPU)
    )


__all__ = [
    "MAX_NONFINITE_STEPS",
    "NonFiniteGuard",
    "TrainState",
    "Trainer",
    "check_batch",
    "lr_multiplier",
    "run",
    "total_steps",
]
