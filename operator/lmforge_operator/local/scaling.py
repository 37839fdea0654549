"""``lmforge run`` of a ScalingStudy: its points, one after the other, each a child PretrainRun named
``<study>-b<II>n<JJ>`` run by the same runner as any other resource (``WORKDIR/pretrainrun/<point>/``),
then the scaling-law fits of :mod:`lmforge_jobs.scaling` on their final losses.

The loss of a point is its final held-out loss (``status.metrics.evalLoss``) when every point reported one,
else its final training loss (``metrics.loss``, the last logged step's): one study never mixes the two, and
``status.lossMetric`` says which it used. A point's compute is its budget C as written in the spec (so the
fit groups the points of a budget exactly), its tokens the ones it trained on (whole steps).

The fits go to ``WORKDIR/scalingstudy/<name>/scaling-approach2.json`` and ``scaling-approach3.json``, and
the one ``lmforge plan --law`` should read to ``scaling.json`` (approach 3 when it was fitted and has a
frontier, else approach 2); status.outputs.law names it.

Run again, a study skips its finished points (the runner skips an up-to-date PretrainRun), resumes an
interrupted one from its checkpoint and refits. Points run side by side as a Sweep's trials do
(:mod:`.parallel`: at most spec.maxParallel and ``--parallel``, one per free set of GPUs, one at a time on
CPU unless ``--parallel`` asks for more); the fits wait for every point.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from lmforge_jobs.resolve import UnresolvedReference, point_resource
from lmforge_jobs.scaling_study import (
    fit_study,
    loss_metric,
    point_rows,
    study_points,
    target_prediction,
)
from lmforge_jobs.spec import SpecError
from lmforge_operator import status as status_helpers
from lmforge_operator.local.parallel import gpus_per_child, run_children, slots
from lmforge_operator.local.runner import (
    LocalRunner,
    Outcome,
    job_environment,
    read_status,
    resource_dir,
    tokenizer_vocab,
)
from lmforge_operator.local.storage import storage_env

LAW_FILE = "scaling.json"
"""The law ``lmforge plan --law`` reads, in the study's run directory."""


def law_file(run_dir: Path, approach: int) -> Path:
    return run_dir / f"scaling-approach{approach}.json"


def _vocab(runner: LocalRunner, study: Any) -> int | None:
    """The tokenizer's size, for the parameter counts of ``vocabSize: auto`` models (None: the spec's)."""
    job = runner.resolved(point_resource(study, study.name, {}, 1))
    if job.spec.data is None:
        return None
    with job_environment(storage_env(job, runner.s3_endpoint)):
        return tokenizer_vocab(job.spec.data.tokenizer)


def _public(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]


def fit_points(spec: Any, rows: list[dict[str, Any]], run_dir: Path) -> tuple[list[dict[str, Any]], Any]:
    """Fit the requested approaches to the rows (:func:`lmforge_jobs.scaling_study.fit_study`); each fit's
    status entry with the file it was written to, and the law written to scaling.json (None when no fit
    has a frontier)."""
    fits, results, law = fit_study(spec, rows)
    for entry in fits:
        result = results.get(entry["approach"])
        if result is not None:
            entry["law"] = str(result.save(law_file(run_dir, entry["approach"])).resolve())
    if law is not None:
        shutil.copyfile(law_file(run_dir, law.approach), run_dir / LAW_FILE)
    return fits, law


