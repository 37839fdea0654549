"""Operator throughput against kmock: reconciles per second and create→Job latency.

    python bench/operator.py                     # 1,000 Evaluations (goals: ≥ 50 reconciles/s, p99 ≤ 1 s)
    python bench/operator.py --resources 100     # a quicker run
    python bench/operator.py --kind PretrainRun  # torchrun children (ConfigMap, Service, NetworkPolicy, Job)
    python bench/operator.py --resources 10000 --timeout 900   # the scale goal: RSS ≤ 1 GiB too

    python bench/operator.py --kmock thread      # kmock in this process too (the old setup: one GIL for all)
    python bench/operator.py --stock-kmock       # kmock's own object lookup (a scan per request; see below)

By default kmock (the API server emulator) serves HTTP on 127.0.0.1 from a child process of its own, the
way an API server runs apart from the operator; the operator (kopf and lmforge_operator.handlers) runs on a
thread of this process and the client creating resources on the main thread. With ``--kmock thread`` kmock
runs on a thread of this process as well, so all three share one interpreter (and its GIL) and the numbers
are a lower bound. Stock kmock finds an object by scanning every object it stores, on every request, so
it slows as objects accumulate (at 1,000 resources: ~3,000 objects, ~7,800 requests, ~25 M comparisons
that took most of its CPU). The harness (tests/support/kmock_harness.py) looks a named object up by its key instead
(tested to answer exactly what the scan answers) and fetches its request log incrementally; with
``--stock-kmock`` the scan is kept, to see how much of a number is the emulator's. Measured:

* ``reconcilesPerSecond``: N resources already exist when the operator starts; reconciles it completed
  (its own counter) / seconds until every one has its Job (``resourcesPerSecond``: Jobs per second);
* then every Job is marked running (as the Job controller would; no pods are emulated), so from here on
  each of the N resources is resynced every ``--resync-seconds`` (15, the operator's default);
* ``createToJob``: then ``--latency-resources`` more ("late" resources) are created, ``--latency-rate`` per
  second so that they span resyncs of the whole backlog; for each, the time from its POST to the POST of its
  Job (p50, p99, max). ``steady`` counts what the operator did meanwhile: reconciles, pod LISTs and status
  PATCHes of the backlog's resources (nothing changed in them: none should be written);
* ``apiCallsPerResource``: calls the operator made per resource in the backlog phase;
* ``rssMiB``: peak resident memory of this process (the operator, its cache and kopf's; plus this
  script's client and request log) after the late resources, before the in-memory run;
* ``inMemory``: the same backlog reconciled against an in-memory API (no HTTP, no kmock): the operator's own
  cost (spec validation, builders, status), i.e. its ceiling when the API server is not the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))


def manifest(kind: str, name: str) -> dict[str, Any]:
    if kind == "Evaluation":
        spec: dict[str, Any] = {
            "model": {"huggingface": "org/model"},
            "benchmarks": [{"task": "hellaswag"}],
            "output": f"s3://bench/evals/{name}",
        }
    elif kind == "PretrainRun":
        spec = {
            "data": {"tokens": "s3://bench/tokens", "tokenizer": "s3://bench/tokenizer"},
            "model": {"layers": 2, "hidden": 64, "heads": 4, "kvHeads": 2, "seqLen": 64},
            "budget": {"steps": 100},
            "batch": {"globalTokens": 8192, "microBatchSize": 8},  # seqLen × micro × 16 GPUs
            "parallelism": {"nodes": 2, "gpusPerNode": 8},
            "output": f"s3://bench/runs/{name}",
        }
    else:
        raise SystemExit(f"unsupported kind {kind}")
    return {"apiVersion": "lmforge.io/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec}


def check_manifest(kind: str) -> None:
    """Refuse to start on a manifest the operator would mark Invalid (it would never get a Job)."""
    from lmforge_jobs.manifest import parse_resource

    _, problems = parse_resource(manifest(kind, "check"), "bench")
    if problems:
        raise SystemExit(
            "bench manifest is invalid: " + "; ".join(f"{p.field}: {p.message}" for p in problems)
        )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


class MemoryApi:
    """An in-memory API server stand-in (no HTTP): isolates the operator's own cost per reconcile."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.calls = 0

    async def get(self, kind: str, ns: str, name: str) -> dict[str, Any] | None:
        self.calls += 1
        return self.objects.get((kind, ns, name))

    async def create(self, obj: dict[str, Any], ns: str) -> tuple[dict[str, Any] | None, bool]:
        self.calls += 1
        key = (obj["kind"], ns, obj["metadata"]["name"])
        if key in self.objects:
            return None, False
        self.objects[key] = obj
        return obj, True

    async def patch(
        self, kind: str, ns: str, name: str, patch: dict[str, Any], subresource: Any = None
    ) -> Any:
        self.calls += 1
        obj = self.objects.setdefault((kind, ns, name), {})
        obj.update(patch)
        return None

    async def list(self, kind: str, ns: str, labels: Any) -> list[dict[str, Any]]:
        self.calls += 1
        return []

    async def close(self) -> None:
        pass


