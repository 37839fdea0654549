"""PretrainRun spec: what ``torchrun … -m lmforge_jobs.pretrain --manifest run.yaml`` trains."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import Field, PlainValidator, StringConstraints, WithJsonSchema, model_validator

from lmforge_jobs.spec import (
    GPU_CONSISTENT,
    MAX_STEPS,
    MAX_TOKENS,
    Cel,
    HubId,
    Image,
    NodeParallelism,
    PodTemplate,
    Precision,
    Queue,
    ResourceRef,
    Resources,
    Scheduling,
    SecretRef,
    ShortStr,
    Spec,
    SpecError,
    StatusBase,
    Storage,
    Uri,
    check_gpus,
    exactly_one,
)


class TokenData(Spec):
    """Tokenised data given directly (datatrove token shards and a tokenizer) instead of a Corpus."""

    tokens: Uri
    """Directory of training token shards."""
    held_out: Uri | None = None
    """Directory of held-out token shards, for periodic evaluation."""
    tokenizer: Uri
    """tokenizer.json file or tokenizer directory."""


class Architecture(str, Enum):
    """Transformer family and its objective."""

    decoder = "decoder"  # causal LM, next-token prediction
    encoder = "encoder"  # masked LM
    encoder_decoder = "encoder-decoder"  # span corruption


def _vocab_size(value: Any) -> int | str:
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise ValueError(f"must be 'auto' or an integer of at least 256, not {value!r}")
    if not 256 <= value <= 1048576:
        raise ValueError(f"must be 'auto' or an integer from 256 to 1048576, not {value}")
    return int(value)


VocabSize = Annotated[
    int | str,
    PlainValidator(_vocab_size),
    WithJsonSchema({"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}),
]


class ModelInit(Spec):
    """Start from a Hugging Face checkpoint (continued pre-training / domain adaptation); exactly one."""

    __cel__ = (
        Cel("has(self.huggingface) != has(self.path)", "exactly one of huggingface, path must be set"),
    )

    huggingface: HubId | None = None
    """Hub model id (Llama family for decoder)."""
    path: Uri | None = None
    """Hugging Face format model directory."""
    revision: ShortStr | None = None
    """Hub revision."""
    token: SecretRef | None = None
    """Hub token, by Secret reference."""

    @model_validator(mode="after")
    def _one(self) -> ModelInit:
        exactly_one(self, ("huggingface", "path"))
        return self


class ModelShape(Spec):
    """Shape of the transformer."""

    __cel__ = (
        Cel("self.hidden % self.heads == 0", "hidden must be divisible by heads", field="hidden"),
        Cel(
            "!has(self.kvHeads) || self.heads % self.kvHeads == 0",
            "heads must be divisible by kvHeads",
            field="kvHeads",
        ),
        Cel(
            "!has(self.kvHeads) || self.kvHeads <= self.heads",
            "kvHeads must not exceed heads",
            field="kvHeads",
        ),
        Cel(
            "type(self.vocabSize) == string ? self.vocabSize == 'auto' : self.vocabSize >= 256",
            "vocabSize must be 'auto' or an integer of at least 256",
            field="vocabSize",
        ),
        Cel(
            "!has(self.decoderLayers) || self.architecture == 'encoder-decoder'",
            "decoderLayers applies only to architecture encoder-decoder",
            field="decoderLayers",
        ),
    )

    architecture: Architecture = Architecture.decoder
    """decoder (causal LM), encoder (masked LM) or encoder-decoder (span corruption)."""
    layers: Annotated[int, Field(ge=1, le=512)] = 12
    """Transformer blocks (encoder blocks for encoder-decoder)."""
    decoder_layers: Annotated[int, Field(ge=1, le=512)] | None = None
    """Decoder blocks for encoder-decoder; defaults to layers."""
    hidden: Annotated[int, Field(ge=8, le=65536)] = 768
    """Model width."""
    heads: Annotated[int, Field(ge=1, le=1024)] = 12
    """Attention heads."""
    kv_heads: Annotated[int, Field(ge=1, le=1024)] | None = None
    """Key/value heads; fewer than heads gives grouped-query attention. Defaults to heads."""
    ffn_hidden: Annotated[int, Field(ge=1, le=262144)] | None = None
    """Feed-forward width; defaults to the SwiGLU size 8/3·hidden rounded up to a multiple of 256."""
    seq_len: Annotated[int, Field(ge=8, le=1048576)] = 1024
    """Training sequence length in tokens."""
    vocab_size: VocabSize = "auto"
    """Vocabulary size, or auto to take it from the tokenizer (rounded up to a multiple of 64)."""
    tie_embeddings: bool = False
    """Share input embedding and output projection weights."""
    rope_theta: Annotated[float, Field(gt=0)] = 10000.0
    """RoPE base frequency."""
    norm_eps: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    """RMSNorm epsilon."""
    mask_probability: Annotated[float, Field(gt=0, lt=1)] = 0.15
    """encoder: fraction of tokens masked; encoder-decoder: fraction of tokens corrupted (noise density)."""
    mean_span_length: Annotated[float, Field(ge=1, le=64)] = 3.0
    """encoder-decoder: mean length of corrupted spans."""
    init: ModelInit | None = None
    """Initialise from a Hugging Face checkpoint (continued pre-training)."""

    @model_validator(mode="after")
    def _shape(self) -> ModelShape:
        if self.hidden % self.heads:
            raise SpecError("hidden", f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.kv_heads is not None:
            if self.kv_heads > self.heads:
                raise SpecError("kvHeads", f"kvHeads ({self.kv_heads}) must not exceed heads ({self.heads})")
            if self.heads % self.kv_heads:
                raise SpecError(
                    "kvHeads", f"heads ({self.heads}) must be divisible by kvHeads ({self.kv_heads})"
                )
        if self.decoder_layers is not None and self.architecture != Architecture.encoder_decoder:
            raise SpecError("decoderLayers", "decoderLayers applies only to architecture encoder-decoder")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        return 256 * -(-int(8 * self.hidden / 3) // 256)


class Budget(Spec):
    """How long to train; exactly one of tokens, tokensPerParameter, steps."""

    __cel__ = (
        Cel(
            "(has(self.tokens) ? 1 : 0) + (has(self.tokensPerParameter) ? 1 : 0) + (has(self.steps) ? 1 : 0) == 1",
            "exactly one of tokens, tokensPerParameter, steps must be set",
        ),
    )

    tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] | None = None
    """Train on this many tokens."""
    tokens_per_parameter: Annotated[float, Field(gt=0, le=100000)] | None = None
    """Tokens per model parameter; 20 is compute-optimal (Chinchilla, Hoffmann et al. 2022)."""
    steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] | None = None
    """Train for this many optimizer steps."""

    @model_validator(mode="after")
    def _one(self) -> Budget:
        exactly_one(self, ("tokens", "tokens_per_parameter", "steps"))
        return self


class Schedule(str, Enum):
    """Learning-rate schedule after warmup."""

    cosine = "cosine"
    wsd = "wsd"  # warmup-stable-decay
    linear = "linear"
    constant = "constant"


class Optimizer(Spec):
    """AdamW and its learning-rate schedule."""

    lr: Annotated[float, Field(gt=0, lt=1)] = 3.0e-4
    """Peak learning rate."""
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    """Final learning rate as a fraction of lr."""
    warmup_steps: Annotated[int, Field(ge=0, le=MAX_STEPS)] = 100
    """Linear warmup steps."""
    schedule: Schedule = Schedule.cosine
    """cosine, wsd (warmup-stable-decay), linear or constant."""
    decay_fraction: Annotated[float, Field(ge=0, le=1)] = 0.2
    """wsd: fraction of steps spent in the final decay."""
    weight_decay: Annotated[float, Field(ge=0, le=10)] = 0.1
    """Decoupled weight decay (not applied to norms and biases)."""
    beta1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    """Adam β1."""
    beta2: Annotated[float, Field(ge=0, lt=1)] = 0.95
    """Adam β2."""
    eps: Annotated[float, Field(gt=0, lt=1)] = 1e-8
    """Adam ε."""
    grad_clip: Annotated[float, Field(ge=0)] = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""


class Batch(Spec):
    """Batch size in tokens; gradient accumulation makes up the difference."""

    global_tokens: Annotated[int, Field(ge=8)] = 524288
    """Tokens per optimizer step across all processes."""
    micro_batch_size: Annotated[int, Field(ge=1, le=65536)] = 8
    """Sequences per process per forward pass."""


class Strategy(str, Enum):
    ddp = "ddp"
    fsdp = "fsdp"


class TrainParallelism(NodeParallelism):
    """Nodes, GPUs and how the model is spread over them."""

    strategy: Strategy = Strategy.ddp
    """ddp (replicated model) or fsdp (FSDP2, sharded parameters, gradients and optimizer state)."""
    compile: bool = True
    """Compile the model with torch.compile."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""


