"""AlignmentRun spec: what ``torchrun … -m lmforge_jobs.align --manifest run.yaml`` trains.

Methods: sft (supervised fine-tuning), reward (Bradley–Terry reward model), dpo (direct preference
optimisation) and ppo (RLHF); any of them with LoRA or prompt tuning.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated

from pydantic import Field, model_validator

from lmforge_jobs.pretrain.config import Queue
from lmforge_jobs.spec import (
    GPU_CONSISTENT,
    MAX_STEPS,
    Cel,
    Image,
    ModelRef,
    NodeParallelism,
    PodTemplate,
    Precision,
    Resources,
    Scheduling,
    ShortStr,
    Spec,
    SpecError,
    StatusBase,
    Storage,
    Tracking,
    Uri,
    check_gpus,
)


class Method(str, Enum):
    sft = "sft"
    reward = "reward"
    dpo = "dpo"
    ppo = "ppo"


class DatasetFormat(str, Enum):
    """Shape of each record."""

    messages = "messages"  # {"messages": [{"role", "content"}…]}
    prompt_completion = "promptCompletion"  # {"prompt", "completion"}
    preference = "preference"  # {"prompt", "chosen", "rejected"}
    prompts = "prompts"  # {"prompt"}


FORMATS_BY_METHOD: dict[Method, tuple[DatasetFormat, ...]] = {
    Method.sft: (DatasetFormat.messages, DatasetFormat.prompt_completion),
    Method.reward: (DatasetFormat.preference,),
    Method.dpo: (DatasetFormat.preference,),
    Method.ppo: (DatasetFormat.prompts,),
}


class Dataset(Spec):
    """Training data: JSONL or Parquet files, or a hub dataset (hf://datasets/ORG/NAME)."""

    path: Uri
    """File, directory or glob of JSONL/Parquet, or hf://datasets/ORG/NAME."""
    format: DatasetFormat
    """messages, promptCompletion (sft), preference (reward, dpo) or prompts (ppo)."""
    split: ShortStr = "train"
    """Split to use for hub datasets."""
    eval_fraction: Annotated[float, Field(ge=0, le=0.5)] = 0.05
    """Fraction held out for evaluation (reward accuracy, DPO margins, SFT eval loss)."""
    limit: Annotated[int, Field(ge=1)] | None = None
    """Use at most this many records."""


class Lora(Spec):
    """Low-rank adapters (PEFT LoRA)."""

    r: Annotated[int, Field(ge=1, le=4096)] = 16
    """Rank of the update matrices."""
    alpha: Annotated[float, Field(gt=0, le=65536)] = 32
    """Scaling numerator (update scaled by alpha / r)."""
    dropout: Annotated[float, Field(ge=0, le=1)] = 0.05
    """Dropout on the adapter input."""
    target_modules: Annotated[list[ShortStr], Field(min_length=1, max_length=256)] = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    ]
    """Module names to adapt (or [all-linear])."""


class PromptTuning(Spec):
    """Soft prompt: trainable virtual token embeddings prepended to the input (PEFT prompt tuning)."""

    virtual_tokens: Annotated[int, Field(ge=1, le=4096)] = 20
    """Number of virtual tokens."""
    init_text: Annotated[str, Field(max_length=4096)] | None = None
    """Initialise the soft prompt from the embeddings of this text (random otherwise)."""


class Peft(Spec):
    """Parameter-efficient tuning; at most one of lora, promptTuning."""

    __cel__ = (
        Cel(
            "!(has(self.lora) && has(self.promptTuning))",
            "at most one of lora, promptTuning may be set",
            field="promptTuning",
        ),
    )

    lora: Lora | None = None
    """LoRA adapters."""
    prompt_tuning: PromptTuning | None = None
    """Soft prompt tuning."""
    merge: bool = False
    """Write the merged model (LoRA only) instead of the adapter alone."""

    @model_validator(mode="after")
    def _one(self) -> Peft:
        if self.lora is not None and self.prompt_tuning is not None:
            raise SpecError("promptTuning", "at most one of lora, promptTuning may be set")
        return self


