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
    Tracking,
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


class TrainPrecision(str, Enum):
    """Numeric precision of pre-training (the shared precisions plus fp8)."""

    bf16 = Precision.bf16.value
    fp32 = Precision.fp32.value
    fp8 = "fp8"  # torchao float8 training: bf16 mixed precision with the linear layers' matmuls in float8


class Strategy(str, Enum):
    ddp = "ddp"
    fsdp = "fsdp"


class PipelineSchedule(str, Enum):
    """torch.distributed.pipelining schedules (``get_schedule_class`` names)."""

    one_f_one_b = "1F1B"
    gpipe = "GPipe"
    interleaved_1f1b = "Interleaved1F1B"
    looped_bfs = "LoopedBFS"
    interleaved_zero_bubble = "InterleavedZeroBubble"
    zbv_zero_bubble = "ZBVZeroBubble"
    dual_pipe_v = "DualPipeV"

    @property
    def stages_per_rank(self) -> int:
        """Model chunks each pipeline rank holds: one for the single-stage schedules, two (virtual stages)
        for the looped, interleaved and V-shaped ones (ZBV and DualPipeV need exactly two)."""
        return 1 if self in (PipelineSchedule.one_f_one_b, PipelineSchedule.gpipe) else 2


MESH_PRODUCT = (
    "(has(self.dataParallelReplicate) ? self.dataParallelReplicate : 1)"
    " * (has(self.tensorParallel) ? self.tensorParallel : 1)"
    " * (has(self.pipelineParallel) ? self.pipelineParallel : 1)"
    " * (has(self.contextParallel) ? self.contextParallel : 1)"
)
"""CEL: the mesh's degrees other than dataParallelShard (guarded: rules must hold on written defaults)."""
WORLD = "(self.nodes * (self.gpusPerNode > 0 ? self.gpusPerNode : 1))"


