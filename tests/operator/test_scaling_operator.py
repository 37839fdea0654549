"""A ScalingStudy on a cluster: its points are child PretrainRuns (named, owned, at most maxParallel at
once, never created twice), their statuses make the study's table, and once every point has ended the
operator fits the law and writes the fits and the target prediction into the study's status.

The fits are fed a planted law L = E + A/N^alpha + B/D^beta, so what the status reports can be checked
against the constants that made the losses.
"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fake_api import FakeApi
from kmock_harness import Cluster, Operator, assert_rbac

from lmforge_jobs.manifest import parse_resource
from lmforge_jobs.resolve import point_resource
from lmforge_jobs.scaling_study import study_points
from lmforge_operator import builders, rbac
from lmforge_operator.controller.outcomes import Failed, Invalid, Running, Succeeded, Waiting
from lmforge_operator.controller.scaling_studies import (
    SPEC_DIGEST_ANNOTATION,
    fit_rows,
    fitted,
    is_point_of,
    plan_study,
    reconcile_study,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

NS = "ml"
TEMPLATE = {
    "data": {"tokens": "s3://bucket/tokens/train", "tokenizer": "s3://bucket/tokenizer"},
    "model": {"layers": 2, "hidden": 64, "heads": 4, "kvHeads": 2, "ffnHidden": 192, "seqLen": 64, "vocabSize": 512},
    "batch": {"globalTokens": 1024, "microBatchSize": 16},
    "parallelism": {"nodes": 1, "gpusPerNode": 1},
}  # fmt: skip
E, A, B, ALPHA, BETA = 1.7, 400.0, 400.0, 0.34, 0.28


def law(n: float, d: float) -> float:
    return E + A / n**ALPHA + B / d**BETA


def study_doc(name: str = "iso", uid: str = "uid-iso", **spec: Any) -> dict[str, Any]:
    body = {
        "template": copy.deepcopy(TEMPLATE),
        "budgets": [2e10, 6e10],
        "sizes": {"modelsPerBudget": 3, "spread": 2.0, "tokensPerParameter": 0.5},
        "targetBudget": 1e13,
        "bootstrap": 0,
        **spec,
    }
    return {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "ScalingStudy",
        "metadata": {"name": name, "namespace": NS, "uid": uid, "generation": 1},
        "spec": {k: v for k, v in body.items() if v is not None},
    }


def parsed(doc: dict[str, Any]) -> Any:
    resource, problems = parse_resource(copy.deepcopy(doc), "test")
    assert resource is not None, problems
    return resource


class FakeCluster:
    """The study's children as the reconcile sees them; applies each plan's creations."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.study = parsed(doc)
        self.owner = builders.owner_reference(doc)
        self.children: dict[str, dict[str, Any]] = {}
        self.created: list[str] = []
        self.points = {p["name"]: p for p in study_points(self.study.spec, self.study.name, None)}

    def reconcile(self) -> Any:
        plan = plan_study(self.study, self.owner, copy.deepcopy(self.children), None)
        for obj in plan.create:
            assert obj["metadata"]["name"] not in self.children, "created twice"
            self.children[obj["metadata"]["name"]] = obj
            self.created.append(obj["metadata"]["name"])
        return plan

    def succeed(self, name: str, eval_loss: bool = True) -> None:
        p = self.points[name]
        loss = law(p["parameters"], p["tokens"])
        metrics = {"loss": loss + 0.1, **({"evalLoss": loss} if eval_loss else {})}
        self.children[name]["status"] = {"phase": "Succeeded", "metrics": metrics}

    def fail(self, name: str, phase: str = "Failed") -> None:
        self.children[name]["status"] = {"phase": phase}


