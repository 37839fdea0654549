"""bench/operator.py stays runnable: a handful of resources of each kind it offers get their Jobs.

The benchmark's numbers are reported by running it (bench/README.md); this only guards against a bench
manifest the operator would mark Invalid (no Job would ever appear and the bench would wait out its timeout).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kmock_harness import Cluster, Operator
from repo import ROOT

BENCH = ROOT / "bench" / "operator.py"

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def load_bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_operator", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_bench_manifests_get_their_jobs_from_the_operator(cluster: Cluster) -> None:
    """Every kind the bench offers, its own manifest, through the operator: a Job per resource."""
    bench = load_bench()
    ns = "bench-kinds"
    with Operator(cluster, ns):
        for kind, suffix in (("Evaluation", "evaluate"), ("PretrainRun", "pretrain")):
            for i in range(2):
                cluster.create(bench.manifest(kind, f"{suffix}-{i}"), ns)
        for suffix in ("evaluate", "pretrain"):
            for i in range(2):
                cluster.wait_job(f"{suffix}-{i}-{suffix}", ns)
    with pytest.raises(SystemExit, match="unsupported kind"):
        bench.manifest("Corpus", "x")


# The whole bench run (its backlog, steady-state and in-memory phases), end to end: slow. The operator
# creating a Job per resource of each kind the bench offers, from the bench's own manifests, is
# test_the_bench_manifests_get_their_jobs_from_the_operator; resyncs reading pods from the watch and
# writing nothing are test_operator_scale.py::test_resyncs_of_a_running_job_read_pods_from_the_watch_not_a_list.
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["Evaluation", "PretrainRun"])
def test_bench_operator_creates_a_job_per_resource(kind: str) -> None:
    args = ["--kind", kind, "--resources", "4", "--latency-resources", "4", "--timeout", "30", "--json"]
    args += ["--latency-rate", "4", "--resync-seconds", "0.3"]  # the late ones span several resyncs
    proc = subprocess.run(
        [sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=180, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["kind"] == kind
    assert result["jobsCreated"] == 4 and result["latencyResources"] == 4
    assert result["serverErrors"] == 0
    assert result["createToJob"]["p99"] is not None
    # the running Jobs were resynced meanwhile, their pods read from the pod watch, nothing written
    assert result["steady"]["reconciles"] >= 4
    assert result["steady"]["podLists"] == 0 and result["steady"]["backlogStatusPatches"] == 0
    assert 0 < result["rssMiB"]["peak"] < 1024
    assert result["inMemory"]["resources"] == 4


def test_bench_operator_refuses_an_invalid_manifest(tmp_path: Path) -> None:
    """check_manifest names the field instead of letting the bench wait for Jobs that never come."""
    bench = load_bench()
    bench.check_manifest("PretrainRun")  # the shipped manifests are valid
    original = bench.manifest

    def broken(kind: str, name: str) -> dict:
        doc = original(kind, name)
        doc["spec"]["batch"]["globalTokens"] = 4096
        return doc

    bench.manifest = broken
    with pytest.raises(SystemExit, match=r"batch\.globalTokens"):
        bench.check_manifest("PretrainRun")
