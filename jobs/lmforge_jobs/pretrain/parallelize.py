"""Apply parallelism to a model written for one device (torchtitan's order): activation checkpointing →
torch.compile (per block) → FSDP2 ``fully_shard`` (per block, then the root) or DDP.

The same code serves one process, one node × N GPUs and M nodes × N GPUs: the process group that
torchrun's c10d rendezvous set up decides the data-parallel world.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmforge_jobs.pretrain.model import HFObjective, Transformer, blocks_of


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


def apply_fsdp(model: nn.Module, mesh: Any, bf16: bool) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mesh": mesh, **({"mp_policy": mp} if mp else {})}
    blocks = list(blocks_of(model))
    for i, block in enumerate(blocks):
        # the last block's parameters are needed at once for the backward: no point resharding them
        fully_shard(block, reshard_after_forward=i < len(blocks) - 1, **kwargs)
    fully_shard(model, **kwargs)


def parallelize(
    model: nn.Module,
    *,
    strategy: str,
    world: int,
    device: torch.device,
    bf16: bool,
    compile: bool,
    activation_checkpointing: bool,
) -> nn.Module:
    """The model ready to train: wrapped for DDP, sharded in place for FSDP, or as is for one process."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if world <= 1:
        return model
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world,))
        apply_fsdp(model, mesh, bf16)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def uses_autocast(strategy: str, world: int, bf16: bool) -> bool:
    """FSDP2 casts parameters itself (MixedPrecisionPolicy); DDP and one process use autocast."""
    return bf16 and not (strategy == "fsdp" and world > 1)


__all__ = ["apply_activation_checkpointing", "apply_compile", "apply_fsdp", "parallelize", "uses_autocast"]
