"""A ScalingStudy on a cluster: its points are child PretrainRuns, its fit runs in the operator.

Every reconcile starts from the spec and the children in the watch cache, never from memory:

1. the points are planned as ``lmforge run`` plans them (:func:`lmforge_jobs.scaling_study.study_points`):
   the same names ``<study>-b<II>n<JJ>``, shapes, N and D. With ``vocabSize: auto`` N needs the tokenizer's
   size, which the operator cannot read: it takes the ``tokenizer.train.vocabSize`` of the Corpus the
   template names (as a PretrainRun's compute plan does), and refuses a template whose tokenizer size it
   cannot know (set ``template.model.vocabSize``);
2. each point's row in ``status.points`` comes from its child's status (phase, tokens trained, final loss)
   by the rules of the local runner (:func:`lmforge_jobs.scaling_study.point_rows`): the held-out loss
   ``evalLoss`` when every succeeded point reported one, else the training loss ``loss``;
3. points are started in order while fewer than ``spec.maxParallel`` (unset: all) have a child that has not
   ended. A child is created under its deterministic name if absent (the template with the point's shape,
   budget and output, :func:`lmforge_jobs.resolve.point_resource`, the same function ``lmforge run``
   uses), owned by the study (controller, blockOwnerDeletion: deleting the study deletes its points, and
   through them their Jobs). One that exists and is the study's is adopted, never created twice; one left
   over from an earlier study of the same name is waited for (:mod:`.children`). The names alone make
   this restart-safe: a restarted operator plans the same points and finds their children;
4. once every point has ended, the fits of :mod:`lmforge_jobs.scaling` (approach 2, 3 or both, with the
   spec's bootstrap and seed) run on the succeeded points, in a worker thread of the operator (numpy and
   scipy are in the operator's extra and image): ``status.fits``, ``status.lossMetric``, ``status.target``
   (compute-optimal N, D and loss at ``spec.targetBudget``) and Succeeded — or Failed when no law could be
   fitted (too few points succeeded, no minimum, a diverged fit), the message saying why and which points
   failed. The verdict is final for the generation: the fit runs once.

Unlike ``lmforge run``, the operator writes nothing to object storage: a study on a cluster has no
``scaling.json`` (``status.outputs.law``); its fitted constants are in ``status.fits``. A study whose spec
changed after its points were created is refused (SpecChanged), as a Sweep is.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lmforge_jobs.kinds import STUDY_LABEL
from lmforge_jobs.manifest import Resource
from lmforge_jobs.resolve import point_resource
from lmforge_jobs.scaling_study import (
    PointPhase,
    fit_study,
    loss_metric,
    point_rows,
    study_points,
    target_prediction,
)
from lmforge_jobs.spec import SpecError, spec_hash
from lmforge_operator import status as status_helpers
from lmforge_operator.controller.children import create_owned, owned_children
from lmforge_operator.controller.outcomes import Failed, Invalid, Outcome, Running, Succeeded, Waiting

if TYPE_CHECKING:
    from lmforge_operator.controller.reconcile import Controller
    from lmforge_operator.controller.workqueue import Key

SPEC_DIGEST_ANNOTATION = "lmforge.io/scaling-study-spec-digest"
"""Annotation of a point: the digest of the study spec it was created from (a changed spec is refused)."""
ENDED = (PointPhase.succeeded.value, PointPhase.failed.value)
_POINT = re.compile(r"-b\d{2}n\d{2}")


def is_point_of(study: str, name: str) -> bool:
    """Whether ``name`` is a point's name of the study ``study`` (``<study>-b<II>n<JJ>``)."""
    return name.startswith(study) and _POINT.fullmatch(name[len(study) :]) is not None


