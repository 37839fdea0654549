"""bench/operator.py stays runnable: a handful of resources of each kind it offers get their Jobs.

The benchmark's numbers are reported by running it (bench/README.md); this only guards against a bench
manifest the operator would mark Invalid (no Job would ever appear and the bench would wait out its timeout).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from repo import ROOT

BENCH = ROOT / "bench" / "operator.py"


# PretrainRun (torchrun children: ConfigMap, Service, NetworkPolicy, Job) in the default suite; the bench's
# default kind in the slow one.
@pytest.mark.parametrize("kind", [pytest.param("Evaluation", marks=pytest.mark.slow), "PretrainRun"])
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
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import importlib.util

        spec = importlib.util.spec_from_file_location("bench_operator", BENCH)
        assert spec is not None and spec.loader is not None
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    bench.check_manifest("PretrainRun")  # the shipped manifests are valid
    original = bench.manifest

    def broken(kind: str, name: str) -> dict:
        doc = original(kind, name)
        doc["spec"]["batch"]["globalTokens"] = 4096
        return doc

    bench.manifest = broken
    with pytest.raises(SystemExit, match=r"batch\.globalTokens"):
        bench.check_manifest("PretrainRun")
