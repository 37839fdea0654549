"""Compute planner for PretrainRuns: parameters, tokens, FLOPs, memory per GPU, GPU-hours and cost.

Pure Python (stdlib and pydantic only, no torch), so the operator and ``lmforge plan`` can use it.

Everything here is an estimate for the Llama-shaped decoder that ``lmforge_jobs.pretrain`` builds:
token embedding; per layer q/k/v/o projections without bias, a SwiGLU MLP (gate, up, down) without bias
and two RMSNorm weights; a final RMSNorm; an lm_head that is untied unless ``tieEmbeddings``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge_jobs.pretrain.config import Architecture, ModelShape, PretrainRunSpec, Strategy
from lmforge_jobs.spec import Precision

if TYPE_CHECKING:
    from lmforge_jobs.pretrain.config import Budget
    from lmforge_jobs.scaling import ScalingFit

GiB = 1024**3
DEFAULT_VOCAB = 32000
VOCAB_MULTIPLE = 64
USABLE_FRACTION = 0.9
"""Fraction of device memory a plan may use: the rest is CUDA context, NCCL buffers, fragmentation."""
PUBLISHED_LAW = "chinchilla-2022 (published)"
"""The law a plan uses by default: Hoffmann et al. 2022's published constants (``chinchilla_optimal``)."""


@dataclass(frozen=True)
class Device:
    name: str
    memory_gib: float
    peak_tflops: float
    """Dense bf16 tensor-core peak (no sparsity)."""


DEVICES: dict[str, Device] = {
    "h100": Device("H100 SXM", 80, 989),
    "h200": Device("H200 SXM", 141, 989),
    "a100": Device("A100 80GB", 80, 312),
    "l40s": Device("L40S", 48, 362),
}


def device(gpu: str) -> Device:
    try:
        return DEVICES[gpu.lower()]
    except KeyError:
        raise ValueError(f"unknown gpu {gpu!r}; expected one of {', '.join(DEVICES)}") from None


# ------------------------------------------------------------------------------------------ parameters
@dataclass(frozen=True)
class ParamCount:
    total: int
    embedding: int
    """Input embedding, plus the lm_head when it is not tied."""
    non_embedding: int


