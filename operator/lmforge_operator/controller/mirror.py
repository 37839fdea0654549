"""Job → status: the conditions, progress, metrics and outputs of a resource from its Job and pods.

While the Job runs, progress and metrics come from the rank-0 pod's Prometheus endpoint; when it ends,
from the container's termination message (the job's summary); outputs on success.
"""

from __future__ import annotations

from typing import Any

from lmforge_jobs.data.config import CorpusStage
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
    return (await read_termination(api, ns, job_name))[0]


async def read_termination(
    api: Kube, ns: str, job_name: str
) -> tuple[dict[str, Any] | None, str, int | None]:
    """(the job's JSON summary, when a pod left one: rank 0's, else any pod's; the raw termination text of
    a pod that left no JSON (a log tail); the exit code of a pod that failed, 64 first)."""
    pods = await job_pods(api, ns, job_name, fresh=True)  # the pod watch may lag behind the Job watch
    summaries = [s for p in pods if (s := status_helpers.termination_summary(p))]
    pod = status_helpers.rank0_pod(pods)
    best = status_helpers.termination_summary(pod) if pod is not None else None
    if best is None and summaries:
        best = summaries[-1]
    ends = [status_helpers.termination_state(p) for p in pods]
    codes = [c for c, _ in ends if c]
    code = EXIT_CONFIG_ERROR if EXIT_CONFIG_ERROR in codes else (codes[-1] if codes else None)
    raw = next((text for c, text in ends if c and text), "")
    return best, raw, code


def check_pods_started(job_name: str, pods: list[dict[str, Any]], where: str = "") -> Outcome | None:
    """Raise Waiting (PodsNotStarting) when a pod of the Job cannot start; Pending while every pod is still
    Pending (the Job controller counts them as active); None once one runs."""
    stuck = [m for p in pods if (m := status_helpers.pod_not_starting(p))]
    if stuck:
        more = f" (and {len(stuck) - 1} more)" if len(stuck) > 1 else ""
        raise Waiting(status_helpers.PODS_NOT_STARTING, f"{where}Job {job_name}: {stuck[0]}{more}")
    if not status_helpers.pods_started(pods):
        return Pending(status_helpers.JOB_CREATED, f"{where}Job {job_name} created, waiting for its pods")
    return None


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


def apply_progress(status: dict[str, Any], kind: str, progress: dict[str, Any]) -> None:
    """status.apply_progress, keeping ``progress.updatedAt`` while the numbers stay the same (so an
    unchanged job writes no status)."""
    previous = dict(status.get("progress") or {})
    status_helpers.apply_progress(status, kind, {k: v for k, v in progress.items() if k != "updatedAt"})
    after = status.get("progress") or {}
    unchanged = {k: v for k, v in previous.items() if k != "updatedAt"} == {
        k: v for k, v in after.items() if k != "updatedAt"
    }
    if after and unchanged and "updatedAt" in previous:
        after["updatedAt"] = previous["updatedAt"]
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
    fields = status_helpers.status_model(resource.kind).model_fields["outputs"].annotation
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


def job_failed(
    job: status_helpers.JobState,
    summary: dict[str, Any] | None,
    raw: str = "",
    exit_code: int | None = None,
) -> Outcome:
    """Invalid when the job refused its configuration (exit 64), else Failed; to raise. The message is the
    first of: the summary's (``spec.<field>: why``), the raw termination text (a log tail), the Job
    condition's message, a pointer to the logs; never empty."""
    summary = summary or {}
    config_error = (
        summary.get("state") == "Invalid"
        or summary.get("exitCode") == EXIT_CONFIG_ERROR
        or exit_code == EXIT_CONFIG_ERROR
        # no pod left to ask: the Job's own condition names the podFailurePolicy rule that matched
        or (job.message.startswith("PodFailurePolicy") and f"exit code {EXIT_CONFIG_ERROR}" in job.message)
    )
    said = str(summary.get("message") or "").strip()
    tail = raw.strip()[-1000:]
    if config_error:
        field = summary.get("field")
        if said and field and not said.startswith("spec."):
            said = f"spec.{field}: {said}"
        detail = job.message if ": " in job.message else ""  # "reason: message", not the reason alone
        message = (
            said
            or tail
            or detail
            or f"exit code {EXIT_CONFIG_ERROR} (configuration error): see kubectl logs job/{job.name}"
        )
        return Invalid(status_helpers.CONFIG_ERROR, f"{message} (Job {job.name})")
    message = said or tail or job.message or f"see kubectl describe job/{job.name}"
    return Failed(status_helpers.JOB_FAILED, f"Job {job.name}: {message}")


def verdict_kept(status: dict[str, Any]) -> Outcome:
    """The verdict the status already records (Succeeded, Failed or Invalid: the pods, their termination
    messages, even the Job may be gone; a finished resource keeps what it was told), with its reason and
    message; to return or raise."""
    phase = status.get("phase")
    cls = {"Succeeded": Succeeded, "Invalid": Invalid, "Failed": Failed}.get(str(phase), Failed)
    recorded = status_helpers.condition(status, str(phase)) or {}
    reason = recorded.get("reason") or status_helpers.JOB_FAILED
    message = recorded.get("message") or f"{phase}"
    return Succeeded(reason, message) if cls is Succeeded else cls(reason, message)


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
        pods = await job_pods(api, ns, js.name)
        not_yet = check_pods_started(js.name, pods)
        if not_yet is not None:
            return not_yet
        progress = await scrape_progress(api, kind, pods)
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
        raise verdict_kept(status)
    raise job_failed(js, *await read_termination(api, ns, js.name))


__all__ = [
    "apply_progress",
    "apply_summary",
    "check_pods_started",
    "job_failed",
    "job_pods",
    "left_out",
    "mirror_job",
    "outputs_of",
    "read_summary",
    "read_termination",
    "scrape_progress",
    "verdict_kept",
]
