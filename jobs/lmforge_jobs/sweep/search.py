"""The search behind a Sweep, through Optuna's ask/tell: samplers, pruners, and a journal file that keeps
the study, so a sweep run again resumes where it stopped.

:class:`Search` is what a runner (``lmforge run``, the operator) calls: :meth:`Search.next_trial` for the
parameters of the next trial (or of one left running by an interrupted run), :meth:`Search.report` with a
trial's intermediate objective (True: prune it), :meth:`Search.finish` with its outcome, and
:meth:`Search.status` for the sweep's status (the trial table and the best trial).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from lmforge_jobs.spec import spec_hash
from lmforge_jobs.sweep.config import (
    Algorithm,
    Direction,
    Parameter,
    Pruner,
    SweepSpec,
    TrialPhase,
    trial_name,
)

optuna.logging.set_verbosity(logging.WARNING)

STUDY_FILE = "optuna-{digest}.journal"
"""The study's journal, in the sweep's run directory, one per spec: a changed spec starts a new study (its
trials' resources, same names with other parameters, run again)."""


@dataclass(frozen=True)
class Trial:
    """A trial to run: its number, resource name and parameters (path → value)."""

    number: int
    name: str
    parameters: dict[str, Any]


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler without its ``study.stop()`` once the grid is exhausted: that works only
    inside ``study.optimize``; the runners count the trials themselves (Search.total)."""

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        return None


def _sampler(spec: SweepSpec, seed: int | None = None) -> optuna.samplers.BaseSampler:
    """The spec's sampler, seeded with spec.seed (``seed``: another seed, for the operator's per-trial
    samplers, see :meth:`Search.reseed`)."""
    seed = spec.seed if seed is None else seed
    if spec.algorithm == Algorithm.grid:
        space = {p.path: p.grid() for p in spec.parameters}
        return _GridSampler(space, seed=seed)
    if spec.algorithm == Algorithm.random:
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(1, spec.max_trials // 3)))


def _pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    stopping = spec.early_stopping
    if stopping is None or stopping.pruner == Pruner.none:
        return optuna.pruners.NopPruner()
    if stopping.pruner == Pruner.median:
        return optuna.pruners.MedianPruner(
            n_startup_trials=stopping.startup_trials, n_warmup_steps=stopping.warmup_steps
        )
    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource=stopping.min_resource, reduction_factor=stopping.reduction_factor
    )


def _suggest(trial: optuna.Trial, parameter: Parameter) -> Any:
    name = parameter.path
    if parameter.values is not None:
        return trial.suggest_categorical(name, list(parameter.values))
    if parameter.integer is not None:
        r = parameter.integer
        return trial.suggest_int(name, r.min, r.max, step=r.step)
    if parameter.log_uniform is not None:
        return trial.suggest_float(name, parameter.log_uniform.min, parameter.log_uniform.max, log=True)
    assert parameter.range is not None
    return trial.suggest_float(name, parameter.range.min, parameter.range.max, step=parameter.range.step)


def distribution(parameter: Parameter) -> optuna.distributions.BaseDistribution:
    """The distribution :func:`_suggest` asks Optuna for (a trial rebuilt from a status table needs it)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if parameter.values is not None:
        return CategoricalDistribution(list(parameter.values))
    if parameter.integer is not None:
        r = parameter.integer
        return IntDistribution(r.min, r.max, step=r.step)
    if parameter.log_uniform is not None:
        return FloatDistribution(parameter.log_uniform.min, parameter.log_uniform.max, log=True)
    assert parameter.range is not None
    return FloatDistribution(parameter.range.min, parameter.range.max, step=parameter.range.step)


def trials_total(spec: SweepSpec) -> int:
    """Trials the sweep runs: maxTrials, or fewer for a smaller grid."""
    if spec.algorithm == Algorithm.grid:
        return min(spec.max_trials, math.prod(len(p.grid()) for p in spec.parameters))
    return spec.max_trials


_PHASE_STATES = {
    TrialPhase.succeeded.value: TrialState.COMPLETE,
    TrialPhase.pruned.value: TrialState.PRUNED,
    TrialPhase.failed.value: TrialState.FAIL,
}


