"""Pure helpers that turn what the operator observes into a resource's status.

* conditions (Kubernetes API conventions: ``lastTransitionTime`` changes only with ``status``, every
  condition carries ``observedGeneration``) and the derived phase;
* the state of a batch/v1 Job (:func:`job_state`);
* a job pod's rank-0 Prometheus text (:func:`parse_prometheus`, :func:`progress_from_metrics`) and its
  termination message (:func:`termination_summary`), in the shape of the job's ``progress.json`` so that
  :func:`apply_progress` mirrors both the same way ``lmforge run`` mirrors the job's file;
* the status checked against the kind's status model (:func:`validated_status`).

The cluster controller and the local runner (``lmforge run``) both write status through these helpers, with
the same condition reasons for the same situations.

No API calls, no kopf: unit-testable and shared by the reconciler.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from lmforge_jobs.data.config import CorpusStage
from lmforge_jobs.kinds import STATUS_METRICS
from lmforge_jobs.manifest import MODELS
from lmforge_jobs.spec import Condition, derive_phase

# ------------------------------------------------------------------------------------ condition reasons
# Machine-readable reasons (CamelCase) of the conditions the operator sets.
SPEC_INVALID = "SpecInvalid"
"""The spec breaks a rule the CRD schema cannot express (message: ``spec.<field>: why``)."""
SPEC_CHANGED = "SpecChanged"
"""A field changed after the resource's jobs were created; jobs are not restarted with a new spec."""
DOES_NOT_FIT = "DoesNotFitInMemory"
"""The compute plan needs more GPU memory than a GPU has."""
DEPENDENCY_CYCLE = "DependencyCycle"
DEPENDENCY_NOT_FOUND = "DependencyNotFound"
DEPENDENCY_NOT_READY = "DependencyNotReady"
DEPENDENCY_FAILED = "DependencyFailed"
QUEUED = "Queued"
"""The Job is suspended (Kueue admits it when its queue has quota)."""
JOB_CREATED = "JobCreated"
JOB_RUNNING = "JobRunning"
JOB_SUCCEEDED = "JobSucceeded"
JOB_FAILED = "JobFailed"
CONFIG_ERROR = "ConfigError"
"""The job exited with the configuration-error code (64): its message names the field."""
WAITING_FOR_CHECKPOINT = "WaitingForCheckpoint"
DEPENDENCIES_READY = "DependenciesReady"
NOT_STARTED = "NotStarted"
OUTPUTS_AVAILABLE = "OutputsAvailable"
VALID = "Valid"
INTERRUPTED = "Interrupted"
"""``lmforge run`` was stopped (Ctrl-C, SIGTERM) while the job ran; running it again resumes the job."""

# -------------------------------------------------------------- faults of the cluster (docs/cluster.md)
MODEL_RUN_ENDED = "ModelRunEnded"
"""An Evaluation following checkpoints ended because its PretrainRun failed or was deleted: Succeeded with
the rounds it has, or Failed when it has none."""
HISTORY_LIMIT = 100
"""status.history (Evaluation rounds) keeps the newest entries: an object stays far below etcd's 1.5 MiB."""
FINAL_SUCCESS_REASONS = (JOB_SUCCEEDED, MODEL_RUN_ENDED)
"""Reasons of a Succeeded verdict: kept when the Jobs are deleted later (only a new spec runs it again)."""
FINAL_FAILURE_REASONS = (JOB_FAILED, MODEL_RUN_ENDED)
"""Reasons of a Failed verdict, kept the same way."""
CHILD_REJECTED = "ChildRejected"
"""The API server refused a child with a 4xx (a quota: Failed; an invalid or oversized object: Invalid);
the message is the server's."""
PODS_NOT_STARTING = "PodsNotStarting"
"""A pod of the Job cannot start (image pull, a missing Secret or ConfigMap, unschedulable): the message
is the pod's reason and message."""
OLD_CHILDREN = "OldChildrenPresent"
"""A child under the resource's name belongs to an earlier resource of the same name (deleted, its children
not yet collected or orphaned): deleted first, never adopted."""

