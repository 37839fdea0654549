"""Job → status: the conditions, progress, metrics and outputs of a resource from its Job and pods.

While the Job runs, progress and metrics come from the rank-0 pod's Prometheus endpoint; when it ends,
from the container's termination message (the job's summary); outputs on success.
"""

from __future__ import annotations

from typing import Any

from lmforge_jobs.data.config import CorpusStage
from lmforge_jobs.manifest import KINDS as RESOURCE_KINDS
from lmforge_jobs.manifest import Resource
from lmforge_jobs.resolve import expected_outputs
from lmforge_jobs.spec import EXIT_CONFIG_ERROR
from lmforge_operator import status as status_helpers
from lmforge_operator.controller.outcomes import (
    Failed,
    Invalid,
    Outcome,
    Pending,
    Running,
    Succeeded,
    Waiting,
)
from lmforge_operator.kube import Kube

CORPUS_PHASES = {s.value for s in CorpusStage}


def status_model(kind: str) -> Any:
    model = RESOURCE_KINDS[kind].model_fields["status"].annotation
    return next(a for a in getattr(model, "__args__", (model,)) if a is not type(None))


async def job_pods(api: Kube, ns: str, job_name: str, fresh: bool = False) -> list[dict[str, Any]]:
    """The Job's pods: from the pod watch's index when the client has one (a running Job is reconciled
    every resync; a LIST each time is what that index saves), else, or when ``fresh``, a LIST (the pod
    watch and the Job watch are separate streams: a Job's end may arrive before its pods' last change)."""
    index = getattr(api, "pod_index", None)
    if index is not None and not fresh:
        return index(ns, job_name)
    return await api.list("Pod", ns, {"job-name": job_name})


async def read_summary(api: Kube, ns: str, job_name: str) -> dict[str, Any] | None:
    """The job's summary from a termination message: rank 0's, else any pod's."""
    pods = await job_pods(api, ns, job_name, fresh=True)
    summaries = [s for p in pods if (s := status_helpers.termination_summary(p))]
    pod = status_helpers.rank0_pod(pods)
    best = status_helpers.termination_summary(pod) if pod is not None else None
    if best is None and summaries:
        best = summaries[-1]
    return best


