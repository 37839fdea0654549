"""Unit tests of the operator's pure parts: conditions, Job states, pod reports, the reconciler's decisions
(with a fake API), the `lmforge operator` command and the package's import weight."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import pytest
from fake_api import FakeApi
from repo import ROOT

from lmforge_jobs.telemetry import metric_name, progress_names
from lmforge_operator import status as status_helpers
from lmforge_operator.controller import Config, Controller, changed_fields, spec_hash
from lmforge_operator.kube import path_for


# ------------------------------------------------------------------------------------------- conditions
def test_condition_transition_time_changes_only_with_status() -> None:
    status: dict[str, Any] = {}
    assert status_helpers.set_condition(status, "Running", True, "JobRunning", "running", 3) is True
    first = status["conditions"][0]["lastTransitionTime"]
    status["conditions"][0]["lastTransitionTime"] = "2000-01-01T00:00:00Z"
    assert status_helpers.set_condition(status, "Running", True, "JobRunning", "still", 4) is False
    c = status["conditions"][0]
    assert c["lastTransitionTime"] == "2000-01-01T00:00:00Z" and c["message"] == "still"
    assert c["observedGeneration"] == 4 and first
    assert status_helpers.set_condition(status, "Running", False, "JobSucceeded", "", 4) is True
    assert status["conditions"][0]["lastTransitionTime"] != "2000-01-01T00:00:00Z"


def test_set_state_one_true_condition_and_phase() -> None:
    status: dict[str, Any] = {}
    assert (
        status_helpers.set_state(
            status, "Waiting", status_helpers.DEPENDENCY_NOT_READY, "spec.corpus: waiting", 1
        )
        == "Waiting"
    )
    assert status_helpers.set_state(status, "Running", status_helpers.JOB_RUNNING, "", 1) == "Running"
    true = [c["type"] for c in status["conditions"] if c["status"] == "True"]
    assert true == ["Running"]
    assert status_helpers.set_state(status, "Succeeded", status_helpers.JOB_SUCCEEDED, "", 2) == "Succeeded"
    types = [c["type"] for c in status["conditions"]]
    assert types == ["Ready", "Running", "Succeeded", "Failed", "Waiting"]  # API order
    ready = status_helpers.condition(status, "Ready")
    assert (
        ready is not None
        and ready["status"] == "True"
        and ready["reason"] == status_helpers.OUTPUTS_AVAILABLE
    )
    assert all(c["observedGeneration"] == 2 for c in status["conditions"])
    assert (
        status_helpers.set_state(status, "Invalid", status_helpers.SPEC_CHANGED, "spec.model.layers: …", 3)
        == "Invalid"
    )
    # Running beside Waiting (an Evaluation between checkpoints) shows as Running.
    assert (
        status_helpers.set_state({}, "Waiting", status_helpers.WAITING_FOR_CHECKPOINT, "", 1, running=True)
        == "Running"
    )


# ------------------------------------------------------------------------------------------ Job states
@pytest.mark.parametrize(
    ("job_status", "spec", "state"),
    [
        ({}, {}, "Pending"),
        ({}, {"suspend": True}, "Queued"),
        ({"active": 2, "startTime": "t"}, {}, "Running"),
        ({"conditions": [{"type": "Complete", "status": "True"}]}, {}, "Succeeded"),
        ({"conditions": [{"type": "SuccessCriteriaMet", "status": "True"}]}, {}, "Succeeded"),
        (
            {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]},
            {},
            "Failed",
        ),
        (
            {"conditions": [{"type": "FailureTarget", "status": "True", "reason": "PodFailurePolicy"}]},
            {},
            "Failed",
        ),
        ({"conditions": [{"type": "Failed", "status": "False"}], "active": 1}, {}, "Running"),
    ],
)
def test_job_state(job_status: dict[str, Any], spec: dict[str, Any], state: str) -> None:
    job = {"metadata": {"name": "j"}, "spec": {"completions": 2, **spec}, "status": job_status}
    js = status_helpers.job_state(job)
    assert js.state == state and js.completions == 2
    if state == "Failed":
        assert js.message.startswith(("BackoffLimitExceeded", "PodFailurePolicy"))


# ------------------------------------------------------------------------------------------ pod reports
def _pod(index: str, created: str, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": f"p{index}{created}",
            "creationTimestamp": created,
            "labels": {"batch.kubernetes.io/job-completion-index": index},
        },
        "spec": {
            "containers": [
                {
                    "ports": [
                        {"name": "rdzv", "containerPort": 29400},
                        {"name": "metrics", "containerPort": 9400},
                    ]
                }
            ]
        },
        "status": status,
    }


def test_rank0_pod_and_metrics_url() -> None:
    pods = [
        _pod("1", "2024-01-01T00:00:02Z", phase="Running", podIP="10.0.0.2"),
        _pod("0", "2024-01-01T00:00:00Z", phase="Failed", podIP="10.0.0.1"),
        _pod("0", "2024-01-01T00:00:05Z", phase="Running", podIP="fd00::5"),  # the replacement
    ]
    pod = status_helpers.rank0_pod(pods)
    assert pod is not None and pod["metadata"]["name"] == "p02024-01-01T00:00:05Z"
    assert status_helpers.metrics_url(pod) == "http://[fd00::5]:9400/metrics"
    assert status_helpers.metrics_url(pods[1]) is None  # not running
    assert status_helpers.rank0_pod([]) is None


def test_termination_summary() -> None:
    message = json.dumps({"state": "Invalid", "message": "bad", "field": "data.tokens"})
    pod = {"status": {"containerStatuses": [{"state": {"terminated": {"exitCode": 64, "message": message}}}]}}
    summary = status_helpers.termination_summary(pod)
    assert summary == {"state": "Invalid", "message": "bad", "field": "data.tokens", "exitCode": 64}
    logs = {
        "status": {"containerStatuses": [{"state": {"terminated": {"exitCode": 1, "message": "Traceback…"}}}]}
    }
    assert status_helpers.termination_summary(logs) is None  # FallbackToLogsOnError gave log text, not JSON


def test_a_failed_jobs_message_falls_back_but_is_never_empty() -> None:
    from lmforge_operator.controller.mirror import job_failed

    policy = (
        "PodFailurePolicy: Container main for pod ns/x-0-a failed with exit code 64 matching FailJob rule"
    )
    job = status_helpers.JobState(name="x", state="Failed", message=policy)
    said = {"state": "Invalid", "message": "no tokenizer.json", "field": "data.tokenizer"}
    cases = [
        (said, "", None, "spec.data.tokenizer: no tokenizer.json (Job x)"),
        (None, "ValueError: bad\n", 64, "ValueError: bad (Job x)"),
        (None, "", None, f"{policy} (Job x)"),
    ]
    for summary, raw, code, message in cases:
        outcome = job_failed(job, summary, raw, code)
        assert (outcome.condition, outcome.reason, outcome.message) == ("Invalid", "ConfigError", message)
    bare = status_helpers.JobState(name="x", state="Failed", message="PodFailurePolicy")
    outcome = job_failed(bare, None, "", 64)
    assert outcome.message == "exit code 64 (configuration error): see kubectl logs job/x (Job x)"
    crash = job_failed(status_helpers.JobState(name="x", state="Failed"), None, "", 1)
    assert crash.condition == "Failed" and crash.message == "Job x: see kubectl describe job/x"


def test_pods_that_cannot_start() -> None:
    def pod(status: dict[str, Any]) -> dict[str, Any]:
        return {"metadata": {"name": "p"}, "status": status}

    waiting = {"waiting": {"reason": "ErrImagePull", "message": "not found"}}
    assert status_helpers.pod_not_starting(
        pod({"phase": "Pending", "containerStatuses": [{"state": waiting}]})
    ) == ("pod p: ErrImagePull: not found")
    unschedulable = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "no"}
    assert status_helpers.pod_not_starting(pod({"phase": "Pending", "conditions": [unschedulable]})) == (
        "pod p: Unschedulable: no"
    )
    creating = {"waiting": {"reason": "ContainerCreating"}}
    assert (
        status_helpers.pod_not_starting(pod({"phase": "Pending", "containerStatuses": [{"state": creating}]}))
        is None
    )
    assert status_helpers.pod_not_starting(pod({"phase": "Running"})) is None
    assert not status_helpers.pods_started([pod({"phase": "Pending"})])
    assert status_helpers.pods_started([]) and status_helpers.pods_started([pod({"phase": "Running"})])
    term = {"terminated": {"exitCode": 64, "message": " tail "}}
    assert status_helpers.termination_state(pod({"containerStatuses": [{"lastState": term}]})) == (64, "tail")


def test_progress_from_prometheus_text_uses_the_jobs_names() -> None:
    names = progress_names("PretrainRun")
    text = "\n".join(
        [
            f"# TYPE {names['step']} gauge",
            f"{names['step']} 120.0",
            f"{names['totalSteps']} 400.0",
            f"{names['tokens']} 491520.0",
            f"{names['progress']} 0.3",
            f"{names['etaSeconds']} 90.0",
            f"{metric_name('PretrainRun', 'loss')} 3.5",
            f"{metric_name('PretrainRun', 'mfu')} 0.38",
            f"{metric_name('PretrainRun', 'gpuUtilization')} 0.9",
            "lmforge_train_unknown_series 7",
            "",
        ]
    )
    progress = status_helpers.progress_from_metrics("PretrainRun", status_helpers.parse_prometheus(text))
    assert progress == {
        "step": 120,
        "totalSteps": 400,
        "tokens": 491520,
        "etaSeconds": 90,
        "percent": 30.0,
        "metrics": {"gpuUtilization": 0.9, "loss": 3.5, "mfu": 0.38},
    }
    assert status_helpers.parse_prometheus("not prometheus {{{") == {}


# ------------------------------------------------------------------------------------------- reconciler
def set_pods(api: FakeApi, pods: list[dict[str, Any]]) -> None:
    """The pods the API server holds in namespace ns: exactly ``pods`` (the kubelet's and the garbage
    collector's part)."""
    for key in [k for k in api.objects if k[0] == "Pod"]:
        del api.objects[key]
    for pod in pods:
        api.objects[("Pod", "ns", pod["metadata"]["name"])] = pod


def _resource(kind: str, name: str, spec: dict[str, Any], **status: Any) -> dict[str, Any]:
    body = {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}", "generation": 1},
        "spec": spec,
    }
    if status:
        body["status"] = status
    return body


