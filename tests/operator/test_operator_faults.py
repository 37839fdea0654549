"""What the operator does when the cluster misbehaves, replayed against the kmock API server: a job's
configuration error whatever shape the Job controller and kubelet leave it in, children left over from an
earlier resource of the same name, a finished resource whose Job goes away, children the API server
refuses, pods that never start, spec changes after success, an Evaluation whose model run ends, and
lists in status that must stay bounded.

kmock has no Job controller, kubelet or garbage collector: the tests play them (Job conditions in the shape
the Job controller writes, pod statuses in the shape the kubelet writes, children left behind on delete).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from kmock_harness import Cluster, Operator
from manifests import CORPUS, EVERY_CHECKPOINT, PRETRAIN, resource
from repo import ROOT

from lmforge_operator import status as status_helpers

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def true_condition(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == status["phase"] and c["status"] == "True")


def events(cluster: Cluster, ns: str, name: str, reason: str | None = None) -> list[dict[str, Any]]:
    return [
        e
        for e in cluster.list("Event", ns)
        if e["involvedObject"]["name"] == name and (reason is None or e["reason"] == reason)
    ]


def wait_reason(cluster: Cluster, kind: str, name: str, ns: str, reason: str) -> dict[str, Any]:
    def check() -> Any:
        s = cluster.status(kind, name, ns)
        return (
            s
            if s.get("conditions")
            and any(c["status"] == "True" and c["reason"] == reason for c in s["conditions"])
            else None
        )

    return cluster.wait(check, 20, f"{kind}/{name} reason {reason}")


def poke_job(cluster: Cluster, op: Operator, ns: str, job: str) -> None:
    """A change of the Job (as its controller makes many): a watch event that reconciles its owner. Returns
    once the operator has seen it (its owner is queued from then on)."""
    mark = str(time.monotonic())
    cluster.patch("Job", job, {"metadata": {"annotations": {"poke": mark}}}, ns)

    def seen(ctrl: Any) -> bool:
        annotations = ((ctrl.jobs.get((ns, job)) or {}).get("metadata") or {}).get("annotations") or {}
        return annotations.get("poke") == mark

    op.wait_until(seen, f"the operator seeing Job {job} change")


def pod_terminated(exit_code: int, message: str, where: str = "state") -> dict[str, Any]:
    term = {"terminated": {"exitCode": exit_code, "reason": "Error", "message": message}}
    state = {"waiting": {"reason": "CrashLoopBackOff"}} if where == "lastState" else term
    cs: dict[str, Any] = {"name": "main", "state": state}
    if where == "lastState":
        cs["lastState"] = term
    return {"phase": "Failed" if where == "state" else "Running", "containerStatuses": [cs]}


# --------------------------------------------------------------------- a configuration error keeps its message
POLICY_64 = (
    "Container main for pod {ns}/{job}-0-abcde failed with exit code 64 matching FailJob rule at index 1"
)


# The job's own JSON summary in the default suite; the other shapes walk the same reconcile with another
# pod. Where each message comes from is unit-tested in test_operator.py:
# test_a_failed_jobs_message_falls_back_but_is_never_empty (log tail, Job condition, bare exit 64) and
# test_pods_that_cannot_start (lastState).
@pytest.mark.parametrize(
    "case",
    [
        "json",
        *(
            pytest.param(case, marks=pytest.mark.slow)
            for case in ("json-in-lastState", "log-tail", "pod-gone", "nothing")
        ),
    ],
)
def test_configuration_error_keeps_a_message_on_every_reconcile(cluster: Cluster, case: str) -> None:
    """Whatever the Job controller and kubelet leave (a JSON summary in state or lastState, a log tail under
    FallbackToLogsOnError, no pod at all, a Job condition without a message), the Invalid condition and its
    Event say why, and later reconciles (Job updates, resyncs) never blank it."""
    ns = f"cfg-{case}".lower()
    with Operator(cluster, ns) as op:
        cluster.create(resource("PretrainRun", "run", PRETRAIN), ns)
        job = "run-pretrain"
        cluster.wait_job(job, ns)
        summary = json.dumps({"state": "Invalid", "message": "no tokenizer.json", "field": "data.tokenizer"})
        if case == "json":
            cluster.add_pod(job, namespace=ns, pod_status=pod_terminated(64, summary))
        elif case == "json-in-lastState":
            cluster.add_pod(job, namespace=ns, pod_status=pod_terminated(64, summary, "lastState"))
        elif case == "log-tail":
            tail = "Traceback ...\nValueError: tokenizer s3://b/tok has no tokenizer.json"
            cluster.add_pod(job, namespace=ns, pod_status=pod_terminated(64, tail))
        policy = POLICY_64.format(ns=ns, job=job) if case != "nothing" else ""
        if case == "nothing":  # a pod that exited 64 without a word, under a Job condition without one
            cluster.add_pod(job, namespace=ns, pod_status=pod_terminated(64, ""))
        cluster.fail_job_by_policy(job, policy, ns)
        status = cluster.wait_phase("PretrainRun", "run", "Invalid", ns)
        expected = {
            "json": "spec.data.tokenizer: no tokenizer.json",
            "json-in-lastState": "spec.data.tokenizer: no tokenizer.json",
            "log-tail": "ValueError: tokenizer s3://b/tok has no tokenizer.json",
            "pod-gone": "failed with exit code 64",
            "nothing": f"exit code 64 (configuration error): see kubectl logs job/{job}",
        }[case]
        invalid = true_condition(status)
        assert invalid["reason"] == "ConfigError" and expected in invalid["message"], invalid
        assert any(expected in e["message"] for e in events(cluster, ns, "run", "ConfigError"))
        # Later reconciles: the Job changes (and its pods go), each change reconciled; the message stays.
        for pod in cluster.list("Pod", ns):
            cluster.request("DELETE", f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}")
        op.wait_until(lambda ctrl: not ctrl.job_pods(ns, job), "the pods gone from the operator's index")
        for _ in range(3):
            poke_job(cluster, op, ns, job)
            op.wait_reconciled("PretrainRun", "run", ns)
        status = cluster.status("PretrainRun", "run", ns)
        assert status["phase"] == "Invalid" and expected in true_condition(status)["message"], status
        assert all(c["message"] for c in status["conditions"] if c["status"] == "True")


# ----------------------------------------------------------------------------- terminal means terminal
def test_a_finished_resource_whose_job_is_deleted_is_not_run_again(cluster: Cluster) -> None:
    """Succeeded, Failed and Invalid resources stay as they were when a TTL controller, a cleanup policy or
    a user deletes their Job; only a new spec (generation) runs the resource again."""
    ns = "terminal"
    with Operator(cluster, ns, resync_seconds=0.1) as op:
        for name in ("ok", "crash", "bad"):
            cluster.create(resource("PretrainRun", name, PRETRAIN), ns)
            cluster.wait_job(f"{name}-pretrain", ns)
        cluster.add_pod("ok-pretrain", namespace=ns, termination={"state": "Succeeded", "step": 200})
        cluster.finish_job("ok-pretrain", ns)
        cluster.finish_job("crash-pretrain", ns, failed=True, message="BackoffLimitExceeded")
        cluster.fail_job_by_policy("bad-pretrain", POLICY_64.format(ns=ns, job="bad-pretrain"), ns)
        before = {
            "ok": cluster.wait_phase("PretrainRun", "ok", "Succeeded", ns),
            "crash": cluster.wait_phase("PretrainRun", "crash", "Failed", ns),
            "bad": cluster.wait_phase("PretrainRun", "bad", "Invalid", ns),
        }
        posted = len([c for c in cluster.calls if c.method == "POST" and c.path.endswith("/jobs")])
        for name in before:
            cluster.request("DELETE", f"/apis/batch/v1/namespaces/{ns}/jobs/{name}-pretrain")
        # The Job watch's DELETED events, each reconciled; then resyncs come and reconcile nothing.
        op.wait_until(lambda ctrl: not any(n == ns for n, _ in ctrl.jobs), "the Jobs' DELETED events")
        for name in before:
            op.wait_reconciled("PretrainRun", name, ns)
        reconciled = op.reconciles("PretrainRun")
        op.wait_resyncs(*(("PretrainRun", name) for name in before), n=2, namespace=ns)
        assert op.reconciles("PretrainRun") == reconciled
        assert cluster.job_names(ns) == []
        assert len([c for c in cluster.calls if c.method == "POST" and c.path.endswith("/jobs")]) == posted
        for name, was in before.items():
            now = cluster.status("PretrainRun", name, ns)
            assert now["phase"] == was["phase"] and true_condition(now) == true_condition(was), now
        assert cluster.status("PretrainRun", "ok", ns)["outputs"] == before["ok"]["outputs"]
        # A new spec is a new run.
        cluster.patch(
            "PretrainRun", "ok", {"metadata": {"generation": 2}, "spec": {"budget": {"steps": 300}}}, ns
        )
        job = cluster.wait_job("ok-pretrain", ns)
        assert json.loads(job["metadata"]["annotations"]["lmforge.io/spec"])["budget"]["steps"] == 300
        cluster.wait_phase("PretrainRun", "ok", "Pending", ns)


# ------------------------------------------------------------------------ children belong to one resource
def test_a_recreated_resource_does_not_adopt_the_children_of_the_deleted_one(cluster: Cluster) -> None:
    """Deleted and re-created under the same name while its children are still there (the garbage collector
    has not got to them, or they were orphaned): the new resource waits with reason OldChildrenPresent,
    the old children are deleted, and it gets children of its own."""
    ns = "reborn"
    path = f"/apis/lmforge.io/v1alpha1/namespaces/{ns}/pretrainruns/run"
    # the operator watches no ConfigMaps, Services or NetworkPolicies: resyncs find the old ones, one each
    with Operator(cluster, ns, resync_seconds=0.1):
        first = cluster.create(resource("PretrainRun", "run", PRETRAIN), ns)
        cluster.wait_job("run-pretrain", ns)
        cluster.add_pod("run-pretrain", namespace=ns, termination={"state": "Succeeded", "step": 200})
        cluster.finish_job("run-pretrain", ns)
        cluster.wait_phase("PretrainRun", "run", "Succeeded", ns)
        for orphaned in (False, True):
            old_uid = cluster.get("PretrainRun", "run", ns)["metadata"]["uid"]
            if orphaned:  # `kubectl delete --cascade=orphan`: the children lose their ownerReferences
                for kind in ("Job", "ConfigMap"):
                    name = "run-pretrain" if kind == "Job" else "run-pretrain-spec"
                    cluster.patch(kind, name, {"metadata": {"ownerReferences": None}}, ns)
            cluster.request("DELETE", path)  # kmock has no garbage collector: the children stay
            cluster.wait(lambda: cluster.get("PretrainRun", "run", ns) is None, 10, "deleted")
            new = cluster.create(resource("PretrainRun", "run", PRETRAIN), ns)
            uid = new["metadata"]["uid"]
            assert uid != old_uid and first["metadata"]["uid"]

            def owned(kind: str, name: str, uid: str = uid) -> bool:
                obj = cluster.get(kind, name, ns) or {}
                return [o["uid"] for o in obj.get("metadata", {}).get("ownerReferences") or []] == [uid]

            cluster.wait(lambda: owned("Job", "run-pretrain"), 20, "a Job of the new resource")
            cluster.wait(lambda: owned("ConfigMap", "run-pretrain-spec"), 20, "a ConfigMap of its own")
            status = cluster.wait_phase("PretrainRun", "run", "Pending", ns)
            assert "outputs" not in status  # not the old run's verdict
            said = [e["message"] for e in events(cluster, ns, "run", "OldChildrenPresent")]
            whose = "no owner: orphaned" if orphaned else f"owner uid {old_uid}"
            assert any(whose in m and "Job run-pretrain" in m for m in said), said


# ------------------------------------------------------------------------- failures to start are visible
def test_children_the_api_server_refuses_fail_the_resource_with_its_message(cluster: Cluster) -> None:
    """A 4xx on creating a child (403 quota, 422 invalid, 413 too large) is the resource's Failed or Invalid
    condition with the server's message, not a silent retry; a 5xx or 429 is retried until it passes."""
    ns = "refused"
    quota = (
        'jobs "quota-pretrain" is forbidden: exceeded quota: gpus, requested: requests.nvidia.com/gpu=1, '
        "used: requests.nvidia.com/gpu=8, limited: requests.nvidia.com/gpu=8"
    )
    invalid = 'ConfigMap "huge-pretrain-spec" is invalid: []: Too long: must have at most 1048576 bytes'
    jobs, cms = f"/namespaces/{ns}/jobs", f"/namespaces/{ns}/configmaps"
    cluster.refuse("POST", jobs, 403, "Forbidden", quota, name="quota-pretrain")
    cluster.refuse("POST", cms, 422, "Invalid", invalid, name="huge-pretrain-spec")
    cluster.refuse("POST", jobs, 500, "InternalError", "etcdserver: request timed out", name="flaky-pretrain")
    with Operator(cluster, ns) as op:
        for name in ("quota", "huge", "flaky"):
            cluster.create(resource("PretrainRun", name, PRETRAIN), ns)
        status = cluster.wait_phase("PretrainRun", "quota", "Failed", ns)
        failed = true_condition(status)
        assert failed["reason"] == "ChildRejected" and "exceeded quota: gpus" in failed["message"], failed
        assert "403" in failed["message"] and "Job quota-pretrain" in failed["message"]
        status = cluster.wait_phase("PretrainRun", "huge", "Invalid", ns)
        assert "Too long: must have at most 1048576 bytes" in true_condition(status)["message"]
        assert events(cluster, ns, "quota", "ChildRejected") and events(cluster, ns, "huge", "ChildRejected")
        # A server error is retried: no verdict once the refused request's reconcile has ended.
        cluster.wait(
            lambda: any(c.name == "flaky-pretrain" and c.status == 500 for c in cluster.calls),
            20,
            "the server error",
        )
        op.wait_reconciled("PretrainRun", "flaky", ns)
        assert cluster.status("PretrainRun", "flaky", ns).get("phase") in (None, "Pending")
        assert cluster.emulator is not None
        cluster.emulator.refusals.clear()
        cluster.wait_job("flaky-pretrain", ns)


