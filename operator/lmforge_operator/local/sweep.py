"""``lmforge run`` of a Sweep: its trials, one after the other, each a child PretrainRun or AlignmentRun
named ``<sweep>-t<NNN>`` run by the same runner as any other resource (``WORKDIR/<kind>/<trial>/``).

While a trial runs, its objective at each step (its metrics.jsonl) goes to the sweep's Optuna pruner; a
pruned trial is stopped with SIGTERM (it saves a checkpoint and exits 143) and recorded as Pruned. The
study lives in ``WORKDIR/sweep/<name>/optuna-<spec digest>.journal``: a sweep run again keeps its finished trials and
runs the ones an interruption left running again (they resume from their checkpoints).

Trials run side by side when the machine allows (:mod:`.parallel`: at most spec.maxParallel and
``--parallel``, one per free set of GPUs, one at a time on CPU unless ``--parallel`` asks for more). The
trials are asked for in number order, so their numbers and names follow the seed; with several at once a
sampler such as TPE proposes from the trials finished so far, which depends on which finished first —
Optuna's own behaviour with parallel workers. The Search is called by one thread at a time.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from lmforge_jobs.resolve import trial_resource
from lmforge_jobs.sweep.config import TrialPhase
from lmforge_operator import status as status_helpers
from lmforge_operator.local.parallel import gpus_per_child, run_children, slots
from lmforge_operator.local.runner import LocalRunner, Outcome, read_status, resource_dir

TRIAL_PRUNED = "TrialPruned"
"""Condition reason of a trial the sweep's pruner stopped."""


class _Serialized:
    """A Search whose calls run one at a time: Optuna's ask and tell and the pruner's bookkeeping are
    not atomic across the threads of trials that run side by side."""

    def __init__(self, search: Any):
        self._search = search
        self._lock = threading.RLock()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._search, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attribute(*args, **kwargs)

        return call


class _Pruning:
    """Feeds a trial's new metrics.jsonl rows to the pruner; ``pruned`` once it says stop."""

    def __init__(self, search: Any, number: int, metric: str):
        self.search, self.number, self.metric = search, number, metric
        self.offset = 0
        self.pruned = False
        self.last: float | None = None
        self.step: int | None = None

    def __call__(self, run_dir: Path) -> bool:
        try:
            with open(run_dir / "metrics.jsonl", encoding="utf-8") as fh:
                fh.seek(self.offset)
                lines = fh.readlines()
        except OSError:
            return False
        for line in lines:
            if not line.endswith("\n"):
                break  # half-written: read it next time
            self.offset += len(line.encode("utf-8"))
            try:
                row = json.loads(line)
            except ValueError:
                continue
            value, step = row.get(self.metric), row.get("step")
            if not isinstance(value, int | float) or not isinstance(step, int):
                continue
            self.last, self.step = float(value), step
            if self.search.report(self.number, step, float(value)):
                self.pruned = True
        return self.pruned


def run_trial(
    runner: LocalRunner, sweep: Any, search: Any, trial: Any, slot: Any = None
) -> tuple[TrialPhase, float | None]:
    """Run one trial to its end (or until pruned); its phase and objective. ``slot``: its GPUs or CPU
    threads when it runs beside other trials (local.parallel)."""
    child = trial_resource(sweep, trial.name, trial.parameters)
    metric = sweep.spec.objective.metric
    pruning = _Pruning(search, trial.number, metric)
    outcome = runner.run_one(child, stop_when=pruning, slot=slot)
    if pruning.pruned and outcome.phase != "Succeeded":  # not one that ended before the signal landed
        status = read_status(runner.workdir, child.kind, child.name) or {}
        message = f"pruned by Sweep/{sweep.name}: {metric} {pruning.last:.4g} at step {pruning.step}"
        status_helpers.set_state(status, "Failed", TRIAL_PRUNED, message)
        runner._save(child, status)
        if runner.display:
            runner.display.note(child, message)
        return TrialPhase.pruned, pruning.last
    if outcome.phase != "Succeeded":
        return TrialPhase.failed, pruning.last
    metrics = (read_status(runner.workdir, child.kind, child.name) or {}).get("metrics") or {}
    value = metrics.get(metric, pruning.last)
    return (TrialPhase.succeeded, float(value)) if value is not None else (TrialPhase.failed, None)


def run_sweep(runner: LocalRunner, sweep: Any) -> Outcome:
    """Run (or resume) every trial of ``sweep`` and write its status.json."""
    from lmforge_jobs.sweep.search import Search  # optuna: only when a sweep runs

    run_dir = resource_dir(runner.workdir, sweep.kind, sweep.name)
    search = _Serialized(Search(sweep.name, sweep.spec, run_dir))
    previous = read_status(runner.workdir, sweep.kind, sweep.name) or {}
    status: dict[str, Any] = {k: v for k, v in previous.items() if k in ("conditions", "startTime")}
    status["startTime"] = status.get("startTime") or status_helpers.now_iso()
    template_kind = sweep.spec.template.kind

    def save() -> None:
        names = [row["name"] for row in search.status()["trials"]]
        outputs = {
            n: (read_status(runner.workdir, template_kind, n) or {}).get("outputs") or {} for n in names
        }
        with runner.status_lock:
            status.update(search.status(outputs))
            runner._save(sweep, status)

    if not search.finished():
        status_helpers.set_state(status, "Running", status_helpers.JOB_RUNNING, "trials running")
    save()
    pending = search.unfinished()

    def next_trial() -> Any:
        trial = pending.pop(0) if pending else search.next_trial()
        if trial is not None:
            save()
        return trial

    def run(trial: Any, slot: Any) -> tuple[TrialPhase, float | None]:
        return run_trial(runner, sweep, search, trial, slot)

    def done(trial: Any, result: tuple[TrialPhase, float | None]) -> None:
        if not runner.interrupted:  # an interrupted trial stays running: the next run resumes it
            search.finish(trial.number, *result)
        save()

    template = trial_resource(sweep, f"{sweep.name}-t000", {})
    places = slots(
        sweep.spec.max_parallel, runner.parallel, runner.gpus, gpus_per_child([template], runner.gpus)
    )
    run_children(runner, places, next_trial, run, done)

    if runner.interrupted:
        message = "interrupted; run again to resume the sweep"
        phase = status_helpers.set_state(status, "Failed", status_helpers.INTERRUPTED, message)
    elif status.get("best"):
        best = status["best"]
        message = f"best {best['name']}: {sweep.spec.objective.metric} {best['objective']:.4g}"
        status["completionTime"] = status.get("completionTime") or status_helpers.now_iso()
        phase = status_helpers.set_state(status, "Succeeded", status_helpers.JOB_SUCCEEDED, message)
    else:
        message = "no trial succeeded"
        phase = status_helpers.set_state(status, "Failed", status_helpers.JOB_FAILED, message)
    runner._save(sweep, status)
    if runner.display:
        runner.display.finished(sweep, phase, message)
    return Outcome(sweep, phase, message)


__all__ = ["run_sweep", "run_trial"]