ALIGN = {
    "base": {"pretrainRun": "base"},
    "method": "sft",
    "dataset": {"path": "s3://d", "format": "messages"},
}


def _run(controller: Controller, body: dict[str, Any]) -> dict[str, Any]:
    key = (body["kind"], "ns", body["metadata"]["name"])
    controller.cache[key] = body
    asyncio.run(controller.reconcile(body))
    return controller.cache[key].get("status") or {}


def test_reconcile_waits_then_creates_children_once() -> None:
    api = FakeApi()
    controller = Controller(Config(storage="s3://store"))
    controller.api = api  # type: ignore[assignment]
    status = _run(controller, _resource("AlignmentRun", "sft", ALIGN))
    assert status["phase"] == "Waiting"
    waiting = status_helpers.condition(status, "Waiting")
    assert waiting is not None and waiting["reason"] == status_helpers.DEPENDENCY_NOT_FOUND
    assert "spec.base: PretrainRun/base not found" in waiting["message"]
    assert not [c for c in api.calls if c[0] == "create"]
    (event,) = api.events  # the transition to Waiting, and why
    assert event["reason"] == status_helpers.DEPENDENCY_NOT_FOUND and event["type"] == "Normal"
    assert event["message"] == f"Waiting: {waiting['message']}"

    controller.cache[("PretrainRun", "ns", "base")] = _resource(
        "PretrainRun", "base", {}, phase="Succeeded", outputs={"model": "s3://m/model"}
    )
    body = _resource("AlignmentRun", "sft", ALIGN)
    body["status"] = status
    status = _run(controller, body)
    created = [(k, n) for op, k, n in api.calls if op == "create"]
    assert created == [
        ("ConfigMap", "sft-align-spec"),
        ("Service", "sft-align"),
        ("NetworkPolicy", "sft-align"),
        ("Job", "sft-align"),
    ]
    job = api.objects[("Job", "ns", "sft-align")]
    recorded = json.loads(job["metadata"]["annotations"]["lmforge.io/spec"])  # the spec it was built from
    assert recorded["base"] == ALIGN["base"] and recorded["dataset"]["path"] == "s3://d"
    assert job["metadata"]["annotations"]["lmforge.io/spec-digest"] == spec_hash(recorded)
    assert status["phase"] == "Pending"
    # Reconciling again (a restarted operator with an empty cache) creates nothing new.
    controller2 = Controller(Config(storage="s3://store"))
    controller2.api = api  # type: ignore[assignment]
    controller2.cache[("PretrainRun", "ns", "base")] = controller.cache[("PretrainRun", "ns", "base")]
    body["status"] = status
    _run(controller2, body)
    assert [(k, n) for op, k, n in api.calls if op == "create"] == created


