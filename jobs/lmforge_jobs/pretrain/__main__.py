"""``torchrun [--nnodes=M --nproc-per-node=N …] -m lmforge_jobs.pretrain --manifest run.yaml`` (or plain
``python -m lmforge_jobs.pretrain --manifest run.yaml`` for one process): run a PretrainRun.

Environment: ``LMFORGE_METRICS_PORT`` (Prometheus port, default 9400, ``off``), ``LMFORGE_PEAK_TFLOPS``
(device peak for MFU when the GPU is not in the planner's table, or on CPU), ``LMFORGE_LOG_EVERY`` (steps
between metric reports, default 1), ``LMFORGE_MAX_NONFINITE_STEPS`` (default 5), ``LMFORGE_COMPILE=0``
(turn torch.compile off whatever the spec says).
"""

from __future__ import annotations

import sys

from lmforge_jobs.entry import job_main


def main(argv: list[str] | None = None) -> int:
    from lmforge_jobs.pretrain.train import run

    return job_main("PretrainRun", run, argv, description="Pre-train a transformer on token shards.")


if __name__ == "__main__":
    sys.exit(main())