CONDITION_TYPES = ("Ready", "Running", "Succeeded", "Failed", "Invalid", "Waiting")


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def set_condition(
    status: dict[str, Any],
    ctype: str,
    value: bool,
    reason: str,
    message: str = "",
    generation: int | None = None,
) -> bool:
    """Set one condition; True when its status changed (a transition)."""
    conditions = status.setdefault("conditions", [])
    new = "True" if value else "False"
    for c in conditions:
        if c.get("type") == ctype:
            changed = c.get("status") != new
            if changed:
                c["lastTransitionTime"] = now_iso()
            c.update(status=new, reason=reason, message=message[:32768])
            if generation is not None:
                c["observedGeneration"] = generation
            return changed
    cond = {
        "type": ctype,
        "status": new,
        "reason": reason,
        "message": message[:32768],
        "lastTransitionTime": now_iso(),
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    conditions.append(cond)
    return value


def set_state(
    status: dict[str, Any],
    active: str | None,
    reason: str,
    message: str = "",
    generation: int | None = None,
    *,
    running: bool = False,
) -> str:
    """Make ``active`` the one True condition among Running/Succeeded/Failed/Invalid/Waiting (``running``
    keeps Running True beside Waiting, e.g. an Evaluation between checkpoints); Ready follows Succeeded.
    Returns the derived phase."""
    for ctype in ("Running", "Succeeded", "Failed", "Invalid", "Waiting"):
        on = ctype == active or (ctype == "Running" and running)
        existing = next((c for c in status.get("conditions", []) if c.get("type") == ctype), None)
        if on:
            set_condition(status, ctype, True, reason, message, generation)
        elif existing is not None or ctype in ("Running", "Succeeded", "Failed"):
            set_condition(status, ctype, False, reason, "", generation)
    ready = active == "Succeeded"
    set_condition(
        status,
        "Ready",
        ready,
        OUTPUTS_AVAILABLE if ready else reason,
        "outputs are available" if ready else "",
        generation,
    )
    position = {t: i for i, t in enumerate(CONDITION_TYPES)}
    status["conditions"].sort(key=lambda c: position.get(c["type"], 99))
    phase = derive_phase([Condition.model_validate(c) for c in status["conditions"]]).value
    status["phase"] = phase
    return phase


def condition(status: dict[str, Any] | None, ctype: str) -> dict[str, Any] | None:
    for c in (status or {}).get("conditions") or []:
        if c.get("type") == ctype:
            return c
    return None


# ------------------------------------------------------------------------------------------- job state
@dataclass
class JobState:
    """What a batch/v1 Job says about itself."""

    name: str
    state: str  # Pending | Queued | Running | Succeeded | Failed
    message: str = ""
    active: int = 0
    succeeded: int = 0
    completions: int = 1
    start_time: str | None = None
    completion_time: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)


def job_state(job: dict[str, Any]) -> JobState:
    meta, spec, job_status = job.get("metadata") or {}, job.get("spec") or {}, job.get("status") or {}
    conds = {c.get("type"): c for c in job_status.get("conditions") or [] if c.get("status") == "True"}
    out = JobState(
        name=meta.get("name", ""),
        state="Pending",
        active=int(job_status.get("active") or 0),
        succeeded=int(job_status.get("succeeded") or 0),
        completions=int(spec.get("completions") or 1),
        start_time=job_status.get("startTime"),
        completion_time=job_status.get("completionTime"),
        annotations=dict(meta.get("annotations") or {}),
    )
    if "Complete" in conds or "SuccessCriteriaMet" in conds:
        out.state = "Succeeded"
    elif "Failed" in conds or "FailureTarget" in conds:
        c = conds.get("Failed") or conds["FailureTarget"]
        out.state = "Failed"
        out.message = ": ".join(x for x in (c.get("reason"), c.get("message")) if x)
    elif spec.get("suspend") or "Suspended" in conds:
        out.state = "Queued"
    elif out.active or int(job_status.get("ready") or 0) or out.start_time or out.succeeded:
        out.state = "Running"
    return out


# ------------------------------------------------------------------------------- pods and their reports
def rank0_pod(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The pod of completion index 0 (the newest, when it was replaced), else any pod."""

    def index(p: dict[str, Any]) -> str | None:
        meta = p.get("metadata") or {}
        return (meta.get("labels") or {}).get("batch.kubernetes.io/job-completion-index") or (
            meta.get("annotations") or {}
        ).get("batch.kubernetes.io/job-completion-index")

    ranked = [p for p in pods if index(p) in ("0", None)]
    ranked.sort(key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")
    return ranked[-1] if ranked else None


def metrics_url(pod: dict[str, Any]) -> str | None:
    """http://<pod IP>:<port named metrics>/metrics of a running pod."""
    pod_status = pod.get("status") or {}
    ip = pod_status.get("podIP")
    if not ip or pod_status.get("phase") not in (None, "Running"):
        return None
    port = None
    for c in (pod.get("spec") or {}).get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name") == "metrics":
                port = p.get("containerPort")
                break
    if not port:
        return None
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}/metrics"