# ---------------------------------------------------------------------------------------- the children
def test_points_are_named_built_as_lmforge_run_builds_them_and_owned() -> None:
    fake = FakeCluster(study_doc(maxParallel=2))
    plan = fake.reconcile()
    assert fake.created == ["iso-b00n00", "iso-b00n01"]  # maxParallel, in order
    assert isinstance(plan.outcome, Running) and not plan.fit
    assert plan.status["pointsTotal"] == 6 and plan.status["pointsDone"] == 0
    assert [r["name"] for r in plan.status["points"]][:3] == ["iso-b00n00", "iso-b00n01", "iso-b00n02"]
    obj = fake.children["iso-b00n01"]
    point = fake.points["iso-b00n01"]
    local = point_resource(fake.study, "iso-b00n01", point["shape"], point["tokens"])
    assert obj["spec"] == local.model_dump(by_alias=True, exclude_none=True, mode="json")["spec"]
    assert obj["spec"]["budget"] == {"tokens": point["tokens"]} and obj["kind"] == "PretrainRun"
    (ref,) = obj["metadata"]["ownerReferences"]
    assert ref["uid"] == "uid-iso" and ref["kind"] == "ScalingStudy"
    assert ref["controller"] and ref["blockOwnerDeletion"]
    assert obj["metadata"]["labels"]["lmforge.io/scaling-study"] == "iso"
    assert obj["metadata"]["namespace"] == NS and obj["metadata"]["annotations"][SPEC_DIGEST_ANNOTATION]
    # the point's Job and pods carry the study's label: Prometheus series get lmforge_study from it
    job = builders.build_job(
        parsed({**obj, "metadata": {**obj["metadata"], "uid": "uid-p"}}), None, image="j:t"
    )
    for meta in (job["metadata"], job["spec"]["template"]["metadata"]):
        assert meta["labels"]["lmforge.io/scaling-study"] == "iso"


def test_without_max_parallel_every_point_starts_at_once() -> None:
    fake = FakeCluster(study_doc())
    fake.reconcile()
    assert fake.created == sorted(fake.points)


def test_a_point_ending_starts_the_next_and_a_restart_creates_nothing_twice() -> None:
    fake = FakeCluster(study_doc(maxParallel=2))
    fake.reconcile()
    assert fake.reconcile().create == []  # nothing ended: nothing new
    fake.succeed("iso-b00n00")
    plan = fake.reconcile()
    assert [o["metadata"]["name"] for o in plan.create] == ["iso-b00n02"]
    assert plan.status["points"][0]["phase"] == "Succeeded" and plan.status["pointsDone"] == 1
    # a new operator: no memory, the same children → the same plan, nothing created
    again = FakeCluster(study_doc(maxParallel=2))
    again.children = copy.deepcopy(fake.children)
    assert again.reconcile().create == []
    # a watch cache that has not yet seen the children just created: the same names again (adopted)
    lagging = FakeCluster(study_doc(maxParallel=2))
    lagging.children = {"iso-b00n00": copy.deepcopy(fake.children["iso-b00n00"])}
    assert [
        o["metadata"]["name"] for o in plan_study(lagging.study, lagging.owner, lagging.children, None).create
    ] == [
        "iso-b00n01",
        "iso-b00n02",
    ]


def test_is_point_of_matches_only_the_studys_points() -> None:
    assert is_point_of("iso", "iso-b00n00") and is_point_of("iso", "iso-b15n03")
    assert not is_point_of("iso", "iso-t000") and not is_point_of("iso", "iso-b00n00x")
    assert not is_point_of("iso", "isox-b00n00") and not is_point_of("iso", "iso-b0n00")


# ---------------------------------------------------------------------------------------------- the fit
def _all_ended(fake: FakeCluster, failed: tuple[str, ...] = (), eval_loss: bool = True) -> Any:
    """End every point (those in ``failed`` Failed, the others on the planted law), maxParallel at a time."""
    plan = fake.reconcile()
    while not plan.fit:
        for name, child in fake.children.items():
            if (child.get("status") or {}).get("phase") is None:
                fake.fail(name) if name in failed else fake.succeed(name, eval_loss)
        plan = fake.reconcile()
    return plan


@pytest.fixture(scope="module")
def default_fit() -> tuple[FakeCluster, Any, tuple[list[dict[str, Any]], Any]]:
    """The default study with every point ended on the planted law, its plan and its fits (both
    approaches; the tests copy what they change)."""
    fake = FakeCluster(study_doc())
    plan = _all_ended(fake)
    return fake, plan, fit_rows(fake.study.spec, plan.rows)


