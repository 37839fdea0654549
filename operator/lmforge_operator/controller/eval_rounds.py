"""An Evaluation with ``checkpoints: every`` runs one Job per round: a new round whenever its PretrainRun
has landed new checkpoints. Rounds older than the newest ``KEEP_ROUNDS`` are deleted, their results kept
in status.history."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from lmforge_jobs.manifest import Resource
from lmforge_operator import status as status_helpers
from lmforge_operator.controller.mirror import mirror_job, outputs_of, read_summary
from lmforge_operator.controller.outcomes import (
    Failed,
    Invalid,
    Outcome,
    Pending,
    Running,
    Succeeded,
    Waiting,
)
from lmforge_operator.kube import ApiError, kind_key

if TYPE_CHECKING:
    from lmforge_operator.controller.reconcile import Controller
    from lmforge_operator.controller.workqueue import Key

log = logging.getLogger("lmforge.operator")

CHECKPOINTS_ANNOTATION = "lmforge.io/checkpoints"
MAX_ROUNDS = 1000
KEEP_ROUNDS = 2  # round Jobs (and their pods and spec ConfigMaps) kept per Evaluation with checkpoints: every
_ROUND = re.compile(r"round (\d+): ")


def checkpoint_marker(
    cache: dict[Key, dict[str, Any]], resource: Resource[Any, Any], ns: str
) -> tuple[str, bool] | None:
    """(marker of the checkpoints its PretrainRun has landed, whether that run is finished)."""
    ref = resource.spec.model.reference()
    target = cache.get((ref[0], ns, ref[1])) if ref else None
    if target is None:
        return None
    target_status = target.get("status") or {}
    if target_status.get("phase") == "Succeeded":
        return "final", True
    every = ((target.get("spec") or {}).get("checkpoint") or {}).get("everySteps") or 1000
    step = int((target_status.get("progress") or {}).get("step") or 0)
    return str(step // int(every)), False


def run_ended(
    cache: dict[Key, dict[str, Any]], resource: Resource[Any, Any], ns: str, *, has_rounds: bool
) -> str | None:
    """Why the followed PretrainRun will land no more checkpoints (it failed, or was deleted after a round
    was evaluated), else None."""
    ref = resource.spec.model.reference()
    if ref is None:
        return None
    target = cache.get((ref[0], ns, ref[1]))
    if target is None:
        return f"{ref[0]}/{ref[1]} was deleted" if has_rounds else None
    phase = (target.get("status") or {}).get("phase")
    return f"{ref[0]}/{ref[1]} is {phase}" if phase in ("Failed", "Invalid") else None


async def _latest_round(
    ctl: Controller, resource: Resource[Any, Any], ns: str, status: dict[str, Any], owner: dict[str, Any]
) -> tuple[tuple[int, dict[str, Any]] | None, list[int]]:
    """(the newest round's number and Job, when there is one; the rounds whose Jobs were found)."""
    from lmforge_operator import builders

    # Rounds older than the last KEEP_ROUNDS are deleted once recorded in status.history: look from the
    # last recorded one on (from 0 when none is, or when that Job is gone too).
    recorded = [
        int(m.group(1))
        for h in status.get("history") or []
        if (m := _ROUND.match(str(h.get("checkpoint") or "")))
    ]
    seen: list[int] = []
    latest: tuple[int, dict[str, Any]] | None = None
    for first in dict.fromkeys((max(recorded, default=0), 0)):
        for number in range(first, MAX_ROUNDS):
            job = await ctl.find_job(ns, builders.job_name(resource, None, number), status, owner)
            if job is None:
                break
            seen.append(number)
            latest = (number, job)
        if latest is not None:
            break
    return latest, seen


async def reconcile_rounds(
    ctl: Controller,
    key: Key,
    resource: Resource[Any, Any],
    status: dict[str, Any],
    owner: dict[str, Any],
    output: str,
) -> Outcome:
    """Mirror the newest round; once it succeeded, record its results and start the next round when new
    checkpoints have landed."""
    ns = key[1]
    api = ctl.api
    assert api is not None
    latest, seen = await _latest_round(ctl, resource, ns, status, owner)
    marker = checkpoint_marker(ctl.cache, resource, ns)
    ended = run_ended(ctl.cache, resource, ns, has_rounds=latest is not None)
    if latest is None:
        if ended:
            raise Failed(
                status_helpers.MODEL_RUN_ENDED, f"{ended} before any checkpoint landed: nothing evaluated"
            )
        outputs = ctl.check_dependencies(resource, ns)
        if marker is None or marker[0] == "0":
            raise Waiting(status_helpers.WAITING_FOR_CHECKPOINT, "no checkpoint of the model has landed yet")
        await ctl.create_children(
            key, resource, owner, outputs, round=0, extra={CHECKPOINTS_ANNOTATION: marker[0]}
        )
        return Pending(status_helpers.JOB_CREATED, f"round 0 created for checkpoints {marker[0]}")
    number, job = latest
    changed = ctl.spec_changed(job, resource)
    if changed:
        raise Invalid(status_helpers.SPEC_CHANGED, changed)
    js = status_helpers.job_state(job)
    evaluated = js.annotations.get(CHECKPOINTS_ANNOTATION, "")
    if js.state != "Succeeded":
        return await mirror_job(api, resource, ns, status, job, output)
    # The latest round succeeded: record its results once, then start another if checkpoints landed.
    history = status.setdefault("history", [])
    if not any(h.get("checkpoint") == f"round {number}: {evaluated}" for h in history):
        summary = await read_summary(api, ns, js.name)
        results = (summary or {}).get("results")
        if isinstance(results, dict):
            from lmforge_jobs.evaluate.config import Results

            fields = {f.alias or n for n, f in Results.model_fields.items()}
            entry = {k: v for k, v in results.items() if k in fields}
            entry["checkpoint"] = f"round {number}: {evaluated}"
            history.append(entry)
            status["history"] = history[-status_helpers.HISTORY_LIMIT :]
            status["results"] = {k: v for k, v in entry.items()}
        status["outputs"] = outputs_of(resource, output, summary)
    if ended:  # its run will land no more checkpoints: done with what it has
        status.setdefault("completionTime", js.completion_time or status_helpers.now_iso())
        return Succeeded(
            status_helpers.MODEL_RUN_ENDED,
            f"{ended}: {number + 1} rounds evaluated, up to its checkpoints {evaluated}",
        )
    if marker is not None and marker[0] != evaluated:
        try:
            outputs = ctl.check_dependencies(resource, ns)
        except Waiting:
            outputs = {}
        await ctl.create_children(
            key, resource, owner, outputs, round=number + 1, extra={CHECKPOINTS_ANNOTATION: marker[0]}
        )
        await prune_rounds(ctl, resource, ns, number + 1, seen)
        return Running(status_helpers.JOB_CREATED, f"round {number + 1} created for checkpoints {marker[0]}")
    if marker is not None and marker[1]:
        status.setdefault("completionTime", js.completion_time or status_helpers.now_iso())
        return Succeeded(
            status_helpers.JOB_SUCCEEDED, f"{number + 1} rounds evaluated, the final model included"
        )
    return Running(
        status_helpers.WAITING_FOR_CHECKPOINT, f"round {number} done; waiting for the next checkpoint"
    )


async def prune_rounds(
    ctl: Controller, resource: Resource[Any, Any], ns: str, newest: int, seen: list[int]
) -> None:
    """Round ``newest`` was just created: delete the Job (its pods with it), spec ConfigMap and PodGroup of round
    ``newest - KEEP_ROUNDS`` (each older one went when its successor's successor came), and of any older
    round still seen. Their results are in status.history and results.json. Best effort: a refusal
    is logged, and the round is tried again only if it is seen again."""
    from lmforge_operator import builders

    assert ctl.api is not None
    cutoff = newest - KEEP_ROUNDS
    for number in sorted({r for r in seen if r < cutoff} | ({cutoff} if cutoff >= 0 else set())):
        job = builders.job_name(resource, None, number)
        try:
            await ctl.api.delete("Job", ns, job)
            await ctl.api.delete("ConfigMap", ns, builders.configmap_name(resource, number))
            group = builders.build_pod_group(resource, None, None, number)
            if group is not None:  # gang scheduling: the round's PodGroup goes with its Job
                await ctl.api.delete(kind_key(group), ns, job)
        except ApiError as exc:
            log.warning(
                "%s/%s/%s: round %d not cleaned up: %s", resource.kind, ns, resource.name, number, exc
            )
            continue
        ctl.jobs.pop((ns, job), None)
        log.info("%s/%s/%s: deleted round %d (Job %s)", resource.kind, ns, resource.name, number, job)


__all__ = ["CHECKPOINTS_ANNOTATION", "KEEP_ROUNDS", "MAX_ROUNDS", "checkpoint_marker", "reconcile_rounds"]
