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
from lmforge_jobs.pretrain.model import HFObjective, Transformer, blocks_of

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

    parallelize_module(
        model,
        tp_mesh,
        {
            "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "model.norm": SequenceParallel(),
            "lm_head": ColwiseParallel(
                input_layouts=Shard(1),
                output_layouts=Shard(-1) if loss_parallel else Replicate(),
                use_local_output=not loss_parallel,
            ),
        },
    )
    for block in model.model.layers:
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


# ----------------------------------------------------------------------------- checkpointing and compile
def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass (keeps only block inputs)."""
    if isinstance(model, HFObjective):
        model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = blocks_of(model)
    for i, block in enumerate(layers):
        layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: nn.Module) -> None:
    """Compile every block in place (names in the state dict do not change); the blocks share one graph."""
    for block in blocks_of(model):
        block.compile(fullgraph=isinstance(model, Transformer))


# ------------------------------------------------------------------------------------------------ FSDP
def apply_fsdp(model: nn.Module, mesh: Any, bf16: bool) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mesh": mesh, **({"mp_policy": mp} if mp else {})}
    blocks = list(blocks_of(model))
    for i, block in enumerate(blocks):
        # the last block's parameters are needed at once for the backward: no point resharding them
        fully_shard(block, reshard_after_forward=i < len(blocks) - 1, **kwargs)
    fully_shard(model, **kwargs)


# --------------------------------------------------------------------------------------------- in order
@dataclass
class Parallelized:
    """The model ready to train and what the loop needs to know about how it was spread."""

    model: nn.Module
    mesh: Any
    loss_parallel: bool
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
) -> Parallelized:
    """TP → activation checkpointing → compile → FSDP2 (or DDP), for the mesh ``dims``."""
    mesh = build_mesh(dims, device.type)
    loss_parallel = False
    if dims.tp > 1:
        assert isinstance(model, Transformer)  # the spec refuses tensorParallel for the HF architectures
        # loss parallel keeps the (batch, seq, vocab) logits sharded; the tied-embedding case would need the
        # embedding sharded the same way as the output, which RowwiseParallel does not do
        loss_parallel = not model.args.tie_embeddings
        apply_tp(model, mesh["tp"], loss_parallel)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    sharded = mesh is not None and dims.dp_shard * dims.cp * dims.dp_replicate > 1
    if sharded:
        apply_fsdp(model, fsdp_mesh(mesh, dims), bf16)
    elif dims.world > 1 and not dims.fsdp:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
    return Parallelized(model, mesh, loss_parallel, autocast=bf16 and not sharded)


__all__ = [
    "MeshDims",
    "Parallelized",
    "apply_activation_checkpointing",
    "apply_compile",
    "apply_fsdp",
    "apply_tp",
    "build_mesh",
    "fsdp_mesh",
    "loss_context",
    "parallelize",
]