class Ppo(Spec):
    """PPO settings (method ppo)."""

    kl_coef: Annotated[float, Field(ge=0, le=100)] = 0.05
    """Weight of the KL penalty against the frozen reference policy."""
    clip_range: Annotated[float, Field(gt=0, lt=1)] = 0.2
    """Policy ratio clipping ε."""
    value_clip_range: Annotated[float, Field(gt=0)] = 0.2
    """Value function clipping."""
    value_coef: Annotated[float, Field(ge=0)] = 0.1
    """Weight of the value loss."""
    gamma: Annotated[float, Field(ge=0, le=1)] = 1.0
    """Discount factor."""
    lam: Annotated[float, Field(ge=0, le=1)] = 0.95
    """GAE λ."""
    ppo_epochs: Annotated[int, Field(ge=1, le=64)] = 4
    """Optimisation passes over each rollout batch."""
    rollout_batch_size: Annotated[int, Field(ge=1)] = 64
    """Prompts per rollout."""
    max_new_tokens: Annotated[int, Field(ge=1, le=65536)] = 64
    """Tokens generated per response."""
    temperature: Annotated[float, Field(gt=0, le=10)] = 1.0
    """Sampling temperature for rollouts."""


class Hyperparameters(Spec):
    """Optimisation settings."""

    lr: Annotated[float, Field(gt=0, lt=1)] = 1.0e-5
    """Peak learning rate."""
    epochs: Annotated[float, Field(gt=0, le=1000)] = 1
    """Passes over the dataset."""
    max_steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] | None = None
    """Stop after this many steps (overrides epochs)."""
    batch_size: Annotated[int, Field(ge=1)] = 8
    """Global batch size in examples."""
    micro_batch_size: Annotated[int, Field(ge=1)] = 1
    """Examples per process per forward pass."""
    max_length: Annotated[int, Field(ge=8, le=1048576)] = 1024
    """Truncate examples to this many tokens."""
    warmup_ratio: Annotated[float, Field(ge=0, le=1)] = 0.03
    """Fraction of steps used for linear warmup."""
    weight_decay: Annotated[float, Field(ge=0, le=10)] = 0.0
    """Decoupled weight decay."""
    beta: Annotated[float, Field(gt=0, le=100)] = 0.1
    """dpo: strength of the implicit KL constraint."""
    packing: bool = False
    """sft: pack several examples into each sequence."""
    ppo: Ppo = Ppo()
    """ppo only."""
    seed: Annotated[int, Field(ge=0)] = 0
    """Random seed."""


class Synthetic(Spec):
    """Generate SFT data from a teacher model for a prompts file, then train on it (sft only)."""

    teacher: ModelRef
    """Teacher model (hub id, path or another run)."""
    prompts: Uri
    """JSONL file with a prompt per line."""
    samples_per_prompt: Annotated[int, Field(ge=1, le=64)] = 1
    """Completions generated per prompt."""
    max_new_tokens: Annotated[int, Field(ge=1, le=65536)] = 256
    """Tokens generated per completion."""
    temperature: Annotated[float, Field(ge=0, le=10)] = 0.7
    """Sampling temperature (0 = greedy)."""


class AlignmentCheckpoint(Spec):
    """Periodic trainer checkpoints under spec.output/checkpoints; a rerun resumes from the newest one."""

    every_steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] = 500
    """Save every this many optimizer steps (PPO: rollout iterations)."""
    keep: Annotated[int, Field(ge=1, le=1000)] = 2
    """Keep the newest this many checkpoints."""


class AlignmentParallelism(NodeParallelism):
    """Nodes and GPUs (torchrun), and how the step is made fast."""

    activation_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    compile: bool = False
    """torch.compile the model (worth it on GPUs for longer runs)."""
    liger_kernels: bool = True
    """Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) where they apply: on
    GPUs, with liger-kernel installed."""