def test_once_every_point_ended_the_law_is_fitted_into_the_status(default_fit: Any) -> None:
    fake, plan, (fits, law_fit) = default_fit
    assert plan.fit and plan.status["pointsDone"] == 6 and plan.create == []
    status = copy.deepcopy(plan.status)
    outcome = fitted(fake.study, plan.rows, status, copy.deepcopy(fits), law_fit)
    assert isinstance(outcome, Succeeded) and outcome.message.startswith("approach 3 law fitted on 6 points")
    assert status["lossMetric"] == "evalLoss"
    assert [f["approach"] for f in status["fits"]] == [2, 3]
    three = status["fits"][1]["parameters"]
    assert three["E"]["value"] == pytest.approx(E, rel=1e-3)
    assert three["alpha"]["value"] == pytest.approx(ALPHA, rel=1e-3)
    target = status["target"]
    assert target["approach"] == 3 and target["flops"] == 1e13
    assert target["loss"] == pytest.approx(law(target["parameters"], target["tokens"]), rel=1e-4)
    assert status["points"][0]["loss"] == pytest.approx(
        law(plan.rows[0]["parameters"], plan.rows[0]["tokens"])
    )


def test_lmforge_plan_reads_the_law_from_the_study_as_kubectl_prints_it(
    tmp_path: Path, default_fit: Any
) -> None:
    """`kubectl get scalingstudy iso -o json` (or -o yaml) is a law `lmforge plan --law` reads: the fit
    the study's status.target used, predicting what status.target says."""
    import json

    import yaml

    from lmforge_jobs.plan import load_law

    fake, plan, (fits, law_fit) = default_fit
    status = copy.deepcopy(plan.status)
    fitted(fake.study, plan.rows, status, copy.deepcopy(fits), law_fit)
    doc = {**study_doc(), "status": status}
    for path, text in (
        (tmp_path / "iso.json", json.dumps(doc)),
        (tmp_path / "iso.yaml", yaml.safe_dump(doc)),
    ):
        path.write_text(text)
        law_read = load_law(str(path))
        assert law_read.approach == status["target"]["approach"] == 3
        assert len(law_read.points) == 6 and "ScalingStudy/iso" in law_read.describe()
        predicted = law_read.predict(status["target"]["flops"])
        assert predicted.params == pytest.approx(status["target"]["parameters"], rel=1e-6)
        assert predicted.tokens == pytest.approx(status["target"]["tokens"], rel=1e-6)
    unfitted = {**study_doc(), "status": {"phase": "Running", "points": status["points"]}}
    (tmp_path / "running.json").write_text(json.dumps(unfitted))
    with pytest.raises(ValueError, match="no fitted law"):
        load_law(str(tmp_path / "running.json"))


def test_the_training_loss_is_used_when_a_point_has_no_held_out_loss() -> None:
    fake = FakeCluster(study_doc(fit="approach2"))  # the quick fit: which loss is read is the same for both
    plan = _all_ended(fake, eval_loss=False)
    status = dict(plan.status)
    fitted(fake.study, plan.rows, status, *fit_rows(fake.study.spec, plan.rows))
    assert status["lossMetric"] == "loss"
    p = plan.rows[0]
    assert status["points"][0]["loss"] == pytest.approx(law(p["parameters"], p["tokens"]) + 0.1)


def test_failed_points_are_left_out_of_the_fit_and_too_few_fail_the_study() -> None:
    fake = FakeCluster(study_doc(fit="approach3"))
    plan = _all_ended(fake, failed=("iso-b01n02",))
    assert plan.fit and [r["phase"] for r in plan.status["points"]].count("Failed") == 1
    status = dict(plan.status)
    outcome = fitted(fake.study, plan.rows, status, *fit_rows(fake.study.spec, plan.rows))
    assert isinstance(outcome, Succeeded) and "1 point(s) failed: iso-b01n02" in outcome.message

    fake = FakeCluster(study_doc(fit="approach3"))
    fake.reconcile()
    fake.fail("iso-b01n01", "Invalid")  # refused by its own admission: failed as well
    plan = _all_ended(fake, failed=("iso-b01n01", "iso-b01n02"))
    status = dict(plan.status)
    outcome = fitted(fake.study, plan.rows, status, *fit_rows(fake.study.spec, plan.rows))
    assert isinstance(outcome, Failed)
    assert outcome.message.startswith("no law fitted on 4 of 6 points: ")
    assert "iso-b01n01, iso-b01n02" in outcome.message and status["fits"][0]["error"]
    assert "target" not in status


# ------------------------------------------------------------------------------- the reconcile's calls
def fake_controller(objs: list[dict[str, Any]], api: FakeApi | None = None) -> Any:
    cache = {(c["kind"], NS, c["metadata"]["name"]): c for c in objs}
    return SimpleNamespace(
        api=api or FakeApi(), cache=cache, host="test", parse=lambda key, body: parse_resource(body, "t")
    )


