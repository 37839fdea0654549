"""``python -m lmforge_jobs.evaluate --manifest eval.yaml``: run an Evaluation (see :mod:`.job`).

Environment: ``LMFORGE_METRICS_PORT`` (Prometheus port, default 9400, ``off``), ``LMFORGE_WORKDIR`` (where
results go when spec.output is unset), ``LMFORGE_SECRET_<NAME>_<KEY>`` or files under
``LMFORGE_SECRETS_DIR`` (default /var/run/secrets/lmforge) for secretKeyRefs (judge API key, hub token).
"""

from __future__ import annotations

import sys

from lmforge_jobs.entry import job_main


def main(argv: list[str] | None = None) -> int:
    from lmforge_jobs.evaluate.job import run

    return job_main(
        "Evaluation",
        run,
        argv,
        description="Evaluate a model: perplexity, lm-eval benchmarks, LLM judge, arena.",
    )


if __name__ == "__main__":
    sys.exit(main())