def _job_ended(
    controller: Controller,
    api: FakeApi,
    body: dict[str, Any],
    status: dict[str, Any],
    job_name: str,
    job_status: dict[str, Any],
    exit_code: int,
    message: str,
) -> dict[str, Any]:
    """Play the Job controller and kubelet: the Job gets ``job_status``, its one pod terminated with
    ``exit_code`` and termination ``message``; then reconcile ``body`` (last seen with ``status``) again."""
    job = api.objects[("Job", "ns", job_name)]
    job["status"] = job_status
    controller.jobs[("ns", job_name)] = job
    terminated = {"terminated": {"exitCode": exit_code, "message": message}}
    pod = _pod("0", "t1", containerStatuses=[{"state": terminated}])
    pod["metadata"]["labels"]["job-name"] = job_name
    set_pods(api, [pod])
    body["status"] = status
    return _run(controller, body)


def test_config_error_stays_invalid_after_its_pods_are_gone() -> None:
    """Exit 64 → Invalid naming the field; a later reconcile with no pods left must not turn it Failed."""

    api = FakeApi()
    controller = Controller(Config(storage="s3://store"))
    controller.api = api  # type: ignore[assignment]
    controller.cache[("PretrainRun", "ns", "base")] = _resource(
        "PretrainRun", "base", {}, phase="Succeeded", outputs={"model": "s3://m/model"}
    )
    status = _run(controller, _resource("AlignmentRun", "sft", ALIGN))
    failed = {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "x"}
    message = json.dumps({"state": "Invalid", "message": "no such file", "field": "dataset.path"})
    body = _resource("AlignmentRun", "sft", ALIGN)
    status = _job_ended(controller, api, body, status, "sft-align", {"conditions": [failed]}, 64, message)
    assert status["phase"] == "Invalid", status
    assert "spec.dataset.path" in (status_helpers.condition(status, "Invalid") or {}).get("message", "")
    set_pods(api, [])  # pods garbage-collected; resync reconciles again
    body["status"] = status
    status = _run(controller, body)
    assert status["phase"] == "Invalid", status


