"""Sweeps: the spec's rules (Python and the CRD's CEL refuse the same manifests), a trial's spec from the
template, the Optuna search (grid, seeds, pruning, resuming), and ``lmforge run`` of a tiny learning-rate
sweep whose pruner stops the bad trials and whose best trial is the learning rate that trains."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from crdcheck import admission_errors
from manifests import resource, tiny_pretrain

from lmforge_jobs.kinds import STATUS_METRICS
from lmforge_jobs.manifest import parse_resource
from lmforge_jobs.resolve import dependencies, trial_resource
from lmforge_jobs.sweep.config import TEMPLATE_KINDS, TrialPhase, apply_parameters, reported_metrics
from lmforge_jobs.sweep.search import Search

TEMPLATE = {
    "corpus": {"name": "web"},
    "model": {"layers": 2, "hidden": 64, "heads": 4, "kvHeads": 2, "seqLen": 32},
    "budget": {"steps": 200},
    "optimizer": {"lr": 1e-3, "warmupSteps": 10},
    "batch": {"globalTokens": 1024, "microBatchSize": 8},
}


def sweep(**changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "template": {"kind": "PretrainRun", "spec": copy.deepcopy(TEMPLATE)},
        "parameters": [{"path": "optimizer.lr", "logUniform": {"min": 1e-5, "max": 1e-1}}],
        "objective": {"metric": "evalLoss"},
        "maxTrials": 6,
    }
    spec.update(changes)
    return resource("Sweep", "lr", spec)


def python_problems(doc: dict[str, Any]) -> list[str]:
    return [f"{p.field}: {p.message}" for p in parse_resource(doc)[1]]


# ---------------------------------------------------------------------------------------------- the spec
def test_a_valid_sweep_passes_python_and_the_api_server() -> None:
    doc = sweep(earlyStopping={"pruner": "asha"}, algorithm="random", seed=3)
    parsed, problems = parse_resource(doc)
    assert problems == [] and admission_errors(doc) == []
    assert (
        parsed is not None and parsed.spec.max_parallel == 1 and parsed.spec.early_stopping.min_resource == 1
    )


BAD = {
    "a path the template kind does not have": (
        sweep(parameters=[{"path": "optimizer.learningRate", "values": [1e-3]}]),
        "spec.parameters[0].path",
        False,  # the template's spec is free-form in the CRD: only Python knows its fields
    ),
    "an objective the template kind never reports": (
        sweep(objective={"metric": "rewardMargin"}),
        "spec.objective.metric",
        True,
    ),
    "grid over a continuous range": (
        sweep(algorithm="grid"),
        "spec.parameters[0]",
        True,
    ),
    "more in parallel than in all": (sweep(maxParallel=7), "spec.maxParallel", True),
    "two sources of values": (
        sweep(parameters=[{"path": "optimizer.lr", "values": [1e-3], "range": {"min": 0, "max": 1}}]),
        "spec.parameters[0].range",
        True,
    ),
    "an empty integer range": (
        sweep(parameters=[{"path": "model.layers", "integer": {"min": 4, "max": 2}}]),
        "spec.parameters[0].integer.max",
        True,
    ),
    "a log range from zero": (
        sweep(parameters=[{"path": "optimizer.lr", "logUniform": {"min": 0, "max": 1}}]),
        "spec.parameters[0].logUniform.min",
        True,
    ),
    "a template that is not a valid run": (
        sweep(template={"kind": "PretrainRun", "spec": {**TEMPLATE, "budget": {"steps": 5}}}),
        "spec.template.spec.optimizer.warmupSteps",
        False,
    ),
    "a template of a kind that does not train": (
        sweep(template={"kind": "Evaluation", "spec": {}}),
        "spec.template.kind",
        True,
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_invalid_sweeps_name_the_field(case: str) -> None:
    doc, field, cel_too = BAD[case]
    problems = python_problems(doc)
    assert problems and problems[0].startswith(f"{field}:"), problems
    assert bool(admission_errors(doc)) == cel_too, admission_errors(doc)


def test_trial_names_fit_the_name_limit() -> None:
    doc = sweep()
    doc["metadata"]["name"] = "a" * 36
    assert python_problems(doc)[0].startswith("metadata.name:")
    assert admission_errors(doc)
    doc["metadata"]["name"] = "a" * 35
    assert python_problems(doc) == [] and admission_errors(doc) == []


def test_the_metric_table_is_what_the_status_models_report() -> None:
    assert {kind: reported_metrics(kind) for kind in STATUS_METRICS} == STATUS_METRICS
    assert set(TEMPLATE_KINDS) <= set(STATUS_METRICS)


def test_validate_command_refuses_a_bad_sweep(tmp_path: Path) -> None:
    import yaml

    from lmforge_operator.cli import main

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep(maxParallel=9)))
    assert main(["validate", str(path)]) == 1  # what validate returns for any invalid manifest
    path.write_text(yaml.safe_dump(sweep()))
    assert main(["validate", str(path)]) == 0


# ------------------------------------------------------------------------------------------------- trials
def test_parameters_are_written_at_their_paths_without_touching_the_template() -> None:
    template = {"optimizer": {"lr": 1.0, "warmupSteps": 10}}
    out = apply_parameters(template, {"optimizer.lr": 0.5, "model.layers": 4})
    assert out == {"optimizer": {"lr": 0.5, "warmupSteps": 10}, "model": {"layers": 4}}
    assert template == {"optimizer": {"lr": 1.0, "warmupSteps": 10}}


def test_a_trial_is_the_template_with_its_parameters_and_its_own_output() -> None:
    doc = sweep()
    doc["spec"]["template"]["spec"]["output"] = "s3://b/shared"  # never shared between trials
    parsed = parse_resource(doc)[0]
    trial = trial_resource(parsed, "lr-t004", {"optimizer.lr": 0.02, "model.layers": 3})
    assert (trial.kind, trial.name) == ("PretrainRun", "lr-t004")
    assert trial.metadata.labels == {"lmforge.io/sweep": "lr"}
    assert trial.spec.optimizer.lr == 0.02 and trial.spec.model.layers == 3 and trial.spec.output is None
    doc["spec"]["output"] = "s3://b/sweeps/lr"
    trial = trial_resource(parse_resource(doc)[0], "lr-t004", {})
    assert trial.spec.output == "s3://b/sweeps/lr/lr-t004"


def test_a_sweep_depends_on_what_its_template_refers_to() -> None:
    parsed = parse_resource(sweep())[0]
    assert [(f, ref) for f, ref, _ in dependencies(parsed)] == [("template.spec.corpus", ("Corpus", "web"))]


# ------------------------------------------------------------------------------------------------- search
def spec_of(doc: dict[str, Any]) -> Any:
    parsed, problems = parse_resource(doc)
    assert not problems, problems
    return parsed.spec


def test_grid_runs_every_combination_once(tmp_path: Path) -> None:
    doc = sweep(
        algorithm="grid",
        maxTrials=100,
        parameters=[
            {"path": "optimizer.lr", "values": [1e-3, 1e-2]},
            {"path": "model.layers", "integer": {"min": 1, "max": 3}},
        ],
    )
    search = Search("lr", spec_of(doc), tmp_path)
    seen = []
    while (trial := search.next_trial()) is not None:
        seen.append((trial.parameters["optimizer.lr"], trial.parameters["model.layers"]))
        search.finish(trial.number, TrialPhase.succeeded, float(len(seen)))
    assert search.total == 6 and sorted(seen) == sorted((lr, n) for lr in (1e-3, 1e-2) for n in (1, 2, 3))
    assert search.status()["best"]["name"] == "lr-t000"


def test_the_same_seed_proposes_the_same_trials(tmp_path: Path) -> None:
    doc = sweep(algorithm="random", seed=7)
    first = [Search("a", spec_of(doc), tmp_path / "a").next_trial() for _ in range(1)]
    second = [Search("a", spec_of(doc), tmp_path / "b").next_trial() for _ in range(1)]
    assert first[0].parameters == second[0].parameters


def test_median_pruning_and_resuming_from_the_journal(tmp_path: Path) -> None:
    doc = sweep(algorithm="random", seed=0, earlyStopping={"pruner": "median", "startupTrials": 2})
    search = Search("lr", spec_of(doc), tmp_path)
    for value in (1.0, 2.0):  # two trials to the end: the median at step 5 is 1.5
        trial = search.next_trial()
        assert not search.report(trial.number, 5, value)
        search.finish(trial.number, TrialPhase.succeeded, value)
    good, bad = search.next_trial(), search.next_trial()
    assert not search.report(good.number, 5, 1.2)
    assert search.report(bad.number, 5, 9.0)
    search.finish(bad.number, TrialPhase.pruned, 9.0)

    again = Search("lr", spec_of(doc), tmp_path)  # another process, the same journal
    assert [t.name for t in again.unfinished()] == [good.name]
    rows = {row["name"]: row for row in again.status()["trials"]}
    assert rows[bad.name]["phase"] == "Pruned" and rows[bad.name]["pruned"] and rows[bad.name]["step"] == 5
    assert again.status()["trialsDone"] == 3 and again.status()["best"]["objective"] == 1.0


# ------------------------------------------------------------------------------------------ lmforge run
@pytest.mark.slow
def test_lmforge_run_prunes_bad_trials_and_finds_the_learning_rate(tmp_path: Path, monkeypatch) -> None:
    """Six trials of a tiny PretrainRun, one per learning rate: the ones that barely move the held-out
    loss are pruned at their evaluations, and the best trial is the largest learning rate."""
    from lmforge_jobs.pretrain.testing import make_token_data
    from lmforge_operator.local import LocalRunner

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = make_token_data(tmp_path / "tokens", vocab_size=320, documents=300, max_tokens_per_file=9000)
    template = tiny_pretrain(
        data,
        tmp_path / "unused",
        budget={"steps": 24},
        eval={"everySteps": 2, "batches": 1},
        checkpoint={"everySteps": 100, "keep": 1},
    )
    template.pop("output")
    lrs = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3]
    doc = sweep(
        template={"kind": "PretrainRun", "spec": template},
        parameters=[{"path": "optimizer.lr", "values": lrs}],
        algorithm="grid",
        seed=0,
        earlyStopping={"pruner": "median", "startupTrials": 2, "warmupSteps": 4},
    )
    parsed = parse_resource(doc)[0]
    workdir = tmp_path / "work"
    [outcome] = LocalRunner(workdir=workdir, gpus=0).run([parsed])
    status = json.loads((workdir / "sweep" / "lr" / "status.json").read_text())
    phases = [row["phase"] for row in status["trials"]]
    assert outcome.phase == "Succeeded" and status["phase"] == "Succeeded", status
    assert len(phases) == 6 and "Running" not in phases and "Pruned" in phases, status["trials"]
    assert status["trialsDone"] == status["trialsTotal"] == 6
    best = status["best"]
    assert best["parameters"] == {"optimizer.lr": 3e-3}, status["trials"]
    assert best["outputs"]["model"] == str(workdir.resolve() / "pretrainrun" / best["name"] / "model")
    assert status["outputs"] == best["outputs"]
    pruned = next(row for row in status["trials"] if row["pruned"])
    child = json.loads((workdir / "pretrainrun" / pruned["name"] / "status.json").read_text())
    assert child["conditions"] and any(c["reason"] == "TrialPruned" for c in child["conditions"])

    # A second run finds every trial finished in the journal: nothing runs again, the table stays.
    [again] = LocalRunner(workdir=workdir, gpus=0).run([parsed])
    assert again.phase == "Succeeded"
    assert json.loads((workdir / "sweep" / "lr" / "status.json").read_text())["trials"] == status["trials"]


def test_a_reference_to_a_sweep_resolves_to_its_best_trials_model() -> None:
    from lmforge_jobs.resolve import UnresolvedReference, resolve

    evaluation = resource(
        "Evaluation",
        "best",
        {"model": {"sweep": "lr"}, "benchmarks": [{"task": "hellaswag"}], "output": "/o"},
    )
    parsed, problems = parse_resource(evaluation)
    assert problems == [] and admission_errors(evaluation) == []
    assert [ref for _, ref, _ in dependencies(parsed)] == [("Sweep", "lr")]
    best = {"model": "/w/pretrainrun/lr-t003/model", "checkpoint": "/w/pretrainrun/lr-t003/checkpoints"}
    resolved = resolve(parsed, {("Sweep", "lr"): best}, "/o")
    assert resolved.spec.model.path == best["model"] and resolved.spec.model.sweep is None
    with pytest.raises(UnresolvedReference, match=r"Sweep/lr has no outputs\.model"):
        resolve(parsed, {}, "/o")
    both = copy.deepcopy(evaluation)
    both["spec"]["model"]["pretrainRun"] = "gpt"
    assert python_problems(both) and admission_errors(both)


def test_lmforge_status_says_how_far_a_sweep_is(tmp_path: Path) -> None:
    from lmforge_operator.local import status_rows

    folder = tmp_path / "sweep" / "lr"
    folder.mkdir(parents=True)
    status = {"phase": "Running", "trialsDone": 2, "trialsTotal": 6}
    (folder / "status.json").write_text(json.dumps(status))
    assert status_rows(tmp_path)[1][-1] == "2/6 trials"
    status["best"] = {"name": "lr-t001", "objective": 3.14159, "parameters": {}, "outputs": {}}
    (folder / "status.json").write_text(json.dumps(status))
    assert status_rows(tmp_path)[1][-1] == "2/6 trials, best lr-t001: 3.142"