class Search:
    """One sweep's Optuna study, kept in ``<run_dir>/optuna.journal`` (``lmforge run``), or in memory
    (``run_dir`` None: the operator, which rebuilds it from the Sweep's status with :meth:`restore`)."""

    def __init__(self, name: str, spec: SweepSpec, run_dir: Path | None = None):
        self.name = name
        self.spec = spec
        storage: Any = None  # Optuna's in-memory storage
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            journal = run_dir / STUDY_FILE.format(digest=spec_hash(spec.to_yaml_dict()))
            storage = JournalStorage(JournalFileBackend(str(journal)))
        self.study = optuna.create_study(
            study_name=name,
            storage=storage,
            sampler=_sampler(spec),
            pruner=_pruner(spec),
            direction="minimize" if spec.objective.direction == Direction.minimize else "maximize",
            load_if_exists=True,
        )
        self.total = trials_total(spec)

    def restore(self, rows: list[dict[str, Any]]) -> None:
        """Add the trials of a status table (:meth:`status` with ``intermediate``) to an empty study, in
        order: each is added running with its parameters, its intermediate values are reported again
        through the pruner (which rebuilds what a pruner keeps of its own, such as ASHA's rungs), and a
        finished one is told its end. The study then proposes what it would have proposed had it seen
        those trials itself."""
        dists = {p.path: distribution(p) for p in self.spec.parameters}
        for row in sorted(rows, key=lambda r: int(r["number"])):
            number = int(row["number"])
            if number != len(self._trials()):
                raise ValueError(f"status.trials: trial {number} follows trial {len(self._trials()) - 1}")
            params = {k: v for k, v in (row.get("parameters") or {}).items() if k in dists}
            self.study.add_trial(
                optuna.trial.create_trial(
                    params=params,
                    distributions={k: dists[k] for k in params},
                    state=TrialState.RUNNING,
                )
            )
            for step, value in sorted((int(k), float(v)) for k, v in (row.get("intermediate") or {}).items()):
                live = self._live(number)
                live.report(value, step)
                live.should_prune()
            state = _PHASE_STATES.get(str(row.get("phase")))
            objective = row.get("objective")
            if state is None:
                continue  # still running
            if (
                state == TrialState.COMPLETE
                and isinstance(objective, int | float)
                and math.isfinite(objective)
            ):
                self.study.tell(number, float(objective))
            else:
                self.study.tell(
                    number, state=TrialState.PRUNED if state == TrialState.PRUNED else TrialState.FAIL
                )

    def reseed(self, seed: int) -> None:
        """A new sampler seeded with ``seed``. The operator rebuilds the study on every reconcile and asks
        for trial n with a sampler seeded from (spec.seed, n): a restarted operator, or a reconcile run
        again, proposes the same trial n, and trials after the first are not proposed by a sampler that
        has forgotten it ever proposed one (a fresh RandomSampler's first draw)."""
        self.study.sampler = _sampler(self.spec, seed=seed)

    def _trials(self) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False)

    def _trial(self, frozen: optuna.trial.FrozenTrial) -> Trial:
        return Trial(frozen.number, trial_name(self.name, frozen.number), dict(frozen.params))

    def unfinished(self) -> list[Trial]:
        """Trials an interrupted run left running: they run again (and resume from their checkpoints)."""
        return [self._trial(t) for t in self._trials() if t.state == TrialState.RUNNING]

    def next_trial(self) -> Trial | None:
        """A new trial, or None once the sweep has started all its trials."""
        if len(self._trials()) >= self.total:
            return None
        trial = self.study.ask()
        for parameter in self.spec.parameters:
            _suggest(trial, parameter)
        return self._trial(self.study.trials[trial.number])

    def _live(self, number: int) -> optuna.Trial:
        frozen = self._trials()[number]
        return optuna.Trial(self.study, frozen._trial_id)

    def report(self, number: int, step: int, value: float) -> bool:
        """Record the trial's objective at ``step``; True when the pruner stops the trial."""
        trial = self._live(number)
        if step in self._trials()[number].intermediate_values:
            return False
        trial.report(value, step)
        return trial.should_prune()

    def finish(self, number: int, phase: TrialPhase, objective: float | None) -> None:
        """Tell the study how the trial ended."""
        frozen = self._trials()[number]
        if frozen.state != TrialState.RUNNING:
            return
        if phase == TrialPhase.succeeded and objective is not None and math.isfinite(objective):
            self.study.tell(number, objective)
        elif phase == TrialPhase.pruned:
            self.study.tell(number, state=TrialState.PRUNED)
        else:
            self.study.tell(number, state=TrialState.FAIL)

    def finished(self) -> bool:
        return len(self._trials()) >= self.total and not self.unfinished()

    def status(
        self, outputs: dict[str, dict[str, Any]] | None = None, *, intermediate: bool = False
    ) -> dict[str, Any]:
        """The sweep's status (camelCase): the trial table, counts and the best trial with its outputs
        (``outputs``: each trial's status.outputs, by name); with ``intermediate``, each trial's
        intermediate values by step (what :meth:`restore` needs)."""
        phases = {
            TrialState.RUNNING: TrialPhase.running,
            TrialState.WAITING: TrialPhase.running,
            TrialState.COMPLETE: TrialPhase.succeeded,
            TrialState.PRUNED: TrialPhase.pruned,
            TrialState.FAIL: TrialPhase.failed,
        }
        rows = []
        for t in self._trials():
            row: dict[str, Any] = {
                "name": trial_name(self.name, t.number),
                "number": t.number,
                "parameters": dict(t.params),
                "phase": phases[t.state].value,
                "pruned": t.state == TrialState.PRUNED,
            }
            if t.state == TrialState.COMPLETE:
                row["objective"] = t.value
            elif t.intermediate_values:
                last = max(t.intermediate_values)
                row["objective"], row["step"] = t.intermediate_values[last], last
            if intermediate and t.intermediate_values:
                row["intermediate"] = {str(k): v for k, v in sorted(t.intermediate_values.items())}
            rows.append(row)
        status: dict[str, Any] = {
            "trials": rows,
            "trialsDone": sum(1 for t in self._trials() if t.state.is_finished()),
            "trialsTotal": self.total,
        }
        complete = [t for t in self._trials() if t.state == TrialState.COMPLETE]
        if complete:
            best = self.study.best_trial
            name = trial_name(self.name, best.number)
            best_outputs = {k: v for k, v in ((outputs or {}).get(name) or {}).items() if isinstance(v, str)}
            status["best"] = {
                "name": name,
                "parameters": dict(best.params),
                "objective": best.value,
                "outputs": best_outputs,
            }
            status["outputs"] = best_outputs
        return status


__all__ = ["STUDY_FILE", "Search", "Trial", "distribution", "trials_total"]