def test_abridged_results_are_said_in_the_condition_and_kept() -> None:
    """A termination summary that had to shed detail (telemetry.fit_termination_message) shows what it
    left out in the Succeeded condition, with where the full results are; the pods going away keeps it."""
    from lmforge_jobs.telemetry import fit_termination_message

    api = FakeApi()
    controller = Controller(Config(storage="s3://store"))
    controller.api = api  # type: ignore[assignment]
    spec = {"model": {"huggingface": "org/m"}, "benchmarks": [{"task": "x"}], "output": "s3://e/ev"}
    status = _run(controller, _resource("Evaluation", "ev", spec))
    tasks = {f"t{i}": {"acc": 0.5, "acc_stderr": 0.01, "f1": 0.4, "f1_stderr": 0.02} for i in range(100)}
    message = fit_termination_message({"state": "Succeeded", "results": {"benchmarks": tasks}})
    complete = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    body = _resource("Evaluation", "ev", spec)
    status = _job_ended(controller, api, body, status, "ev-evaluate", complete, 0, message)
    assert status["phase"] == "Succeeded", status
    assert status["results"]["benchmarks"]["t7"] == {"acc": 0.5, "f1": 0.4}
    said = (status_helpers.condition(status, "Succeeded") or {})["message"]
    assert "results.benchmarks.*_stderr" in said and "s3://e/ev/results.json" in said
    assert status["progress"]["percent"] == 100.0 and status["progress"]["etaSeconds"] == 0
    set_pods(api, [])
    body["status"] = status
    again = _run(controller, body)
    assert (status_helpers.condition(again, "Succeeded") or {})["message"] == said
    assert again == status  # nothing to write once it has succeeded


def test_spec_changed_names_the_fields() -> None:
    before = {"model": {"layers": 2, "hidden": 64}, "budget": {"steps": 10}}
    after = {"model": {"layers": 4, "hidden": 64}, "budget": {"steps": 10}, "queue": "a"}
    assert changed_fields(before, after) == ["spec.model.layers", "spec.queue"]
    assert changed_fields(before, before) == []


def test_paths() -> None:
    assert path_for("Job", "ns", "j", "status") == "/apis/batch/v1/namespaces/ns/jobs/j/status"
    assert path_for("ConfigMap", "ns") == "/api/v1/namespaces/ns/configmaps"
    assert path_for("Corpus", "ns", "web") == "/apis/lmforge.io/v1alpha1/namespaces/ns/corpora/web"


def _operator_modules() -> set[str]:
    """Every lmforge module the controller package and the kopf handlers import, at the top or inside a
    function."""
    import ast

    package = ROOT / "operator" / "lmforge_operator"
    modules = {"lmforge_operator.handlers"}
    for path in [*sorted((package / "controller").glob("*.py")), package / "handlers.py"]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmforge"):
                modules.add(node.module)
            elif isinstance(node, ast.Import):
                modules.update(a.name for a in node.names if a.name.startswith("lmforge"))
    return modules


