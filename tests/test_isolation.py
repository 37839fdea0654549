"""Isolation of what the operator runs, against the Kubernetes API emulator (kmock): each training
resource's NetworkPolicy is created before its Job (and not at all when turned off), and with two operator
replicas only the leader reconciles."""

from __future__ import annotations

from typing import Any

import pytest
from kmock_harness import Cluster, Operator

from lmforge_operator import rbac

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PRETRAIN = {
    "data": {"tokens": "s3://bucket/tokens/train", "tokenizer": "s3://bucket/tokenizer"},
    "model": {"layers": 2, "hidden": 64, "heads": 4, "seqLen": 64, "vocabSize": 512},
    "budget": {"steps": 100},
    "batch": {"globalTokens": 4096, "microBatchSize": 8},
    "parallelism": {"nodes": 2, "gpusPerNode": 4},
    "output": "s3://bucket/runs/gpt",
}


def pretrain(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "PretrainRun",
        "metadata": {"name": name},
        "spec": PRETRAIN,
    }


@pytest.fixture(scope="module")
def cluster() -> Any:
    with Cluster() as c:
        yield c


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
