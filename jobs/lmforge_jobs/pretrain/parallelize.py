"""Apply parallelism to a model written for one device, in torchtitan's order: tensor parallel (+ sequence
parallel on the norms, loss parallel on the output) → activation checkpointing → torch.compile (per
block) → FSDP2 ``fully_shard`` (per block, then the root; HSDP when replicated) or DDP.

The device mesh has the dimensions ``pp, dp_replicate, dp_shard, cp, tp`` (outermost first; only those of
size > 1 are built): tensor parallel innermost, where the bandwidth is (NVLink within a node), pipeline
parallel outermost. Ranks are laid out row-major over these dimensions, so :class:`MeshDims` tells each
rank its data-parallel coordinate without any collective.

On CPU the process group is gloo: in torch 2.13 it has every collective these need (all_reduce,
all_gather_into_tensor, reduce_scatter_tensor, all_to_all_single, scatter, send/recv), so tensor and
sequence parallel run on CPU as on GPU. Context parallel needs GPU attention kernels (see
:func:`apply_cp`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmforge_jobs.entry import ConfigError
from lmforge_jobs.pretrain.model import HFObjective, Transformer, block_list, blocks_of

DIM_NAMES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class MeshDims:
    """The degree of each mesh dimension for this job's processes."""

    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    fsdp: bool = False
    """Shard parameters over dp_shard × cp (strategy fsdp); otherwise DDP over dp_replicate."""

    @classmethod
    def from_spec(cls, parallelism: Any, world: int) -> MeshDims:
        """The spec's mesh for ``world`` processes. When the launcher started a different number of processes
        than nodes × gpusPerNode (a local run on fewer GPUs), dataParallelShard takes up the difference."""
        if parallelism.strategy.value != "fsdp":
            return cls(dp_replicate=world)
        rest = parallelism.mesh_product
        if world % rest:
            raise ConfigError(
                "parallelism",
                f"{world} processes cannot hold dataParallelReplicate × tensorParallel × pipelineParallel × "
                f"contextParallel = {rest}",
            )
        shard = world // rest
        return cls(
            pp=parallelism.pipeline_parallel,
            dp_replicate=parallelism.data_parallel_replicate,
            dp_shard=shard,
            cp=parallelism.context_parallel,
            tp=parallelism.tensor_parallel,
            fsdp=True,
        )

    @property
    def sizes(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in DIM_NAMES}

    @property
    def world(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def dp(self) -> int:
        """Ranks that read different data."""
        return self.dp_replicate * self.dp_shard

    def coordinate(self, rank: int) -> dict[str, int]:
        """This rank's index along each dimension (row-major, as ``init_device_mesh`` lays them out)."""
        out = {}
        for name in reversed(DIM_NAMES):
            size = getattr(self, name)
            out[name] = rank % size
            rank //= size
        return out

    def dp_rank(self, rank: int) -> int:
        c = self.coordinate(rank)
        return c["dp_replicate"] * self.dp_shard + c["dp_shard"]

    def describe(self) -> str:
        parts = [f"{name} {size}" for name, size in self.sizes.items() if size > 1]
        return " × ".join(parts) if parts else "one process"


def build_mesh(dims: MeshDims, device_type: str) -> Any:
    """The DeviceMesh (every dimension, size 1 included, so the names are always there) with the flattened
    ``dp`` (data loading) and ``dp_shard_cp`` (FSDP shards) views; None for one process or DDP."""
    if not dims.fsdp or dims.world <= 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, tuple(dims.sizes.values()), mesh_dim_names=DIM_NAMES)
    mesh["dp_replicate", "dp_shard"]._flatten("dp")
    mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    return mesh


def fsdp_mesh(mesh: Any, dims: MeshDims) -> Any:
    """FSDP shards over dp_shard × cp (context-parallel ranks hold different tokens, the same weights);
    with dataParallelReplicate > 1 a 2-D (replicate, shard) mesh: HSDP."""
    if dims.dp_replicate > 1:
        return mesh["dp_replicate", "dp_shard_cp"]
    return mesh["dp_shard_cp"]


