"""A Sweep on a cluster: its trials are child PretrainRuns or AlignmentRuns, its status the study.

Every reconcile starts from the Sweep's ``status.trials`` (number, name, parameters, phase, objective,
intermediate values, pruned), never from memory:

1. the Optuna study is rebuilt from that table (:meth:`lmforge_jobs.sweep.search.Search.restore`: the same
   samplers and pruners ``lmforge run`` uses, the finished trials told their ends);
2. each running trial's child is read from the watch cache: Succeeded → the trial is told the child's
   ``status.metrics[objective.metric]`` (the metric ``lmforge run`` reads); Failed or Invalid → failed;
   still running → its ``status.metrics`` at ``status.progress.step`` go to the pruner, and a trial the
   pruner stops is marked pruned and its child deleted (its Job goes with it: ownerReferences);
3. new trials are asked for while fewer than ``maxParallel`` run and fewer than ``maxTrials`` (or the
   grid's size) were started. Trial n is asked with a sampler seeded from (spec.seed, n), so the same
   table always proposes the same trial n: a restarted operator proposes what the one before it did;
4. the table with the new trials is written to ``status`` *before* their children are created, and a
   child is created under its deterministic name ``<sweep>-t<NNN>`` if absent: a child that already
   exists and is this Sweep's (its controller ownerReference has the Sweep's uid) is adopted, never
   created twice, and a child left over from an earlier Sweep of the same name is waited for (the
   garbage collector removes it) instead of adopted;
5. once every trial has ended: ``status.best`` (the best trial's name, parameters, objective and the
   child's ``status.outputs``), ``status.outputs``, and Succeeded (or Failed when no trial succeeded).

Deleting a Sweep deletes its trials: see :func:`trial_manifest` for the garbage collector's rule.

Pruning on a cluster sees a child's metrics when the operator reconciles the Sweep (a child's status
change, or the resync), not every logged step as ``lmforge run`` does; steps are therefore rounded down
to twentieths of the trial's ``progress.totalSteps`` (:func:`report_step`), so that trials are compared
at the same steps, and each twentieth is reported once, with the first value seen in it.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lmforge_jobs.kinds import SWEEP_LABEL
from lmforge_jobs.manifest import Resource
from lmforge_jobs.resolve import trial_resource
from lmforge_jobs.spec import spec_hash
from lmforge_jobs.sweep.config import TrialPhase, trial_name
from lmforge_operator import status as status_helpers
from lmforge_operator.controller.children import controller_uid, create_owned, owned_children
from lmforge_operator.controller.outcomes import Failed, Invalid, Outcome, Running, Succeeded

if TYPE_CHECKING:
    from lmforge_operator.controller.reconcile import Controller
    from lmforge_operator.controller.workqueue import Key

log = logging.getLogger("lmforge.operator")

TRIAL_ANNOTATION = "lmforge.io/trial"
"""Annotation of a trial: ``{"number": n, "parameters": {...}}`` (JSON), what an adopting reconcile reads."""
SPEC_DIGEST_ANNOTATION = "lmforge.io/sweep-spec-digest"
"""Annotation of a trial: the digest of the Sweep spec it was created from (a changed spec is refused)."""
REPORT_POINTS = 20
"""A running trial's objective goes to the pruner at most once per this fraction of its steps."""
TRIAL_PRUNED = "TrialPruned"
"""Reason of the Event saying the pruner stopped a trial (its child is deleted)."""