class TrainParallelism(NodeParallelism):
    """Nodes, GPUs and how the model is spread over them: a device mesh of data-parallel (replicate ×
    shard), context-, tensor- and pipeline-parallel degrees whose product is nodes × gpusPerNode."""

    __cel__ = (
        Cel(
            f"{WORLD} % ({MESH_PRODUCT}) == 0",
            "dataParallelReplicate × tensorParallel × pipelineParallel × contextParallel must divide "
            "nodes × gpusPerNode",
            field="tensorParallel",
        ),
        Cel(
            f"!has(self.dataParallelShard) || self.dataParallelShard * {MESH_PRODUCT} == {WORLD}",
            "dataParallelReplicate × dataParallelShard × tensorParallel × pipelineParallel × contextParallel "
            "must equal nodes × gpusPerNode",
            field="dataParallelShard",
        ),
        Cel(
            "(has(self.strategy) && self.strategy == 'fsdp') || (!has(self.dataParallelShard)"
            f" && {MESH_PRODUCT} == 1)",
            "strategy ddp replicates the whole model: dataParallelShard, dataParallelReplicate, tensorParallel, "
            "pipelineParallel and contextParallel need strategy fsdp",
            field="strategy",
        ),
        Cel(
            "!has(self.asyncTensorParallel) || !self.asyncTensorParallel"
            " || (has(self.tensorParallel) && self.tensorParallel > 1 && (!has(self.compile) || self.compile))",
            "asyncTensorParallel overlaps tensor-parallel communication with compute inside compiled graphs: it "
            "needs tensorParallel > 1 and compile true",
            field="asyncTensorParallel",
        ),
    )

    strategy: Strategy = Strategy.ddp
    """ddp (replicated model) or fsdp (FSDP2, sharded parameters, gradients and optimizer state); the mesh
    degrees below need fsdp."""
    data_parallel_shard: Annotated[int, Field(ge=1, le=65536)] | None = None
    """FSDP degree (parameters sharded over this many ranks); unset: whatever the other degrees leave."""
    data_parallel_replicate: Annotated[int, Field(ge=1, le=65536)] = 1
    """HSDP: replicas of the FSDP-sharded model (e.g. one per node, sharded within the node)."""
    tensor_parallel: Annotated[int, Field(ge=1, le=64)] = 1
    """Tensor-parallel degree: attention heads and MLP columns split over this many ranks, with sequence
    parallelism on the norms; keep it within a node (NVLink)."""
    pipeline_parallel: Annotated[int, Field(ge=1, le=128)] = 1
    """Pipeline stages: the layer stack split over this many ranks (torch.distributed.pipelining)."""
    pipeline_schedule: PipelineSchedule = PipelineSchedule.one_f_one_b
    """Pipeline schedule: 1F1B, GPipe, or Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble,
    DualPipeV (two model chunks per pipeline rank)."""
    micro_batches: Annotated[int, Field(ge=1, le=4096)] | None = None
    """Pipeline micro-batches each micro-batch of batch.microBatchSize sequences is cut into; defaults to
    pipelineParallel. More shrink the bubble, (stages − 1) / (microBatches + stages − 1) for 1F1B."""
    context_parallel: Annotated[int, Field(ge=1, le=64)] = 1
    """Context-parallel degree: each sequence split over this many ranks (ring attention, GPU only)."""
    async_tensor_parallel: bool = False
    """Async tensor parallel (GPU only): torch.compile's micro-pipelining splits each tensor-parallel matmul
    and overlaps its all-gather / reduce-scatter with the matmul's pieces (symmetric memory over NVLink).
    Needs tensorParallel > 1, compile, and CUDA GPUs of one node per tensor-parallel group."""
    compile: bool = True
    """Compile the model with torch.compile."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""

    @property
    def mesh_product(self) -> int:
        """Every degree but dataParallelShard."""
        return (
            self.data_parallel_replicate
            * self.tensor_parallel
            * self.pipeline_parallel
            * self.context_parallel
        )

    @property
    def data_parallel_degree(self) -> int:
        """Ranks that see different data (replicate × shard)."""
        return self.world_size // (self.tensor_parallel * self.pipeline_parallel * self.context_parallel)

    @property
    def pipeline_micro_batches(self) -> int:
        return self.micro_batches or self.pipeline_parallel

    @model_validator(mode="after")
    def _mesh(self) -> TrainParallelism:
        world, rest = self.world_size, self.mesh_product
        if world % rest:
            raise SpecError(
                "tensorParallel",
                f"dataParallelReplicate × tensorParallel × pipelineParallel × contextParallel ({rest}) must "
                f"divide nodes × gpusPerNode ({world})",
            )
        if self.data_parallel_shard is not None and self.data_parallel_shard * rest != world:
            raise SpecError(
                "dataParallelShard",
                f"dataParallelReplicate × dataParallelShard × tensorParallel × pipelineParallel × "
                f"contextParallel ({self.data_parallel_shard * rest}) must equal nodes × gpusPerNode ({world})",
            )
        if self.strategy == Strategy.ddp and (self.data_parallel_shard is not None or rest != 1):
            raise SpecError(
                "strategy",
                "strategy ddp replicates the whole model: dataParallelShard, dataParallelReplicate, "
                "tensorParallel, pipelineParallel and contextParallel need strategy fsdp",
            )
        if self.async_tensor_parallel and (self.tensor_parallel < 2 or not self.compile):
            raise SpecError(
                "asyncTensorParallel",
                "asyncTensorParallel overlaps tensor-parallel communication with compute inside compiled graphs: "
                f"it needs tensorParallel > 1 (here {self.tensor_parallel}) and compile true (here "
                f"{str(self.compile).lower()})",
            )
        return self


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


def _degree(name: str) -> str:
    """CEL for a mesh degree of spec.parallelism, 1 when unset (rules must hold on written defaults)."""
    return f"(has(self.parallelism.{name}) ? self.parallelism.{name} : 1)"


STAGES_PER_RANK = "(!has(self.parallelism.pipelineSchedule) || self.parallelism.pipelineSchedule in ['1F1B', 'GPipe'] ? 1 : 2)"


def check_mesh(model: ModelShape, batch: Batch, par: TrainParallelism) -> None:
    """The model and batch can be cut the way the mesh asks (CEL twins on PretrainRunSpec)."""
    tp, pp, cp = par.tensor_parallel, par.pipeline_parallel, par.context_parallel
    if model.heads % tp or model.n_kv_heads % tp:
        raise SpecError(
            "parallelism.tensorParallel",
            f"model.heads ({model.heads}) and model.kvHeads ({model.n_kv_heads}) must be divisible by "
            f"parallelism.tensorParallel ({tp}): each rank holds whole attention heads",
        )
    if model.ffn_size % tp:
        raise SpecError(
            "parallelism.tensorParallel",
            f"model.ffnHidden ({model.ffn_size}) must be divisible by parallelism.tensorParallel ({tp})",
        )
    chunks = pp * par.pipeline_schedule.stages_per_rank
    if model.layers % chunks:
        raise SpecError(
            "parallelism.pipelineParallel",
            f"model.layers ({model.layers}) must be divisible by parallelism.pipelineParallel × model chunks "
            f"per rank ({pp} × {par.pipeline_schedule.stages_per_rank} for {par.pipeline_schedule.value})",
        )
    if model.seq_len % (2 * cp):
        raise SpecError(
            "model.seqLen",
            f"model.seqLen ({model.seq_len}) must be divisible by 2 × parallelism.contextParallel ({2 * cp}): "
            "each rank holds two load-balanced chunks of every sequence",
        )
    if (pp > 1 or tp > 1) and model.tie_embeddings:
        raise SpecError(
            "model.tieEmbeddings",
            "model.tieEmbeddings cannot be used with parallelism.pipelineParallel or tensorParallel: the "
            "embedding and the output projection live on different stages or are split along different "
            "dimensions",
        )
    micro = par.pipeline_micro_batches
    if pp > 1 and (batch.micro_batch_size % micro or micro < pp):
        raise SpecError(
            "parallelism.microBatches",
            f"parallelism.microBatches ({micro}) must divide batch.microBatchSize ({batch.micro_batch_size}) "
            f"and be at least pipelineParallel ({pp})",
        )
    if model.architecture != Architecture.decoder and tp * pp * cp > 1:
        raise SpecError(
            "parallelism",
            f"tensorParallel, pipelineParallel and contextParallel apply to architecture decoder only, not "
            f"{model.architecture.value}",
        )


class PretrainRunSpec(Spec):
    """Pre-train a transformer from scratch (or continue pre-training a hub model) on a Corpus."""

    __cel__ = (
        Cel("has(self.corpus) != has(self.data)", "exactly one of corpus, data must be set"),
        Cel(
            "self.batch.globalTokens % (self.model.seqLen * self.batch.microBatchSize * self.parallelism.nodes"
            " * (self.parallelism.gpusPerNode > 0 ? self.parallelism.gpusPerNode : 1)"
            f" / ({_degree('tensorParallel')} * {_degree('pipelineParallel')} * {_degree('contextParallel')})) == 0",
            "batch.globalTokens must be a multiple of model.seqLen × batch.microBatchSize × data-parallel ranks "
            "(nodes × gpusPerNode / (tensorParallel × pipelineParallel × contextParallel))",
            field="batch.globalTokens",
        ),
        Cel(
            "!has(self.budget) || !has(self.budget.steps) || !has(self.optimizer)"
            " || self.optimizer.warmupSteps <= self.budget.steps",
            "optimizer.warmupSteps must not exceed budget.steps",
            field="optimizer.warmupSteps",
        ),
        GPU_CONSISTENT,
        Cel(
            f"self.model.heads % {_degree('tensorParallel')} == 0"
            f" && (!has(self.model.kvHeads) || self.model.kvHeads % {_degree('tensorParallel')} == 0)",
            "model.heads and model.kvHeads must be divisible by parallelism.tensorParallel",
            field="parallelism.tensorParallel",
        ),
        Cel(
            f"(has(self.model.ffnHidden) ? self.model.ffnHidden : (8 * self.model.hidden / 3 + 255) / 256 * 256)"
            f" % {_degree('tensorParallel')} == 0",
            "model.ffnHidden (default: 8/3·hidden rounded up to 256) must be divisible by "
            "parallelism.tensorParallel",
            field="parallelism.tensorParallel",
        ),
        Cel(
            f"self.model.layers % ({_degree('pipelineParallel')} * {STAGES_PER_RANK}) == 0",
            "model.layers must be divisible by parallelism.pipelineParallel × model chunks per rank (2 for the "
            "interleaved and V schedules)",
            field="parallelism.pipelineParallel",
        ),
        Cel(
            f"self.model.seqLen % (2 * {_degree('contextParallel')}) == 0",
            "model.seqLen must be divisible by 2 × parallelism.contextParallel (load-balanced causal shards)",
            field="model.seqLen",
        ),
        Cel(
            f"{_degree('pipelineParallel')} * {_degree('tensorParallel')} == 1"
            " || !has(self.model.tieEmbeddings) || !self.model.tieEmbeddings",
            "model.tieEmbeddings cannot be used with parallelism.pipelineParallel or tensorParallel: the "
            "embedding and the output projection live on different stages or are split along different "
            "dimensions",
            field="model.tieEmbeddings",
        ),
        Cel(
            f"{_degree('pipelineParallel')} == 1 || (has(self.parallelism.microBatches)"
            " ? self.batch.microBatchSize % self.parallelism.microBatches == 0"
            " && self.parallelism.microBatches >= self.parallelism.pipelineParallel"
            " : self.batch.microBatchSize % self.parallelism.pipelineParallel == 0)",
            "parallelism.microBatches (default: pipelineParallel) must divide batch.microBatchSize and be at least "
            "pipelineParallel",
            field="parallelism.microBatches",
        ),
        Cel(
            "!has(self.model.architecture) || self.model.architecture == 'decoder' || "
            f"{_degree('tensorParallel')} * {_degree('pipelineParallel')} * {_degree('contextParallel')} == 1",
            "tensorParallel, pipelineParallel and contextParallel apply to architecture decoder only",
            field="parallelism",
        ),
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
    precision: TrainPrecision = TrainPrecision.bf16
    """bf16 mixed precision, fp32, or fp8 (bf16 with float8 matmuls through torchao; Hopper or newer GPUs)."""
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
    tracking: Tracking | None = None
    """Experiment tracking: MLflow, TensorBoard; unset: MLflow whenever MLFLOW_TRACKING_URI is set."""
    resources: Resources = Resources()
    """Resources of each node's pod."""

    @model_validator(mode="after")
    def _rules(self) -> PretrainRunSpec:
        exactly_one(self, ("corpus", "data"))
        check_mesh(self.model, self.batch, self.parallelism)
        per_step = self.model.seq_len * self.batch.micro_batch_size * self.parallelism.data_parallel_degree
        if self.batch.global_tokens % per_step:
            raise SpecError(
                "batch.globalTokens",
                f"batch.globalTokens ({self.batch.global_tokens}) must be a multiple of model.seqLen × "
                f"batch.microBatchSize × data-parallel ranks (nodes × gpusPerNode / (tensorParallel × "
                f"pipelineParallel × contextParallel)) = {per_step}",
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
class PlanCommunication(Spec):
    """Bytes one GPU sends per optimizer step (ring collectives: it receives as much), by mesh dimension."""

    fsdp: Annotated[float, Field(ge=0)] = 0.0
    """FSDP: parameter all-gathers (forward and backward of every micro-batch), gradient reduce-scatter."""
    tp: Annotated[float, Field(ge=0)] = 0.0
    """Tensor parallel with sequence parallel: the activation all-gathers and reduce-scatters of every layer."""
    pp: Annotated[float, Field(ge=0)] = 0.0
    """Pipeline parallel: activations sent forward and their gradients sent backward."""
    dp_replicate: Annotated[float, Field(ge=0)] = 0.0
    """The gradient all-reduce across replicas (HSDP, or DDP's whole model)."""
    total: Annotated[float, Field(ge=0)] = 0.0
    """The sum of the above."""


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
    communication_bytes_per_gpu: PlanCommunication | None = None
    """Bytes one GPU sends per optimizer step, by mesh dimension and in total."""


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