def resolve_vocab(shape: ModelShape, vocab_size: int | None = None) -> int:
    """The vocabulary size the model will have.

    An integer ``vocabSize`` in the shape is used as is. With ``auto`` the tokenizer decides: pass its size
    as ``vocab_size`` (otherwise 32000 is assumed); it is rounded up to a multiple of 64, as the trainer does.
    """
    if isinstance(shape.vocab_size, int) and vocab_size is None:
        return shape.vocab_size
    v = vocab_size if vocab_size is not None else DEFAULT_VOCAB
    if isinstance(shape.vocab_size, int):
        return int(v)
    return VOCAB_MULTIPLE * -(-int(v) // VOCAB_MULTIPLE)


def count_parameters(shape: ModelShape, vocab_size: int | None = None) -> ParamCount:
    """Exact parameter count of the Llama-shaped decoder (equals ``LlamaForCausalLM``'s)."""
    if shape.architecture != Architecture.decoder:
        raise ValueError(f"the planner supports architecture decoder only, not {shape.architecture.value}")
    vocab = resolve_vocab(shape, vocab_size)
    h, kv = shape.hidden, shape.n_kv_heads * shape.head_dim
    attention = 2 * h * h + 2 * h * kv  # q, o: h×h; k, v: h×(kvHeads·headDim)
    mlp = 3 * h * shape.ffn_size  # gate, up, down
    norms = 2 * h
    per_layer = attention + mlp + norms
    embedding = vocab * h * (1 if shape.tie_embeddings else 2)
    non_embedding = shape.layers * per_layer + h  # + final norm
    return ParamCount(total=embedding + non_embedding, embedding=embedding, non_embedding=non_embedding)


def flops_per_token(shape: ModelShape, vocab_size: int | None = None) -> float:
    """Training FLOPs per token: ``6·N + 12·L·H·Q·T`` (PaLM, Chowdhery et al. 2022, appendix B).

    N counts the weights that take part in matrix multiplies: every non-embedding weight plus the lm_head
    (vocab × hidden; the input embedding is a lookup). 6 = 2 (multiply-add) × 3 (forward + backward, which
    costs twice the forward). The attention term 12·L·H·Q·T, with L layers, H heads, Q head dimension
    (H·Q = hidden) and T sequence length, is the QKᵀ and attention·V products, which have no weights;
    like PaLM it does not halve for the causal mask. Kaplan et al. (2020) write the same as 6N + 6·L·T·d
    per token for the forward-and-backward of ``2·n_layer·n_ctx·d_attn`` forward FLOPs.
    """
    count = count_parameters(shape, vocab_size)
    vocab = resolve_vocab(shape, vocab_size)
    n_matmul = count.non_embedding + vocab * shape.hidden
    return 6.0 * n_matmul + 12.0 * shape.layers * shape.hidden * shape.seq_len


# -------------------------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class Memory:
    """Estimated peak memory per GPU, in bytes."""

    weights: float
    master_weights: float
    gradients: float
    optimizer: float
    activations: float
    """With the run's activation checkpointing setting."""
    activations_no_checkpointing: float
    activations_checkpointing: float
    logits: float

    @property
    def states(self) -> float:
        return self.weights + self.master_weights + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.states + self.activations + self.logits


def _mixed(precision: Any) -> bool:
    """bf16 mixed precision, or fp8 (bf16 mixed precision whose matmuls cast to float8 on the fly)."""
    return str(getattr(precision, "value", precision)) in ("bf16", "fp8")


def state_bytes_per_param(precision: Precision) -> dict[str, int]:
    """Bytes per parameter of the model and optimizer states for AdamW.

    bf16 mixed precision: 2 (bf16 weights) + 4 (fp32 master weights) + 2 (bf16 gradients) + 8 (fp32 Adam m
    and v) = 16. fp32: 4 + 0 + 4 + 8 = 16 as well.
    """
    if _mixed(precision):
        return {"weights": 2, "master_weights": 4, "gradients": 2, "optimizer": 8}
    return {"weights": 4, "master_weights": 0, "gradients": 4, "optimizer": 8}


def activation_bytes(
    shape: ModelShape,
    micro_batch: int,
    *,
    checkpointing: bool,
    flash_attention: bool = True,
    bytes_per_value: int = 2,
) -> float:
    """Activation memory of one micro-batch on one GPU (no tensor or sequence parallelism).

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models") give
    ``s·b·h·(34 + 5·a·s/h)`` bytes per layer for 16-bit activations (s sequence length, b micro-batch,
    h hidden, a heads). The ``5·a·s/h`` term stores the s×s attention scores; fused (flash) attention, which
    PyTorch's scaled_dot_product_attention uses, does not keep them, so it is left out when
    ``flash_attention``. The 34 was derived for a GPT block with a 4h MLP; a SwiGLU/GQA block differs a
    little, so treat this as an approximation. With full activation checkpointing each layer keeps only its
    bf16 input (2·s·b·h bytes) and one layer's activations exist at a time during recomputation.
    ``bytes_per_value`` is 2 for 16-bit activations; fp32 training (4) doubles everything.
    """
    s, b, h, a = shape.seq_len, micro_batch, shape.hidden, shape.heads
    scale = bytes_per_value / 2
    per_layer = scale * s * b * h * (34 + (0 if flash_attention else 5 * a * s / h))
    if checkpointing:
        return shape.layers * bytes_per_value * s * b * h + per_layer
    return shape.layers * per_layer


def logits_bytes(
    shape: ModelShape, micro_batch: int, vocab: int, precision: Precision = Precision.bf16
) -> float:
    """Logits of one micro-batch: bf16 logits plus their fp32 copy for the cross-entropy (6 B per entry);
    in fp32 the logits and the log-softmax the cross-entropy keeps for its backward (8 B)."""
    per_entry = 6 if _mixed(precision) else 8
    return shape.seq_len * micro_batch * vocab * per_entry


# ------------------------------------------------------------------------------------- communication
@dataclass(frozen=True)
class Communication:
    """Bytes one GPU sends per optimizer step, by mesh dimension (ring collectives: a GPU receives as much
    as it sends). The busiest GPU: a middle pipeline stage, the stage with the most layers."""

    fsdp: float
    """FSDP2 over dp_shard × cp: the parameters all-gathered for every micro-batch's forward and again for
    its backward (resharded after the forward), the gradients reduce-scattered once a step (fp32)."""
    tp: float
    """Tensor parallel with sequence parallel: per layer and micro-batch 2 all-gathers and 2 reduce-scatters
    of the block's s·b·h activations in the forward, the same in the backward (+4 with activation
    checkpointing, the recomputed forward); one of each at the embedding and the output projection."""
    pp: float
    """Pipeline parallel: each piece's activations sent forward and their gradients sent backward, once per
    stage the rank holds."""
    dp_replicate: float
    """The gradient all-reduce across replicas: HSDP's replicas of each shard, or DDP's whole model (fp32)."""

    @property
    def total(self) -> float:
        return self.fsdp + self.tp + self.pp + self.dp_replicate

    def to_dict(self) -> dict[str, float]:
        return {
            "fsdp": self.fsdp,
            "tp": self.tp,
            "pp": self.pp,
            "dpReplicate": self.dp_replicate,
            "total": self.total,
        }


def communication_bytes(spec: PretrainRunSpec, count: ParamCount) -> Communication:
    """Bytes one GPU sends per optimizer step for ``spec``'s mesh (see :class:`Communication`). A ring
    all-gather or reduce-scatter over n ranks of a tensor of S bytes sends (n − 1)/n · S per rank, an
    all-reduce twice that. Context parallel's ring attention (K/V exchange) is not counted."""
    par = spec.parallelism
    shape = spec.model
    world = par.world_size
    tp, pp, cp = par.tensor_parallel, par.pipeline_parallel, par.context_parallel
    sharded = par.strategy == Strategy.fsdp
    mixed = _mixed(spec.precision)
    act_bytes = 2 if mixed else 4
    param_bytes = 2 if mixed else 4  # FSDP2 gathers the bf16 copy (MixedPrecisionPolicy param_dtype)
    grad_bytes = 4  # FSDP2 reduces in fp32 (reduce_dtype); DDP's gradients are the fp32 parameters'
    dp = world // (tp * pp * cp)
    mb = spec.batch.micro_batch_size
    accumulation = max(1, spec.batch.global_tokens // (shape.seq_len * mb * dp))
    held = count.total if pp == 1 else count.non_embedding / pp + count.embedding / 2
    per_rank_params = held / tp

    fsdp = replicate = 0.0
    if sharded:
        shard = (world // par.mesh_product) * cp
        if shard > 1:
            gathers = 2 * accumulation * param_bytes * per_rank_params
            fsdp = (shard - 1) / shard * (gathers + grad_bytes * per_rank_params)
        r = par.data_parallel_replicate
        if r > 1:
            replicate = 2 * (r - 1) / r * grad_bytes * per_rank_params / max(1, shard)
    elif world > 1:  # DDP: every gradient all-reduced over all processes
        replicate = 2 * (world - 1) / world * grad_bytes * count.total

    activation = shape.seq_len / cp * mb * shape.hidden * act_bytes  # one micro-batch's residual stream
    tp_bytes = 0.0
    if tp > 1:
        layers = -(-shape.layers // pp)
        per_layer = 8 + (4 if par.activation_checkpointing else 0)
        ends = 4 if pp == 1 else 2
        tp_bytes = accumulation * (tp - 1) / tp * activation * (layers * per_layer + ends)
    pp_bytes = 0.0
    if pp > 1:  # the pieces of a micro-batch add up to it; the stage output is sequence-sharded under tp
        pp_bytes = accumulation * 2 * activation / tp * par.pipeline_schedule.stages_per_rank
    return Communication(fsdp=fsdp, tp=tp_bytes, pp=pp_bytes, dp_replicate=replicate)


# ---------------------------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """The compute plan for one PretrainRun."""

    parameters: int
    embedding_parameters: int
    non_embedding_parameters: int
    vocab_size: int
    tokens: int
    steps: int
    flops: float
    flops_per_token: float
    gpu: str
    world_size: int
    strategy: str
    precision: str
    micro_batch_size: int
    activation_checkpointing: bool
    memory: Memory
    communication: Communication
    """Bytes one GPU sends per optimizer step, by mesh dimension."""
    mesh: dict[str, int]
    """Degree of each mesh dimension (pp, dp_replicate, dp_shard, cp, tp)."""
    bubble_fraction: float
    """Share of a step the pipeline stages sit idle (0 without pipeline parallel)."""
    device_memory_gib: float
    peak_tflops: float
    mfu: float
    gpu_hours: float
    wall_clock_hours: float
    cost: float | None
    fits: bool
    reason: str
    notes: list[str] = field(default_factory=list)
    law: str = PUBLISHED_LAW
    """The scaling law that chose the token count (``law_label``)."""

    @property
    def memory_per_gpu_gib(self) -> float:
        return self.memory.total / GiB

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["memory"] = {k: v / GiB for k, v in d["memory"].items()}
        d["memory"]["states"] = self.memory.states / GiB
        d["memory"]["total"] = self.memory_per_gpu_gib
        d["memoryPerGpuGiB"] = self.memory_per_gpu_gib
        d["communication"] = self.communication.to_dict()
        d["communicationBytesPerStep"] = self.communication.total * self.world_size
        return d

    def to_status(self) -> Any:
        """The ``status.plan`` object of the PretrainRun."""
        from lmforge_jobs.pretrain.config import Plan as StatusPlan

        return StatusPlan(
            parameters=self.parameters,
            tokens=self.tokens,
            steps=self.steps,
            flops=self.flops,
            memory_per_gpu_gi_b=round(self.memory_per_gpu_gib, 3),
            gpu_hours=self.gpu_hours,
            fits=self.fits,
            reason=self.reason[:4096],
            law=self.law[:256],
            communication_bytes_per_gpu=self.communication.to_dict(),  # validated into PlanCommunication
        )


def plan_pretrain(
    spec: PretrainRunSpec,
    vocab_size: int | None = None,
    gpu: str = "h100",
    mfu: float = 0.4,
    price_per_gpu_hour: float | None = None,
    peak_tflops: float | None = None,
    flash_attention: bool = True,
    law: ScalingFit | None = None,
) -> Plan:
    """Plan a PretrainRun: size, length, FLOPs, memory per GPU, GPU-hours, wall clock and cost."""
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], not {mfu}")
    dev = device(gpu)
    peak = float(peak_tflops) if peak_tflops else dev.peak_tflops
    shape = spec.model
    count = count_parameters(shape, vocab_size)
    vocab = resolve_vocab(shape, vocab_size)
    n = count.total
    global_tokens = spec.batch.global_tokens
    tokens, law_note = budget_tokens(spec.budget, n, global_tokens, law)
    steps = -(-tokens // global_tokens)
    per_token = flops_per_token(shape, vocab_size)
    flops = per_token * tokens

    par = spec.parallelism
    world = par.world_size
    sharded = par.strategy == Strategy.fsdp
    tp, pp, cp = par.tensor_parallel, par.pipeline_parallel, par.context_parallel
    fsdp_degree = (world // par.mesh_product) * cp if sharded else 1  # FSDP shards over dp_shard × cp
    per_param = state_bytes_per_param(spec.precision)
    # the parameters of the busiest pipeline stage: its share of the blocks plus one end (embedding on the
    # first, output projection on the last; tied embeddings are refused with pipeline parallel)
    held = n if pp == 1 else count.non_embedding / pp + count.embedding / 2
    divisor = tp * fsdp_degree
    mb = spec.batch.micro_batch_size
    pieces = par.pipeline_micro_batches if pp > 1 else 1
    piece = mb / pieces
    ckpt = par.activation_checkpointing
    act_bytes = 2 if _mixed(spec.precision) else 4
    # what one rank holds of one piece: 1/cp of each sequence; tensor parallel with sequence parallel
    # splits every activation of a block over tp (Korthikanti et al. 2022: 34·s·b·h/t per layer)
    stage_shape = shape.model_copy(
        update={"layers": max(1, shape.layers // pp), "seq_len": shape.seq_len // cp}
    )
    act_full = (
        activation_bytes(
            stage_shape, 1, checkpointing=False, flash_attention=flash_attention, bytes_per_value=act_bytes
        )
        * piece
        / tp
    )
    act_ckpt = (
        activation_bytes(
            stage_shape, 1, checkpointing=True, flash_attention=flash_attention, bytes_per_value=act_bytes
        )
        * piece
        / tp
    )
    # 1F1B keeps up to pp pieces in flight on the first stage before their backwards start
    in_flight = min(pp, pieces) if pp > 1 else 1
    act_full, act_ckpt = act_full * in_flight, act_ckpt * in_flight
    memory = Memory(
        weights=held * per_param["weights"] / divisor,
        master_weights=held * per_param["master_weights"] / divisor,
        gradients=held * per_param["gradients"] / divisor,
        optimizer=held * per_param["optimizer"] / divisor,
        activations=act_ckpt if ckpt else act_full,
        activations_no_checkpointing=act_full,
        activations_checkpointing=act_ckpt,
        # one piece's logits at a time, 1/cp of the positions, 1/tp of the vocabulary (loss parallel)
        logits=logits_bytes(stage_shape, 1, vocab, spec.precision) * piece / tp,
    )
    bubble = bubble_fraction(pp, pieces, par.pipeline_schedule.stages_per_rank)

    gpu_hours = flops / (peak * 1e12 * mfu) / 3600 / (1 - bubble)
    wall = gpu_hours / world
    cost = gpu_hours * price_per_gpu_hour if price_per_gpu_hour is not None else None

    usable = dev.memory_gib * USABLE_FRACTION
    need = memory.total / GiB
    if need <= usable:
        fits = True
        reason = (
            f"needs ~{need:.1f} GiB per GPU of {dev.memory_gib:g} GiB on {dev.name} "
            f"({USABLE_FRACTION:.0%} usable = {usable:.1f} GiB)"
        )
    else:
        fits = False
        hints = []
        if not sharded and world > 1:
            hints.append("use strategy fsdp to shard weights, gradients and optimizer state")
        if not ckpt and act_ckpt < act_full:
            hints.append(
                f"enable activationCheckpointing (activations {act_full / GiB:.1f} → {act_ckpt / GiB:.1f} GiB)"
            )
        if mb > 1:
            hints.append("lower batch.microBatchSize")
        if sharded:
            hints.append("add GPUs, or tensor/pipeline parallel (lmforge plan --suggest)")
        reason = (
            f"needs ~{need:.1f} GiB per GPU but {dev.name} has {dev.memory_gib:g} GiB "
            f"({usable:.1f} GiB usable)" + ("; " + ", ".join(hints) if hints else "")
        )
    notes = [law_note] if law_note else []
    if shape.vocab_size == "auto" and vocab_size is None:
        notes.append(f"vocabSize is auto and no tokenizer size was given: assumed {vocab}")
    return Plan(
        parameters=n,
        embedding_parameters=count.embedding,
        non_embedding_parameters=count.non_embedding,
        vocab_size=vocab,
        tokens=tokens,
        steps=steps,
        flops=flops,
        flops_per_token=per_token,
        gpu=gpu.lower(),
        world_size=world,
        strategy=spec.parallelism.strategy.value,
        precision=spec.precision.value,
        micro_batch_size=mb,
        activation_checkpointing=ckpt,
        memory=memory,
        communication=communication_bytes(spec, count),
        mesh={
            "pp": pp,
            "dp_replicate": par.data_parallel_replicate,
            "dp_shard": world // par.mesh_product,
            "cp": cp,
            "tp": tp,
        },
        bubble_fraction=bubble,
        device_memory_gib=dev.memory_gib,
        peak_tflops=peak,
        mfu=mfu,
        gpu_hours=gpu_hours,
        wall_clock_hours=wall,
        cost=cost,
        fits=fits,
        reason=reason,
        notes=notes,
        law=law_label(law),
    )


# --------------------------------------------------------------------------------- which law plans
def load_law(path: str) -> ScalingFit:
    """A scaling law fitted by ``lmforge_jobs.scaling``: its JSON (``scaling.json`` of ``lmforge run``), or
    a ScalingStudy as the API server returns it (``kubectl get scalingstudy NAME -o json|yaml``: the fit
    the operator made, from ``status.fits``); a ValueError says what is wrong."""
    from lmforge_jobs.scaling import ScalingFit

    study = _study_document(path)
    law = ScalingFit.load(path) if study is None else law_from_study(study, Path(path).name)
    if not all(math.isfinite(law.value(k)) for k in ("a", "b")):
        raise ValueError(f"{path}: the fitted law has no compute-optimal frontier (a or b is not finite)")
    return law


def _study_document(path: str) -> dict[str, Any] | None:
    """The ScalingStudy object in ``path`` (JSON or YAML), None when it holds something else."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return None  # ScalingFit.load says why
    try:
        doc = yaml.safe_load(text)  # JSON is YAML
    except yaml.YAMLError:
        return None
    return doc if isinstance(doc, dict) and doc.get("kind") == "ScalingStudy" else None


def law_from_study(study: Mapping[str, Any], source: str = "") -> ScalingFit:
    """The law a ScalingStudy's ``status`` holds: the fit its ``status.target`` predicted with (approach 3
    when it was fitted, else 2), on the succeeded points of ``status.points``."""
    from lmforge_jobs.scaling import FORMAT, ScalingFit

    name = (study.get("metadata") or {}).get("name", "?")
    status = study.get("status") or {}
    fits = {
        f.get("approach"): f for f in status.get("fits") or [] if f.get("parameters") and not f.get("error")
    }
    if not fits:
        raise ValueError(
            f"{source}: ScalingStudy/{name} has no fitted law in its status (phase {status.get('phase')})"
        )
    chosen = (status.get("target") or {}).get("approach")
    approach = chosen if chosen in fits else max(fits)
    points = [
        {"params": p["parameters"], "tokens": p["tokens"], "loss": p["loss"], "compute": p.get("flops")}
        for p in status.get("points") or []
        if p.get("phase") == "Succeeded" and p.get("loss") is not None
    ]
    doc = {
        "format": FORMAT,
        "approach": approach,
        "parameters": fits[approach]["parameters"],
        "points": points,
    }
    return ScalingFit.from_dict(doc, source=f"{source or 'ScalingStudy'} (ScalingStudy/{name})")


def law_label(law: ScalingFit | None) -> str:
    """``chinchilla-2022 (published)`` or ``law.json (approach 3, fitted on 28 points)``."""
    return PUBLISHED_LAW if law is None else law.describe()


def budget_tokens(
    budget: Budget, params: int, global_tokens: int, law: ScalingFit | None = None
) -> tuple[int, str | None]:
    """Training tokens of a budget, and a note when a fitted law changed them.

    ``tokens`` and ``steps`` are taken as written. ``tokensPerParameter`` is taken as written under the
    published law; with a fitted ``law`` the run gets that law's compute-optimal token count for its size
    instead (the frontier N_opt(C) inverted at N, then D_opt(C)), and the note says what it replaced.
    """
    if budget.tokens is not None:
        return budget.tokens, None
    if budget.tokens_per_parameter is None:
        return int(budget.steps) * global_tokens, None
    if law is None:
        return round(budget.tokens_per_parameter * params), None
    tokens = round(law.tokens_for_params(params))
    return tokens, (
        f"tokensPerParameter {budget.tokens_per_parameter:g} replaced by the fitted law's compute-optimal "
        f"{tokens / params:.1f} tokens/parameter at {_si(params)} parameters"
    )


def law_optimal(flops: float, law: ScalingFit) -> ComputeOptimal:
    """``chinchilla_optimal`` under a fitted law: its N_opt(C), D_opt(C) and, for approach 3, L(N, D)
    (approach 2 does not model the loss: NaN)."""
    pred = law.predict(flops)
    loss = pred.loss if pred.loss is not None else float("nan")
    return ComputeOptimal(
        flops=flops, parameters=pred.params, tokens=pred.tokens, loss=loss, method=law_label(law)
    )


def bubble_fraction(pp: int, pieces: int, stages_per_rank: int = 1) -> float:
    """Idle share of a pipelined step: (p − 1) / (v·m + p − 1) for p stages, m pieces and v model chunks per
    rank (Narayanan et al. 2021: 1F1B and GPipe have v = 1, interleaving divides the bubble by v). The
    zero-bubble schedules do better; this is their upper bound."""
    if pp <= 1:
        return 0.0
    return (pp - 1) / (stages_per_rank * pieces + pp - 1)


def suggest_mesh(
    spec: PretrainRunSpec, vocab_size: int | None = None, gpu: str = "h100", **plan_args: Any
) -> tuple[dict[str, int], Plan] | None:
    """The smallest tensor × pipeline parallel degrees (FSDP over the rest, tensor parallel within a node)
    whose plan fits ``gpu``, trying activation checkpointing before a larger mesh; None when none fits."""
    par = spec.parallelism
    gpus = max(1, par.gpus_per_node)
    candidates = []
    for tp in (d for d in range(1, gpus + 1) if gpus % d == 0):
        for pp in (d for d in range(1, par.world_size // tp + 1) if (par.world_size // tp) % d == 0):
            for ckpt in (par.activation_checkpointing, True):
                candidates.append((tp * pp, pp, tp, ckpt))
    for _, pp, tp, ckpt in sorted(set(candidates)):
        update = {
            "strategy": "fsdp",
            "tensorParallel": tp,
            "pipelineParallel": pp,
            "activationCheckpointing": ckpt,
        }
        doc = spec.model_dump(by_alias=True, exclude_none=True)
        doc["parallelism"] = {**doc["parallelism"], **update}
        doc["parallelism"].pop("dataParallelShard", None)
        try:
            candidate = type(spec).model_validate(doc)
        except ValueError:  # the model cannot be cut that way (heads, layers, batch)
            continue
        planned = plan_pretrain(candidate, vocab_size, gpu, **plan_args)
        if planned.fits:
            return {
                "tensorParallel": tp,
                "pipelineParallel": pp,
                "activationCheckpointing": int(ckpt),
            }, planned
    return None


# ------------------------------------------------------------------------------- compute-optimal sizes
@dataclass(frozen=True)
class ScalingLaw:
    """L(N, D) = E + A/N^α + B/D^β."""

    name: str
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n: float, d: float) -> float:
        return self.E + self.A / n**self.alpha + self.B / d**self.beta


SCALING_LAWS: dict[str, ScalingLaw] = {
    # Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", approach 3 (parametric fit).
    "hoffmann-approach3": ScalingLaw("Hoffmann et al. 2022 (approach 3)", 1.69, 406.4, 410.7, 0.34, 0.28),
    # Besiroglu et al. (Epoch AI) 2024, "Chinchilla Scaling: A replication attempt".
    "epoch": ScalingLaw(
        "Besiroglu et al. 2024 (Epoch AI replication)", 1.82, 482.01, 2085.43, 0.3478, 0.3658
    ),
}
# Hoffmann et al.'s approaches 1 and 2 fit N_opt ∝ C^0.5 and D_opt ∝ C^0.5 directly; anchored at Chinchilla's
# own run (70B parameters, 1.4T tokens) that is the familiar "20 tokens per parameter" rule.
HOFFMANN_TOKENS_PER_PARAMETER = 20.0
METHODS: dict[str, str] = {
    "hoffmann": "Hoffmann et al. 2022 (approaches 1-2: N, D ∝ C^0.5, 20 tokens/parameter)",
    "hoffmann-approach3": SCALING_LAWS["hoffmann-approach3"].name,
    "epoch": SCALING_LAWS["epoch"].name,
}


@dataclass(frozen=True)
class ComputeOptimal:
    flops: float
    parameters: float
    tokens: float
    loss: float
    method: str

    @property
    def tokens_per_parameter(self) -> float:
        return self.tokens / self.parameters


def chinchilla_optimal(flops: float, method: str = "hoffmann") -> ComputeOptimal:
    """Compute-optimal parameters and tokens for a FLOP budget C under C = 6·N·D.

    ``hoffmann`` (approaches 1-2 of the paper): D = 20·N, so N = sqrt(C/120) — 69B parameters and 1.4T tokens
    for Chinchilla's 5.76e23 FLOPs, the run the paper trained. ``hoffmann-approach3`` and ``epoch`` minimise
    a parametric loss L(N, D) = E + A/N^α + B/D^β subject to C = 6ND, which gives
    N_opt = G·(C/6)^(β/(α+β)), D_opt = C/(6·N_opt), with G = (αA/(βB))^(1/(α+β)).
    The fits disagree: Hoffmann's published approach-3 constants give about 32B for 5.76e23 FLOPs (the
    rounding of the published constants is part of why; see Besiroglu et al. 2024), the Epoch replication
    ~72B. The reported loss is the Epoch fit's L(N, D) for ``hoffmann``, else the method's own fit.
    """
    if flops <= 0:
        raise ValueError("flops must be positive")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if method == "hoffmann":
        n = math.sqrt(flops / (6 * HOFFMANN_TOKENS_PER_PARAMETER))
        d = flops / (6 * n)
        return ComputeOptimal(
            flops=flops, parameters=n, tokens=d, loss=SCALING_LAWS["epoch"].loss(n, d), method=method
        )
    law = SCALING_LAWS[method]
    a, b = law.alpha, law.beta
    g = (a * law.A / (b * law.B)) ** (1 / (a + b))
    n = g * (flops / 6) ** (b / (a + b))
    d = flops / (6 * n)
    return ComputeOptimal(flops=flops, parameters=n, tokens=d, loss=law.loss(n, d), method=method)


def nearest_shape(params: float, vocab_size: int = DEFAULT_VOCAB, seq_len: int = 2048) -> ModelShape:
    """The Llama-like shape whose parameter count is closest to ``params``.

    hidden is a multiple of 128, head dimension 128, the largest number of key/value heads up to 8 that
    divides the heads,
    SwiGLU default FFN size, and aspect ratio hidden/layers between 64 and 128.
    """
    best: tuple[float, ModelShape] | None = None
    for hidden in range(128, 32768 + 1, 128):
        heads = hidden // 128
        kv = max(d for d in range(1, 9) if heads % d == 0)
        lo, hi = max(1, math.ceil(hidden / 128)), min(512, hidden // 64)
        for layers in range(lo, hi + 1):
            shape = ModelShape(
                layers=layers, hidden=hidden, heads=heads, kv_heads=kv, seq_len=seq_len, vocab_size=vocab_size
            )
            diff = abs(count_parameters(shape).total - params)
            if best is None or diff < best[0]:
                best = (diff, shape)
    assert best is not None
    return best[1]


# ----------------------------------------------------------------------------------------------- text
def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _comm_parts(comm: Communication) -> str:
    names = {"fsdp": "FSDP", "tp": "TP", "pp": "PP", "dpReplicate": "replicas"}
    parts = comm.to_dict()
    return ", ".join(f"{names[k]} {v / 1e6:,.1f} MB" for k, v in parts.items() if k in names and v)


def explain(plan: Plan) -> str:
    """A readable summary of the plan with the memory accounting explained."""
    m = plan.memory
    g = GiB
    mesh = " × ".join(f"{k} {v}" for k, v in plan.mesh.items() if v > 1) or "one GPU"
    shard = f"(mesh {mesh})" if plan.strategy == "fsdp" else "(replicated, DDP)"
    per = state_bytes_per_param(plan.precision)
    rows = [
        ("parameters", f"{plan.parameters:,} ({_si(plan.parameters)})"),
        ("  embedding", f"{plan.embedding_parameters:,}  (vocab {plan.vocab_size:,})"),
        ("  non-embedding", f"{plan.non_embedding_parameters:,}"),
        ("tokens", f"{plan.tokens:,} ({_si(plan.tokens)}, {plan.tokens / plan.parameters:.1f}/param)"),
        ("law", plan.law),
        ("steps", f"{plan.steps:,}"),
        ("FLOPs", f"{plan.flops:.3e}  ({plan.flops_per_token:.3e}/token = 6N + 12·L·h·T)"),
        ("GPU", f"{plan.gpu} × {plan.world_size}, {plan.peak_tflops:g} TFLOP/s peak, MFU {plan.mfu:.0%}"),
        ("GPU-hours", f"{plan.gpu_hours:,.1f}"),
        ("wall clock", f"{plan.wall_clock_hours:,.1f} h ({plan.wall_clock_hours / 24:.1f} days)"),
    ]
    if plan.bubble_fraction:
        rows.append(("pipeline bubble", f"{plan.bubble_fraction:.1%} of each step idle (in the GPU-hours)"))
    if plan.cost is not None:
        rows.append(("cost", f"{plan.cost:,.0f}"))
    rows += [
        (f"memory/GPU {shard}", ""),
        (f"  weights ({per['weights']} B/param)", f"{m.weights / g:8.2f} GiB"),
        (f"  master weights ({per['master_weights']} B)", f"{m.master_weights / g:8.2f} GiB"),
        (f"  gradients ({per['gradients']} B)", f"{m.gradients / g:8.2f} GiB"),
        (f"  AdamW m, v ({per['optimizer']} B)", f"{m.optimizer / g:8.2f} GiB"),
        (
            f"  activations (mb {plan.micro_batch_size}, ckpt {'on' if plan.activation_checkpointing else 'off'})",
            f"{m.activations / g:8.2f} GiB  (off {m.activations_no_checkpointing / g:.2f}, "
            f"on {m.activations_checkpointing / g:.2f})",
        ),
        ("  logits", f"{m.logits / g:8.2f} GiB"),
        ("  total", f"{m.total / g:8.2f} GiB of {plan.device_memory_gib:g} GiB"),
        ("fits", f"{'yes' if plan.fits else 'NO'}: {plan.reason}"),
    ]
    comm = plan.communication
    if comm.total:
        rows.append(
            ("communication/GPU/step", f"{comm.total / 1e6:,.1f} MB sent by each GPU ({_comm_parts(comm)})")
        )
        rows.append(("  all GPUs", f"{comm.total * plan.world_size / 1e9:,.2f} GB per step"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}".rstrip() for k, v in rows]
    lines += [
        "",
        "Memory accounting: AdamW keeps 16 bytes per parameter — bf16 mixed precision is 2 (bf16 weights)",
        "+ 4 (fp32 master) + 2 (bf16 grads) + 8 (fp32 Adam m, v); fp32 is 4 + 4 + 8. So a 1B model needs",
        "~16 GB of states before activations, i.e. 8× its bf16 weights (4× its fp32 weights). Rules of thumb",
        "like '~6× the weights' or '~24 GB per 1B at fp32' fold in activations and buffers loosely; the",
        "activations here follow Korthikanti et al. 2022 (s·b·h·34 bytes per layer with fused attention) and",
        "are approximate (doubled for fp32 activations). FSDP divides the states by the world size; DDP",
        "keeps a full copy on every GPU. The optimizer is fused AdamW, which needs no temporaries.",
    ]
    for note in plan.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
