"""What the training loop measures besides the loss: throughput over a window of steps, model FLOPs
utilisation (FLOPs per token and the device's peak), and GPU utilisation and memory from NVML."""

from __future__ import annotations

import math
import os
import time

import torch

from lmforge_jobs.pretrain.model import ModelArgs

PERPLEXITY_CAP = 80.0
"""Held-out losses above this report the perplexity of this loss (exp would overflow)."""


def perplexity(loss: float) -> float:
    return math.exp(min(loss, PERPLEXITY_CAP))


class ThroughputWindow:
    """Tokens per second over the steps trained since the window last started: at the last metrics report,
    evaluation or checkpoint save (neither of which is training time)."""

    def __init__(self, step: int, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.restart(step)

    def restart(self, step: int) -> None:
        self.started, self.start_step = time.perf_counter(), step

    def close(self, step: int) -> float:
        """Tokens per second since the start of the window; the next window starts now."""
        now = time.perf_counter()
        tokens_per_second = (step - self.start_step) * self.tokens_per_step / max(now - self.started, 1e-9)
        self.started, self.start_step = now, step
        return tokens_per_second


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of one device ($LMFORGE_PEAK_TFLOPS overrides; None when unknown)."""
    if os.environ.get("LMFORGE_PEAK_TFLOPS"):
        return float(os.environ["LMFORGE_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda":
        return None
    from lmforge_jobs.plan import DEVICES

    name = torch.cuda.get_device_name(device).lower()
    for key, dev in DEVICES.items():
        if key in name:
            return dev.peak_tflops * 1e12
    return None


def flops_per_token(args: ModelArgs, parameters: int) -> float:
    """Training FLOPs per token, attention included: the planner's formula for the decoder (6·N with the
    lm_head but not the embedding lookup, + 12·L·h·T); 6·N + 12·L·h·T for the HF architectures."""
    if args.architecture == "decoder":
        from lmforge_jobs.plan import flops_per_token as plan_flops
        from lmforge_jobs.pretrain.config import ModelShape

        shape = ModelShape(
            layers=args.layers,
            hidden=args.hidden,
            heads=args.heads,
            kv_heads=args.kv_heads,
            ffn_hidden=args.ffn_hidden,
            seq_len=args.seq_len,
            vocab_size=args.vocab_size,
            tie_embeddings=args.tie_embeddings,
        )
        return plan_flops(shape)
    layers = args.layers + (
        args.decoder_layers or args.layers if args.architecture == "encoder-decoder" else 0
    )
    return 6.0 * parameters + 12.0 * layers * args.hidden * args.seq_len


class GpuStats:
    """Utilisation and memory of this process's GPU from NVML (nothing on CPU or without nvidia-ml-py)."""

    def __init__(self, device: torch.device):
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception:  # no NVML (MIG, containers without the library): metrics are optional
            self.handle = None

    def read(self) -> dict[str, float]:
        if self.handle is None:
            return {}
        try:
            util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu / 100.0
            used = float(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)
        except Exception:
            return {}
        return {"gpuUtilization": util, "gpuMemoryBytes": used}


__all__ = ["GpuStats", "ThroughputWindow", "flops_per_token", "peak_flops", "perplexity"]
