"""A Sweep on a cluster: the reconcile's plan against fake children (names, ownerReferences, maxParallel,
restarts, pruning, the best trial), and one run of the operator against kmock, playing the trials' Jobs.

kmock has no garbage collector: what deletes a Sweep's trials with it is the ownerReference, checked here
field by field against the rule written in :func:`lmforge_operator.controller.sweeps.trial_manifest`.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from fake_api import FakeApi
from kmock_harness import Cluster, Operator, assert_rbac

from lmforge_jobs.manifest import parse_resource
from lmforge_jobs.sweep.search import Search, _suggest, distribution
from lmforge_operator import builders, rbac
from lmforge_operator.controller.outcomes import Running, Succeeded
from lmforge_operator.controller.sweeps import (
    TRIAL_ANNOTATION,
    plan_sweep,
    report_step,
    trial_manifest,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

NS = "ml"
TEMPLATE = {
    "data": {"tokens": "s3://bucket/tokens/train", "tokenizer": "s3://bucket/tokenizer"},
    "model": {"layers": 2, "hidden": 64, "heads": 4, "kvHeads": 2, "seqLen": 64},
    "budget": {"steps": 200},
    "batch": {"globalTokens": 4096, "microBatchSize": 8},
    "parallelism": {"nodes": 1, "gpusPerNode": 1},
}
LRS = [1e-4, 3e-4, 1e-3, 3e-3]


def sweep_doc(name: str = "lr", uid: str = "uid-lr", **spec: Any) -> dict[str, Any]:
    body = {
        "template": {"kind": "PretrainRun", "spec": TEMPLATE},
        "parameters": [{"path": "optimizer.lr", "values": LRS}],
        "objective": {"metric": "evalLoss", "direction": "minimize"},
        "algorithm": "grid",
        "maxTrials": 4,
        "maxParallel": 2,
        "seed": 7,
        **spec,
    }
    return {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "Sweep",
        "metadata": {"name": name, "namespace": NS, "uid": uid, "generation": 1},
        "spec": body,
    }


def parsed(doc: dict[str, Any]) -> Any:
    resource, problems = parse_resource(copy.deepcopy(doc), "test")
    assert resource is not None, problems
    return resource


class FakeCluster:
    """The Sweep's status and its children, as the reconcile sees them; applies each plan."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.sweep = parsed(doc)
        self.owner = builders.owner_reference(doc)
        self.status: dict[str, Any] = {}
        self.children: dict[str, dict[str, Any]] = {}
        self.created: list[str] = []
        self.deleted: list[str] = []

    def reconcile(self) -> Any:
        plan = plan_sweep(self.sweep, self.owner, copy.deepcopy(self.status), copy.deepcopy(self.children))
        self.status = plan.status
        for obj in plan.create:
            assert obj["metadata"]["name"] not in self.children, "created twice"
            self.children[obj["metadata"]["name"]] = obj
            self.created.append(obj["metadata"]["name"])
        for name in plan.delete:
            self.children.pop(name)
            self.deleted.append(name)
        return plan

    def child_status(self, name: str, **status: Any) -> None:
        self.children[name]["status"] = status

    def succeed(self, name: str, value: float) -> None:
        self.child_status(
            name,
            phase="Succeeded",
            metrics={"evalLoss": value, "loss": value - 0.1},
            outputs={"model": f"s3://bucket/{name}/model", "checkpoint": f"s3://bucket/{name}/ckpt"},
        )

    def running(self) -> list[str]:
        return [r["name"] for r in self.status["trials"] if r["phase"] == "Running"]


def lr_of(fake: FakeCluster, name: str) -> float:
    return float(fake.children[name]["spec"]["optimizer"]["lr"])