def run(ctrl: Any, doc: dict[str, Any], status: dict[str, Any] | None = None) -> Any:
    key = ("ScalingStudy", NS, doc["metadata"]["name"])
    status = {} if status is None else status
    return asyncio.run(reconcile_study(ctrl, key, parsed(doc), status, builders.owner_reference(doc)))


def test_the_reconcile_creates_the_points_and_fits_when_all_ended() -> None:
    doc = study_doc(maxParallel=4)
    ctrl = fake_controller([])
    status: dict[str, Any] = {}
    assert isinstance(run(ctrl, doc, status), Running)
    assert ctrl.api.calls == [("create", "PretrainRun", f"iso-b00n0{i}") for i in range(3)] + [
        ("create", "PretrainRun", "iso-b01n00")
    ]
    assert status["startTime"] and status["pointsTotal"] == 6

    doc = study_doc(maxParallel=4, fit="approach2")  # the quick fit: the reconcile's path is the same
    fake = FakeCluster(doc)
    _all_ended(fake)
    ctrl = fake_controller(list(fake.children.values()))
    status = {}
    outcome = run(ctrl, doc, status)
    assert isinstance(outcome, Succeeded) and ctrl.api.calls == []
    assert status["target"]["parameters"] > 0 and status["completionTime"]


def test_an_existing_child_is_adopted_and_an_earlier_studys_is_waited_for() -> None:
    doc = study_doc(maxParallel=1)
    fake = FakeCluster(doc)
    fake.reconcile()
    mine = fake.children["iso-b00n00"]
    ctrl = fake_controller(
        [], FakeApi({("PretrainRun", NS, "iso-b00n00"): mine})
    )  # made before, not yet in the cache
    assert isinstance(run(ctrl, doc), Running)

    other = study_doc(uid="uid-of-a-new-iso", maxParallel=1)
    ctrl = fake_controller([], FakeApi({("PretrainRun", NS, "iso-b00n00"): mine}))
    with pytest.raises(Waiting) as waiting:
        run(ctrl, other)
    assert waiting.value.reason == "OldChildrenPresent"
    ctrl = fake_controller([mine])
    with pytest.raises(Waiting) as waiting:
        run(ctrl, other)
    assert waiting.value.reason == "OldChildrenPresent" and ctrl.api.calls == []


def test_a_changed_spec_after_the_points_were_created_is_refused() -> None:
    fake = FakeCluster(study_doc())
    fake.reconcile()
    ctrl = fake_controller(list(fake.children.values()))
    with pytest.raises(Invalid) as raised:
        run(ctrl, study_doc(budgets=[2e10, 8e10]))
    assert raised.value.reason == "SpecChanged" and raised.value.message.startswith("spec: cannot change")
    assert ctrl.api.calls == []


def test_vocab_size_auto_takes_the_corpus_tokenizer_size() -> None:
    template = copy.deepcopy(TEMPLATE)
    del template["data"]
    template["corpus"] = {"name": "web"}
    template["model"]["vocabSize"] = "auto"
    doc = study_doc(template=template, maxParallel=1)
    with pytest.raises(Waiting) as waiting:
        run(fake_controller([]), doc)
    assert waiting.value.reason == "DependencyNotFound" and "Corpus/web" in waiting.value.message

    corpus = {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "Corpus",
        "metadata": {"name": "web", "namespace": NS},
        "spec": {
            "sources": [{"warc": {"paths": ["s3://bucket/crawl.warc.gz"]}}],
            "tokenizer": {"train": {"vocabSize": 512}},
        },
    }
    ctrl = fake_controller([corpus])
    status: dict[str, Any] = {}
    run(ctrl, doc, status)
    fixed = FakeCluster(study_doc())  # the same shapes as with vocabSize 512 written in
    assert [p["parameters"] for p in status["points"]] == [p["parameters"] for p in fixed.points.values()]

    template = copy.deepcopy(TEMPLATE)
    template["model"]["vocabSize"] = "auto"
    with pytest.raises(Invalid) as invalid:
        run(fake_controller([]), study_doc(template=template))
    assert invalid.value.message.startswith("spec.template.model.vocabSize: auto needs the tokenizer's size")