def running_pod(ready: bool = True) -> dict[str, Any]:
    return {"phase": "Running", "podIP": "127.0.0.1", "containerStatuses": [{"name": "main", "ready": ready}]}


def pending_pod(waiting: tuple[str, str] | None = None, unschedulable: str = "") -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Pending"}
    if waiting:
        status["containerStatuses"] = [
            {
                "name": "main",
                "ready": False,
                "state": {"waiting": {"reason": waiting[0], "message": waiting[1]}},
            }
        ]
    if unschedulable:
        status["conditions"] = [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unschedulable}
        ]
    return status


def indexed(op: Operator, ns: str, pod_status: dict[str, Any]) -> None:
    """Wait until the operator's pod index has the Job's pod with this status (merged into what it had)."""

    def check(ctrl: Any) -> bool:
        pods = ctrl.job_pods(ns, "run-pretrain")
        return len(pods) == 1 and all(pods[0]["status"].get(k) == v for k, v in pod_status.items())

    op.wait_until(check, f"the pod's status {pod_status} in the operator's index")


# One stuck pod in the default suite; the other reasons walk the same reconcile, and how each one reads is
# test_operator.py::test_pods_that_cannot_start (a waiting container, an Unschedulable condition).
@pytest.mark.parametrize(
    "stuck",
    [
        ("ImagePullBackOff", 'Back-off pulling image "ghcr.io/x/lmforge:nope"'),
        pytest.param(("CreateContainerConfigError", 'secret "hf-token" not found'), marks=pytest.mark.slow),
        pytest.param(
            ("Unschedulable", "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."),
            marks=pytest.mark.slow,
        ),
    ],
)
def test_pods_that_do_not_start_are_a_condition_and_an_event(
    cluster: Cluster, stuck: tuple[str, str]
) -> None:
    """Pods stuck before their container runs: Waiting with reason PodsNotStarting and the pod's reason and
    message, an Event, and Running False; a Job whose pods are all still Pending is not Running."""
    reason, message = stuck
    ns = f"stuck-{reason.lower()}"
    with Operator(cluster, ns) as op:
        cluster.create(resource("PretrainRun", "run", PRETRAIN), ns)
        cluster.wait_job("run-pretrain", ns)
        cluster.start_job("run-pretrain", ns)  # the Job controller counts Pending pods as active
        pod = cluster.add_pod("run-pretrain", namespace=ns, pod_status=pending_pod())
        indexed(op, ns, pending_pod())
        poke_job(cluster, op, ns, "run-pretrain")
        op.wait_reconciled("PretrainRun", "run", ns)
        assert cluster.status("PretrainRun", "run", ns)["phase"] == "Pending"  # created, not running yet
        name = pod["metadata"]["name"]
        if reason == "Unschedulable":
            stuck_status = pending_pod(unschedulable=message)
        else:
            stuck_status = pending_pod((reason, message))
        cluster.patch("Pod", name, {"status": stuck_status}, ns, "status")
        indexed(op, ns, stuck_status)
        poke_job(cluster, op, ns, "run-pretrain")
        status = wait_reason(cluster, "PretrainRun", "run", ns, "PodsNotStarting")
        waiting = true_condition(status)
        assert status["phase"] == "Waiting" and reason in waiting["message"] and message in waiting["message"]
        assert name in waiting["message"]
        running = next(c for c in status["conditions"] if c["type"] == "Running")
        assert running["status"] == "False"
        said = events(cluster, ns, "run", "PodsNotStarting")
        assert len(said) == 1 and message in said[0]["message"]
        # The pod starts after all (an image pushed, a Secret created, a node added).
        cluster.patch("Pod", name, {"status": running_pod()}, ns, "status")
        indexed(op, ns, running_pod())
        poke_job(cluster, op, ns, "run-pretrain")
        cluster.wait_phase("PretrainRun", "run", "Running", ns)