def termination_summary(pod: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON summary the job left as its container's termination message (telemetry.py), if any."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        for where in ("state", "lastState"):
            term = (cs.get(where) or {}).get("terminated") or {}
            message = term.get("message")
            if message:
                try:
                    data = json.loads(message)
                except ValueError:
                    continue
                if isinstance(data, dict):
                    data.setdefault("exitCode", term.get("exitCode"))
                    return data
    return None


def termination_state(pod: dict[str, Any]) -> tuple[int | None, str]:
    """(exit code, termination message as written) of the pod's last terminated container: ``state``, else
    ``lastState`` (a restarted container). The message may be the job's JSON summary, or, under
    ``terminationMessagePolicy: FallbackToLogsOnError``, the tail of its log."""
    for where in ("state", "lastState"):
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = (cs.get(where) or {}).get("terminated")
            if term:
                code = term.get("exitCode")
                return (int(code) if isinstance(code, int) else None), str(term.get("message") or "").strip()
    return None, ""


# What keeps a pod from starting: a waiting container's reason, or PodScheduled False (Unschedulable).
NOT_STARTING = (
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
)


def pod_not_starting(pod: dict[str, Any]) -> str | None:
    """``pod NAME: Reason: message`` when a Pending pod cannot start (see :data:`NOT_STARTING`), else None."""
    pod_status = pod.get("status") or {}
    if pod_status.get("phase") not in (None, "Pending"):
        return None
    name = (pod.get("metadata") or {}).get("name")
    for c in pod_status.get("conditions") or []:
        if (
            c.get("type") == "PodScheduled"
            and c.get("status") == "False"
            and c.get("reason") == "Unschedulable"
        ):
            return f"pod {name}: Unschedulable: {c.get('message') or ''}".rstrip(": ")
    for cs in (pod_status.get("initContainerStatuses") or []) + (pod_status.get("containerStatuses") or []):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in NOT_STARTING:
            return f"pod {name}: {waiting['reason']}: {waiting.get('message') or ''}".rstrip(": ")
    return None


def pods_started(pods: list[dict[str, Any]]) -> bool:
    """Whether the Job has a pod past Pending (or no pods seen at all: the Job's own counts decide)."""
    return not pods or any((p.get("status") or {}).get("phase") not in (None, "Pending") for p in pods)


def parse_prometheus(text: str) -> dict[str, float]:
    """Sample name -> value (labelled series of one name summed: rank-0 endpoints have few labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                values[sample.name] = values.get(sample.name, 0.0) + float(sample.value)
    except (ValueError, TypeError):
        return values
    return values


def metrics_for_status(kind: str, metrics: dict[str, float]) -> dict[str, Any] | None:
    """The job's metrics in the shape of the kind's status.metrics (align extras → methodMetrics)."""
    known = STATUS_METRICS.get(kind)
    if known is None or not metrics:
        return None
    out: dict[str, Any] = {k: v for k, v in metrics.items() if k in known}
    if kind == "AlignmentRun":
        extra = {k: v for k, v in metrics.items() if k not in known}
        if extra:
            out["methodMetrics"] = extra
    if kind == "PretrainRun" and "gpuUtilization" in out:
        out["gpuUtilization"] = min(1.0, max(0.0, out["gpuUtilization"]))
    if kind == "AlignmentRun" and "rewardAccuracy" in out:
        out["rewardAccuracy"] = min(1.0, max(0.0, out["rewardAccuracy"]))
    return out or None


def corpus_counts(stats: dict[str, Any]) -> dict[str, Any]:
    """status.documents, status.tokens and status.heldOutTokens of a Corpus, from its stats.json or from the
    final stage's termination summary ({documents: {read, kept, removedBy}, tokens: {train, heldOut}})."""
    counts = stats if "read" in stats else (stats.get("documents") or {})
    out: dict[str, Any] = {}
    docs = {k: counts[k] for k in ("read", "kept", "removedBy") if k in counts}
    if docs:
        out["documents"] = docs
    tokens = stats.get("tokens")
    if isinstance(tokens, dict):
        if isinstance(tokens.get("train"), int):
            out["tokens"] = tokens["train"]
        held = tokens.get("heldOut", tokens.get("held-out"))
        if isinstance(held, int):
            out["heldOutTokens"] = held
    elif isinstance(tokens, int):
        out["tokens"] = tokens
    return out


def evaluation_results(results: dict[str, Any]) -> dict[str, Any]:
    """status.results (and status.history for checkpoints: every) of an Evaluation, from results.json or
    the termination summary: only the fields of the Results model."""
    from lmforge_jobs.evaluate.config import Results

    fields = {f.alias or name for name, f in Results.model_fields.items()}
    out: dict[str, Any] = {"results": {k: v for k, v in results.items() if k in fields}}
    history = results.get("history")
    if isinstance(history, list):
        out["history"] = [{k: v for k, v in h.items() if k in fields} for h in history][-HISTORY_LIMIT:]
    return out


CORPUS_STAGES = {s.value for s in CorpusStage}
PROGRESS_FIELDS = ("step", "totalSteps", "tokens", "percent", "etaSeconds")


def apply_progress(status: dict[str, Any], kind: str, progress: dict[str, Any]) -> None:
    """Mirror a job's progress (its progress.json, a scrape, a termination summary) into the status:
    status.progress, status.metrics and a Corpus's status.stage."""
    numbers = {k: progress[k] for k in PROGRESS_FIELDS if progress.get(k) is not None}
    if numbers:
        numbers["percent"] = min(100.0, max(0.0, float(numbers.get("percent", 0.0))))
        numbers["updatedAt"] = progress.get("updatedAt") or now_iso()
        status["progress"] = numbers
    metrics = metrics_for_status(kind, progress.get("metrics") or {})
    if metrics:
        status["metrics"] = metrics
    if kind == "Corpus" and progress.get("stage"):
        # the data job reports the stage's phase (lmforge_jobs.data.stages.Stage.phase)
        stage = str(progress["stage"])
        if stage in CORPUS_STAGES:
            status["stage"] = stage


def status_model(kind: str) -> Any:
    """The pydantic model of the kind's status (the CRD's status schema)."""
    annotation = MODELS[kind].model_fields["status"].annotation
    return next(a for a in getattr(annotation, "__args__", (annotation,)) if a is not type(None))


def validated_status(kind: str, status: dict[str, Any]) -> dict[str, Any]:
    """The status checked against the kind's status model (the CRD's status schema); raises on a bug."""
    return status_model(kind).model_validate(status).model_dump(by_alias=True, exclude_none=True, mode="json")


def progress_from_metrics(kind: str, values: dict[str, float]) -> dict[str, Any]:
    """A scraped endpoint in the shape of progress.json: step, totalSteps, tokens, percent, etaSeconds,
    metrics {camelCase: value} (only the series the kind's status has)."""
    from lmforge_jobs.telemetry import metric_name, progress_names

    out: dict[str, Any] = {}
    names = progress_names(kind)
    for key in ("step", "totalSteps", "tokens", "etaSeconds"):
        v = values.get(names[key])
        if v is None and key == "tokens":
            v = values.get(names[key].removesuffix("_total"))
        if v is not None and v == v and v >= 0:
            out[key] = int(v)
    ratio = values.get(names["progress"])
    if ratio is not None and ratio == ratio:
        out["percent"] = round(min(100.0, max(0.0, ratio * 100.0)), 2)
    metrics = {}
    for key in sorted(STATUS_METRICS.get(kind, ())):
        v = values.get(metric_name(kind, key))
        if v is not None and v == v and abs(v) != float("inf"):
            metrics[key] = v
    if metrics:
        out["metrics"] = metrics
    return out


__all__ = [
    "JobState",
    "apply_progress",
    "condition",
    "corpus_counts",
    "evaluation_results",
    "job_state",
    "metrics_for_status",
    "metrics_url",
    "parse_prometheus",
    "pod_not_starting",
    "pods_started",
    "progress_from_metrics",
    "rank0_pod",
    "set_condition",
    "set_state",
    "status_model",
    "termination_state",
    "termination_summary",
    "validated_status",
]