# ---------------------------------------------------------------------------------------- the children
def test_trials_are_named_owned_and_limited_to_max_parallel() -> None:
    fake = FakeCluster(sweep_doc())
    plan = fake.reconcile()
    assert plan.proposed == [0, 1] and fake.created == ["lr-t000", "lr-t001"]
    assert isinstance(plan.outcome, Running) and "0 of 4 trials done, 2 running" in plan.outcome.message
    child = fake.children["lr-t000"]
    assert child["kind"] == "PretrainRun" and child["apiVersion"] == "lmforge.io/v1alpha1"
    # The ownerReference the garbage collector deletes the trial by: the Sweep's uid, in its namespace,
    # the one controller reference, blocking foreground deletion of the Sweep until the trial is gone.
    assert child["metadata"]["namespace"] == NS
    assert child["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "lmforge.io/v1alpha1",
            "kind": "Sweep",
            "name": "lr",
            "uid": "uid-lr",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert child["metadata"]["labels"]["lmforge.io/sweep"] == "lr"
    # the template with the trial's parameter written in, and each trial its own output
    assert child["spec"]["data"] == TEMPLATE["data"] and child["spec"]["budget"] == {"steps": 200}
    assert lr_of(fake, "lr-t000") in LRS and lr_of(fake, "lr-t000") != lr_of(fake, "lr-t001")
    assert "output" not in child["spec"]
    row = fake.status["trials"][0]
    assert row == {
        "name": "lr-t000",
        "number": 0,
        "parameters": {"optimizer.lr": lr_of(fake, "lr-t000")},
        "phase": "Running",
        "pruned": False,
    }

    # Nothing changed: nothing new; still two at once while they run.
    plan = fake.reconcile()
    assert plan.proposed == [] and plan.create == [] and fake.created == ["lr-t000", "lr-t001"]
    fake.succeed("lr-t000", 3.0)
    plan = fake.reconcile()
    assert plan.proposed == [2] and fake.created[-1] == "lr-t002" and len(fake.running()) == 2
    assert fake.status["trialsDone"] == 1 and fake.status["trialsTotal"] == 4


def test_sweep_output_gives_each_trial_its_folder() -> None:
    fake = FakeCluster(sweep_doc(output="s3://bucket/sweeps/lr"))
    fake.reconcile()
    assert fake.children["lr-t001"]["spec"]["output"] == "s3://bucket/sweeps/lr/lr-t001"


def test_max_trials_bounds_the_sweep_and_the_best_trial_is_reported() -> None:
    fake = FakeCluster(sweep_doc(maxTrials=3, maxParallel=3))
    fake.reconcile()
    assert fake.created == ["lr-t000", "lr-t001", "lr-t002"]
    losses = {"lr-t000": 3.5, "lr-t001": 2.25, "lr-t002": 4.0}
    for name, value in losses.items():
        fake.succeed(name, value)
    plan = fake.reconcile()
    assert fake.created == ["lr-t000", "lr-t001", "lr-t002"]  # never a fourth
    assert isinstance(plan.outcome, Succeeded) and "best lr-t001: evalLoss 2.25" in plan.outcome.message
    best = fake.status["best"]
    assert best == {
        "name": "lr-t001",
        "parameters": {"optimizer.lr": lr_of(fake, "lr-t001")},
        "objective": 2.25,
        "outputs": {"model": "s3://bucket/lr-t001/model", "checkpoint": "s3://bucket/lr-t001/ckpt"},
    }
    assert fake.status["outputs"] == best["outputs"] and fake.status["trialsDone"] == 3
    assert [r["objective"] for r in fake.status["trials"]] == [3.5, 2.25, 4.0]


def test_maximize_and_failed_trials() -> None:
    doc = sweep_doc(maxTrials=2, maxParallel=2)
    doc["spec"]["objective"] = {"metric": "evalLoss", "direction": "maximize"}
    fake = FakeCluster(doc)
    fake.reconcile()
    fake.succeed("lr-t000", 1.0)
    fake.child_status("lr-t001", phase="Failed")
    plan = fake.reconcile()
    assert [r["phase"] for r in fake.status["trials"]] == ["Succeeded", "Failed"]
    assert isinstance(plan.outcome, Succeeded) and fake.status["best"]["name"] == "lr-t000"

    fake = FakeCluster(doc)
    fake.reconcile()
    for name in ("lr-t000", "lr-t001"):
        fake.child_status(name, phase="Invalid")
    plan = fake.reconcile()
    assert plan.outcome.condition == "Failed" and "no trial succeeded" in plan.outcome.message
    assert "best" not in fake.status


# -------------------------------------------------------------------------------------- restart safety
@pytest.mark.parametrize("algorithm", ["grid", "random", "tpe"])
def test_a_restarted_operator_proposes_the_same_trial_and_creates_no_duplicate(algorithm: str) -> None:
    doc = sweep_doc(algorithm=algorithm, maxTrials=5, maxParallel=1)
    if algorithm != "grid":
        doc["spec"]["parameters"] = [{"path": "optimizer.lr", "logUniform": {"min": 1e-5, "max": 1e-2}}]
    fake = FakeCluster(doc)
    fake.reconcile()
    fake.succeed("lr-t000", 3.0)
    fake.reconcile()
    fake.succeed("lr-t001", 2.0)
    before = copy.deepcopy(fake.status)

    # One operator asks for trial 2; another (restarted, a fresh study from the same status) asks again.
    first = plan_sweep(fake.sweep, fake.owner, copy.deepcopy(before), copy.deepcopy(fake.children))
    again = plan_sweep(fake.sweep, fake.owner, copy.deepcopy(before), copy.deepcopy(fake.children))
    assert first.proposed == again.proposed == [2]
    assert first.status["trials"][2] == again.status["trials"][2]
    assert first.create == again.create

    # Trials after the first are not all the same proposal (each trial its own seeded sampler).
    fake.reconcile()
    lrs = [lr_of(fake, n) for n in ("lr-t000", "lr-t001", "lr-t002")]
    assert len(set(lrs)) == 3, lrs

    # Restarted after the status was written and the child created: the child is adopted, not re-created.
    plan = plan_sweep(fake.sweep, fake.owner, copy.deepcopy(fake.status), copy.deepcopy(fake.children))
    assert plan.create == [] and plan.proposed == []
    # Restarted after the status was written but before the child was created: created, once, as planned.
    gone = dict(fake.children)
    gone.pop("lr-t002")
    plan = plan_sweep(fake.sweep, fake.owner, copy.deepcopy(fake.status), gone)
    assert [c["metadata"]["name"] for c in plan.create] == ["lr-t002"]
    assert plan.create[0]["spec"] == fake.children["lr-t002"]["spec"]


def test_a_child_whose_status_write_was_lost_is_adopted_with_its_parameters() -> None:
    fake = FakeCluster(sweep_doc(algorithm="random", maxParallel=1))
    fake.reconcile()
    # trial 0's child exists with other parameters than the ones this table would propose
    child = fake.children["lr-t000"]
    child["metadata"]["annotations"][TRIAL_ANNOTATION] = (
        '{"number": 0, "parameters": {"optimizer.lr": 0.003}}'
    )
    plan = plan_sweep(fake.sweep, fake.owner, {}, copy.deepcopy(fake.children))
    assert plan.create == [] and plan.proposed == [0]
    assert plan.status["trials"][0]["parameters"] == {"optimizer.lr": 0.003}


def test_distributions_match_what_the_local_runner_suggests() -> None:
    import optuna

    doc = sweep_doc(algorithm="tpe")
    doc["spec"]["parameters"] = [
        {"path": "optimizer.lr", "logUniform": {"min": 1e-5, "max": 1e-2}},
        {"path": "optimizer.weightDecay", "range": {"min": 0.0, "max": 0.2, "step": 0.05}},
        {"path": "optimizer.warmupSteps", "integer": {"min": 0, "max": 100, "step": 10}},
        {"path": "precision", "values": ["bf16", "fp32"]},
    ]
    spec = parsed(doc).spec
    study = optuna.create_study()
    trial = study.ask()
    for parameter in spec.parameters:
        _suggest(trial, parameter)
    frozen = study.trials[0]
    assert frozen.distributions == {p.path: distribution(p) for p in spec.parameters}


# ------------------------------------------------------------------------------------------- pruning
def test_report_step_rounds_to_twentieths_of_the_run() -> None:
    assert report_step(57, 200) == 50 and report_step(10, 200) == 10 and report_step(9, 200) == 0
    assert report_step(57, None) == 57 and report_step(7, 10) == 7


def test_a_pruned_trial_is_marked_and_its_child_deleted() -> None:
    doc = sweep_doc(
        maxTrials=4,
        maxParallel=1,
        earlyStopping={"pruner": "median", "startupTrials": 2, "warmupSteps": 0},
    )
    fake = FakeCluster(doc)
    for i, final in enumerate((3.0, 3.2)):  # two trials run to the end, seen at the same steps
        name = f"lr-t00{i}"
        fake.reconcile()
        for step, value in ((50, 5.0 + i * 0.1), (100, 4.0 + i * 0.1)):
            fake.child_status(
                name,
                phase="Running",
                progress={"step": step, "totalSteps": 200},
                metrics={"evalLoss": value},
            )
            fake.reconcile()
        fake.succeed(name, final)
    fake.reconcile()
    assert fake.running() == ["lr-t002"]
    assert fake.status["trials"][0]["intermediate"] == {"50": 5.0, "100": 4.0}
    # trial 2 is far worse at step 50 (seen at 57: rounded to the same step as the others)
    fake.child_status(
        "lr-t002", phase="Running", progress={"step": 57, "totalSteps": 200}, metrics={"evalLoss": 9.0}
    )
    plan = fake.reconcile()
    assert fake.deleted == ["lr-t002"] and "lr-t002" not in fake.children
    row = fake.status["trials"][2]
    assert row["phase"] == "Pruned" and row["pruned"] is True
    assert row["objective"] == 9.0 and row["step"] == 50
    assert plan.pruned and plan.pruned[0].startswith("lr-t002: evalLoss 9 at step 50")
    # the next trial starts in its place; the pruned one is never re-created
    assert fake.created[-1] == "lr-t003" and fake.running() == ["lr-t003"]
    fake.reconcile()
    assert fake.created.count("lr-t002") == 1


def test_a_trial_as_good_as_the_others_is_not_pruned() -> None:
    doc = sweep_doc(maxParallel=1, earlyStopping={"pruner": "median", "startupTrials": 1})
    fake = FakeCluster(doc)
    fake.reconcile()
    fake.child_status(
        "lr-t000", phase="Running", progress={"step": 100, "totalSteps": 200}, metrics={"evalLoss": 4.0}
    )
    fake.reconcile()
    fake.succeed("lr-t000", 3.0)
    fake.reconcile()
    fake.child_status(
        "lr-t001", phase="Running", progress={"step": 100, "totalSteps": 200}, metrics={"evalLoss": 3.9}
    )
    fake.reconcile()
    assert fake.deleted == [] and fake.running() == ["lr-t001"]


def test_restore_rebuilds_what_the_study_knew() -> None:
    doc = sweep_doc(algorithm="tpe", maxTrials=6, earlyStopping={"pruner": "asha", "minResource": 10})
    spec = parsed(doc).spec
    rows = [
        {"name": "lr-t000", "number": 0, "parameters": {"optimizer.lr": 1e-3}, "phase": "Succeeded",
         "objective": 3.0, "pruned": False, "intermediate": {"10": 5.0, "30": 4.0}},
        {"name": "lr-t001", "number": 1, "parameters": {"optimizer.lr": 1e-4}, "phase": "Pruned",
         "objective": 6.0, "step": 10, "pruned": True, "intermediate": {"10": 6.0}},
        {"name": "lr-t002", "number": 2, "parameters": {"optimizer.lr": 3e-4}, "phase": "Running",
         "objective": 4.5, "step": 10, "pruned": False, "intermediate": {"10": 4.5}},
    ]  # fmt: skip
    search = Search("lr", spec)
    search.restore(rows)
    states = [t.state.name for t in search.study.trials]
    assert states == ["COMPLETE", "PRUNED", "RUNNING"]
    assert search.status(intermediate=True)["trials"] == rows
    with pytest.raises(ValueError, match="trial 5 follows trial 2"):
        Search("lr", spec).restore([*rows, {**rows[0], "number": 5}])


# ------------------------------------------------------------------------------- the reconcile's calls
def fake_controller(children: list[dict[str, Any]]) -> Any:
    from types import SimpleNamespace

    cache = {(c["kind"], NS, c["metadata"]["name"]): c for c in children}
    return SimpleNamespace(api=FakeApi(), cache=cache, host="test")


def test_the_status_is_written_before_the_children_are_created() -> None:
    import asyncio

    from lmforge_operator.controller.sweeps import reconcile_sweep

    doc = sweep_doc()
    ctrl = fake_controller([])
    status: dict[str, Any] = {}
    outcome = asyncio.run(
        reconcile_sweep(ctrl, ("Sweep", NS, "lr"), parsed(doc), status, builders.owner_reference(doc))
    )
    assert isinstance(outcome, Running)
    assert [c for c in ctrl.api.calls if c[1] != "Event"] == [
        ("patch", "Sweep/status", "lr"),
        ("create", "PretrainRun", "lr-t000"),
        ("create", "PretrainRun", "lr-t001"),
    ]
    assert [t["name"] for t in status["trials"]] == ["lr-t000", "lr-t001"] and status["startTime"]


def test_a_changed_spec_or_someone_elses_child_stops_the_sweep() -> None:
    import asyncio

    from lmforge_operator.controller.outcomes import Invalid, Waiting
    from lmforge_operator.controller.sweeps import reconcile_sweep

    doc = sweep_doc()
    fake = FakeCluster(doc)
    fake.reconcile()
    changed = sweep_doc(maxTrials=3)
    ctrl = fake_controller(list(fake.children.values()))
    with pytest.raises(Invalid) as raised:
        asyncio.run(
            reconcile_sweep(
                ctrl, ("Sweep", NS, "lr"), parsed(changed), dict(fake.status), builders.owner_reference(doc)
            )
        )
    assert raised.value.reason == "SpecChanged" and raised.value.message.startswith("spec: cannot change")
    assert ctrl.api.calls == []

    other = sweep_doc(uid="uid-of-a-new-lr")  # the same name, re-created: the old trials are not adopted
    ctrl = fake_controller(list(fake.children.values()))
    with pytest.raises(Waiting) as waiting:
        asyncio.run(
            reconcile_sweep(ctrl, ("Sweep", NS, "lr"), parsed(other), {}, builders.owner_reference(other))
        )
    assert waiting.value.reason == "OldChildrenPresent" and ctrl.api.calls == []


# ----------------------------------------------------------------------------------------- permissions
def test_rbac_lets_the_operator_create_and_delete_trials() -> None:
    for plural in ("pretrainruns", "alignmentruns"):
        assert rbac.allows("lmforge.io", plural, "create") and rbac.allows("lmforge.io", plural, "delete")
    assert rbac.allows("lmforge.io", "sweeps/status", "patch") and rbac.allows(
        "lmforge.io", "sweeps", "watch"
    )
    assert not rbac.allows("lmforge.io", "sweeps", "create")


def test_trial_manifest_names_and_owner() -> None:
    doc = sweep_doc(name="tiny")
    obj = trial_manifest(parsed(doc), builders.owner_reference(doc), 12, {"optimizer.lr": 0.01})
    assert obj["metadata"]["name"] == "tiny-t012" and obj["spec"]["optimizer"]["lr"] == 0.01
    (ref,) = obj["metadata"]["ownerReferences"]
    assert ref["uid"] == "uid-lr" and ref["controller"] and ref["blockOwnerDeletion"]


# ------------------------------------------------------------------------------------- against kmock
def _finish_trial(cluster: Cluster, ns: str, trial: str, loss: float) -> None:
    job = f"{trial}-pretrain"
    cluster.wait_job(job, ns)
    termination = {"state": "Succeeded", "step": 200, "metrics": {"loss": loss - 0.1, "evalLoss": loss}}
    cluster.add_pod(job, namespace=ns, termination=termination)
    cluster.finish_job(job, ns)
    cluster.wait_phase("PretrainRun", trial, "Succeeded", ns)


@pytest.mark.slow
def test_operator_runs_a_sweep_on_kmock(cluster: Cluster) -> None:
    ns = "sweep"
    losses = {"lr-t000": 3.5, "lr-t001": 2.5, "lr-t002": 3.0}
    with Operator(cluster, ns):
        doc = sweep_doc(maxTrials=3, maxParallel=2)
        del doc["metadata"]["uid"]  # the API server's (the harness's) own
        doc["metadata"]["namespace"] = ns
        cluster.create(doc, ns)
        sweep = cluster.get("Sweep", "lr", ns)
        assert sweep is not None
        cluster.wait(lambda: len(cluster.list("PretrainRun", ns)) >= 2, 20, "two trials")
        status = cluster.wait_phase("Sweep", "lr", "Running", ns)
        assert [t["name"] for t in status["trials"]] == ["lr-t000", "lr-t001"]  # maxParallel
        names = sorted(o["metadata"]["name"] for o in cluster.list("PretrainRun", ns))
        assert names == ["lr-t000", "lr-t001"]
        child = cluster.get("PretrainRun", "lr-t000", ns)
        assert child is not None
        assert child["metadata"]["ownerReferences"][0]["uid"] == sweep["metadata"]["uid"]

        # The trials run as any PretrainRun: their Jobs, played here, end with the objective.
        _finish_trial(cluster, ns, "lr-t000", losses["lr-t000"])
        cluster.wait(lambda: cluster.get("PretrainRun", "lr-t002", ns), 20, "the third trial")
        # A trial's live metrics, as the operator mirrors them into its status, reach the Sweep.
        cluster.patch(
            "PretrainRun",
            "lr-t001",
            {"status": {"progress": {"step": 100, "totalSteps": 200}, "metrics": {"evalLoss": 4.0}}},
            ns,
            "status",
        )
        cluster.wait(
            lambda: (cluster.status("Sweep", "lr", ns).get("trials") or [{}, {}])[1].get("objective") == 4.0,
            20,
            "lr-t001's intermediate objective in the Sweep",
        )
        _finish_trial(cluster, ns, "lr-t001", losses["lr-t001"])
        _finish_trial(cluster, ns, "lr-t002", losses["lr-t002"])
        status = cluster.wait_phase("Sweep", "lr", "Succeeded", ns)
        assert status["trialsDone"] == status["trialsTotal"] == 3
        assert status["best"]["name"] == "lr-t001" and status["best"]["objective"] == 2.5
        assert (
            status["best"]["outputs"]["model"]
            == cluster.status("PretrainRun", "lr-t001", ns)["outputs"]["model"]
        )
        succeeded = next(c for c in status["conditions"] if c["type"] == "Succeeded")
        assert succeeded["status"] == "True" and "best lr-t001" in succeeded["message"]
        assert sorted(o["metadata"]["name"] for o in cluster.list("PretrainRun", ns)) == sorted(losses)
    assert_rbac(cluster)


@pytest.mark.slow
def test_a_restarted_operator_adopts_the_trials_and_creates_none_twice(cluster: Cluster) -> None:
    ns = "sweep-restart"
    doc = sweep_doc(maxTrials=3, maxParallel=2)
    del doc["metadata"]["uid"]
    doc["metadata"]["namespace"] = ns
    since = len(cluster.calls)
    with Operator(cluster, ns):
        cluster.create(doc, ns)
        status = cluster.wait(
            lambda: len((s := cluster.status("Sweep", "lr", ns)).get("trials") or []) == 2 and s,
            20,
            "2 trials",
        )
        cluster.wait(lambda: len(cluster.list("PretrainRun", ns)) == 2, 20, "2 trial resources")
    before = status["trials"]
    with Operator(cluster, ns):  # a new operator: an empty memory, the same cluster
        _finish_trial(cluster, ns, "lr-t000", 3.0)
        cluster.wait(lambda: cluster.get("PretrainRun", "lr-t002", ns), 20, "the third trial")
        after = cluster.wait_phase("Sweep", "lr", "Running", ns)["trials"]
        assert [(t["name"], t["parameters"]) for t in after[:2]] == [
            (t["name"], t["parameters"]) for t in before
        ]
        assert len({t["parameters"]["optimizer.lr"] for t in after}) == 3
    created = [
        c.name
        for c in cluster.calls_since(since)
        if c.method == "POST" and c.path.endswith(f"/namespaces/{ns}/pretrainruns") and c.status < 300
    ]
    assert sorted(created) == ["lr-t000", "lr-t001", "lr-t002"]  # each trial created once


def test_a_trials_status_change_queues_its_sweep() -> None:
    from lmforge_operator.controller.workqueue import WorkQueue

    queue = WorkQueue()
    doc = sweep_doc()
    queue.observe(doc, "ADDED")
    queue._lanes[0].clear()
    queue._queued.clear()
    fake = FakeCluster(doc)
    fake.reconcile()
    child = fake.children["lr-t000"]
    queue.observe(child, "ADDED")
    assert ("Sweep", NS, "lr") in queue.queued() and ("PretrainRun", NS, "lr-t000") in queue.queued()
    queue._lanes[0].clear()
    queue._queued.clear()
    queue.observe(copy.deepcopy(child), "MODIFIED")  # nothing changed: nothing queued
    assert queue.queued() == []
    moved = copy.deepcopy(child)
    moved["status"] = {"progress": {"step": 10}, "metrics": {"evalLoss": 4.0}}
    queue.observe(moved, "MODIFIED")
    assert queue.queued() == [("Sweep", NS, "lr")]  # the trial's own reconcile waits for the resync
    queue._lanes[0].clear()
    queue._queued.clear()
    queue.observe(moved, "DELETED")
    assert queue.queued() == [("Sweep", NS, "lr")]
    # a resource without an lmforge owner queues nobody else
    alone = {**copy.deepcopy(child), "metadata": {"name": "solo", "namespace": NS}}
    queue._lanes[0].clear()
    queue._queued.clear()
    queue.observe(alone, "ADDED")
    assert queue.queued() == [("PretrainRun", NS, "solo")]