# What a fresh interpreter imports, in one process for the tests below: the CLI alone first; then every
# module of the controller and the handlers; then, in a fresh kopf registry, the package as
# `kopf run -m lmforge_operator` imports it.
IMPORTS = """
import importlib, json, sys
out = {}
import lmforge_operator.cli
out["light"] = ["kopf" in sys.modules, "lmforge_operator.handlers" in sys.modules]
for module in MODULES:
    importlib.import_module(module)
out["local"] = "lmforge_operator.local" in sys.modules
import kopf
kopf.set_default_registry(kopf.OperatorRegistry())
del sys.modules["lmforge_operator"], sys.modules["lmforge_operator.handlers"]
sys.argv = ["kopf", "run", "-m", "lmforge_operator"]
import lmforge_operator
r = kopf.get_default_registry()
out["registry"] = {
    "changing": len(r._changing.get_all_handlers()),
    "spawning": len(r._spawning.get_all_handlers()),
    "activities": len(r._activities.get_all_handlers()),
    "watching": sorted(h.id for h in r._watching.get_all_handlers()),
}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def fresh_imports() -> dict[str, Any]:
    code = IMPORTS.replace("MODULES", repr(sorted(_operator_modules())))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_the_operator_does_not_import_the_local_runner(fresh_imports: dict[str, Any]) -> None:
    """Every module the controller package and the kopf handlers import, at the top or inside a function,
    loads without lmforge_operator.local (the laptop runner)."""
    modules = _operator_modules()
    assert "lmforge_operator.controller.mirror" in modules and "lmforge_jobs.data.stages" in modules
    assert fresh_imports["local"] is False


# ---------------------------------------------------------------------------------------------- the CLI
def test_operator_command_flags() -> None:
    from lmforge_operator.cli import build_parser, main

    args = build_parser().parse_args(
        ["operator", "-n", "a", "-n", "b", "--metrics-port", "9", "--liveness-port", "-1"]
    )
    assert args.namespace == ["a", "b"] and args.metrics_port == 9 and args.liveness_port == -1
    assert build_parser().parse_args(["operator"]).metrics_port == 8080
    assert main(["operator", "--namespace", "a", "--all-namespaces"]) == 2


def test_importing_the_package_stays_light_and_kopf_run_registers_handlers(
    fresh_imports: dict[str, Any],
) -> None:
    assert fresh_imports["light"] == [False, False]
    # As `kopf run -m lmforge_operator` imports it: handlers registered in kopf's default registry, and no
    # changing handlers, timers or daemons: nothing that would need a finalizer.
    registry = fresh_imports["registry"]
    ids = registry["watching"]
    assert "observe-jobs" in ids and "observe-pretrainruns" in ids and registry["activities"] >= 3
    assert (registry["changing"], registry["spawning"]) == (0, 0)


@pytest.mark.parametrize(
    ("kind", "spec", "status", "resync"),
    [
        ("PretrainRun", {}, {"phase": "Running"}, True),
        ("PretrainRun", {}, {"phase": "Succeeded"}, False),
        ("PretrainRun", {}, {"phase": "Failed"}, False),
        ("PretrainRun", {}, {"phase": "Succeeded", "observedGeneration": 0}, True),  # not seen at this gen
        ("PretrainRun", {}, {"phase": "Invalid", "reason": status_helpers.SPEC_INVALID}, False),
        ("PretrainRun", {}, {"phase": "Invalid", "reason": status_helpers.CONFIG_ERROR}, False),
        ("PretrainRun", {}, {"phase": "Invalid", "reason": status_helpers.SPEC_CHANGED}, False),
        (
            "PretrainRun",
            {},
            {"phase": "Invalid", "reason": status_helpers.DEPENDENCY_CYCLE},
            True,
        ),  # others' specs
        (
            "PretrainRun",
            {},
            {"phase": "Invalid", "reason": status_helpers.DOES_NOT_FIT},
            True,
        ),  # a Corpus's vocab
        ("Evaluation", {"checkpoints": "every"}, {"phase": "Succeeded"}, True),
    ],
)
def test_resync_skips_what_only_an_event_can_change(
    kind: str, spec: dict[str, Any], status: dict[str, Any], resync: bool
) -> None:
    status = {"observedGeneration": 1, **status}
    reason = status.pop("reason", None)
    if reason:
        status["conditions"] = [{"type": "Invalid", "status": "True", "reason": reason, "message": "m"}]
    body = _resource(kind, "r", spec, **status)
    assert Controller.needs_resync((kind, "ns", "r"), body) is resync