async def scrape_progress(api: Kube, kind: str, pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Progress and metrics from the rank-0 pod's Prometheus endpoint."""
    pod = status_helpers.rank0_pod(pods)
    url = status_helpers.metrics_url(pod) if pod is not None else None
    if url is None:
        return None
    text = await api.scrape(url)
    if not text:
        return None
    return status_helpers.progress_from_metrics(kind, status_helpers.parse_prometheus(text))


def _progress_into_status(status: dict[str, Any], kind: str, progress: dict[str, Any]) -> None:
    """Progress, metrics and the Corpus stage of a job's progress report into the status (a copy of the
    local runner's, which the controller does not import)."""
    numbers = {
        k: progress[k]
        for k in ("step", "totalSteps", "tokens", "percent", "etaSeconds")
        if progress.get(k) is not None
    }
    if numbers:
        numbers["percent"] = min(100.0, max(0.0, float(numbers.get("percent", 0.0))))
        status["progress"] = numbers
    metrics = status_helpers.metrics_for_status(kind, progress.get("metrics") or {})
    if metrics:
        status["metrics"] = metrics
    if kind == "Corpus" and progress.get("stage"):
        stage = str(progress["stage"])  # the data job reports the stage's phase (Stage.phase)
        if stage in CORPUS_PHASES:
            status["stage"] = stage


def apply_progress(status: dict[str, Any], kind: str, progress: dict[str, Any]) -> None:
    before = {k: v for k, v in (status.get("progress") or {}).items() if k != "updatedAt"}
    _progress_into_status(status, kind, progress)
    after = status.get("progress") or {}
    if before == {k: v for k, v in after.items() if k != "updatedAt"} and "updatedAt" in before:
        after["updatedAt"] = before["updatedAt"]  # unchanged numbers: no status write
    elif after:
        after["updatedAt"] = status_helpers.now_iso()
    if kind == "Corpus":
        status.pop("stage", None)  # the Corpus stage comes from its Jobs, not the job's names


def apply_summary(status: dict[str, Any], resource: Resource[Any, Any], summary: dict[str, Any]) -> None:
    """The final numbers of a job's summary: progress, metrics, Evaluation results, Corpus counts."""
    kind = resource.kind
    progress = {k: summary[k] for k in ("step", "tokens") if k in summary}
    if summary.get("metrics"):
        progress["metrics"] = summary["metrics"]
    if progress:
        apply_progress(status, kind, progress)
    results = summary.get("results")
    if kind == "Evaluation" and isinstance(results, dict):
        status.update(status_helpers.evaluation_results(results))
    if kind == "Corpus":
        stats = results if isinstance(results, dict) else summary
        status.update(status_helpers.corpus_counts({"tokens": summary.get("tokens"), **stats}))


def outputs_of(resource: Resource[Any, Any], output: str, summary: dict[str, Any] | None) -> dict[str, Any]:
    """status.outputs: where the kind writes under ``output``, and what the summary reports."""
    outputs = expected_outputs(resource.kind, output, resource.spec)
    reported = (summary or {}).get("outputs")
    if isinstance(reported, dict):
        outputs.update({k: str(v) for k, v in reported.items() if isinstance(v, str | int | float)})
    fields = status_model(resource.kind).model_fields["outputs"].annotation
    model = next(a for a in getattr(fields, "__args__", (fields,)) if a is not type(None))
    allowed = {f.alias or n for n, f in model.model_fields.items()}
    return {k: v for k, v in outputs.items() if k in allowed}


def left_out(summary: dict[str, Any] | None, outputs: dict[str, Any]) -> str:
    """What an oversized termination summary left out of status, and where all of it is."""
    dropped = (summary or {}).get("truncated")
    if not isinstance(dropped, list) or not dropped:
        return ""
    where = outputs.get("results") or ", ".join(str(v) for v in outputs.values()) or "the job's output"
    what = ", ".join(str(d) for d in dropped)[:300]
    return f"; status lacks {what} (the 4 KiB termination message could not hold them): see {where}"


def job_failed(job: status_helpers.JobState, summary: dict[str, Any] | None) -> Outcome:
    """Invalid when the job refused its configuration (exit 64), else Failed; to raise."""
    summary = summary or {}
    message = str(summary.get("message") or job.message or "the job failed")
    config_error = (
        summary.get("state") == "Invalid"
        or summary.get("exitCode") == EXIT_CONFIG_ERROR
        # no pod left to ask: the Job's own condition names the podFailurePolicy rule that matched
        or (job.message.startswith("PodFailurePolicy") and f"exit code {EXIT_CONFIG_ERROR}" in job.message)
    )
    if config_error:
        field = summary.get("field")
        where = f"spec.{field}: " if field and not message.startswith("spec.") else ""
        return Invalid(status_helpers.CONFIG_ERROR, f"{where}{message} (Job {job.name})")
    return Failed(status_helpers.JOB_FAILED, f"Job {job.name}: {message}")


def verdict_kept(status: dict[str, Any], default_condition: str) -> Outcome:
    """The Failed or Invalid outcome the status already records (the failed pods, and their termination
    messages, may be gone: a finished resource keeps its verdict); to raise."""
    invalid = status_helpers.condition(status, "Invalid") or {}
    cls = Invalid if invalid.get("status") == "True" else Failed
    recorded = status_helpers.condition(status, default_condition) or invalid
    reason = recorded.get("reason") or status_helpers.JOB_FAILED
    return cls(reason, recorded.get("message") or "")


async def mirror_job(
    api: Kube,
    resource: Resource[Any, Any],
    ns: str,
    status: dict[str, Any],
    job: dict[str, Any],
    output: str,
) -> Outcome:
    """The outcome of a single-Job resource from its Job and pods; status filled on the way."""
    kind = resource.kind
    js = status_helpers.job_state(job)
    if js.start_time and not status.get("startTime"):
        status["startTime"] = js.start_time
    if js.state == "Queued":
        queue = getattr(resource.spec, "queue", None)
        raise Waiting(
            status_helpers.QUEUED, f"Job {js.name} is suspended until Kueue admits it (queue {queue})"
        )
    if js.state == "Pending":
        return Pending(status_helpers.JOB_CREATED, f"Job {js.name} created, waiting for its pods")
    if js.state == "Running":
        if kind == "PretrainRun":
            status["outputs"] = {"checkpoint": expected_outputs(kind, output)["checkpoint"]}
        progress = await scrape_progress(api, kind, await job_pods(api, ns, js.name))
        if progress:
            apply_progress(status, kind, progress)
        return Running(status_helpers.JOB_RUNNING, f"Job {js.name} is running")
    # a finished resource keeps its verdict: Invalid (exit 64) must not turn into Failed once the
    # failed pods (and their termination messages) are gone
    phase = status.get("phase")
    already = phase in ("Failed", "Invalid") or (phase == "Succeeded" and bool(status.get("outputs")))
    if js.state == "Succeeded":
        message = f"Job {js.name} succeeded"
        if not already:
            summary = await read_summary(api, ns, js.name)
            if summary:
                apply_summary(status, resource, summary)
            status["outputs"] = outputs_of(resource, output, summary)
            message += left_out(summary, status["outputs"])
            progress = dict(status.get("progress") or {})
            if progress.get("totalSteps"):
                progress["step"] = max(progress.get("step", 0), progress["totalSteps"])
            progress.update(percent=100.0, etaSeconds=0, updatedAt=status_helpers.now_iso())
            status["progress"] = progress
        else:  # the pods may be gone: keep what was said when the summary was read
            message = (status_helpers.condition(status, "Succeeded") or {}).get("message") or message
        status.setdefault("completionTime", js.completion_time or status_helpers.now_iso())
        return Succeeded(status_helpers.JOB_SUCCEEDED, message)
    # Failed
    status.setdefault("completionTime", js.completion_time or status_helpers.now_iso())
    if already:
        raise verdict_kept(status, "Failed")
    raise job_failed(js, await read_summary(api, ns, js.name))


__all__ = [
    "apply_progress",
    "apply_summary",
    "job_failed",
    "job_pods",
    "left_out",
    "mirror_job",
    "outputs_of",
    "read_summary",
    "scrape_progress",
    "status_model",
]
