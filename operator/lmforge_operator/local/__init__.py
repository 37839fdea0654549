"""``lmforge run``: the same manifests on one machine, without a cluster.

``lmforge run PATH... [--workdir lmforge-runs]`` loads the manifests, orders them by their references (a
cycle or a reference to nothing is an error before anything runs), and runs each resource through the
same entry points a cluster uses: the Corpus job with its local workers, PretrainRun and AlignmentRun under
torchrun, the Evaluation job — each launched by torchx's local scheduler. References resolve to the
outputs of the resources run before (:mod:`lmforge_jobs.resolve`).

Everything of ``<kind>/<name>`` lies in ``WORKDIR/<kind>/<name>/``: the resolved ``manifest.yaml``, the
job's logs, its outputs (unless spec.output points elsewhere), ``progress.json``/``metrics.jsonl`` written by
the job and ``status.json`` (the resource's status, in the CRD's status schema, with the cluster's condition
reasons) written here. A rerun skips resources whose outputs are complete for the same resolved spec and
resumes interrupted ones (the jobs resume from their checkpoints and completion markers). Ctrl-C or SIGTERM
stops the running job gracefully — it saves a checkpoint before exiting — and every process it started.

Object storage: ``--s3-endpoint`` and ``spec.storage`` reach the jobs' environment, the credentials are
the user's (:mod:`.storage`). Whatever its output (a local path, s3://, gs://), a job writes its
progress.json, metrics.jsonl and outputs.json into ``WORKDIR/<kind>/<name>/`` (``$LMFORGE_RUN_DIR``).

* :mod:`.launch` starts a job's processes and stops all of them;
* :mod:`.runner` orders the resources, skips, resumes or runs each and writes its status;
* :mod:`.parallel` runs a Sweep's trials or a ScalingStudy's points side by side (``--parallel``);
* :mod:`.storage` says what of object storage a job's environment gets;
* :mod:`.view` reads the work directory back: the rows ``lmforge status`` prints.

This package never imports torch: jobs run in their own processes.
"""

from lmforge_operator.local.launch import (
    EXIT_INTERRUPTED,
    Launch,
    command,
    local_gpus,
    processes_for,
)
from lmforge_operator.local.runner import (
    LocalRunner,
    Outcome,
    RunError,
    load_set,
    order,
    read_status,
    resource_dir,
    run_hash,
)
from lmforge_operator.local.view import collect, status_rows

__all__ = [
    "EXIT_INTERRUPTED",
    "Launch",
    "LocalRunner",
    "Outcome",
    "RunError",
    "collect",
    "command",
    "load_set",
    "local_gpus",
    "order",
    "processes_for",
    "read_status",
    "resource_dir",
    "run_hash",
    "status_rows",
]
