"""Operator settings."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def default_image() -> str:
    """$LMFORGE_JOBS_IMAGE (set by the chart), else ghcr.io/lmforge/lmforge-jobs:<package version>."""
    from lmforge_operator.builders import default_image as image

    return image()


@dataclass
class Config:
    """Operator settings (environment variables in parentheses)."""

    image: str = field(default_factory=default_image)
    """Jobs image when spec.image is unset ($LMFORGE_JOBS_IMAGE)."""
    storage: str = field(default_factory=lambda: os.environ.get("LMFORGE_STORAGE", "pvc://lmforge-storage"))
    """Root of spec.output when it is unset: <storage>/<namespace>/<kind>/<name> ($LMFORGE_STORAGE)."""
    resync_seconds: float = field(
        default_factory=lambda: float(os.environ.get("LMFORGE_RESYNC_SECONDS", "15"))
    )
    """How often unfinished resources are reconciled without an event ($LMFORGE_RESYNC_SECONDS), counted
    from each one's last reconcile."""
    resync_jitter: float = 0.2
    """Each resync comes a random fraction up to this earlier or later than ``resync_seconds`` after the
    last reconcile, so resources reconciled together are not resynced together for ever."""
    workers: int = field(default_factory=lambda: int(os.environ.get("LMFORGE_WORKERS", "16")))
    """Resources reconciled concurrently ($LMFORGE_WORKERS)."""
    gpu: str = field(default_factory=lambda: os.environ.get("LMFORGE_GPU", "h100"))
    """GPU type the compute plan assumes ($LMFORGE_GPU: h100, h200, a100, l40s)."""


__all__ = ["Config", "default_image"]