def run_study(runner: LocalRunner, study: Any) -> Outcome:
    """Run (or resume) every point of ``study``, fit the law and write its status.json."""
    run_dir = resource_dir(runner.workdir, study.kind, study.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = read_status(runner.workdir, study.kind, study.name) or {}
    status: dict[str, Any] = {k: v for k, v in previous.items() if k in ("conditions", "startTime")}
    status["startTime"] = status.get("startTime") or status_helpers.now_iso()
    try:
        plan = study_points(study.spec, study.name, _vocab(runner, study))
    except UnresolvedReference as exc:
        runner._not_run(study, status_helpers.DEPENDENCY_NOT_READY, str(exc))
        return Outcome(study, "Waiting", str(exc))
    except SpecError as exc:
        message = f"spec.{exc.field}: {exc.message}"
        phase = status_helpers.set_state(status, "Invalid", status_helpers.CONFIG_ERROR, message)
        runner._save(study, status)
        if runner.display:
            runner.display.finished(study, phase, message)
        return Outcome(study, phase, message)

    def rows() -> list[dict[str, Any]]:
        return point_rows(plan, [read_status(runner.workdir, "PretrainRun", p["name"]) or {} for p in plan])

    def save(current: list[dict[str, Any]]) -> None:
        status["points"] = _public(current)
        status["pointsTotal"] = len(current)
        status["pointsDone"] = sum(r["phase"] in ("Succeeded", "Failed") for r in current)
        with runner.status_lock:
            runner._save(study, status)

    status_helpers.set_state(status, "Running", status_helpers.JOB_RUNNING, f"{len(plan)} points")
    save(rows())
    failed: list[str] = []

    def child(point: dict[str, Any]) -> Any:
        return point_resource(study, point["name"], point["shape"], point["tokens"])

    queue = (child(point) for point in plan)

    def run(child: Any, slot: Any) -> Outcome:
        return runner.run_one(child, slot=slot)

    def done(child: Any, outcome: Outcome) -> None:
        if outcome.phase != "Succeeded" and not runner.interrupted:
            failed.append(f"{child.name}: {outcome.message or outcome.phase}")
        save(rows())

    # maxParallel unset: every point may run at once, as on a cluster; the hardware and --parallel decide
    max_parallel = study.spec.max_parallel or len(plan)
    per_child = gpus_per_child([child(point) for point in plan] if runner.gpus else [], runner.gpus)
    places = slots(max_parallel, runner.parallel, runner.gpus, per_child)
    run_children(runner, places, lambda: next(queue, None), run, done)

    current = rows()
    if runner.interrupted:
        message = "interrupted; run again to resume the study"
        phase = status_helpers.set_state(status, "Failed", status_helpers.INTERRUPTED, message)
    elif failed:
        message = f"{len(failed)} point(s) failed; first {failed[0]}"
        phase = status_helpers.set_state(status, "Failed", status_helpers.JOB_FAILED, message)
    else:
        status["lossMetric"] = loss_metric(current)
        (run_dir / LAW_FILE).unlink(missing_ok=True)  # a law from an earlier spec must not outlive its fit
        fits, law = fit_points(study.spec, current, run_dir)
        status["fits"] = fits
        status.pop("target", None)
        if law is None:
            errors = [f.get("error") or "no compute-optimal frontier" for f in fits]
            message = f"no law fitted: {errors[0]}"
            phase = status_helpers.set_state(status, "Failed", status_helpers.JOB_FAILED, message)
        else:
            status["outputs"] = {"law": str((run_dir / LAW_FILE).resolve())}
            message = f"approach {law.approach} law fitted on {len(law.points)} points"
            if study.spec.target_budget:
                try:
                    status["target"] = target_prediction(law, study.spec.target_budget)
                except ArithmeticError as exc:  # the law overflows that far out
                    message += f"; no prediction at the target ({exc})"
            if status.get("target"):
                target = status["target"]
                message += f"; at {target['flops']:.3g} FLOPs N_opt {target['parameters']:.3g}"
                if "loss" in target:
                    message += f", loss {target['loss']:.4g}"
            status["completionTime"] = status.get("completionTime") or status_helpers.now_iso()
            phase = status_helpers.set_state(status, "Succeeded", status_helpers.JOB_SUCCEEDED, message)
    save(current)
    (run_dir / "points.jsonl").write_text(
        "".join(
            json.dumps({k: v for k, v in r.items() if k != "_losses"} | r["_losses"]) + "\n" for r in current
        ),
        encoding="utf-8",
    )
    if runner.display:
        runner.display.finished(study, phase, message)
    return Outcome(study, phase, message)


__all__ = ["LAW_FILE", "fit_points", "loss_metric", "point_rows", "run_study", "target_prediction"]
