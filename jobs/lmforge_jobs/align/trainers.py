"""sft, reward and dpo through TRL's trainers, reporting through Telemetry.

Each method builds its TRL config from the spec (:func:`training_args`), the trainer, and runs
``train(resume_from_checkpoint=…)`` — the newest complete checkpoint under ``spec.output/checkpoints`` when
one exists (downloaded when the output is on object storage, see :mod:`.checkpoints`), so a rerun after an
interruption continues instead of starting over — then one held-out evaluation whose numbers are the run's
final metrics (DPO's reward margin and accuracy, the reward model's pairwise accuracy, SFT's eval loss).

Every checkpoint the trainer saves is published to the output with its completion marker written last.
SIGTERM/SIGINT (a preempted or deleted pod) make every process finish its current step, save a checkpoint
and stop; :func:`run_trl` then raises :class:`Stopped` (the job exits 143, ``EXIT_STOPPED``).

TRL's log keys become status metrics (:data:`METRIC_NAMES`): the contract's names (loss, evalLoss,
rewardAccuracy, rewardMargin …) where one applies, camelCase method metrics otherwise.
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path
from typing import Any

from lmforge_jobs.align import checkpoints
from lmforge_jobs.align.config import AlignmentRunSpec, Method
from lmforge_jobs.align.data import Split
from lmforge_jobs.launch import StopFlag
from lmforge_jobs.telemetry import Telemetry

# TRL log key → status metric. Held-out (eval_) numbers take the contract's names: they are what the
# run reports at the end; the training-batch versions are kept as method metrics.
METRIC_NAMES = {
    "loss": "loss",
    "eval_loss": "evalLoss",
    "eval_rewards/margins": "rewardMargin",
    "eval_rewards/accuracies": "rewardAccuracy",
    "rewards/margins": "trainRewardMargin",
    "rewards/accuracies": "trainRewardAccuracy",
    "eval_accuracy": "rewardAccuracy",
    "accuracy": "trainRewardAccuracy",
    "eval_margin": "rewardMargin",
    "margin": "trainRewardMargin",
    "mean_reward": "trainMeanScore",  # the reward model's mean output, not ppo's meanReward
    "eval_mean_reward": "evalMeanScore",
    "min_reward": "trainMinScore",
    "max_reward": "trainMaxScore",
    "eval_min_reward": "evalMinScore",
    "eval_max_reward": "evalMaxScore",
}


def _camel(key: str) -> str:
    parts = [p for p in re.split(r"[/_\s]+", key) if p]
    return parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:]) if parts else key


def status_metrics(logs: dict[str, Any]) -> dict[str, float]:
    """TRL/Trainer log entries as camelCase status metrics (non-numbers and bookkeeping dropped)."""
    out: dict[str, float] = {}
    for key, value in logs.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            continue
        if key in ("epoch", "step", "total_flos", "num_tokens", "eval_num_tokens") or key.endswith(
            "_runtime"
        ):
            continue
        if "per_second" in key:
            continue
        out[METRIC_NAMES.get(key, _camel(key))] = float(value)
    return out


def make_callback(tel: Telemetry, world_size: int) -> Any:
    """A TrainerCallback that forwards every log to Telemetry with step, tokens and tokens/s."""
    from transformers import TrainerCallback

    class TelemetryCallback(TrainerCallback):
        def __init__(self) -> None:
            self.last: tuple[float, float] | None = None  # (time, tokens)
            self.tokens = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            tel.update(step=state.global_step, total_steps=state.max_steps, stage="train", force=True)

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
        ) -> None:
            logs = logs or {}
            metrics = status_metrics(logs)
            if "num_tokens" in logs:
                # TRL counts tokens over all processes
                now, tokens = time.monotonic(), float(logs["num_tokens"])
                if self.last is not None and tokens > self.last[1] and now > self.last[0]:
                    metrics["tokensPerSecond"] = (tokens - self.last[1]) / (now - self.last[0])
                self.last = (now, tokens)
                self.tokens = tokens
            tel.update(
                step=state.global_step,
                total_steps=state.max_steps,
                tokens=int(self.tokens) or None,
                metrics=metrics,
            )

    return TelemetryCallback()


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def use_bf16(spec: AlignmentRunSpec) -> bool:
    """bf16 mixed precision where the spec asks for it and a GPU supports it (CPU runs stay fp32)."""
    import torch

    return spec.precision.value == "bf16" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def liger_available() -> bool:
    """Liger kernels apply: a GPU and the liger-kernel package."""
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def training_args(spec: AlignmentRunSpec, config_cls: type, output: str, **extra: Any) -> Any:
    """The TRL config of ``config_cls`` (SFTConfig, RewardConfig, DPOConfig) for this spec."""
    import torch

    hp = spec.hyperparameters
    par = spec.parallelism
    ws = world_size()
    micro = max(1, min(hp.micro_batch_size, hp.batch_size // ws))  # a global batch smaller than micro × world
    accumulation = max(1, hp.batch_size // (micro * ws))
    return config_cls(
        output_dir=str(Path(output) / "checkpoints"),
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        learning_rate=hp.lr,
        num_train_epochs=hp.epochs,
        max_steps=hp.max_steps or -1,
        warmup_steps=hp.warmup_ratio,
        weight_decay=hp.weight_decay,
        lr_scheduler_type="cosine",
        seed=hp.seed,
        max_length=hp.max_length,
        bf16=use_bf16(spec),
        use_cpu=not torch.cuda.is_available(),
        logging_steps=1,
        save_strategy="steps",
        save_steps=spec.checkpoint.every_steps,
        save_total_limit=spec.checkpoint.keep,
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        gradient_checkpointing=par.activation_checkpointing,  # TRL turns it on by default
        torch_compile=par.compile,
        use_liger_kernel=par.liger_kernels and liger_available(),
        **extra,
    )


class Stopped(Exception):
    """Training stopped by SIGTERM/SIGINT after saving a checkpoint at ``step`` (the job exits 143)."""

    def __init__(self, step: int):
        super().__init__(f"stopped by signal after step {step}")
        self.step = step


def any_rank(flag: bool, device: Any) -> bool:
    """True when ``flag`` is up in any process: every rank must save and stop at the same step."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    votes = torch.tensor([float(flag)], device=device)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return bool(votes.item() > 0)


