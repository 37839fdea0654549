"""The operator (kopf) against a Kubernetes API emulator (kmock): children, status, dependency order,
restart safety, invalid specs, metrics, deletion, and RBAC of every call it made.

kmock has no Job controller: the tests play it (``start_job``/``finish_job`` patch a Job's status, and
``add_pod`` creates its pods with a termination message or a live metrics endpoint).
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from kmock_harness import Cluster, Operator, assert_rbac
from manifests import CORPUS, EVERY_CHECKPOINT, resource
from repo import ROOT

from lmforge_jobs.manifest import parse_resource
from lmforge_jobs.resolve import dependencies
from lmforge_operator.kube import path_for

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


PRETRAIN = {
    "corpus": {"name": "web"},
    "model": {"layers": 2, "hidden": 64, "heads": 4, "kvHeads": 2, "seqLen": 64},
    "budget": {"steps": 200},
    "batch": {"globalTokens": 4096, "microBatchSize": 8},
    "parallelism": {"nodes": 2, "gpusPerNode": 4},
    "checkpoint": {"everySteps": 50},
    "output": "s3://bucket/runs/gpt",
}
# Shell metacharacters everywhere a string may go: they must reach the job verbatim (no shell in between).
NASTY = "s3://bucket/data/$(rm${IFS}-rf${IFS}~);`id`|&&>x'\"*?[a]{b}\\n.jsonl"
ALIGN = {
    "base": {"pretrainRun": "gpt"},
    "method": "sft",
    "dataset": {"path": NASTY, "format": "messages"},
    "parallelism": {"nodes": 1, "gpusPerNode": 2},
    "output": "s3://bucket/runs/gpt-sft",
}
EVAL = {
    "model": {"alignmentRun": "gpt-sft"},
    "perplexity": {"corpus": {"name": "web"}},
    "output": "s3://bucket/evals/gpt-sft",
}


def finish(cluster: Cluster, job: str, ns: str, termination: dict[str, Any] | None = None, **kw: Any) -> None:
    cluster.add_pod(job, namespace=ns, termination=termination or {"state": "Succeeded"}, **kw)
    cluster.finish_job(job, ns)


def configmap_spec(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    cm = cluster.get("ConfigMap", name, ns)
    assert cm is not None, name
    return yaml.safe_load(cm["data"]["spec.yaml"])


# ------------------------------------------------------------------------------------ each kind, end to end
def test_each_kind_reaches_succeeded_with_outputs(cluster: Cluster, tmp_path: Path) -> None:
    ns = "kinds"
    with Operator(cluster, ns, resync_seconds=0.1):  # the running PretrainRun's metrics are read on resyncs
        # Applied all at once: the dependents wait with a reason that names the field.
        for kind, name, spec in (
            ("Evaluation", "gpt-eval", EVAL),
            ("AlignmentRun", "gpt-sft", ALIGN),
            ("PretrainRun", "gpt", PRETRAIN),
            ("Corpus", "web", CORPUS),
        ):
            cluster.create(resource(kind, name, spec), ns)

        def waiting_for_corpus() -> Any:
            s = cluster.status("PretrainRun", "gpt", ns)
            c = next((c for c in s.get("conditions", []) if c["type"] == "Waiting"), {})
            return s if c.get("reason") == "DependencyNotReady" and c.get("status") == "True" else None

        status = cluster.wait(waiting_for_corpus, 20, "PretrainRun waiting for its Corpus")
        waiting = next(c for c in status["conditions"] if c["type"] == "Waiting")
        assert "spec.corpus: waiting for Corpus/web" in waiting["message"] and status["phase"] == "Waiting"
        assert waiting["observedGeneration"] == 1
        assert status["plan"]["fits"] is True and status["plan"]["parameters"] > 0  # plan at admission

        # Corpus: one Indexed Job per stage, in order.
        corpus = cluster.get("Corpus", "web", ns)
        stages = ["extract", "tokenizer", "tokenize", "stats"]
        for i, stage in enumerate(stages):
            job = cluster.wait_job(f"web-{stage}", ns)
            assert job["metadata"]["labels"]["lmforge.io/stage"] == stage
            assert job["metadata"]["ownerReferences"][0]["uid"] == corpus["metadata"]["uid"]
            assert job["spec"]["completionMode"] == "Indexed"
            assert "--stage" in job["spec"]["template"]["spec"]["containers"][0]["args"]
            # Later stages do not exist before this one is done.
            later = {f"web-{s}" for s in stages[i + 1 :]}
            assert not later & set(cluster.job_names(ns))
            cluster.start_job(f"web-{stage}", ns)
            status = cluster.wait(
                lambda stage=stage: (
                    (s := cluster.status("Corpus", "web", ns)).get("phase") == "Running"
                    and len(s.get("completedStages", [])) == stages.index(stage)
                    and s
                ),
                20,
                f"Corpus running {stage}",
            )
            assert status["stage"] in ("Extracting", "TrainingTokenizer", "Tokenizing")
            term = None
            if stage == "stats":
                term = {
                    "state": "Succeeded",
                    "outputs": {"tokens": "s3://bucket/corpora/web/tokens/train"},
                    "tokens": 123456,
                    # the shape lmforge_jobs.data writes from its final stage
                    "results": {
                        "documents": {"read": 1000, "kept": 700, "removedBy": {"url": 200, "language": 100}},
                        "tokens": {"train": 123456, "heldOut": 789},
                    },
                }
            finish(cluster, f"web-{stage}", ns, term)
        status = cluster.wait_phase("Corpus", "web", "Succeeded", ns)
        assert status["stage"] == "Done" and status["completedStages"] == stages
        assert status["documents"] == {"read": 1000, "kept": 700, "removedBy": {"url": 200, "language": 100}}
        assert status["tokens"] == 123456 and status["heldOutTokens"] == 789
        assert status["outputs"]["heldOut"] == "s3://bucket/corpora/web/tokens/held-out"
        assert status["progress"]["percent"] == 100

        # PretrainRun: ConfigMap with references resolved, headless Service, torchrun Job.
        job = cluster.wait_job("gpt-pretrain", ns)
        resolved = configmap_spec(cluster, ns, "gpt-pretrain-spec")
        assert "corpus" not in resolved["spec"]
        assert resolved["spec"]["data"]["tokens"] == "s3://bucket/corpora/web/tokens/train"
        assert resolved["spec"]["data"]["heldOut"] == "s3://bucket/corpora/web/tokens/held-out"
        service = cluster.get("Service", "gpt-pretrain", ns)
        assert service is not None and service["spec"]["clusterIP"] == "None"
        container = job["spec"]["template"]["spec"]["containers"][0]
        argv = [*container["command"], *container["args"]]
        assert (
            argv[:3] == ["python", "-m", "lmforge_jobs.launch"]
            and "--nnodes=2" in argv
            and "--nproc-per-node=4" in argv
        )
        assert "--rdzv-endpoint=gpt-pretrain-0.gpt-pretrain:29400" in argv
        assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
        assert container["resources"]["limits"]["nvidia.com/gpu"] in (4, "4")
        assert job["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "lmforge-operator"

        # Progress mirrored from rank 0's Prometheus endpoint while it runs.
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        registry = CollectorRegistry()
        for name, value in (
            ("lmforge_train_step", 50),
            ("lmforge_train_total_steps", 200),
            ("lmforge_train_tokens_total", 204800),
            ("lmforge_train_progress_ratio", 0.25),
            ("lmforge_train_eta_seconds", 300),
            ("lmforge_train_loss", 3.25),
            ("lmforge_train_tokens_per_second", 1234.5),
            ("lmforge_train_mfu_ratio", 0.41),
        ):
            Gauge(name, name, registry=registry).set(value)
        server, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
        try:
            cluster.add_pod("gpt-pretrain", namespace=ns, metrics_port=server.server_address[1])
            cluster.add_pod("gpt-pretrain", index=1, namespace=ns, metrics_port=1)  # not rank 0: not read
            cluster.start_job("gpt-pretrain", ns)
            status = cluster.wait(
                lambda: (s := cluster.status("PretrainRun", "gpt", ns)).get("metrics") and s,
                20,
                "mirrored metrics",
            )
        finally:  # the endpoint goes away with its pod: connections refused, not left unanswered
            server.shutdown()
            server.server_close()
        assert status["phase"] == "Running"
        assert status["progress"]["step"] == 50 and status["progress"]["totalSteps"] == 200
        assert status["progress"]["percent"] == 25.0 and status["progress"]["tokens"] == 204800
        assert status["metrics"] == {"loss": 3.25, "tokensPerSecond": 1234.5, "mfu": 0.41}
        assert status["outputs"]["checkpoint"] == "s3://bucket/runs/gpt/checkpoints"  # while running
        assert status["startTime"]
        finish(
            cluster,
            "gpt-pretrain",
            ns,
            {"state": "Succeeded", "step": 200, "metrics": {"loss": 2.5, "evalLoss": 2.75}},
        )
        status = cluster.wait_phase("PretrainRun", "gpt", "Succeeded", ns)
        assert status["outputs"] == {
            "checkpoint": "s3://bucket/runs/gpt/checkpoints",
            "model": "s3://bucket/runs/gpt/model",
            "tokenizer": "s3://bucket/runs/gpt/model",
        }
        assert status["metrics"]["loss"] == 2.5 and status["progress"]["percent"] == 100
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "True" and status["completionTime"]

        # AlignmentRun: the base resolved to the PretrainRun's model; shell metacharacters verbatim.
        job = cluster.wait_job("gpt-sft-align", ns)
        resolved = configmap_spec(cluster, ns, "gpt-sft-align-spec")
        assert resolved["spec"]["base"] == {"path": "s3://bucket/runs/gpt/model"}
        assert resolved["spec"]["dataset"]["path"] == NASTY
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert all(NASTY not in a for a in container["args"])  # spec strings never become arguments
        assert container["command"][0] != "sh" and "-c" not in container["args"][:1]
        finish(cluster, "gpt-sft-align", ns)
        status = cluster.wait_phase("AlignmentRun", "gpt-sft", "Succeeded", ns)
        assert status["outputs"] == {"model": "s3://bucket/runs/gpt-sft/model"}

        # Evaluation: results from the termination message.
        cluster.wait_job("gpt-eval-evaluate", ns)
        resolved = configmap_spec(cluster, ns, "gpt-eval-evaluate-spec")
        assert resolved["spec"]["perplexity"]["data"] == "s3://bucket/corpora/web/tokens/held-out"
        finish(
            cluster,
            "gpt-eval-evaluate",
            ns,
            {"state": "Succeeded", "results": {"perplexity": 12.5, "benchmarks": {"tiny": {"acc": 0.5}}}},
        )
        status = cluster.wait_phase("Evaluation", "gpt-eval", "Succeeded", ns)
        assert status["results"]["perplexity"] == 12.5 and status["results"]["benchmarks"] == {
            "tiny": {"acc": 0.5}
        }
        assert status["outputs"] == {"results": "s3://bucket/evals/gpt-sft/results.json"}

        # Kubernetes Events on transitions, and no finalizer anywhere.
        events = cluster.list("Event", ns)
        reasons = {(e["involvedObject"]["name"], e["reason"]) for e in events}
        assert ("gpt", "JobSucceeded") in reasons and ("gpt", "DependencyNotReady") in reasons
        for kind, name in (("Corpus", "web"), ("PretrainRun", "gpt"), ("Evaluation", "gpt-eval")):
            assert not cluster.get(kind, name, ns)["metadata"].get("finalizers")
    assert_rbac(cluster)


# ------------------------------------------------------------------------------- the example set at once
def _example_resources() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((ROOT / "examples" / "cluster").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _termination(kind: str) -> dict[str, Any]:
    if kind == "Evaluation":
        return {"state": "Succeeded", "results": {"perplexity": 20.0}}
    return {"state": "Succeeded"}


def play_job_controller(
    cluster: Cluster, ns: str, done: dict[str, float], until: Any, timeout: float
) -> None:
    """Finish every Job as soon as it appears (recording when), until ``until()``."""
    deadline = time.monotonic() + timeout
    while not until():
        finished = False
        for job in cluster.jobs(ns):
            name = job["metadata"]["name"]
            if name not in done:
                finish(cluster, name, ns, _termination(job["metadata"]["labels"]["lmforge.io/kind"]))
                done[name] = time.monotonic()
                finished = True
        if time.monotonic() > deadline:
            phases = {
                f"{d['kind']}/{d['metadata']['name']}": cluster.status(
                    d["kind"], d["metadata"]["name"], ns
                ).get("phase")
                for d in _example_resources()
            }
            raise AssertionError(f"not converged: {phases}")
        if not finished:
            time.sleep(0.02)


def test_example_set_runs_in_dependency_order(cluster: Cluster) -> None:
    ns = "examples"
    docs = _example_resources()
    with Operator(cluster, ns):
        for d in reversed(docs):  # dependents first: order must come from the operator
            cluster.create(d, ns)
        done: dict[str, float] = {}

        def all_succeeded() -> bool:
            return all(
                cluster.status(d["kind"], d["metadata"]["name"], ns).get("phase") == "Succeeded" for d in docs
            )

        play_job_controller(cluster, ns, done, all_succeeded, timeout=90)
    created: dict[str, float] = {}
    for call in cluster.calls:
        if (
            call.method == "POST"
            and call.path == f"/apis/batch/v1/namespaces/{ns}/jobs"
            and call.status < 300
        ):
            assert call.name not in created, f"Job {call.name} created twice"
            created[call.name] = call.time
    jobs = {j["metadata"]["name"]: j["metadata"]["labels"] for j in cluster.jobs(ns)}
    by_owner: dict[tuple[str, str], list[str]] = {}
    for job, labels in jobs.items():
        by_owner.setdefault((labels["lmforge.io/kind"], labels["lmforge.io/name"]), []).append(job)
    assert len(by_owner) == len(docs)
    for d in docs:
        resource, problems = parse_resource(d)
        assert resource is not None, problems
        first = min(created[j] for j in by_owner[(d["kind"], resource.name)])
        for _, ref, _ in dependencies(resource):
            dep_done = max(done[j] for j in by_owner[ref])
            assert first > dep_done, f"{d['kind']}/{resource.name} started before {ref} finished"
    # Queue label → created suspended (Kueue admits it).
    job = cluster.get("Job", "llama-1b-pretrain", ns)
    assert (
        job["spec"]["suspend"] is True and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    )
    assert_rbac(cluster)


# ------------------------------------------------------------------------------------------ restart safety
@pytest.mark.slow
def test_operator_killed_mid_reconcile_restarts_without_duplicates(cluster: Cluster) -> None:
    ns = "restart"
    corpus = next(d for d in _example_resources() if d["kind"] == "Corpus")
    op = Operator(cluster, ns)
    op.start()
    n_before = len(cluster.calls)
    cluster.create(corpus, ns)
    # Kill it the moment the first child (the ConfigMap) is POSTed: before or while the Job is created.
    cluster.wait(
        lambda: any(c.method == "POST" and "/configmaps" in c.path for c in cluster.calls[n_before:]),
        20,
        "first ConfigMap POST",
    )
    op.kill()
    done: dict[str, float] = {}
    for _round in range(3):  # restart, let it progress a few stages, kill it again
        op = Operator(cluster, ns)
        op.start()
        target = len(done) + 3
        play_job_controller(cluster, ns, done, lambda target=target: len(done) >= target, timeout=30)
        op.kill()
        # While it is down, a Job finishes: the restarted operator must pick that up.
        for job in cluster.job_names(ns):
            if job not in done:
                finish(cluster, job, ns)
                done[job] = time.monotonic()
    with Operator(cluster, ns):
        play_job_controller(
            cluster,
            ns,
            done,
            lambda: cluster.status("Corpus", "web-en", ns).get("phase") == "Succeeded",
            timeout=60,
        )
    posts = [
        c.name
        for c in cluster.calls
        if c.method == "POST" and c.path == f"/apis/batch/v1/namespaces/{ns}/jobs" and c.status < 300
    ]
    assert len(posts) == len(set(posts)) == 11  # every stage once
    assert sorted(cluster.job_names(ns)) == sorted(set(posts))
    status = cluster.status("Corpus", "web-en", ns)
    assert status["completedStages"] and len(status["completedStages"]) == 11
    assert len(cluster.list("ConfigMap", ns)) == 1
    assert_rbac(cluster)


# ------------------------------------------------------------------------------------------ invalid specs
def _invalid_cases() -> list[tuple[str, dict[str, Any], str, str]]:
    """(name, manifest, field named in the message, reason)."""
    from bad_manifests import CASES, manifest

    picked = [
        "no-sources",
        "held-out-fraction",
        "language-model-missing",
        "heads-kv-heads",
        "unknown-field",
        "budget-two",
        "corpus-and-data",
        "ppo-no-reward",
        "peft-two",
        "base-two",
        "checkpoints-enum",
        "model-missing",
    ]
    out = []
    for case_id, kind, patch, field, _ in CASES:
        if case_id in picked:
            out.append((f"bad-{case_id}", manifest(kind, patch, name=f"bad-{case_id}"), field, "SpecInvalid"))
    assert len(out) == len(picked)
    # Rules only the operator can check.
    big = resource(
        "PretrainRun",
        "too-big",
        {
            "data": {"tokens": "s3://b/t", "tokenizer": "s3://b/tok"},
            "model": {
                "layers": 80,
                "hidden": 8192,
                "heads": 64,
                "kvHeads": 8,
                "seqLen": 4096,
                "vocabSize": 128256,
            },
            "budget": {"steps": 1000},
            "batch": {"globalTokens": 65536, "microBatchSize": 16},
            "parallelism": {"nodes": 1, "gpusPerNode": 1, "strategy": "ddp"},
        },
    )
    out.append(("too-big", big, "spec.batch.microBatchSize", "DoesNotFitInMemory"))
    selfref = resource(
        "AlignmentRun",
        "self-ref",
        {
            "base": {"alignmentRun": "self-ref"},
            "method": "sft",
            "dataset": {"path": "s3://b/d.jsonl", "format": "messages"},
        },
    )
    out.append(("self-ref", selfref, "spec.base", "DependencyCycle"))
    for a, b in (("cycle-a", "cycle-b"), ("cycle-b", "cycle-a")):
        spec = {
            "base": {"alignmentRun": b},
            "method": "sft",
            "dataset": {"path": "s3://b/d", "format": "messages"},
        }
        out.append((a, resource("AlignmentRun", a, spec), "spec.base", "DependencyCycle"))
    long_name = "x" * 45
    out.append((long_name, resource("Corpus", long_name, CORPUS), "metadata.name", "SpecInvalid"))
    return out


def test_invalid_resources_get_invalid_condition_and_no_children(cluster: Cluster) -> None:
    ns = "invalid"
    cases = _invalid_cases()
    assert len(cases) >= 10
    with Operator(cluster, ns, resync_seconds=0.1) as op:
        for _, manifest, _, _ in cases:
            cluster.create(manifest, ns)
        for name, manifest, field, reason in cases:
            status = cluster.wait_phase(manifest["kind"], name, "Invalid", ns)
            invalid = next(c for c in status["conditions"] if c["type"] == "Invalid")
            assert invalid["status"] == "True" and invalid["reason"] == reason, (name, invalid)
            assert field in invalid["message"], (name, field, invalid["message"])
            assert invalid["observedGeneration"] == 1
        assert cluster.status("PretrainRun", "too-big", ns)["plan"]["fits"] is False
        # A few resyncs of each (those Invalid for another resource's sake are reconciled): still nothing.
        op.wait_resyncs(*((m["kind"], name) for name, m, _, _ in cases), n=2)
    for kind in ("Job", "ConfigMap", "Service", "NetworkPolicy"):
        assert cluster.list(kind, ns) == [], kind
    warnings = [e for e in cluster.list("Event", ns) if e["type"] == "Warning"]
    assert len({e["involvedObject"]["name"] for e in warnings}) == len(cases)
    assert_rbac(cluster)


# -------------------------------------------------------------------- spec changes, failures, deletion
def test_spec_change_while_running_failure_and_deletion(cluster: Cluster) -> None:
    ns = "changes"
    spec = {**PRETRAIN, "corpus": None, "data": {"tokens": "s3://b/t", "tokenizer": "s3://b/tok"}}
    spec = {k: v for k, v in spec.items() if v is not None}
    with Operator(cluster, ns, metrics_port=0) as op:
        cluster.create(resource("PretrainRun", "run", spec), ns)
        cluster.wait_job("run-pretrain", ns)
        cluster.start_job("run-pretrain", ns)
        cluster.wait_phase("PretrainRun", "run", "Running", ns)
        # A field that cannot change on a running resource: Invalid naming it; the Job is left alone.
        cluster.patch(
            "PretrainRun", "run", {"metadata": {"generation": 2}, "spec": {"model": {"layers": 4}}}, ns
        )
        status = cluster.wait_phase("PretrainRun", "run", "Invalid", ns)
        invalid = next(c for c in status["conditions"] if c["type"] == "Invalid")
        assert invalid["reason"] == "SpecChanged" and "spec.model.layers" in invalid["message"]
        assert invalid["observedGeneration"] == 2 and status["observedGeneration"] == 2
        # Restoring it clears the refusal.
        cluster.patch(
            "PretrainRun", "run", {"metadata": {"generation": 3}, "spec": {"model": {"layers": 2}}}, ns
        )
        cluster.wait_phase("PretrainRun", "run", "Running", ns)

        # A configuration error (exit 64) is Invalid naming the field; a crash is Failed.
        cluster.create(resource("PretrainRun", "bad-config", spec), ns)
        cluster.wait_job("bad-config-pretrain", ns)
        cluster.add_pod(
            "bad-config-pretrain",
            namespace=ns,
            termination={"state": "Invalid", "message": "no tokenizer.json", "field": "data.tokenizer"},
            exit_code=64,
        )
        cluster.finish_job("bad-config-pretrain", ns, failed=True, message="exit code 64")
        status = cluster.wait_phase("PretrainRun", "bad-config", "Invalid", ns)
        invalid = next(c for c in status["conditions"] if c["type"] == "Invalid")
        assert (
            invalid["reason"] == "ConfigError"
            and "spec.data.tokenizer: no tokenizer.json" in invalid["message"]
        )
        cluster.create(resource("PretrainRun", "crash", spec), ns)
        cluster.wait_job("crash-pretrain", ns)
        cluster.finish_job("crash-pretrain", ns, failed=True, message="BackoffLimitExceeded")
        status = cluster.wait_phase("PretrainRun", "crash", "Failed", ns)
        assert (
            "BackoffLimitExceeded"
            in next(c for c in status["conditions"] if c["type"] == "Failed")["message"]
        )

        # The operator's own metrics.
        from lmforge_operator import handlers

        port = handlers.METRICS._server.server_address[1]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'lmforge_operator_reconciles_total{kind="PretrainRun",result="ok"}' in text
        # the registry is the process's: other tests' operators may have counted Failed runs too
        failed_before = _sample(text, 'lmforge_operator_resources{kind="PretrainRun",phase="Failed"}')
        assert failed_before >= 1
        assert 'lmforge_operator_children_created_total{child="Job",kind="PretrainRun"}' in text

        # Deletion is never blocked (no finalizer): the API server removes it at once, and the operator
        # forgets it; children go with ownerReferences (the garbage collector's job, absent in kmock).
        cluster.request("DELETE", "/apis/lmforge.io/v1alpha1/namespaces/changes/pretrainruns/crash")
        assert cluster.get("PretrainRun", "crash", ns) is None
        cluster.wait(lambda: ("PretrainRun", ns, "crash") not in op.controller.cache, 10, "forgotten")
        job = cluster.get("Job", "run-pretrain", ns)
        owner = job["metadata"]["ownerReferences"][0]
        assert owner["kind"] == "PretrainRun" and owner["controller"] is True and owner["uid"]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        failed_after = _sample(text, 'lmforge_operator_resources{kind="PretrainRun",phase="Failed"}')
        assert failed_after == failed_before - 1  # the deleted run is no longer counted
    assert_rbac(cluster)


def _sample(text: str, series: str) -> float:
    """The value of one series in a Prometheus text exposition."""
    line = next(line for line in text.splitlines() if line.startswith(series + " "))
    return float(line.rsplit(" ", 1)[1])


# ------------------------------------------------------------------------ Evaluation, checkpoints: every
def test_evaluation_every_checkpoint_reruns_as_checkpoints_land(cluster: Cluster) -> None:
    ns = "every"
    pre = {k: v for k, v in PRETRAIN.items() if k != "corpus"} | {
        "data": {"tokens": "s3://b/t", "tokenizer": "s3://b/tok"}
    }
    # the Evaluation finds a new checkpoint (its PretrainRun's mirrored step) on a resync
    with Operator(cluster, ns, resync_seconds=0.1):
        cluster.create(resource("PretrainRun", "gpt", pre), ns)
        cluster.create(resource("Evaluation", "gpt-every", EVERY_CHECKPOINT), ns)
        status = cluster.wait_phase("Evaluation", "gpt-every", "Waiting", ns)
        cluster.wait_job("gpt-pretrain", ns)
        cluster.start_job("gpt-pretrain", ns)
        cluster.wait_phase("PretrainRun", "gpt", "Running", ns)
        status = cluster.wait(
            lambda: (
                (s := cluster.status("Evaluation", "gpt-every", ns)).get("conditions")
                and any(c["reason"] == "WaitingForCheckpoint" for c in s["conditions"])
                and s
            ),
            20,
            "waiting for a checkpoint",
        )
        # A checkpoint lands (the PretrainRun's mirrored step passes checkpoint.everySteps).
        cluster.patch("PretrainRun", "gpt", {"status": {"progress": {"step": 60}}}, ns, "status")
        cluster.wait_job("gpt-every-evaluate", ns)
        resolved = configmap_spec(cluster, ns, "gpt-every-evaluate-spec")
        assert resolved["spec"]["checkpointDir"] == "s3://bucket/runs/gpt/checkpoints"
        finish(cluster, "gpt-every-evaluate", ns, {"state": "Succeeded", "results": {"perplexity": 30.0}})
        status = cluster.wait(
            lambda: (s := cluster.status("Evaluation", "gpt-every", ns)).get("history") and s, 20, "round 0"
        )
        assert status["phase"] == "Running" and status["history"][0]["perplexity"] == 30.0
        # The run finishes (its export reported somewhere other than the default): one more round for the
        # final model, then Succeeded.
        final = {"state": "Succeeded", "outputs": {"model": "s3://bucket/exports/gpt-final"}}
        finish(cluster, "gpt-pretrain", ns, final)
        job1 = cluster.wait_job("gpt-every-evaluate-1", ns)
        # Each round mounts the spec it was resolved with, in a ConfigMap of its own; round 0's is unchanged.
        mounted = {v["name"]: v for v in job1["spec"]["template"]["spec"]["volumes"]}["spec"]
        assert mounted["configMap"]["name"] == "gpt-every-evaluate-spec-1"
        assert configmap_spec(cluster, ns, "gpt-every-evaluate-spec-1")["spec"]["model"] == {
            "path": "s3://bucket/exports/gpt-final"
        }
        assert configmap_spec(cluster, ns, "gpt-every-evaluate-spec") == resolved
        finish(cluster, "gpt-every-evaluate-1", ns, {"state": "Succeeded", "results": {"perplexity": 25.0}})
        status = cluster.wait_phase("Evaluation", "gpt-every", "Succeeded", ns)
        assert [h["perplexity"] for h in status["history"]] == [30.0, 25.0]
        assert status["results"]["perplexity"] == 25.0
        assert sorted(j for j in cluster.job_names(ns) if "every" in j) == [
            "gpt-every-evaluate",
            "gpt-every-evaluate-1",
        ]
    assert_rbac(cluster)


def test_evaluation_every_checkpoint_deletes_superseded_rounds(cluster: Cluster) -> None:
    """Only the newest two rounds keep their Job (and pods) and spec ConfigMap; older ones are deleted once
    their results are in status.history, and a restarted operator neither re-creates nor forgets them."""
    ns = "prune"
    pre = {k: v for k, v in PRETRAIN.items() if k != "corpus"} | {
        "data": {"tokens": "s3://b/t", "tokenizer": "s3://b/tok"}
    }
    ev = {"model": {"pretrainRun": "gpt"}, "checkpoints": "every", "output": "s3://b/evals/gpt"}
    ev["benchmarks"] = [{"task": "hellaswag"}]
    rounds = ["gpt-every-evaluate", "gpt-every-evaluate-1", "gpt-every-evaluate-2"]
    specs = ["gpt-every-evaluate-spec", "gpt-every-evaluate-spec-1", "gpt-every-evaluate-spec-2"]

    def history() -> list[float]:
        return [h["perplexity"] for h in cluster.status("Evaluation", "gpt-every", ns).get("history") or []]

    # the Evaluation finds a new checkpoint (its PretrainRun's mirrored step) on a resync
    with Operator(cluster, ns, resync_seconds=0.1):
        cluster.create(resource("PretrainRun", "gpt", pre), ns)
        cluster.create(resource("Evaluation", "gpt-every", EVERY_CHECKPOINT), ns)
        cluster.wait_job("gpt-pretrain", ns)
        cluster.start_job("gpt-pretrain", ns)
        cluster.wait_phase("PretrainRun", "gpt", "Running", ns)
        for r, step in enumerate((60, 110)):  # checkpoints 1 and 2 land (everySteps 50): rounds 0 and 1
            cluster.patch("PretrainRun", "gpt", {"status": {"progress": {"step": step}}}, ns, "status")
            cluster.wait_job(rounds[r], ns)
            finish(cluster, rounds[r], ns, {"state": "Succeeded", "results": {"perplexity": 30.0 - r}})
            cluster.wait(lambda r=r: len(history()) == r + 1, 20, f"round {r} recorded")
        assert cluster.get("Job", rounds[0], ns) is not None  # two rounds so far: nothing deleted
        finish(cluster, "gpt-pretrain", ns)  # the final model: round 2, and round 0 goes
        cluster.wait_job(rounds[2], ns)
        cluster.wait(lambda: cluster.get("Job", rounds[0], ns) is None, 20, "round 0 deleted")
        cluster.wait(lambda: cluster.get("ConfigMap", specs[0], ns) is None, 20, "round 0 spec deleted")
        assert all(cluster.get("Job", j, ns) is not None for j in rounds[1:])
        assert all(cluster.get("ConfigMap", c, ns) is not None for c in specs[1:])
        deletes = [c for c in cluster.calls if c.by_operator and c.method == "DELETE" and f"/{ns}/" in c.path]
        assert {c.path.rsplit("/", 1)[-1] for c in deletes} == {rounds[0], specs[0]}
    # A restart: round 0 is not re-created; round 2 finishes and the Evaluation succeeds with all three.
    with Operator(cluster, ns):
        finish(cluster, rounds[2], ns, {"state": "Succeeded", "results": {"perplexity": 25.0}})
        status = cluster.wait_phase("Evaluation", "gpt-every", "Succeeded", ns)
        assert [h["perplexity"] for h in status["history"]] == [30.0, 29.0, 25.0]
        assert status["results"]["perplexity"] == 25.0
    assert sorted(j for j in cluster.job_names(ns) if "every" in j) == rounds[1:]
    here = [c for c in cluster.calls if c.by_operator and f"/namespaces/{ns}/" in c.path]
    posted = [c.name for c in here if c.method == "POST" and c.path.endswith("/jobs") and "every" in c.name]
    assert sorted(posted) == rounds  # each round's Job created once, none again after the restart
    assert_rbac(cluster)


# -------------------------------------------------------------------------------- `lmforge operator`
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_lmforge_operator_command_serves_metrics_and_liveness(cluster: Cluster, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    ns = "cli"
    metrics, liveness = _free_port(), _free_port()
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "LMFORGE_RESYNC_SECONDS": "1"}
    log = (tmp_path / "operator.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lmforge_operator",
            "operator",
            "--namespace",
            ns,
            "--metrics-port",
            str(metrics),
            "--liveness-port",
            str(liveness),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        cluster.create(
            resource("Evaluation", "hub", {"model": {"huggingface": "org/m"}, "benchmarks": [{"task": "x"}]}),
            ns,
        )
        cluster.wait_job("hub-evaluate", ns, timeout=60)
        health = urllib.request.urlopen(f"http://127.0.0.1:{liveness}/healthz", timeout=10)
        assert health.status == 200
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10).read().decode()
        assert 'lmforge_operator_reconciles_total{kind="Evaluation",result="ok"}' in text
        job = cluster.get("Job", "hub-evaluate", ns)
        image = job["spec"]["template"]["spec"]["containers"][0]["image"]
        assert image.startswith("ghcr.io/lmforge/lmforge-jobs:") or image == os.environ.get(
            "LMFORGE_JOBS_IMAGE"
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0, (tmp_path / "operator.log").read_text()[-2000:]


def test_keyed_lookup_in_the_harness_finds_what_kmocks_scan_finds(cluster: Cluster) -> None:
    """The harness replaces kmock's per-request scan of every stored object with a dict lookup (bench speed);
    it must answer exactly what the scan answers: live, deleted and absent objects, any namespace."""
    from kmock._internal.references import resource
    from kmock._internal.rendering import Request

    ns_a, ns_b = "lookup-a", "lookup-b"
    for ns in (ns_a, ns_b):
        cluster.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "same"}}, ns)
    cluster.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "gone"}}, ns_a)
    cluster.request("DELETE", path_for("ConfigMap", ns_a, "gone"))
    emulator = cluster.emulator
    assert emulator is not None and emulator.indexed
    configmaps, jobs = resource("v1/configmaps"), resource("batch/v1/jobs")
    cases = [
        (configmaps, ns_a, "same"),
        (configmaps, ns_b, "same"),
        (configmaps, ns_a, "gone"),
        (configmaps, ns_a, "absent"),
        (configmaps, None, "same"),
        (configmaps, ns_a, None),
        (jobs, ns_a, "same"),
    ]
    found_any = found_deleted = False
    for res, ns, name in cases:
        for strict in (True, False):
            request = Request(resource=res, namespace=ns, name=name)
            keyed = emulator._KubernetesEmulator__get_objs(request, strict)
            scanned = emulator._scan_objs(request, strict)
            assert [id(o) for o in keyed] == [id(o) for o in scanned], (res, ns, name, strict)
            found_any |= any(not o.deleted for o in keyed)
            found_deleted |= any(o.deleted for o in keyed)
    assert found_any and found_deleted
    assert cluster.get("ConfigMap", "same", ns_b) is not None
    assert cluster.get("ConfigMap", "gone", ns_a) is None
