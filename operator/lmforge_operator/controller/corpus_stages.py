"""A Corpus advances stage by stage, one Indexed Job per stage (lmforge_jobs.data.stages)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmforge_jobs.manifest import Resource
from lmforge_jobs.resolve import default_output
from lmforge_operator import status as status_helpers
from lmforge_operator.controller.mirror import (
    apply_summary,
    check_pods_started,
    job_failed,
    job_pods,
    outputs_of,
    read_summary,
    read_termination,
    scrape_progress,
    verdict_kept,
)
from lmforge_operator.controller.outcomes import Invalid, Outcome, Pending, Running, Succeeded, Waiting

if TYPE_CHECKING:
    from lmforge_operator.controller.reconcile import Controller
    from lmforge_operator.controller.workqueue import Key


async def reconcile_corpus(
    ctl: Controller, key: Key, resource: Resource[Any, Any], status: dict[str, Any], owner: dict[str, Any]
) -> Outcome:
    """The first stage whose Job has not succeeded: create its Job, or mirror it into the status."""
    from lmforge_jobs.data.stages import stages
    from lmforge_operator import builders

    kind, ns, name = key
    api = ctl.api
    assert api is not None
    output = resource.spec.output or default_output(kind, name, ctl.config.storage, ns)
    plan = stages(resource.spec)
    done: list[str] = []
    current: tuple[Any, dict[str, Any] | None] | None = None
    last_job: dict[str, Any] = {}
    for stage in plan:
        job = await ctl.find_job(ns, builders.job_name(resource, stage), status, owner)
        if job is not None:  # a change of the spec is refused whichever stage's Job it finds
            changed = ctl.spec_changed(job, resource)
            if changed:
                raise Invalid(status_helpers.SPEC_CHANGED, changed)
        if job is not None and status_helpers.job_state(job).state == "Succeeded":
            done.append(stage.name)
            last_job = job
            continue
        current = (stage, job)
        break
    status["completedStages"] = done
    n = len(plan)
    if current is None:  # every stage succeeded
        if not (status.get("phase") == "Succeeded" and status.get("outputs")):
            summary = await read_summary(api, ns, last_job["metadata"]["name"])
            if summary:
                apply_summary(status, resource, summary)
            status["outputs"] = outputs_of(resource, output, summary)
        status["stage"] = "Done"
        status["progress"] = {"step": n, "totalSteps": n, "percent": 100.0, "etaSeconds": 0}
        status.setdefault("completionTime", status_helpers.now_iso())
        return Succeeded(status_helpers.JOB_SUCCEEDED, f"all {n} stages succeeded")
    stage, job = current
    if job is None:
        job = await ctl.create_children(key, resource, owner, {}, stage=stage)
        job = job or await ctl.find_job(ns, builders.job_name(resource, stage), None, owner)
        if job is None:
            return Pending(status_helpers.JOB_CREATED, f"stage {stage.name} created")
    changed = ctl.spec_changed(job, resource)
    if changed:
        raise Invalid(status_helpers.SPEC_CHANGED, changed)
    js = status_helpers.job_state(job)
    status["stage"] = stage.phase
    fraction = (js.succeeded / js.completions) if js.completions else 0.0
    percent = round(100.0 * (len(done) + fraction) / n, 2)
    prev = status.get("progress") or {}
    progress = {"step": len(done), "totalSteps": n, "percent": percent}
    if {k: prev.get(k) for k in progress} != progress:
        progress["updatedAt"] = status_helpers.now_iso()
    else:
        progress = prev
    status["progress"] = progress
    if js.start_time and not status.get("startTime"):
        status["startTime"] = js.start_time
    if js.state == "Queued":
        raise Waiting(
            status_helpers.QUEUED, f"stage {stage.name}: Job {js.name} is suspended until Kueue admits it"
        )
    if js.state == "Failed":
        status.setdefault("completionTime", js.completion_time or status_helpers.now_iso())
        if status.get("phase") in ("Failed", "Invalid"):
            raise verdict_kept(status)
        raise job_failed(js, *await read_termination(api, ns, js.name))
    if js.state == "Pending":
        return Pending(
            status_helpers.JOB_CREATED, f"stage {stage.name}: Job {js.name} created, waiting for its pods"
        )
    if js.state == "Running":
        pods = await job_pods(api, ns, js.name)
        not_yet = check_pods_started(js.name, pods, f"stage {stage.name}: ")
        if not_yet is not None:
            return not_yet
        scraped = await scrape_progress(api, kind, pods)
        metrics = status_helpers.metrics_for_status(kind, (scraped or {}).get("metrics") or {})
        if metrics:
            status["metrics"] = metrics
    return Running(status_helpers.JOB_RUNNING, f"stage {len(done) + 1}/{n} {stage.name}: {stage.description}")


__all__ = ["reconcile_corpus"]
