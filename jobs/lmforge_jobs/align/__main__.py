"""``python -m lmforge_jobs.align --manifest run.yaml`` (also under torchrun): run one AlignmentRun."""

from __future__ import annotations

import sys

from lmforge_jobs.entry import job_main


def main(argv: list[str] | None = None) -> int:
    from lmforge_jobs.align.job import run

    return job_main(
        "AlignmentRun", run, argv, description="Align a model: sft, reward, dpo or ppo (TRL + PEFT)."
    )


if __name__ == "__main__":
    sys.exit(main())