def test_a_points_status_change_queues_its_study() -> None:
    from lmforge_operator.controller.workqueue import WorkQueue

    queue = WorkQueue()
    doc = study_doc()
    queue.observe(doc, "ADDED")
    queue._lanes[0].clear()
    queue._queued.clear()
    fake = FakeCluster(doc)
    fake.reconcile()
    child = copy.deepcopy(fake.children["iso-b00n00"])
    queue.observe(child, "ADDED")
    queue._lanes[0].clear()
    queue._queued.clear()
    ended = {**copy.deepcopy(child), "status": {"phase": "Succeeded", "metrics": {"evalLoss": 3.0}}}
    queue.observe(ended, "MODIFIED")
    assert ("ScalingStudy", NS, "iso") in queue.queued()


def test_rbac_lets_the_operator_create_points_and_write_the_study_status() -> None:
    assert rbac.allows("lmforge.io", "pretrainruns", "create")
    assert rbac.allows("lmforge.io", "scalingstudies/status", "patch")
    assert rbac.allows("lmforge.io", "scalingstudies", "watch")
    assert not rbac.allows("lmforge.io", "scalingstudies", "create")


# ------------------------------------------------------------------------------------- against kmock
def _finish_point(cluster: Cluster, ns: str, point: str, loss: float) -> None:
    """The point runs as any PretrainRun: its Job, played here, ends with its losses."""
    job = f"{point}-pretrain"
    cluster.wait_job(job, ns)
    termination = {"state": "Succeeded", "step": 10, "metrics": {"loss": loss + 0.1, "evalLoss": loss}}
    cluster.add_pod(job, namespace=ns, termination=termination)
    cluster.finish_job(job, ns)
    cluster.wait_phase("PretrainRun", point, "Succeeded", ns)


@pytest.mark.slow
def test_operator_runs_a_scaling_study_on_kmock(cluster: Cluster) -> None:
    ns = "scaling"
    doc = study_doc(maxParallel=3)
    del doc["metadata"]["uid"]  # the API server's (the harness's) own
    doc["metadata"]["namespace"] = ns
    points = {p["name"]: p for p in study_points(parsed(doc).spec, "iso", None)}
    since = len(cluster.calls)
    with Operator(cluster, ns):
        cluster.create(doc, ns)
        study = cluster.get("ScalingStudy", "iso", ns)
        assert study is not None
        cluster.wait(lambda: len(cluster.list("PretrainRun", ns)) >= 3, 20, "three points")
        status = cluster.wait_phase("ScalingStudy", "iso", "Running", ns)
        assert status["pointsTotal"] == 6
        names = sorted(o["metadata"]["name"] for o in cluster.list("PretrainRun", ns))
        assert names == ["iso-b00n00", "iso-b00n01", "iso-b00n02"]  # maxParallel
        child = cluster.get("PretrainRun", "iso-b00n00", ns)
        assert child is not None
        assert child["metadata"]["ownerReferences"][0]["uid"] == study["metadata"]["uid"]
        for name in names:
            _finish_point(cluster, ns, name, law(points[name]["parameters"], points[name]["tokens"]))
        cluster.wait(lambda: len(cluster.list("PretrainRun", ns)) == 6, 20, "the next three points")
    with Operator(cluster, ns):  # a new operator: an empty memory, the same cluster
        for name in sorted(points)[3:]:
            _finish_point(cluster, ns, name, law(points[name]["parameters"], points[name]["tokens"]))
        status = cluster.wait_phase("ScalingStudy", "iso", "Succeeded", ns)
    assert status["pointsDone"] == 6 and status["lossMetric"] == "evalLoss"
    assert status["fits"][1]["parameters"]["beta"]["value"] == pytest.approx(BETA, rel=1e-3)
    assert status["target"]["flops"] == 1e13 and status["target"]["loss"] > E
    succeeded = next(c for c in status["conditions"] if c["type"] == "Succeeded")
    assert succeeded["status"] == "True" and "approach 3 law fitted on 6 points" in succeeded["message"]
    created = [
        c.name
        for c in cluster.calls_since(since)
        if c.method == "POST" and c.path.endswith(f"/namespaces/{ns}/pretrainruns") and c.status < 300
    ]
    assert sorted(created) == sorted(points)  # each point created once
    assert_rbac(cluster)
