"""Isolation of what the operator runs, against the Kubernetes API emulator (kmock): each training
resource's NetworkPolicy is created before its Job (and not at all when turned off), and with two operator
replicas only the leader reconciles."""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Any

import manifests
import pytest
from kmock_harness import Cluster, Operator, assert_rbac
from manifests import merged, resource

from lmforge_operator import rbac
from lmforge_operator.kube import ApiError
from lmforge_operator.leader import LeaderElection

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# two nodes: a training run with a headless Service besides its Job
PRETRAIN = merged(manifests.PRETRAIN, {"parallelism": {"nodes": 2, "gpusPerNode": 4}})


def pretrain(name: str) -> dict[str, Any]:
    return resource("PretrainRun", name, PRETRAIN)


def _posts(cluster: Cluster, since: int, ns: str) -> list[tuple[str, str]]:
    """(collection, name) of every object the operator POSTed in ``ns``, in order."""
    return [
        (c.path.rsplit("/", 1)[-1], c.name)
        for c in cluster.calls_since(since)
        if c.by_operator and c.method == "POST" and f"/namespaces/{ns}/" in c.path and c.name
    ]


def test_network_policy_is_created_before_the_job_and_can_be_turned_off(cluster: Cluster) -> None:
    ns = "isolated"
    since = len(cluster.calls)
    with Operator(cluster, ns):
        cluster.create(pretrain("gpt"), ns)
        cluster.wait(lambda: cluster.get("Job", "gpt-pretrain", ns), 20, "Job gpt-pretrain")
    policy = cluster.get("NetworkPolicy", "gpt-pretrain", ns)
    assert policy is not None
    assert policy["metadata"]["ownerReferences"][0]["kind"] == "PretrainRun"
    job = cluster.get("Job", "gpt-pretrain", ns)
    assert (
        policy["spec"]["podSelector"]["matchLabels"].items()
        <= job["spec"]["template"]["metadata"]["labels"].items()
    )
    posts = [p for p in _posts(cluster, since, ns) if p[0] != "events"]
    assert posts.index(("networkpolicies", "gpt-pretrain")) < posts.index(("jobs", "gpt-pretrain"))
    assert rbac.allows("networking.k8s.io", "networkpolicies", "create")

    ns = "open"
    with Operator(cluster, ns, network_policy=False):
        cluster.create(pretrain("gpt"), ns)
        cluster.wait(lambda: cluster.get("Job", "gpt-pretrain", ns), 20, "Job gpt-pretrain")
    assert cluster.list("NetworkPolicy", ns) == []
    assert cluster.get("Service", "gpt-pretrain", ns) is not None


# ---------------------------------------------------------------------------------------- two replicas
def _job_posts(cluster: Cluster, since: int, ns: str) -> list[tuple[str, str]]:
    """Every Job the operators POSTed in ``ns``: (name, HTTP status)."""
    return [
        (c.name, str(c.status))
        for c in cluster.calls_since(since)
        if c.by_operator and c.method == "POST" and c.path.endswith(f"/namespaces/{ns}/jobs")
    ]


def test_two_replicas_only_the_leader_reconciles_and_the_other_takes_over(cluster: Cluster) -> None:
    ns = "ha"
    lease = {"lease_namespace": ns, "lease_name": "lmforge", "lease_seconds": 2.0}
    since = len(cluster.calls)
    a = Operator(cluster, ns, identity="replica-a", resync_seconds=0.1, **lease)
    b = Operator(cluster, ns, identity="replica-b", resync_seconds=0.1, **lease)
    a.start()
    try:
        cluster.wait(lambda: (cluster.get("Lease", "lmforge", ns) or {}).get("spec"), 10, "the Lease")
        b.start()
        leader = cluster.get("Lease", "lmforge", ns)["spec"]["holderIdentity"]
        assert leader == "replica-a"
        cluster.create(pretrain("one"), ns)
        cluster.wait(lambda: cluster.get("Job", "one-pretrain", ns), 20, "Job one-pretrain")
        # The standby watches the resource too; several resyncs by the leader later, it still stands by.
        b.wait_until(lambda ctrl: ("PretrainRun", ns, "one") in ctrl.cache, "replica-b watching the resource")
        a.wait_reconciles("PretrainRun", 3)
        b.wait_until(
            lambda _: (e := b.memo.lmforge_election)._observed is not None and not e.leading,
            "replica-b campaigning",
        )
        # The standby watched the resource too, but never wrote: one POST of the Job, and no status
        # patch or Event from replica-b's controller (its workers never ran).
        assert [n for n, _ in _job_posts(cluster, since, ns)] == ["one-pretrain"], [
            (c.method, c.path.rsplit("/", 1)[-1], c.status)
            for c in cluster.calls_since(since)
            if "leases" in c.path
        ]
        assert b.controller is not None and ("PretrainRun", ns, "one") in b.controller.cache
        assert not b.controller._tasks and a.controller._tasks, [
            (c.time, c.method, c.path.rsplit("/", 1)[-1], c.status)
            for c in cluster.calls_since(since)
            if "leases" in c.path
        ]

        # The leader dies without releasing the Lease: the standby takes over within the lease duration.
        a.kill()
        died = time.monotonic()
        cluster.create(pretrain("two"), ns)
        cluster.wait(lambda: cluster.get("Job", "two-pretrain", ns), 20, "Job two-pretrain")
        took = time.monotonic() - died
        assert took < lease["lease_seconds"] + 2.0, took
        spec = cluster.get("Lease", "lmforge", ns)["spec"]
        assert spec["holderIdentity"] == "replica-b" and spec["leaseTransitions"] == 1
        assert sorted(n for n, _ in _job_posts(cluster, since, ns)) == ["one-pretrain", "two-pretrain"]
    finally:
        b.stop()
        a.stop()
    # A graceful stop releases the Lease: the next replica need not wait for it to expire.
    assert not (cluster.get("Lease", "lmforge", ns) or {}).get("spec", {}).get("holderIdentity")
    assert rbac.allows("coordination.k8s.io", "leases", "patch")
    assert_rbac(cluster)


