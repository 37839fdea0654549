"""The work queue at scale: events ahead of resyncs, resyncs spread over the period, pods from a watch.

Unit tests of :class:`~lmforge_operator.controller.workqueue.WorkQueue` (a subclass records its
reconciles) and of the pod index, then one run against kmock: a running Job's resyncs read its pods from
the pod watch instead of LISTing them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from lmforge_operator import status as status_helpers
from lmforge_operator.controller import Config
from lmforge_operator.controller.mirror import job_pods
from lmforge_operator.controller.workqueue import WorkQueue


def body(name: str, phase: str | None = "Running") -> dict[str, Any]:
    status = {"phase": phase, "observedGeneration": 1} if phase else {}
    return {
        "kind": "Evaluation",
        "metadata": {"namespace": "ns", "name": name, "generation": 1, "uid": name},
        "spec": {},
        "status": status,
    }


def key(name: str) -> tuple[str, str, str]:
    return ("Evaluation", "ns", name)


class ListingApi:
    def __init__(self) -> None:
        self.lists = 0

    async def list(self, kind: str, ns: str, labels: Any) -> list[dict[str, Any]]:
        self.lists += 1
        return [{"metadata": {"name": "listed"}}]

    async def close(self) -> None:
        pass


class Recorder(WorkQueue):
    """Records the order of reconciles; the first one waits for ``release``."""

    def __init__(self, **config: Any) -> None:
        super().__init__(Config(image="img", **{"workers": 1, "resync_seconds": 3600, **config}))
        self.order: list[str] = []
        self.first = asyncio.Event()
        self.release = asyncio.Event()

    async def reconcile(self, body: dict[str, Any]) -> None:
        self.order.append(body["metadata"]["name"])
        if len(self.order) == 1:
            self.first.set()
            await self.release.wait()


def test_a_new_resource_is_reconciled_before_queued_resyncs() -> None:
    async def run() -> list[str]:
        q = Recorder()
        q.set_api(ListingApi())  # type: ignore[arg-type]
        for i in range(50):
            q.cache[key(f"old{i}")] = body(f"old{i}")
            q.enqueue(key(f"old{i}"), resync=True)
        await q.start()
        await asyncio.wait_for(q.first.wait(), 5)  # a worker is busy with the first resync
        q.observe(body("new", phase=None), "ADDED")
        q.release.set()
        while len(q.order) < 51:
            await asyncio.sleep(0.01)
        await q.stop()
        return q.order

    order = asyncio.run(run())
    assert order[0] == "old0"
    assert order[1] == "new"  # not behind the 49 resyncs still queued
    assert order[2:] == [f"old{i}" for i in range(1, 50)]


def test_an_event_moves_a_key_out_of_the_resync_lane_and_a_resync_never_demotes_it() -> None:
    q = Recorder()
    for name in ("a", "b", "c"):
        q.cache[key(name)] = body(name)
        q.enqueue(key(name), resync=True)
    q.enqueue(key("c"))  # an event for c
    q.enqueue(key("c"), resync=True)  # its resync comes due too: it stays in the event lane
    q.enqueue(key("a"), resync=True)  # already waiting
    assert q.queued() == [key("c"), key("a"), key("b")]


def test_a_resync_of_a_resource_being_reconciled_is_dropped_but_an_event_reruns_it() -> None:
    q = Recorder()
    q._active.add(key("a"))
    q.enqueue(key("a"), resync=True)
    assert key("a") not in q._dirty and not q.queued()
    q.enqueue(key("a"))
    assert key("a") in q._dirty


def test_resyncs_are_spread_over_the_period_and_follow_the_last_reconcile() -> None:
    q = Recorder(resync_seconds=10, resync_jitter=0.2)
    start = time.monotonic()
    for i in range(1000):  # reconciled in one burst (a restart)
        q.cache[key(f"r{i}")] = body(f"r{i}")
        q._schedule_resync(key(f"r{i}"), now=start)  # one instant, however long the loop takes
    assert q.resync_due(start + 7.9) == 0  # none before 0.8 × the period
    first_half = q.resync_due(start + 10)
    assert 300 < first_half < 700  # about half in the first half of the jitter window, not all at once
    # one of the rest is reconciled by an event 5 s in: its resync moves to 13–17 s
    late = next(k for k in q._due)
    q._schedule_resync(late, now=start + 5)
    rest = q.resync_due(start + 12.1)
    assert rest == 1000 - first_half - 1
    assert late not in q._queued and late in q._due
    assert q.resync_due(start + 12.9) == 0 and q.resync_due(start + 17.1) == 1


def test_finished_resources_are_not_queued_but_looked_at_again_a_period_later() -> None:
    q = Recorder(resync_seconds=10, resync_jitter=0.0)
    q.cache[key("done")] = body("done", phase="Succeeded")
    q._schedule_resync(key("done"))
    now = time.monotonic()
    assert q.resync_due(now + 10.1) == 0 and not q.queued()
    assert key("done") in q._due  # rescheduled
    q.cache[key("done")]["metadata"]["generation"] = 2  # its spec changed (the event is missed here)
    assert q.resync_due(now + 20.2) == 1


def test_forgotten_resources_are_never_resynced() -> None:
    q = Recorder(resync_seconds=10, resync_jitter=0.0)
    q.cache[key("gone")] = body("gone")
    q._schedule_resync(key("gone"))
    q.observe(body("gone"), "DELETED")
    assert q.resync_due(time.monotonic() + 11) == 0 and not q.queued()


def test_job_pods_read_the_pod_index_once_it_is_attached_and_list_before() -> None:
    q = Recorder()
    api = ListingApi()
    q.set_api(api)  # type: ignore[arg-type]

    async def names(**kw: Any) -> list[str]:
        return [p["metadata"]["name"] for p in await job_pods(api, "ns", "job", **kw)]  # type: ignore[arg-type]

    assert asyncio.run(names()) == ["listed"] and api.lists == 1  # no index yet: a LIST
    q.set_pod_index({("ns", "job"): [{"metadata": {"name": "watched"}}]})
    assert asyncio.run(names()) == ["watched"] and api.lists == 1
    assert q.job_pods("ns", "other") == []
    assert asyncio.run(names(fresh=True)) == ["listed"] and api.lists == 2  # a finished Job's summary


def pod(index: int, job: str = "e-evaluate") -> dict[str, Any]:
    return {
        "metadata": {
            "name": f"{job}-{index}-x",
            "namespace": "ns",
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": {
                "app.kubernetes.io/managed-by": "lmforge-operator",
                "job-name": job,
                "batch.kubernetes.io/job-completion-index": str(index),
            },
            "managedFields": [{"manager": "kubelet"}],
        },
        "spec": {
            "containers": [
                {
                    "name": "main",
                    "image": "img",
                    "env": [{"name": "A", "value": "x" * 1000}],
                    "ports": [{"name": "metrics", "containerPort": 9090}],
                }
            ],
            "volumes": [{"name": "v", "emptyDir": {}}],
        },
        "status": {
            "phase": "Running",
            "podIP": "10.0.0.7",
            "containerStatuses": [
                {
                    "name": "main",
                    "state": {"terminated": {"exitCode": 0, "message": '{"state": "Succeeded"}'}},
                }
            ],
        },
    }


def test_the_pod_index_keeps_what_the_status_reads_of_a_pod() -> None:
    pytest.importorskip("kopf")
    from lmforge_operator.handlers import index_pod

    full = [pod(0), pod(1)]
    entries = [index_pod(body=p, namespace="ns", labels=p["metadata"]["labels"]) for p in full]
    assert all(e is not None and list(e) == [("ns", "e-evaluate")] for e in entries)
    slim = [e[("ns", "e-evaluate")] for e in entries if e is not None]
    assert "env" not in slim[0]["spec"]["containers"][0] and "managedFields" not in slim[0]["metadata"]
    assert status_helpers.rank0_pod(slim) == slim[0]
    assert status_helpers.metrics_url(slim[0]) == status_helpers.metrics_url(full[0]) is not None
    assert status_helpers.termination_summary(slim[0]) == status_helpers.termination_summary(full[0])
    unlabelled = pod(0)
    del unlabelled["metadata"]["labels"]["job-name"]
    assert index_pod(body=unlabelled, namespace="ns", labels=unlabelled["metadata"]["labels"]) is None


def test_resyncs_of_a_running_job_read_pods_from_the_watch_not_a_list() -> None:
    """Against kmock: a running Evaluation resynced every 0.1 s, five times, never LISTs its pods, yet its
    finished Job's summary is read (a fresh LIST, once)."""
    kmock_harness = pytest.importorskip("kmock_harness")
    ns = "scale"
    doc = {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "Evaluation",
        "metadata": {"name": "e"},
        "spec": {
            "model": {"huggingface": "org/model"},
            "benchmarks": [{"task": "hellaswag"}],
            "output": "s3://bucket/evals/e",
        },
    }
    with kmock_harness.Cluster() as cluster:
        cluster.create(doc, ns)
        with kmock_harness.Operator(cluster, ns, resync_seconds=0.1) as op:
            cluster.wait(lambda: cluster.get("Job", "e-evaluate", ns), 20, "the Job")
            cluster.add_pod("e-evaluate", namespace=ns, ip="127.0.0.1", metrics_port=1)
            cluster.start_job("e-evaluate", ns)
            cluster.wait_phase("Evaluation", "e", "Running", ns)
            cluster.wait(lambda: op.controller.pods is not None, 10, "the pod index")
            since = len(cluster.calls)
            before = op.controller.metrics.reconciles.labels("Evaluation", "ok")._value.get()
            op.wait_reconciles("Evaluation", 5)
            reconciled = op.controller.metrics.reconciles.labels("Evaluation", "ok")._value.get() - before
            window = cluster.calls_since(since)
            lists = [c for c in window if c.path.endswith("/pods") and c.params.get("watch") != "true"]
            patches = [c for c in window if c.method == "PATCH" and c.path.endswith("/e/status")]
            assert reconciled >= 4  # it was resynced
            assert lists == [] and patches == []  # no LIST, and nothing written: nothing changed
            cluster.add_pod("e-evaluate", namespace=ns, termination={"state": "Succeeded"})
            cluster.finish_job("e-evaluate", ns)
            cluster.wait_phase("Evaluation", "e", "Succeeded", ns)