# --------------------------------------------------------------------------------------- tensor parallel
def apply_tp(model: Transformer, tp_mesh: Any, loss_parallel: bool) -> None:
    """Megatron-style tensor parallel with sequence parallel (Korthikanti et al. 2022), as DTensor plans:
    q/k/v and gate/up column-wise (each rank keeps whole heads), o and down row-wise; the residual stream
    between blocks stays sharded along the sequence, so the norms see 1/tp of the tokens. The embedding
    is split by vocabulary rows, the output projection by vocabulary columns; with ``loss_parallel`` the
    logits stay sharded and the cross-entropy is computed without gathering them."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    outer: dict[str, Any] = {}
    if model.model.embed_tokens is not None:  # a pipeline stage may hold neither end
        outer["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.lm_head is not None:
        outer["model.norm"] = SequenceParallel()
        outer["lm_head"] = ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )
    if outer:
        parallelize_module(model, tp_mesh, outer)
    for block in model.model.layers.values():
        parallelize_module(
            block,
            tp_mesh,
            {
                "input_layernorm": SequenceParallel(),
                "self_attn": PrepareModuleInput(
                    input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)
                ),
                "self_attn.q_proj": ColwiseParallel(),
                "self_attn.k_proj": ColwiseParallel(),
                "self_attn.v_proj": ColwiseParallel(),
                "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
                "post_attention_layernorm": SequenceParallel(),
                "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
                "mlp.gate_proj": ColwiseParallel(),
                "mlp.up_proj": ColwiseParallel(),
                "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
            },
        )


def loss_context(loss_parallel: bool) -> Any:
    """Forward and backward of a loss over vocabulary-sharded logits run inside this context."""
    if not loss_parallel:
        return contextlib.nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel as context

    return context()


# ---------------------------------------------------------------------------------- context parallel, fp8
def check_gpu_only(dims: MeshDims, precision: str, device: torch.device, async_tp: bool = False) -> None:
    """Refuse, naming the field, what needs a GPU this process does not have (before any rendezvous)."""
    if async_tp and device.type != "cuda":
        raise ConfigError(
            "parallelism.asyncTensorParallel",
            "asyncTensorParallel needs CUDA GPUs: its micro-pipelined collectives run on NCCL symmetric memory, "
            "which gloo on CPUs does not have; set it false",
        )
    if dims.cp > 1 and device.type != "cuda":
        raise ConfigError(
            "parallelism.contextParallel",
            f"contextParallel {dims.cp} needs CUDA GPUs: ring attention (torch's context_parallel) replaces the "
            "flash and memory-efficient scaled_dot_product_attention kernels, which CPUs do not have",
        )
    if precision != "fp8":
        return
    if device.type != "cuda":
        raise ConfigError(
            "precision",
            "precision fp8 needs an NVIDIA GPU of compute capability 8.9 or newer "
            "(Ada, Hopper: H100/H200) and torchao; this process runs on the CPU",
        )
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ConfigError(
            "precision",
            f"precision fp8 needs compute capability 8.9 or newer (Ada, Hopper: H100/H200); "
            f"{torch.cuda.get_device_name(device)} is {major}.{minor}: use bf16",
        )
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise ConfigError(
            "precision",
            "precision fp8 needs torchao (float8 training): a jobs image with lmforge[fp8] installed",
        ) from None
    if dims.tp > 1:
        raise ConfigError(
            "precision",
            "precision fp8 with tensorParallel needs torchao's float8 tensor-parallel plans, not wired yet: use "
            "bf16 or FSDP and pipeline parallel only",
        )


def apply_fp8(model: nn.Module) -> None:
    """torchao float8 training: the blocks' linear layers run their matmuls in float8 with dynamic scaling
    (weights, activations and gradients scaled per tensor); the output projection stays bf16, as in
    torchtitan, and so do layers whose sizes are not multiples of 16 (the float8 GEMM's requirement)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    def wanted(module: nn.Module, fqn: str) -> bool:
        return (
            isinstance(module, nn.Linear)
            and fqn != "lm_head"
            and module.in_features % 16 == 0
            and module.out_features % 16 == 0
        )

    convert_to_float8_training(model, config=Float8LinearConfig(), module_filter_fn=wanted)


def cp_context(mesh: Any, dims: MeshDims, model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    """Context parallel for one forward and backward: the batch and the RoPE table are cut along the
    sequence into 2·cp load-balanced chunks (each rank gets one early and one late chunk, so causal work
    is even) and SDPA becomes ring attention over the cp group. GPU only (:func:`check_gpu_only`)."""
    if dims.cp <= 1:
        return contextlib.nullcontext()
    from torch.distributed.tensor.experimental import context_parallel

    rope = model.rope if isinstance(model, Transformer) else None
    buffers = [batch["input_ids"], batch["labels"], *([rope] if rope is not None else [])]
    return context_parallel(
        mesh["cp"],
        buffers=buffers,
        buffer_seq_dims=[1] * len(buffers),
        no_restore_buffers={batch["input_ids"], batch["labels"]},
    )


# ------------------------------------------------------------------------------------- pipeline parallel
def stage_ids(pp_rank: int, pp: int, schedule: str, per_rank: int) -> list[int]:
    """The pipeline stages (model chunks, 0 = embedding end) this rank runs: round-robin for the looped
    and interleaved schedules, a V (``rank`` and ``2·pp − 1 − rank``) for ZBVZeroBubble and DualPipeV."""
    if per_rank == 1:
        return [pp_rank]
    if schedule in ("ZBVZeroBubble", "DualPipeV"):
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(per_rank)]


class StageView(nn.Module):
    """One pipeline stage: some consecutive blocks of the rank's model, with the embedding on the first
    stage and the final norm and output projection on the last. It holds the rank model's own modules
    (no copy), so the rank model keeps the state-dict names of the whole model for checkpoints."""

    def __init__(self, model: Transformer, keys: list[str], first: bool, last: bool):
        super().__init__()
        self.embed_tokens = model.model.embed_tokens if first else None
        self.layers = nn.ModuleDict({k: model.model.layers[k] for k in keys})
        self.norm = model.model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self._owner = [model]  # a list: not registered as a child (its rope buffer is all we read)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens is not None:
            h = self.embed_tokens(h)
        rope = self._owner[0].rope
        for block in self.layers.values():
            h = block(h, rope)
        if self.lm_head is not None:
            h = self.lm_head(self.norm(h))
        return h


def split_pipeline(
    model: Transformer, dims: MeshDims, pp_rank: int, schedule: str, per_rank: int
) -> dict[int, list[str]]:
    """Delete from ``model`` what this pipeline rank does not run; the blocks (keys) of each stage it runs."""
    stages = dims.pp * per_rank
    per_stage = model.args.layers // stages
    mine = stage_ids(pp_rank, dims.pp, schedule, per_rank)
    keys = {sid: [str(i) for i in range(sid * per_stage, (sid + 1) * per_stage)] for sid in mine}
    kept = {k for ks in keys.values() for k in ks}
    for key in [k for k in model.model.layers if k not in kept]:
        del model.model.layers[key]
    if 0 not in mine:
        model.model.embed_tokens = None
    if stages - 1 not in mine:
        model.model.norm = None
        model.lm_head = None
    return keys


@dataclass
class Pipeline:
    """This rank's stages and the schedule that runs them (``step`` trains a micro-batch, ``eval`` scores one)."""

    schedule: Any
    stage_ids: list[int]
    stages: int
    pp_group: Any

    @property
    def first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def last(self) -> bool:
        return self.stages - 1 in self.stage_ids


def build_pipeline(
    views: list[StageView],
    ids: list[int],
    stages: int,
    mesh: Any,
    device: torch.device,
    schedule: str,
    micro_batches: int,
    loss_fn: Any,
) -> Pipeline:
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

    group = mesh["pp"].get_group()
    built = [
        PipelineStage(view, sid, stages, device, group=group) for view, sid in zip(views, ids, strict=True)
    ]
    cls = get_schedule_class(schedule)
    # scale_grads off: ``loss_fn`` already divides by the pieces (and accumulation steps), as the loop does
    # for unpipelined micro-batches, so the gradients are scaled once, the same way on every mesh
    stage = built[0] if issubclass(cls, PipelineScheduleSingle) else built
    runner = cls(stage, n_microbatches=micro_batches, loss_fn=loss_fn, scale_grads=False)
    return Pipeline(runner, ids, stages, group)


# ----------------------------------------------------------------------------- checkpointing and compile
def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass (keeps only block inputs)."""
    if isinstance(model, HFObjective):
        model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = blocks_of(model)
    keys = list(layers.keys()) if isinstance(layers, nn.ModuleDict) else range(len(layers))
    for key in keys:
        layers[key] = checkpoint_wrapper(layers[key], preserve_rng_state=False)


def enable_async_tp(tp_mesh: Any) -> None:
    """Async tensor parallel: inductor's micro-pipeline pass rewrites each all-gather → matmul and
    matmul → reduce-scatter of the compiled tensor-parallel blocks into pieces that overlap communication
    with compute (torchtitan's ``maybe_enable_async_tp``). Set before the first compiled step. torch up to
    2.9 also needed symmetric memory enabled per group; later versions do it themselves (and deprecate
    the call), so it is called only where it is not deprecated."""
    import warnings

    import torch._inductor.config as inductor_config

    inductor_config._micro_pipeline_tp = True
    try:
        from torch.distributed._symmetric_memory import enable_symm_mem_for_group
    except ImportError:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "no need to call this function anymore"
        enable_symm_mem_for_group(tp_mesh.get_group().group_name)


def apply_compile(model: nn.Module) -> None:
    """Compile every block in place (names in the state dict do not change); the blocks share one graph."""
    for block in block_list(model):
        block.compile(fullgraph=isinstance(model, Transformer))


# ------------------------------------------------------------------------------------------------ FSDP
def apply_fsdp(model: nn.Module, mesh: Any, bf16: bool) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mesh": mesh, **({"mp_policy": mp} if mp else {})}
    blocks = block_list(model)
    for i, block in enumerate(blocks):
        # the last block's parameters are needed at once for the backward: no point resharding them
        fully_shard(block, reshard_after_forward=i < len(blocks) - 1, **kwargs)
    fully_shard(model, **kwargs)


def apply_fsdp_stages(model: nn.Module, views: list[StageView], mesh: Any, bf16: bool) -> None:
    """FSDP2 under pipeline parallel: each block, then each stage as a root (the stages, not the rank's
    model, are what the schedule calls, so their embedding, norm and output projection are theirs)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mesh": mesh, **({"mp_policy": mp} if mp else {})}
    for view in views:
        for block in view.layers.values():
            # pipeline schedules run a stage's backward well after its forward: keep the shards resharded
            fully_shard(block, reshard_after_forward=True, **kwargs)
        fully_shard(view, **kwargs)


# --------------------------------------------------------------------------------------------- in order
@dataclass
class Parallelized:
    """The model ready to train and what the loop needs to know about how it was spread."""

    model: nn.Module
    mesh: Any
    loss_parallel: bool
    pipeline: Pipeline | None
    autocast: bool
    """Whether the loop autocasts to bf16 (FSDP2 casts parameters itself, MixedPrecisionPolicy)."""


def parallelize(
    model: nn.Module,
    *,
    dims: MeshDims,
    device: torch.device,
    bf16: bool,
    compile: bool,
    activation_checkpointing: bool,
    rank: int = 0,
    pipeline_schedule: str = "1F1B",
    stages_per_rank: int = 1,
    micro_batches: int = 1,
    loss_fn: Any = None,
    async_tp: bool = False,
) -> Parallelized:
    """PP split → TP → activation checkpointing → compile → FSDP2 (or DDP) → pipeline schedule, for the
    mesh ``dims`` (torchtitan's order). ``loss_fn(output, labels)`` is the last pipeline stage's loss."""
    mesh = build_mesh(dims, device.type)
    loss_parallel = False
    views: list[StageView] = []
    ids: list[int] = []
    if dims.pp > 1:
        assert isinstance(model, Transformer)  # the spec refuses pipelineParallel for the HF architectures
        pp_rank = dims.coordinate(rank)["pp"]
        stage_keys = split_pipeline(model, dims, pp_rank, pipeline_schedule, stages_per_rank)
        ids = list(stage_keys)
    if dims.tp > 1:
        assert isinstance(model, Transformer)  # the spec refuses tensorParallel for the HF architectures
        # loss parallel keeps the (batch, seq, vocab) logits sharded; the tied-embedding case would need the
        # embedding sharded the same way as the output, which RowwiseParallel does not do
        loss_parallel = not model.args.tie_embeddings
        apply_tp(model, mesh["tp"], loss_parallel)
        if async_tp and compile:
            enable_async_tp(mesh["tp"])
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if ids:  # after checkpointing and compile replaced the blocks: the stages run the wrapped ones
        assert isinstance(model, Transformer)
        last = dims.pp * stages_per_rank - 1
        views = [StageView(model, stage_keys[sid], sid == 0, sid == last) for sid in ids]
    sharded = mesh is not None and dims.dp_shard * dims.cp * dims.dp_replicate > 1
    if sharded and views:
        apply_fsdp_stages(model, views, fsdp_mesh(mesh, dims), bf16)
    elif sharded:
        apply_fsdp(model, fsdp_mesh(mesh, dims), bf16)
    elif dims.world > 1 and not dims.fsdp:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
    pipeline = None
    if views:
        pipeline = build_pipeline(
            views, ids, dims.pp * stages_per_rank, mesh, device, pipeline_schedule, micro_batches, loss_fn
        )
    return Parallelized(model, mesh, loss_parallel, pipeline, autocast=bf16 and not sharded)


__all__ = [
    "MeshDims",
    "Parallelized",
    "Pipeline",
    "StageView",
    "apply_activation_checkpointing",
    "apply_compile",
    "apply_fp8",
    "apply_fsdp",
    "apply_tp",
    "build_mesh",
    "build_pipeline",
    "check_gpu_only",
    "cp_context",
    "enable_async_tp",
    "fsdp_mesh",
    "loss_context",
    "parallelize",
    "split_pipeline",
    "stage_ids",
]