def report_step(step: int, total_steps: int | None) -> int:
    """The step a running trial's objective is reported at: ``step`` rounded down to a multiple of
    ``total_steps / REPORT_POINTS`` (rounded up to a whole step), so that trials whose metrics the operator
    sees at different moments are compared at the same steps; ``step`` itself without a total."""
    if not total_steps or total_steps <= 0:
        return step
    every = max(1, math.ceil(total_steps / REPORT_POINTS))
    return (step // every) * every


def trial_seed(spec: Any, namespace: str, name: str, number: int) -> int:
    """The seed of the sampler that proposes trial ``number``: from spec.seed, else from the Sweep's
    namespace and name (stable across operator restarts), and ``number``. A grid keeps one seed: it
    shuffles the grid with it and gives trial n the n-th point, so every trial must see the same order."""
    from lmforge_jobs.sweep.config import Algorithm

    base = spec.seed if spec.seed is not None else zlib.crc32(f"{namespace}/{name}".encode())
    if spec.algorithm == Algorithm.grid:
        return base % 2**32
    return (base * 1_000_003 + number) % 2**32


def trial_manifest(
    sweep: Resource[Any, Any], owner: dict[str, Any], number: int, parameters: dict[str, Any]
) -> dict[str, Any]:
    """The child resource of trial ``number``: the template with the trial's parameters written in
    (:func:`lmforge_jobs.resolve.trial_resource`, as ``lmforge run`` builds it), named ``<sweep>-tNNN``,
    labelled with the Sweep, annotated with the trial, and owned by the Sweep.

    The ownerReference is what deletes the trials with their Sweep. Kubernetes' garbage collector (the
    "Owners and dependents" and "Garbage collection" pages of the Kubernetes documentation): a dependent
    whose ``ownerReferences`` all name owners that no longer exist is deleted; with background propagation
    (kubectl's default) the owner goes at once and the collector deletes the dependents afterwards, with
    foreground propagation the owner stays, with a ``deletionTimestamp`` and the ``foregroundDeletion``
    finalizer, until every dependent that has ``blockOwnerDeletion: true`` is gone; with ``orphan`` the
    dependents stay and lose the reference. Cross-namespace owner references are disallowed: a namespaced
    owner must be in its dependent's namespace. A reference names the owner by apiVersion, kind, name and
    uid, and one whose uid is not the owner's counts as an absent owner (a re-created Sweep of the same
    name does not own the old one's trials). At most one reference has ``controller: true``. So each trial names its Sweep with the Sweep's uid,
    ``controller: true`` and ``blockOwnerDeletion: true``, and its own Job, ConfigMap and Service name
    the trial the same way: deleting the Sweep deletes the trials, and through them their Jobs and pods.
    """
    name = trial_name(sweep.name, number)
    child = trial_resource(sweep, name, parameters)
    doc = child.model_dump(by_alias=True, exclude_none=True, mode="json")
    meta = {
        "name": name,
        "namespace": sweep.metadata.namespace,
        "labels": {**(doc.get("metadata") or {}).get("labels", {}), SWEEP_LABEL: sweep.name},
        "annotations": {
            TRIAL_ANNOTATION: json.dumps({"number": number, "parameters": parameters}, sort_keys=True),
            SPEC_DIGEST_ANNOTATION: spec_hash(sweep.spec.to_yaml_dict()),
        },
        "ownerReferences": [dict(owner)],
    }
    return {
        "apiVersion": doc.get("apiVersion"),
        "kind": child.kind,
        "metadata": {k: v for k, v in meta.items() if v is not None},
        "spec": doc["spec"],
    }


def adopted_parameters(child: dict[str, Any] | None, number: int) -> dict[str, Any] | None:
    """The parameters a child already made for trial ``number`` was created with (its annotation)."""
    annotations = ((child or {}).get("metadata") or {}).get("annotations") or {}
    try:
        trial = json.loads(annotations.get(TRIAL_ANNOTATION) or "null")
    except ValueError:
        return None
    if (
        isinstance(trial, dict)
        and trial.get("number") == number
        and isinstance(trial.get("parameters"), dict)
    ):
        return dict(trial["parameters"])
    return None


@dataclass
class SweepPlan:
    """What one reconcile of a Sweep decides, from its status and its children (no API calls)."""

    status: dict[str, Any]
    """The Sweep's trial table, counts and best trial (camelCase, the status fields)."""
    outcome: Outcome
    """Running, Succeeded or Failed."""
    create: list[dict[str, Any]] = field(default_factory=list)
    """Children to create if absent (their trials are Running in ``status``)."""
    delete: list[str] = field(default_factory=list)
    """Children to delete: the pruned trials'."""
    proposed: list[int] = field(default_factory=list)
    """Trials started by this reconcile: ``status`` is written before their children are created."""
    pruned: list[str] = field(default_factory=list)
    """Trials the pruner stopped in this reconcile (``name: why``)."""


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def plan_sweep(
    sweep: Resource[Any, Any],
    owner: dict[str, Any],
    status: dict[str, Any],
    children: dict[str, dict[str, Any]],
) -> SweepPlan:
    """Decide one reconcile of ``sweep`` from its ``status`` and ``children`` (trial name → the child, this
    Sweep's own only): see the module docstring. Pure: the same inputs give the same plan."""
    from lmforge_jobs.sweep.search import Search  # optuna: only where Sweeps are reconciled

    spec = sweep.spec
    metric = spec.objective.metric
    search = Search(sweep.name, spec)
    search.restore(list(status.get("trials") or []))
    plan = SweepPlan(status={}, outcome=Running(status_helpers.JOB_RUNNING))

    # 2. the running trials, from their children
    for row in search.status()["trials"]:
        if row["phase"] != TrialPhase.running.value:
            continue
        number, name = row["number"], row["name"]
        child = children.get(name)
        if child is None:
            continue  # created (again) below
        child_status = child.get("status") or {}
        phase = child_status.get("phase")
        metrics = child_status.get("metrics") or {}
        progress = child_status.get("progress") or {}
        if phase == "Succeeded":
            value = _number(metrics.get(metric))
            value = row.get("objective") if value is None else value
            ok = value is not None and math.isfinite(value)
            search.finish(number, TrialPhase.succeeded if ok else TrialPhase.failed, value)
        elif phase in ("Failed", "Invalid"):
            search.finish(number, TrialPhase.failed, None)
        else:
            value, step = _number(metrics.get(metric)), progress.get("step")
            if value is None or not isinstance(step, int) or step <= 0:
                continue
            at = report_step(step, progress.get("totalSteps"))
            if at > 0 and search.report(number, at, value):
                search.finish(number, TrialPhase.pruned, value)
                plan.pruned.append(f"{name}: {metric} {value:.4g} at step {at}")

    # 3. new trials
    rows = search.status()["trials"]
    running = sum(1 for r in rows if r["phase"] == TrialPhase.running.value)
    while running < spec.max_parallel and len(rows) < search.total:
        number = len(rows)
        search.reseed(trial_seed(spec, sweep.metadata.namespace or "", sweep.name, number))
        adopted = adopted_parameters(children.get(trial_name(sweep.name, number)), number)
        if adopted is not None:  # made by an operator whose status write was lost: keep its parameters
            search.study.enqueue_trial(adopted)
        trial = search.next_trial()
        if trial is None:
            break
        plan.proposed.append(trial.number)
        running += 1
        rows = search.status()["trials"]

    # 4. the children of the running trials; the pruned trials' children go
    outputs = {n: dict((c.get("status") or {}).get("outputs") or {}) for n, c in children.items()}
    plan.status = search.status(outputs, intermediate=True)
    for row in plan.status["trials"]:
        child = children.get(row["name"])
        if row["phase"] == TrialPhase.running.value and child is None:
            plan.create.append(trial_manifest(sweep, owner, row["number"], row["parameters"]))
        elif (
            row["phase"] == TrialPhase.pruned.value
            and child is not None
            and not (child.get("metadata") or {}).get("deletionTimestamp")  # not already going
        ):
            plan.delete.append(row["name"])

    # 5. the outcome
    done, total = plan.status["trialsDone"], plan.status["trialsTotal"]
    if done < total:
        plan.outcome = Running(
            status_helpers.JOB_RUNNING, f"{done} of {total} trials done, {running} running"
        )
    elif plan.status.get("best"):
        best = plan.status["best"]
        message = f"best {best['name']}: {metric} {best['objective']:.4g} ({done} trials)"
        plan.outcome = Succeeded(status_helpers.JOB_SUCCEEDED, message)
    else:
        plan.outcome = Failed(status_helpers.JOB_FAILED, f"no trial succeeded ({done} trials)")
    return plan


def own_children(
    ctrl: Controller, sweep: Resource[Any, Any], ns: str, uid: str | None
) -> dict[str, dict[str, Any]]:
    """This Sweep's trials in the watch cache, by name; raises Waiting when a resource under a trial's
    name belongs to someone else (an earlier Sweep of the same name: the garbage collector removes it)."""
    prefix = f"{sweep.name}-t"

    def is_trial(name: str) -> bool:
        return name.startswith(prefix) and name[len(prefix) :].isdigit()

    return owned_children(ctrl, sweep.spec.template.kind, ns, uid, is_trial, "Sweep")


async def reconcile_sweep(
    ctrl: Controller, key: Key, sweep: Resource[Any, Any], status: dict[str, Any], owner: dict[str, Any]
) -> Outcome:
    """One reconcile of a Sweep (see the module docstring); ``status`` is filled; returns or raises the
    outcome."""
    from lmforge_operator.controller.events import post_note

    kind, ns, name = key
    assert ctrl.api is not None
    children = own_children(ctrl, sweep, ns, owner.get("uid"))
    digest = spec_hash(sweep.spec.to_yaml_dict())
    for child, body in sorted(children.items()):
        made_from = ((body.get("metadata") or {}).get("annotations") or {}).get(SPEC_DIGEST_ANNOTATION)
        if made_from not in (None, digest):
            raise Invalid(
                status_helpers.SPEC_CHANGED,
                f"cannot change after trial {child} was created (restore the previous spec, or delete "
                "and re-create the Sweep to search again)",
                "spec",
            )
    try:
        plan = plan_sweep(sweep, owner, status, children)
    except ValueError as exc:  # a trial table this spec cannot have written (edited by hand)
        raise Invalid(status_helpers.SPEC_INVALID, str(exc), "status.trials") from None
    status.update(plan.status)
    status.setdefault("startTime", status_helpers.now_iso())

    if plan.proposed:  # the table first: a restart after this finds the trials, and adopts their children
        written = status_helpers.validated_status(kind, status)
        updated = await ctrl.api.patch(kind, ns, name, {"status": written}, subresource="status")
        if updated is not None and key in ctrl.cache:
            ctrl.cache[key] = updated

    template_kind = sweep.spec.template.kind
    await create_owned(ctrl, key, owner, plan.create)
    for child in plan.delete:
        await ctrl.api.delete(template_kind, ns, child)
        log.info("%s/%s/%s: deleted pruned trial %s", *key, child)
    for note in plan.pruned:
        body = ctrl.cache.get(key) or {"apiVersion": owner["apiVersion"], "kind": kind, "metadata": {}}
        await post_note(ctrl.api, ctrl.host, body, TRIAL_PRUNED, f"pruned {note}")
    if isinstance(plan.outcome, Succeeded):
        status.setdefault("completionTime", status_helpers.now_iso())
        return plan.outcome
    if isinstance(plan.outcome, Failed):
        status.setdefault("completionTime", status_helpers.now_iso())
        raise plan.outcome
    return plan.outcome


__all__ = [
    "REPORT_POINTS",
    "SPEC_DIGEST_ANNOTATION",
    "SWEEP_LABEL",
    "TRIAL_ANNOTATION",
    "SweepPlan",
    "adopted_parameters",
    "controller_uid",
    "own_children",
    "plan_sweep",
    "reconcile_sweep",
    "report_step",
    "trial_manifest",
    "trial_seed",
]