class AlignmentRunSpec(Spec):
    """Align a model: SFT, reward model, DPO or PPO, optionally parameter-efficient."""

    __cel__ = (
        GPU_CONSISTENT,
        Cel(
            "(self.method == 'ppo') == has(self.rewardModel)",
            "rewardModel is required if and only if method is ppo",
            field="rewardModel",
        ),
        Cel(
            "has(self.dataset) || has(self.synthetic)",
            "dataset is required unless synthetic is set",
            field="dataset",
            reason="FieldValueRequired",
        ),
        Cel(
            "!has(self.synthetic) || self.method == 'sft'",
            "synthetic applies only to method sft",
            field="synthetic",
        ),
        Cel(
            "!has(self.dataset) || (self.method == 'sft' ? self.dataset.format in ['messages', 'promptCompletion']"
            " : self.method == 'ppo' ? self.dataset.format == 'prompts' : self.dataset.format == 'preference')",
            "dataset.format must match the method: sft takes messages or promptCompletion, reward and dpo take "
            "preference, ppo takes prompts",
            field="dataset.format",
        ),
        Cel(
            "!has(self.peft) || !has(self.peft.promptTuning) || !self.peft.merge",
            "peft.merge applies only to lora",
            field="peft.merge",
        ),
    )

    base: ModelRef
    """Model to start from: pretrainRun, alignmentRun, huggingface or path."""
    method: Method
    """sft, reward, dpo or ppo."""
    dataset: Dataset | None = None
    """Training data; its format must suit the method."""
    reward_model: ModelRef | None = None
    """Reward model for ppo (usually an AlignmentRun with method reward)."""
    peft: Peft | None = None
    """LoRA or prompt tuning; full fine-tuning when absent."""
    hyperparameters: Hyperparameters = Hyperparameters()
    """Optimisation settings."""
    synthetic: Synthetic | None = None
    """Generate the SFT data from a teacher first."""
    precision: Precision = Precision.bf16
    """bf16 mixed precision or fp32."""
    parallelism: AlignmentParallelism = AlignmentParallelism()
    """Nodes and GPUs."""
    checkpoint: AlignmentCheckpoint = AlignmentCheckpoint()
    """Periodic checkpoints for resuming an interrupted run."""
    output: Uri | None = None
    """Where the model goes; defaults to the local run directory or operator storage."""
    queue: Queue | None = None
    """Kueue LocalQueue to submit to."""
    image: Image | None = None
    """Container image of the jobs; defaults to the operator's configured jobs image."""
    storage: Storage | None = None
    """Object storage endpoint, region and credentials (Secrets by name); unset: the operator's defaults."""
    template: PodTemplate | None = None
    """Pod template merged into the pods (placement, priority, registries, volumes, devices, env)."""
    scheduling: Scheduling | None = None
    """Gang scheduling of the pods (Volcano or coscheduling PodGroup); unset: none."""
    tracking: Tracking | None = None
    """Experiment tracking: MLflow, TensorBoard; unset: MLflow whenever MLFLOW_TRACKING_URI is set."""
    resources: Resources = Resources()
    """Resources of each node's pod."""

    @model_validator(mode="after")
    def _rules(self) -> AlignmentRunSpec:
        if (self.method == Method.ppo) != (self.reward_model is not None):
            raise SpecError("rewardModel", "rewardModel is required if and only if method is ppo")
        if self.dataset is None and self.synthetic is None:
            raise SpecError("dataset", "dataset is required unless synthetic is set")
        if self.synthetic is not None and self.method != Method.sft:
            raise SpecError("synthetic", "synthetic applies only to method sft")
        if self.dataset is not None and self.dataset.format not in FORMATS_BY_METHOD[self.method]:
            allowed = " or ".join(f.value for f in FORMATS_BY_METHOD[self.method])
            raise SpecError(
                "dataset.format",
                f"method {self.method.value} needs dataset.format {allowed}, not {self.dataset.format.value}",
            )
        if self.peft is not None and self.peft.prompt_tuning is not None and self.peft.merge:
            raise SpecError("peft.merge", "peft.merge applies only to lora")
        check_gpus(self.resources, self.parallelism.gpus_per_node)
        return self


# ------------------------------------------------------------------------------------------------ status
class AlignmentMetrics(Spec):
    """Latest training numbers; method-specific ones in methodMetrics."""

    loss: float | None = None
    """Training loss."""
    eval_loss: float | None = None
    """Held-out loss."""
    tokens_per_second: Annotated[float, Field(ge=0)] | None = None
    """Training throughput."""
    reward_accuracy: Annotated[float, Field(ge=0, le=1)] | None = None
    """reward, dpo: held-out pairwise accuracy."""
    reward_margin: float | None = None
    """dpo: mean chosen − rejected reward margin."""
    mean_reward: float | None = None
    """ppo: mean reward of the rollouts."""
    kl: float | None = None
    """ppo: KL divergence from the reference policy."""
    method_metrics: Annotated[dict[ShortStr, float], Field(max_length=64)] = {}
    """Other method metrics (entropy, clip fraction …)."""


class AlignmentOutputs(Spec):
    """Where the AlignmentRun's results are."""

    model: Uri | None = None
    """Hugging Face format model directory (merged, or base + adapter)."""
    adapter: Uri | None = None
    """PEFT adapter directory, when peft is used."""


class AlignmentRunStatus(StatusBase):
    """Observed state of an AlignmentRun."""

    metrics: AlignmentMetrics | None = None
    """Latest metrics."""
    outputs: AlignmentOutputs | None = None
    """Results."""