def stop_callback(stop: StopFlag) -> Any:
    """A TrainerCallback that, once ``stop`` is set in any process, saves a checkpoint and ends training."""
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        stopped_at: int | None = None

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            if any_rank(stop.set, args.device):
                control.should_save = True
                control.should_training_stop = True
                self.stopped_at = state.global_step
            return control

    return StopOnSignal()


def publish_callback(output: str, keep: int) -> Any:
    """A TrainerCallback that publishes each saved checkpoint to ``output`` (see :mod:`.checkpoints`)."""
    from transformers import TrainerCallback

    class PublishCheckpoint(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            if state.is_world_process_zero:
                local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                uri = checkpoints.publish(local, output, keep)
                print(f"checkpoint saved: {uri}", flush=True)
            return control

    return PublishCheckpoint()


def _datasets(split: Split) -> tuple[Any, Any]:
    from datasets import Dataset

    train = Dataset.from_list(split.train)
    held = Dataset.from_list(split.eval) if split.eval else None
    return train, held


def run_trl(
    spec: AlignmentRunSpec,
    model: Any,
    tokenizer: Any,
    split: Split,
    output: str,
    tel: Telemetry,
    peft_cfg: Any = None,
    ref_model: Any = None,
) -> Any:
    """Train ``model`` with the TRL trainer of spec.method in the working directory ``output``; return the
    trained (possibly PEFT) model. Raises :class:`Stopped` when a signal stopped it (checkpoint saved)."""
    train, held = _datasets(split)
    hp = spec.hyperparameters
    stop = StopFlag()
    on_stop = stop_callback(stop)
    callbacks = [
        make_callback(tel, world_size()),
        publish_callback(str(spec.output), spec.checkpoint.keep),
        on_stop,
    ]
    if spec.method == Method.sft:
        from trl import SFTConfig, SFTTrainer

        args = training_args(spec, SFTConfig, output, packing=hp.packing, completion_only_loss=True)
        trainer: Any = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=held,
            processing_class=tokenizer,
            peft_config=peft_cfg,
            callbacks=callbacks,
        )
    elif spec.method == Method.reward:
        from trl import RewardConfig, RewardTrainer

        args = training_args(spec, RewardConfig, output)
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=held,
            processing_class=tokenizer,
            peft_config=peft_cfg,
            callbacks=callbacks,
        )
    elif spec.method == Method.dpo:
        from trl import DPOConfig, DPOTrainer

        # the reference log-probs do not change: with more than one epoch compute them once, up front
        args = training_args(spec, DPOConfig, output, beta=hp.beta, precompute_ref_log_probs=hp.epochs > 1)
        trainer = DPOTrainer(
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=train,
            eval_dataset=held,
            processing_class=tokenizer,
            peft_config=peft_cfg,
            callbacks=callbacks,
        )
    else:  # pragma: no cover - ppo has its own loop
        raise ValueError(spec.method)
    resume = checkpoints.restore(str(spec.output), output, "checkpoint")
    if resume:
        print(f"resuming from {resume}", flush=True)
    with stop:
        trainer.train(resume_from_checkpoint=resume)
    if on_stop.stopped_at is not None:
        raise Stopped(on_stop.stopped_at)
    if held is not None:
        tel.update(stage="evaluate", force=True)
        trainer.evaluate()  # logged through the callback: the final held-out metrics
    return trainer.model


__all__ = [
    "METRIC_NAMES",
    "Stopped",
    "any_rank",
    "make_callback",
    "publish_callback",
    "run_trl",
    "status_metrics",
    "stop_callback",
    "training_args",
]