# ------------------------------------------------------------------------ the election against a strict API
class StrictLeases:
    """An API server's handling of one Lease: resourceVersion bumped on every write, a merge patch naming a
    stale resourceVersion refused with 409 (kmock checks neither)."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.version = 0
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise OSError("connection refused")

    async def get(self, kind: str, ns: str, name: str) -> dict[str, Any] | None:
        self._check()
        return copy.deepcopy(self.lease)

    async def create(self, obj: dict[str, Any], ns: str) -> tuple[dict[str, Any] | None, bool]:
        self._check()
        if self.lease is not None:
            return None, False
        self.version += 1
        self.lease = copy.deepcopy(obj)
        self.lease["metadata"]["resourceVersion"] = str(self.version)
        return copy.deepcopy(self.lease), True

    async def patch(self, kind: str, ns: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        self._check()
        assert self.lease is not None
        wanted = (patch.get("metadata") or {}).get("resourceVersion")
        if wanted != self.lease["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", "the object has been modified")
        self.version += 1
        self.lease["spec"] = {**self.lease["spec"], **patch["spec"]}
        self.lease["metadata"]["resourceVersion"] = str(self.version)
        return copy.deepcopy(self.lease)

    async def close(self) -> None:
        pass


class OwnClock:
    """A replica's monotonic clock that the test can move on (time.monotonic() plus an offset)."""

    offset = 0.0

    @classmethod
    def monotonic(cls) -> float:
        return time.monotonic() + cls.offset


def test_racing_candidates_never_both_win_and_a_cut_off_leader_steps_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lmforge_operator import leader

    monkeypatch.setattr(leader, "time", OwnClock)
    monkeypatch.setattr(OwnClock, "offset", 0.0)

    async def scenario() -> None:
        api = StrictLeases()
        a, b = (LeaderElection("ns", "lease", who, lease_seconds=1.0) for who in ("a", "b"))
        for election in (a, b):
            election.set_api(api)  # type: ignore[arg-type]
        assert [await a.try_acquire_or_renew(), await b.try_acquire_or_renew()] == [True, False]
        # a stops renewing; b waits the lease duration on its own clock, then a and b race for it with the
        # same read: exactly one write lands
        OwnClock.offset += 1.1
        assert await b.try_acquire_or_renew() is True
        stale = await api.get("Lease", "ns", "lease")
        api.lease["metadata"]["resourceVersion"] = "changed"  # type: ignore[index]
        with pytest.raises(ApiError):
            await api.patch("Lease", "ns", "lease", LeaderElection._guarded(stale, {"holderIdentity": "a"}))
        assert api.lease["spec"]["holderIdentity"] == "b"  # type: ignore[index]

        # The leader loses the API server: it stops reconciling within two thirds of the lease duration.
        events: list[str] = []

        async def started() -> None:
            events.append("started")

        async def stopped() -> None:
            events.append("stopped")

        api.lease["metadata"]["resourceVersion"] = str(api.version)  # type: ignore[index]
        c = LeaderElection("ns", "lease", "b", lease_seconds=1.0)
        c.set_api(api)  # type: ignore[arg-type]
        c.start(started, stopped)
        await asyncio.sleep(0.3)
        assert events == ["started"]
        api.down = True
        cut = time.monotonic()
        while events == ["started"]:
            await asyncio.sleep(0.02)
        # before a standby could take over (one lease duration after the last renewal it saw)
        assert events == ["started", "stopped"] and time.monotonic() - cut < 1.0
        await c.stop()

    asyncio.run(scenario())