def test_one_event_per_transition(cluster: Cluster) -> None:
    """A Corpus stage's JobCreated Event is posted once, however often its Job changes meanwhile."""
    ns = "one-event"
    with Operator(cluster, ns) as op:
        cluster.create(resource("Corpus", "web", CORPUS), ns)
        job = cluster.wait(lambda: cluster.job_names(ns), 20, "the first stage's Job")[0]
        cluster.wait(lambda: events(cluster, ns, "web", "JobCreated"), 20, "JobCreated")
        for _ in range(3):
            poke_job(cluster, op, ns, job)
            op.wait_reconciled("Corpus", "web", ns)
        said = events(cluster, ns, "web", "JobCreated")
        assert len(said) == 1, [e["message"] for e in said]


# -------------------------------------------------------------------- spec changes, ended runs, bounded lists
def test_a_corpus_spec_change_after_success_is_refused_naming_the_field(cluster: Cluster) -> None:
    ns = "corpus-change"
    with Operator(cluster, ns):
        cluster.create(resource("Corpus", "web", CORPUS), ns)
        done: set[str] = set()

        def advance() -> bool:
            for job in cluster.job_names(ns):
                if job not in done:
                    done.add(job)
                    cluster.add_pod(job, namespace=ns, termination={"state": "Succeeded"})
                    cluster.finish_job(job, ns)
            return cluster.status("Corpus", "web", ns).get("phase") == "Succeeded"

        cluster.wait(advance, 40, "every stage succeeded")
        cluster.patch(
            "Corpus",
            "web",
            {"metadata": {"generation": 2}, "spec": {"tokenizer": {"train": {"vocabSize": 8192}}}},
            ns,
        )
        status = cluster.wait_phase("Corpus", "web", "Invalid", ns)
        invalid = true_condition(status)
        assert invalid["reason"] == "SpecChanged" and "spec.tokenizer.train.vocabSize" in invalid["message"]
        # Restored: Succeeded again, nothing re-run.
        jobs = cluster.job_names(ns)
        cluster.patch(
            "Corpus",
            "web",
            {"metadata": {"generation": 3}, "spec": {"tokenizer": {"train": {"vocabSize": 4096}}}},
            ns,
        )
        cluster.wait_phase("Corpus", "web", "Succeeded", ns)
        assert cluster.job_names(ns) == jobs