class Checkpoint(Spec):
    """Periodic checkpoints (torch.distributed.checkpoint) for exact resume."""

    every_steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] = 1000
    """Save every this many steps (and on SIGTERM and at the end)."""
    keep: Annotated[int, Field(ge=1, le=1000)] = 3
    """Keep the newest this many complete checkpoints."""


class Eval(Spec):
    """Periodic held-out loss."""

    every_steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] = 500
    """Evaluate every this many steps (and at the end)."""
    batches: Annotated[int, Field(ge=1, le=100000)] = 20
    """Held-out micro-batches per evaluation."""


class Push(Spec):
    """Upload the exported model to the Hugging Face hub."""

    repo: HubId
    """Target repository (org/name)."""
    token: SecretRef
    """Hub token with write access, by Secret reference."""
    private: bool = True
    """Create the repository as private."""
    revision: ShortStr | None = None
    """Branch to push to."""


class Export(Spec):
    """Export at the end of training."""

    huggingface: bool = True
    """Write a Hugging Face format model directory (config.json, safetensors, tokenizer)."""
    quantize: Literal["none", "int8"] = "none"
    """Also write an int8 weight-only quantised copy."""
    push: Push | None = None
    """Push the export to the hub."""


class PretrainRunSpec(Spec):
    """Pre-train a transformer from scratch (or continue pre-training a hub model) on a Corpus."""

    __cel__ = (
        Cel("has(self.corpus) != has(self.data)", "exactly one of corpus, data must be set"),
        Cel(
            "self.batch.globalTokens % (self.model.seqLen * self.batch.microBatchSize * self.parallelism.nodes"
            " * (self.parallelism.gpusPerNode > 0 ? self.parallelism.gpusPerNode : 1)) == 0",
            "batch.globalTokens must be a multiple of model.seqLen × batch.microBatchSize × nodes × gpusPerNode",
            field="batch.globalTokens",
        ),
        Cel(
            "!has(self.budget) || !has(self.budget.steps) || !has(self.optimizer)"
            " || self.optimizer.warmupSteps <= self.budget.steps",
            "optimizer.warmupSteps must not exceed budget.steps",
            field="optimizer.warmupSteps",
        ),
        GPU_CONSISTENT,
    )

    corpus: ResourceRef | None = None
    """The Corpus whose token shards, held-out split and tokenizer are used."""
    data: TokenData | None = None
    """Token shards and tokenizer given directly."""
    model: ModelShape = ModelShape()
    """The transformer."""
    budget: Budget = Budget(tokens_per_parameter=20)
    """Training length; Chinchilla's 20 tokens per parameter by default."""
    optimizer: Optimizer = Optimizer()
    """AdamW and learning-rate schedule."""
    batch: Batch = Batch()
    """Global batch in tokens and micro-batch in sequences."""
    precision: Precision = Precision.bf16
    """bf16 mixed precision or fp32."""
    parallelism: TrainParallelism = TrainParallelism()
    """Nodes, GPUs, DDP or FSDP, compile, activation checkpointing."""
    checkpoint: Checkpoint = Checkpoint()
    """Checkpoint frequency and retention."""
    eval: Eval = Eval()
    """Held-out evaluation frequency."""
    export: Export = Export()
    """Export format and upload."""
    seed: Annotated[int, Field(ge=0)] = 0
    """Random seed for initialisation and data order."""
    output: Uri | None = None
    """Where checkpoints and the export go; defaults to the local run directory or operator storage."""
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
    resources: Resources = Resources()
    """Resources of each node's pod."""

    @model_validator(mode="after")
    def _rules(self) -> PretrainRunSpec:
        exactly_one(self, ("corpus", "data"))
        per_step = self.model.seq_len * self.batch.micro_batch_size * self.parallelism.world_size
        if self.batch.global_tokens % per_step:
            raise SpecError(
                "batch.globalTokens",
                f"batch.globalTokens ({self.batch.global_tokens}) must be a multiple of model.seqLen × "
                f"batch.microBatchSize × nodes × gpusPerNode = {per_step}",
            )
        steps = self.budget.steps
        if steps is not None and self.optimizer.warmup_steps > steps:
            raise SpecError(
                "optimizer.warmupSteps",
                f"optimizer.warmupSteps ({self.optimizer.warmup_steps}) must not exceed budget.steps ({steps}): "
                "the learning rate would never reach its peak",
            )
        check_gpus(self.resources, self.parallelism.gpus_per_node)
        return self