def point_manifest(study: Resource[Any, Any], owner: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """The child PretrainRun of ``point`` (a row of :func:`study_points`), owned by the study."""
    child = point_resource(study, point["name"], point["shape"], point["tokens"])
    doc = child.model_dump(by_alias=True, exclude_none=True, mode="json")
    meta = {
        "name": point["name"],
        "namespace": study.metadata.namespace,
        "labels": {**((doc.get("metadata") or {}).get("labels") or {}), STUDY_LABEL: study.name},
        "annotations": {SPEC_DIGEST_ANNOTATION: spec_hash(study.spec.to_yaml_dict())},
        "ownerReferences": [dict(owner)],
    }
    return {
        "apiVersion": doc.get("apiVersion"),
        "kind": "PretrainRun",
        "metadata": {k: v for k, v in meta.items() if v is not None},
        "spec": doc["spec"],
    }


@dataclass
class StudyPlan:
    """What one reconcile of a study decides, from its spec and its children (no API calls)."""

    rows: list[dict[str, Any]]
    """Every point's row, with its losses (``_losses``) for the fit."""
    status: dict[str, Any]
    """points, pointsDone, pointsTotal (camelCase, the status fields)."""
    outcome: Outcome
    """Running until every point has ended; then the fit decides."""
    create: list[dict[str, Any]] = field(default_factory=list)
    """Children to create if absent."""
    fit: bool = False
    """Every point has ended: fit now."""


def plan_study(
    study: Resource[Any, Any],
    owner: dict[str, Any],
    children: dict[str, dict[str, Any]],
    vocab_size: int | None,
) -> StudyPlan:
    """Decide one reconcile of ``study`` from its ``children`` (point name → the child, this study's own
    only): see the module docstring. Pure: the same inputs give the same plan. A SpecError names the field
    when the spec cannot be planned."""
    points = study_points(study.spec, study.name, vocab_size)
    rows = point_rows(points, [(children.get(p["name"]) or {}).get("status") or {} for p in points])
    limit = study.spec.max_parallel or len(points)
    active = sum(
        1 for p, r in zip(points, rows, strict=True) if p["name"] in children and r["phase"] not in ENDED
    )
    create = []
    for point in points:
        if active >= limit:
            break
        if point["name"] not in children:
            create.append(point_manifest(study, owner, point))
            active += 1
    done = sum(r["phase"] in ENDED for r in rows)
    status = {
        "points": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
        "pointsDone": done,
        "pointsTotal": len(rows),
    }
    message = f"{done} of {len(rows)} points done, {active} running"
    plan = StudyPlan(rows, status, Running(status_helpers.JOB_RUNNING, message), create)
    plan.fit = done == len(rows)
    return plan


def fit_rows(spec: Any, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Any]:
    """Each requested fit's status entry, and the law to predict with (None: no fit has a frontier):
    :func:`lmforge_jobs.scaling_study.fit_study`. CPU-bound (the bootstrap): the reconcile runs it in a
    worker thread."""
    fits, _, law = fit_study(spec, rows)
    return fits, law


def fitted(
    study: Resource[Any, Any], rows: list[dict[str, Any]], status: dict[str, Any], fits: list[Any], law: Any
) -> Outcome:
    """Write the fits into ``status``; Succeeded with what was fitted, or Failed saying why none was."""
    failed = [r["name"] for r in rows if r["phase"] == PointPhase.failed.value]
    status["lossMetric"] = loss_metric(rows)
    status["fits"] = fits
    status.pop("target", None)
    status.setdefault("completionTime", status_helpers.now_iso())
    which = f"; {len(failed)} point(s) failed: {', '.join(failed[:5])}" if failed else ""
    if law is None:
        errors = [f.get("error") or "no compute-optimal frontier" for f in fits]
        succeeded = len(rows) - len(failed)
        message = f"no law fitted on {succeeded} of {len(rows)} points: {errors[0]}{which}"
        return Failed(status_helpers.JOB_FAILED, message)
    message = f"approach {law.approach} law fitted on {len(law.points)} points{which}"
    if study.spec.target_budget:
        try:
            status["target"] = target_prediction(law, study.spec.target_budget)
        except ArithmeticError as exc:  # the law overflows that far out
            message += f"; no prediction at the target ({exc})"
    target = status.get("target")
    if target:
        message += f"; at {target['flops']:.3g} FLOPs N_opt {target['parameters']:.3g}"
        if "loss" in target:
            message += f", loss {target['loss']:.4g}"
    return Succeeded(status_helpers.JOB_SUCCEEDED, message)


def study_vocab(ctrl: Controller, study: Resource[Any, Any], ns: str) -> int | None:
    """The tokenizer size N is counted with: None when the template fixes ``model.vocabSize``; with
    ``auto``, the ``tokenizer.train.vocabSize`` of the Corpus the template names. Raises Waiting while that
    Corpus is absent, Invalid when the size cannot be known before the points run."""
    template = study.spec.template
    if isinstance((template.get("model") or {}).get("vocabSize"), int):
        return None
    corpus = (template.get("corpus") or {}).get("name")
    where = "spec.template.model.vocabSize"
    if not corpus:
        raise Invalid(
            status_helpers.SPEC_INVALID,
            "auto needs the tokenizer's size, which the operator cannot read from a tokenizer given by URI: "
            "set the template's model.vocabSize",
            where,
        )
    body = ctrl.cache.get(("Corpus", ns, corpus))
    if body is None:
        raise Waiting(status_helpers.DEPENDENCY_NOT_FOUND, f"spec.template.corpus: Corpus/{corpus} not found")
    resource, _ = ctrl.parse(("Corpus", ns, corpus), body)
    if resource is None:
        raise Waiting(status_helpers.DEPENDENCY_FAILED, f"spec.template.corpus: Corpus/{corpus} is invalid")
    train = resource.spec.tokenizer.train
    if train is None:
        raise Invalid(
            status_helpers.SPEC_INVALID,
            f"auto needs the tokenizer's size, and Corpus/{corpus} uses a pretrained tokenizer the operator "
            "cannot read: set the template's model.vocabSize",
            where,
        )
    return int(train.vocab_size)


async def reconcile_study(
    ctrl: Controller, key: Key, study: Resource[Any, Any], status: dict[str, Any], owner: dict[str, Any]
) -> Outcome:
    """One reconcile of a ScalingStudy (see the module docstring); ``status`` is filled; returns or raises
    the outcome."""
    _, ns, name = key
    children = owned_children(
        ctrl, "PretrainRun", ns, owner.get("uid"), lambda n: is_point_of(name, n), "ScalingStudy"
    )
    digest = spec_hash(study.spec.to_yaml_dict())
    for child, body in sorted(children.items()):
        made_from = ((body.get("metadata") or {}).get("annotations") or {}).get(SPEC_DIGEST_ANNOTATION)
        if made_from not in (None, digest):
            raise Invalid(
                status_helpers.SPEC_CHANGED,
                f"cannot change after point {child} was created (restore the previous spec, or delete and "
                "re-create the ScalingStudy to run it again)",
                "spec",
            )
    vocab = study_vocab(ctrl, study, ns)
    try:
        plan = plan_study(study, owner, children, vocab)
    except SpecError as exc:
        raise Invalid(status_helpers.SPEC_INVALID, exc.args[0], f"spec.{exc.field}") from None
    status.update(plan.status)
    status.setdefault("startTime", status_helpers.now_iso())
    await create_owned(ctrl, key, owner, plan.create)
    if not plan.fit:
        return plan.outcome
    fits, law = await asyncio.to_thread(fit_rows, study.spec, plan.rows)
    outcome = fitted(study, plan.rows, status, fits, law)
    if isinstance(outcome, Failed):
        raise outcome
    return outcome


__all__ = [
    "SPEC_DIGEST_ANNOTATION",
    "STUDY_LABEL",
    "StudyPlan",
    "fit_rows",
    "fitted",
    "is_point_of",
    "plan_study",
    "point_manifest",
    "reconcile_study",
    "study_vocab",
]
