"""The Corpus job: ``python -m lmforge_jobs.data --manifest corpus.yaml [--stage NAME|all] [--rank R --world W]``.

* ``--stage all`` (the default; what ``lmforge run`` uses) runs every stage of
  :func:`lmforge_jobs.data.stages.stages` in order, each with ``spec.parallelism.workers`` local processes
  (datatrove's LocalPipelineExecutor), then writes ``stats.json`` and ``outputs.json``.
* ``--stage NAME`` runs one rank of one stage (an Indexed Job pod): ``--rank`` defaults to
  ``$JOB_COMPLETION_INDEX`` (else 0), ``--world`` to the stage's task count. ``--rank all`` runs every
  rank of the stage locally. A rank that left its completion marker (``OUT/logs/<stage>/completions``)
  is skipped, so retrying a Job index redoes only what is missing. Running the ``stats`` stage writes
  ``stats.json`` and ``outputs.json`` — the Corpus's completion marker.

Sources, model files, a pretrained tokenizer and ``spec.output`` may be local paths or object-store URIs
(``s3://bucket/key``; the endpoint and credentials come from the environment, see
:mod:`lmforge_jobs.storage`). Completion markers, ``stats.json`` and ``outputs.json`` are written last and
atomically, so a half-written stage or corpus is never taken for a complete one.

Exit codes: 0 done; 64 a configuration or input error (``error: spec.<field>: <message>`` on stderr:
missing source, unreadable WARC, missing fastText model, vocabSize too small, nothing left after filtering,
a missing bucket or object, credentials the store refuses);
75 the previous stage has not completed every rank yet (retry later); 143 stopped by SIGTERM; anything else
is a crash. A stopped job shuts its worker processes down, and a killed one takes them with it.
"""

from __future__ import annotations

import sys

from lmforge_jobs.entry import job_main


def main(argv: list[str] | None = None) -> int:
    from lmforge_jobs.data.job import KIND, add_arguments, run

    return job_main(KIND, run, argv, add_arguments, description=__doc__.splitlines()[0] if __doc__ else None)


if __name__ == "__main__":
    sys.exit(main())