# ------------------------------------------------------------------------------------------------ status
class Plan(Spec):
    """The compute plan, computed before the run starts."""

    parameters: Annotated[int, Field(ge=0)] | None = None
    """Model parameters."""
    tokens: Annotated[int, Field(ge=0)] | None = None
    """Training tokens."""
    steps: Annotated[int, Field(ge=0)] | None = None
    """Optimizer steps."""
    flops: Annotated[float, Field(ge=0)] | None = None
    """Training FLOPs (6·N·D plus attention)."""
    memory_per_gpu_gi_b: Annotated[float, Field(ge=0)] | None = Field(default=None, alias="memoryPerGpuGiB")
    """Estimated peak memory per GPU in GiB."""
    gpu_hours: Annotated[float, Field(ge=0)] | None = None
    """Estimated GPU-hours at the assumed MFU."""
    fits: bool | None = None
    """Whether the estimate fits in the device memory."""
    reason: Annotated[str, StringConstraints(max_length=4096)] | None = None
    """Why it does or does not fit."""
    law: Annotated[str, StringConstraints(max_length=256)] | None = None
    """The scaling law that chose the tokens: chinchilla-2022 (published), or a fitted one."""


class TrainMetrics(Spec):
    """Latest training numbers."""

    loss: float | None = None
    """Training loss (mean over the last step)."""
    eval_loss: float | None = None
    """Held-out loss."""
    perplexity: Annotated[float, Field(ge=0)] | None = None
    """exp(evalLoss)."""
    tokens_per_second: Annotated[float, Field(ge=0)] | None = None
    """Training throughput across all processes."""
    mfu: Annotated[float, Field(ge=0)] | None = None
    """Model FLOPs utilisation (0-1)."""
    gpu_utilization: Annotated[float, Field(ge=0, le=1)] | None = None
    """Mean GPU utilisation (0-1) from NVML."""


class PretrainOutputs(Spec):
    """Where the PretrainRun's results are."""

    checkpoint: Uri | None = None
    """Newest complete checkpoint."""
    model: Uri | None = None
    """Hugging Face format model directory."""
    tokenizer: Uri | None = None
    """Tokenizer used."""


class PretrainRunStatus(StatusBase):
    """Observed state of a PretrainRun."""

    plan: Plan | None = None
    """Compute plan."""
    metrics: TrainMetrics | None = None
    """Latest metrics."""
    outputs: PretrainOutputs | None = None
    """Results."""