@pytest.mark.parametrize("end", ["fails", "deleted", "fails-before-any-round"])
def test_an_evaluation_following_checkpoints_ends_when_its_run_ends(cluster: Cluster, end: str) -> None:
    """With checkpoints: every, a PretrainRun that fails or is deleted ends the Evaluation: Succeeded with
    the rounds it has (reason ModelRunEnded), or Failed when it has none."""
    ns = f"ends-{end}"
    with Operator(cluster, ns, resync_seconds=0.1):  # a checkpoint is found on a resync
        cluster.create(resource("PretrainRun", "gpt", PRETRAIN), ns)
        cluster.create(resource("Evaluation", "ev", EVERY_CHECKPOINT), ns)
        cluster.wait_job("gpt-pretrain", ns)
        cluster.start_job("gpt-pretrain", ns)
        cluster.wait_phase("PretrainRun", "gpt", "Running", ns)
        if end != "fails-before-any-round":
            cluster.patch("PretrainRun", "gpt", {"status": {"progress": {"step": 60}}}, ns, "status")
            cluster.wait_job("ev-evaluate", ns)
            cluster.add_pod(
                "ev-evaluate",
                namespace=ns,
                termination={"state": "Succeeded", "results": {"perplexity": 30.0}},
            )
            cluster.finish_job("ev-evaluate", ns)
            cluster.wait(lambda: cluster.status("Evaluation", "ev", ns).get("history"), 20, "round 0")
        if end == "deleted":
            cluster.request("DELETE", f"/apis/lmforge.io/v1alpha1/namespaces/{ns}/pretrainruns/gpt")
        else:
            cluster.finish_job("gpt-pretrain", ns, failed=True, message="BackoffLimitExceeded")
            cluster.wait_phase("PretrainRun", "gpt", "Failed", ns)
        if end == "fails-before-any-round":
            status = cluster.wait_phase("Evaluation", "ev", "Failed", ns)
        else:
            status = cluster.wait_phase("Evaluation", "ev", "Succeeded", ns)
            assert [h["perplexity"] for h in status["history"]] == [30.0]
        verdict = true_condition(status)
        assert verdict["reason"] == "ModelRunEnded" and "PretrainRun/gpt" in verdict["message"], verdict
        rounds = [j for j in cluster.job_names(ns) if j.startswith("ev-")]
        assert rounds == ([] if end == "fails-before-any-round" else ["ev-evaluate"])


def test_status_history_is_bounded_well_under_the_etcd_object_limit() -> None:
    from lmforge_jobs.evaluate.config import EvaluationStatus, Results

    entry = {"perplexity": 1.0, "checkpoint": "round 0: 1"}
    assert len(status_helpers.evaluation_results({"history": [entry] * 500})["history"]) == 100
    field = EvaluationStatus.model_fields["history"]
    assert any(getattr(m, "max_length", None) == 100 for m in field.metadata), field.metadata
    import yaml

    for crds in ("crds", "charts/lmforge/files/crds"):  # the CRDs say the same
        crd = yaml.safe_load((ROOT / crds / "evaluations.lmforge.io.yaml").read_text())
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert schema["properties"]["status"]["properties"]["history"]["maxItems"] == 100
    # 100 rounds of a full Results entry stay far below etcd's 1.5 MiB limit for the whole object
    assert len(json.dumps([Results().model_dump(mode="json") | entry] * 100)) < 256 * 1024