def in_memory(kind: str, n: int, workers: int) -> dict[str, Any]:
    """Reconciles per second of the controller alone (builders, validation, status), no API server."""
    import asyncio

    from lmforge_operator.controller import Config, Controller

    async def run() -> dict[str, Any]:
        controller = Controller(Config(workers=workers, resync_seconds=3600))
        api = MemoryApi()
        controller.set_api(api)  # type: ignore[arg-type]
        await controller.start()
        started = time.monotonic()
        for i in range(n):
            body = manifest(kind, f"m{i:05d}")
            body["metadata"].update(namespace="bench", uid=f"uid-{i}", generation=1)
            controller.observe(body, "ADDED")
        while sum(1 for k in api.objects if k[0] == "Job") < n:
            await asyncio.sleep(0.01)
        elapsed = time.monotonic() - started
        await controller.stop()
        return {"resources": n, "seconds": round(elapsed, 2), "reconcilesPerSecond": round(n / elapsed, 1)}

    return asyncio.run(run())


def peak_rss_mib() -> float:
    """This process's peak resident memory (MiB): VmHWM of its own address space. Not getrusage's
    ru_maxrss, which Linux carries across execve, so a bench started by a large process (a long pytest
    run) would report its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resources", type=int, default=1000, help="resources to create (default 1000)")
    parser.add_argument("--kind", default="Evaluation", choices=["Evaluation", "PretrainRun"])
    parser.add_argument("--workers", type=int, default=16, help="operator reconcile workers")
    parser.add_argument("--latency-resources", type=int, default=200, help="resources timed create→Job")
    parser.add_argument(
        "--latency-rate", type=float, default=10, help="late resources created per second (default 10)"
    )
    parser.add_argument(
        "--resync-seconds", type=float, default=15, help="the operator's resync period (default 15)"
    )
    parser.add_argument("--timeout", type=float, default=600, help="give up after this many seconds")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument(
        "--kmock",
        default="process",
        choices=["process", "thread"],
        help="run kmock in a child process (default) or on a thread of this process (shares the GIL)",
    )
    parser.add_argument(
        "--stock-kmock", action="store_true", help="keep kmock's scan of every object per request (slower)"
    )
    args = parser.parse_args(argv)
    check_manifest(args.kind)

    import logging

    from kmock_harness import Cluster, Operator

    logging.getLogger("kopf").setLevel(logging.WARNING)
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    ns = "bench"
    n = args.resources
    suffix = "-evaluate" if args.kind == "Evaluation" else "-pretrain"

    def job_times(cluster: Cluster, since: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for call in cluster.calls_since(since):
            if call.method == "POST" and call.path.endswith("/jobs") and call.status < 300:
                out.setdefault(call.name.removesuffix(suffix), call.time)
        return out

    def wait_for(cluster: Cluster, since: int, names: set[str]) -> dict[str, float]:
        deadline = time.monotonic() + args.timeout
        jobs = job_times(cluster, since)
        while not names <= set(jobs) and time.monotonic() < deadline:
            time.sleep(0.1)
            jobs = job_times(cluster, since)
        return jobs

    def reconciles(op: Operator) -> float:
        counter = op.controller.metrics.reconciles
        return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))

    with Cluster(process=args.kmock == "process", indexed=not args.stock_kmock) as cluster:
        # A. Backlog: N resources exist when the operator starts (a restart, or kubectl apply of a big set).
        backlog = {f"r{i:05d}" for i in range(n)}
        for name in sorted(backlog):
            cluster.create(manifest(args.kind, name), ns)
        since = len(cluster.calls)
        with Operator(cluster, ns, workers=args.workers, resync_seconds=args.resync_seconds) as op:
            before = reconciles(op)
            started = time.monotonic()
            jobs = wait_for(cluster, since, backlog)
            elapsed = max(jobs.values(), default=time.monotonic()) - started
            done = reconciles(op) - before
            calls = sum(1 for c in cluster.calls_since(since) if c.by_operator)

            # The Jobs run: from now on each resource is resynced (and, before, listed its pods) every period.
            running_started = time.monotonic()
            with ThreadPoolExecutor(8) as pool:  # the requests wait on kmock: overlap them
                list(pool.map(lambda name: cluster.start_job(name + suffix, ns), sorted(backlog)))
            settle = time.monotonic() + args.timeout

            def running() -> int:
                items = cluster.list(args.kind, ns)
                return sum(1 for o in items if (o.get("status") or {}).get("phase") == "Running")

            while time.monotonic() < settle and running() < n:
                time.sleep(1.0)  # each resource is reconciled once for its Job's change
            running_seconds = time.monotonic() - running_started

            # B. Latency: resources created one after another while it runs.
            m = min(n, args.latency_resources)
            since = len(cluster.calls)
            before_late = reconciles(op)
            late_started = time.monotonic()
            created: dict[str, float] = {}
            for i in range(m):
                name = f"l{i:05d}"
                time.sleep(max(0.0, late_started + i / args.latency_rate - time.monotonic()))
                created[name] = time.monotonic()
                cluster.create(manifest(args.kind, name), ns)
            late = wait_for(cluster, since, set(created))
            late_seconds = time.monotonic() - late_started
            steady_reconciles = reconciles(op) - before_late
            steady_calls = [c for c in cluster.calls_since(since) if c.by_operator]
            errors = sum(1 for c in cluster.calls if c.by_operator and c.status >= 500)
    rss_peak = peak_rss_mib()
    try:
        rss_now = os.sysconf("SC_PAGE_SIZE") * int(Path("/proc/self/statm").read_text().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        rss_now = None
    latencies = [late[k] - created[k] for k in late if k in created]
    result = {
        "kind": args.kind,
        "setup": (
            "kmock in a child process, operator on a thread of this process"
            if args.kmock == "process"
            else "kmock and operator on threads of one process (shared GIL)"
        )
        + ("; kmock's stock lookup (scan)" if args.stock_kmock else "; kmock with keyed lookup"),
        "resources": n,
        "jobsCreated": len(set(jobs) & backlog),
        "seconds": round(elapsed, 2),
        "reconciles": int(done),
        "reconcilesPerSecond": round(done / elapsed, 1) if elapsed > 0 else None,
        "resourcesPerSecond": round(len(jobs) / elapsed, 1) if elapsed > 0 else None,
        "apiCallsPerResource": round(calls / n, 1),
        "latencyResources": len(created),
        "createToJob": {
            "p50": round(statistics.median(latencies), 3) if latencies else None,
            "p99": round(percentile(latencies, 99), 3) if latencies else None,
            "max": round(max(latencies), 3) if latencies else None,
        },
        "steady": {
            "seconds": round(late_seconds, 1),
            "reconciles": int(steady_reconciles),
            "podLists": sum(
                1
                for c in steady_calls
                if c.method == "GET" and c.path.endswith("/pods") and c.params.get("watch") != "true"
            ),
            "backlogStatusPatches": sum(
                1
                for c in steady_calls
                if c.method == "PATCH" and c.path.endswith("/status") and c.path.split("/")[-2] in backlog
            ),
            "apiCalls": len(steady_calls),
        },
        "runningSeconds": round(running_seconds, 1),
        "resyncSeconds": args.resync_seconds,
        "rssMiB": {"peak": round(rss_peak), "end": round(rss_now) if rss_now is not None else None},
        "loadAverage": [round(x, 2) for x in os.getloadavg()],
        "workers": args.workers,
        "serverErrors": errors,
    }
    result["inMemory"] = in_memory(args.kind, n, args.workers)
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
        p99 = result["createToJob"]["p99"]
        ok = min(result["reconcilesPerSecond"] or 0, result["resourcesPerSecond"] or 0) >= 50
        ok = ok and p99 is not None and p99 <= 1 and result["rssMiB"]["peak"] <= 1024
        print(
            f"{n} {args.kind}s ({result['setup']}): {result['reconcilesPerSecond']} reconciles/s, "
            f"{result['resourcesPerSecond']} Jobs/s (goal ≥ 50), p99 create→Job of a late resource {p99} s "
            f"(goal ≤ 1), peak RSS {result['rssMiB']['peak']} MiB (goal ≤ 1024): "
            f"{'ok' if ok else 'below goal'}"
        )
    return 0 if result["jobsCreated"] == n and len(latencies) == len(created) else 1


if __name__ == "__main__":
    sys.exit(main())
