"""Pod templates and gang scheduling: ``spec.template`` and the operator's defaults merged into the rendered
Jobs (strategic merge by name, the resource winning over the defaults), refusals naming the field, PodGroups
rendered and owned, and the operator end to end against kmock. Every rendered Job is checked against the
Kubernetes OpenAPI schema and models (tests/k8s_validate.py)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from k8s_validate import problems, restricted_problems
from kmock_harness import Cluster, Operator
from manifests import BUILT_CORPUS, BUILT_PRETRAIN, resource
from repo import ROOT

from lmforge_jobs.data.stages import stages
from lmforge_jobs.manifest import parse_resource
from lmforge_operator import builders, podtemplate, rbac
from lmforge_operator.builders import BuildError
from lmforge_operator.controller.config import Config

UID = "6f1c1d6e-0000-4000-8000-000000000002"
IMAGE = "registry.example/lmforge-jobs:1.2.3"

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# ------------------------------------------------------------------------------------------------ helpers
def pretrain(**spec: Any) -> dict[str, Any]:
    return resource("PretrainRun", "gpt", {**copy.deepcopy(BUILT_PRETRAIN), **spec})


def corpus(**spec: Any) -> dict[str, Any]:
    return resource("Corpus", "web", {**copy.deepcopy(BUILT_CORPUS), **spec})


def parsed(doc: dict[str, Any]) -> Any:
    res, found = parse_resource(doc)
    assert not found, found
    return res


def owner(res: Any) -> dict[str, Any]:
    return builders.owner_reference(
        {"apiVersion": res.api_version, "kind": res.kind, "metadata": {"name": res.name, "uid": UID}}
    )


def render(doc: dict[str, Any], **kw: Any) -> list[dict[str, Any]]:
    res = parsed(doc)
    stage = stages(res.spec)[0] if res.kind == "Corpus" else None
    resolved = res.model_dump(by_alias=True, exclude_none=True, mode="json")
    return builders.children(res, resolved, owner(res), image=IMAGE, stage=stage, **kw)


def job_of(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (job,) = [o for o in objs if o["kind"] == "Job"]
    assert problems(job) == [], problems(job)
    return job


def pod(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]


def main(job: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod(job)["containers"] if c["name"] == "main")


def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {i["name"]: i for i in items}


# --------------------------------------------------------------------------------- a table of templates
def _check_placement(job: dict[str, Any]) -> None:
    spec = pod(job)
    assert spec["nodeSelector"] == {"node.kubernetes.io/instance-type": "p5.48xlarge"}
    # lmforge's GPU toleration stays, the template's is appended
    assert [t["key"] for t in spec["tolerations"]] == ["nvidia.com/gpu", "pool"]
    assert spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert spec["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    assert spec["priorityClassName"] == "training-high"
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["serviceAccountName"] == "trainer"
    assert spec["automountServiceAccountToken"] is False
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels["team"] == "llm" and labels["lmforge.io/name"] == "gpt"


def _check_merge_by_name(job: dict[str, Any]) -> None:
    spec, container = pod(job), main(job)
    volumes = by_name(spec["volumes"])
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}  # merged, not replaced
    assert volumes["datasets"]["persistentVolumeClaim"]["claimName"] == "datasets"
    assert volumes["spec"]["configMap"]["name"] == "gpt-pretrain-spec"
    env = by_name(container["env"])
    assert env["NCCL_DEBUG"] == {"name": "NCCL_DEBUG", "value": "INFO"}
    assert env["HOME"]["value"] == "/scratch"  # replaced by name, once
    assert [e["name"] for e in container["env"]].count("HOME") == 1
    assert env["LMFORGE_KIND"]["value"] == "PretrainRun"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/datasets"]["name"] == "datasets" and mounts["/etc/lmforge"]["name"] == "spec"
    assert container["envFrom"] == [{"configMapRef": {"name": "nccl-settings"}}]
    assert container["command"] == ["python"] and "--rdzv-backend=c10d" in container["args"]


def _check_devices(job: dict[str, Any]) -> None:
    resources = main(job)["resources"]
    assert resources["limits"] == {"nvidia.com/gpu": "4", "rdma/ib": "1", "vpc.amazonaws.com/efa": "32"}
    assert resources["requests"]["nvidia.com/gpu"] == "4"
    assert resources["requests"]["vpc.amazonaws.com/efa"] == "32"


def _check_sidecar(job: dict[str, Any]) -> None:
    assert [c["name"] for c in pod(job)["containers"]] == ["main"]
    # a native sidecar: started before the job's container, stopped once it exits, so the Job completes
    (sidecar,) = pod(job)["initContainers"]
    assert sidecar["name"] == "tcpx-daemon" and sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == "us-docker.pkg.dev/gce-ai-infra/gpudirect-tcpx/tcpgpudmarxd:v2.0.9"
    # the sidecar starts from lmforge's restricted security context
    assert sidecar["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert sidecar["securityContext"]["allowPrivilegeEscalation"] is False


TEMPLATES: dict[str, tuple[dict[str, Any], Any]] = {
    "placement": (
        {
            "metadata": {"labels": {"team": "llm"}},
            "spec": {
                "nodeSelector": {"node.kubernetes.io/instance-type": "p5.48xlarge"},
                "tolerations": [{"key": "pool", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}],
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [
                                {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}
                            ]
                        }
                    }
                },
                "topologySpreadConstraints": [
                    {
                        "maxSkew": 1,
                        "topologyKey": "topology.kubernetes.io/zone",
                        "whenUnsatisfiable": "ScheduleAnyway",
                        "labelSelector": {"matchLabels": {"lmforge.io/name": "gpt"}},
                    }
                ],
                "priorityClassName": "training-high",
                "runtimeClassName": "nvidia",
                "imagePullSecrets": [{"name": "regcred"}],
                "serviceAccountName": "trainer",
            },
        },
        _check_placement,
    ),
    "merge-by-name": (
        {
            "spec": {
                "volumes": [
                    {
                        "name": "datasets",
                        "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True},
                    },
                    {"name": "dshm", "emptyDir": {"sizeLimit": "64Gi"}},
                ],
                "containers": [
                    {
                        "name": "main",
                        "env": [
                            {"name": "NCCL_DEBUG", "value": "INFO"},
                            {"name": "HOME", "value": "/scratch"},
                        ],
                        "envFrom": [{"configMapRef": {"name": "nccl-settings"}}],
                        "volumeMounts": [{"name": "datasets", "mountPath": "/datasets", "readOnly": True}],
                    }
                ],
            }
        },
        _check_merge_by_name,
    ),
    "devices": (
        {
            "spec": {
                "containers": [
                    {
                        "name": "main",
                        "resources": {
                            "limits": {"rdma/ib": "1", "vpc.amazonaws.com/efa": 32},
                            "requests": {"vpc.amazonaws.com/efa": "32"},
                        },
                    }
                ]
            }
        },
        _check_devices,
    ),
    "sidecar": (
        {
            "spec": {
                "containers": [
                    {
                        "name": "tcpx-daemon",
                        "image": "us-docker.pkg.dev/gce-ai-infra/gpudirect-tcpx/tcpgpudmarxd:v2.0.9",
                        "args": ["--gpu_nic_preset", "a3vm"],
                    }
                ]
            }
        },
        _check_sidecar,
    ),
}


@pytest.mark.parametrize("case", list(TEMPLATES))
def test_templates_render_valid_restricted_jobs(case: str) -> None:
    template, check = TEMPLATES[case]
    job = job_of(render(pretrain(template=template)))
    check(job)
    assert restricted_problems(pod(job)) == []
    # the rest of the Job is lmforge's
    assert job["spec"]["podFailurePolicy"]["rules"][0]["onPodConditions"][0]["type"] == "DisruptionTarget"
    assert pod(job)["subdomain"] == "gpt-pretrain"


def test_no_template_renders_the_same_job_as_before() -> None:
    plain = job_of(render(pretrain()))
    empty = job_of(render(pretrain(template={})))
    assert plain == empty
    assert "template" not in parsed(pretrain()).spec.to_yaml_dict()  # the spec digest does not change


def test_corpus_template_reaches_every_stage_job() -> None:
    template = {"spec": {"nodeSelector": {"pool": "cpu"}, "priorityClassName": "batch-low"}}
    res = parsed(corpus(template=template))
    resolved = res.model_dump(by_alias=True, exclude_none=True, mode="json")
    for stage in stages(res.spec):
        job = builders.build_job(res, owner(res), image=IMAGE, stage=stage, resolved_doc=resolved)
        assert problems(job) == []
        assert pod(job)["nodeSelector"] == {"pool": "cpu"} and pod(job)["priorityClassName"] == "batch-low"


# ---------------------------------------------------------------------------------- operator defaults
DEFAULTS = {
    "metadata": {"labels": {"cost-center": "research"}, "annotations": {"team": "platform"}},
    "spec": {
        "nodeSelector": {"pool": "gpu", "zone": "a"},
        "tolerations": [{"key": "pool", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}],
        "priorityClassName": "training-default",
        "containers": [{"name": "main", "env": [{"name": "NCCL_DEBUG", "value": "WARN"}]}],
    },
}


def test_defaults_apply_under_the_resources_template() -> None:
    template = {
        "spec": {
            "nodeSelector": {"zone": "b"},
            "tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}],
            "priorityClassName": "training-high",
            "containers": [{"name": "main", "env": [{"name": "NCCL_DEBUG", "value": "INFO"}]}],
        }
    }
    job = job_of(render(pretrain(template=template), template_defaults=DEFAULTS))
    spec = pod(job)
    assert spec["nodeSelector"] == {"pool": "gpu", "zone": "b"}  # maps merged, the resource wins
    assert [t["key"] for t in spec["tolerations"]] == ["nvidia.com/gpu", "pool", "spot"]  # appended
    # a toleration both give (or lmforge's own, repeated) is there once
    gpu = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    again = {"spec": {"tolerations": [*DEFAULTS["spec"]["tolerations"], gpu]}}
    job_again = job_of(render(pretrain(template=again), template_defaults=DEFAULTS))
    assert [t["key"] for t in pod(job_again)["tolerations"]] == ["nvidia.com/gpu", "pool"]
    assert spec["priorityClassName"] == "training-high"
    assert by_name(main(job)["env"])["NCCL_DEBUG"]["value"] == "INFO"
    assert job["spec"]["template"]["metadata"]["labels"]["cost-center"] == "research"
    # without a template of its own, the resource gets the defaults alone
    job = job_of(render(pretrain(), template_defaults=DEFAULTS))
    assert pod(job)["priorityClassName"] == "training-default"
    assert by_name(main(job)["env"])["NCCL_DEBUG"]["value"] == "WARN"
    assert podtemplate.fields_set(DEFAULTS) == [
        "metadata.labels",
        "metadata.annotations",
        "nodeSelector",
        "tolerations",
        "priorityClassName",
        "containers",
    ]


def test_config_reads_and_checks_the_charts_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    monkeypatch.setenv("LMFORGE_POD_TEMPLATE_DEFAULTS", json.dumps({"PretrainRun": DEFAULTS, "Corpus": {}}))
    assert Config().template_defaults() == {"PretrainRun": DEFAULTS}
    for raw, field in [
        ({"Pretrain": DEFAULTS}, "podTemplate.defaults.Pretrain"),
        ({"Corpus": {"spec": {"hostPID": True}}}, "podTemplate.defaults.Corpus.spec.hostPID"),
        (
            {"Evaluation": {"spec": {"restartPolicy": "Always"}}},
            "podTemplate.defaults.Evaluation.spec.restartPolicy",
        ),
    ]:
        monkeypatch.setenv("LMFORGE_POD_TEMPLATE_DEFAULTS", json.dumps(raw))
        with pytest.raises(ValueError, match=f"^{field.replace('.', '[.]')}: "):
            Config().template_defaults()
    monkeypatch.setenv("LMFORGE_POD_TEMPLATE_DEFAULTS", json.dumps({"Corpus": {"spec": {"hostPID": True}}}))
    monkeypatch.setenv("LMFORGE_POD_TEMPLATE_ALLOW_PRIVILEGED", "true")
    assert Config().template_defaults()["Corpus"] == {"spec": {"hostPID": True}}


# ------------------------------------------------------------------------------------------- refusals
def _main(**fields: Any) -> dict[str, Any]:
    return {"spec": {"containers": [{"name": "main", **fields}]}}


# template → the field named (under spec.), whether allowPrivileged lifts the refusal
REFUSALS: list[tuple[str, dict[str, Any], str, bool]] = [
    ("hostNetwork", {"spec": {"hostNetwork": True}}, "template.spec.hostNetwork", True),
    ("hostPID", {"spec": {"hostPID": True}}, "template.spec.hostPID", True),
    ("hostIPC", {"spec": {"hostIPC": True}}, "template.spec.hostIPC", False),
    (
        "hostPath",
        {"spec": {"volumes": [{"name": "nvme", "hostPath": {"path": "/mnt/nvme"}}]}},
        "template.spec.volumes[0].hostPath",
        True,
    ),
    (
        "privileged",
        _main(securityContext={"privileged": True}),
        "template.spec.containers[0].securityContext.privileged",
        True,
    ),
    (
        "escalation",
        _main(securityContext={"allowPrivilegeEscalation": True}),
        "template.spec.containers[0].securityContext.allowPrivilegeEscalation",
        True,
    ),
    (
        "capabilities",
        _main(securityContext={"capabilities": {"add": ["IPC_LOCK"]}}),
        "template.spec.containers[0].securityContext.capabilities.add",
        True,
    ),
    (
        "root",
        {"spec": {"securityContext": {"runAsUser": 0}}},
        "template.spec.securityContext.runAsUser",
        True,
    ),
    (
        "seccomp",
        {"spec": {"securityContext": {"seccompProfile": {"type": "Unconfined"}}}},
        "template.spec.securityContext.seccompProfile.type",
        True,
    ),
    (
        "keep-capabilities",
        _main(securityContext={"capabilities": {"drop": []}}),
        "template.spec.containers[0].securityContext.capabilities.drop",
        True,
    ),
    (
        "sidecar-root",
        {
            "spec": {
                "containers": [
                    {"name": "side", "image": "busybox", "securityContext": {"runAsNonRoot": False}}
                ]
            }
        },
        "template.spec.containers[0].securityContext.runAsNonRoot",
        True,
    ),
    ("command", _main(command=["bash", "-c", "sleep inf"]), "template.spec.containers[0].command", False),
    ("image", _main(image="evil/image:1"), "template.spec.containers[0].image", False),
    (
        "ports",
        _main(ports=[{"name": "metrics", "containerPort": 9400}]),
        "template.spec.containers[0].ports",
        False,
    ),
    (
        "sidecar-port",
        {"spec": {"containers": [{"name": "side", "image": "busybox", "ports": [{"containerPort": 29400}]}]}},
        "template.spec.containers[0].ports[0]",
        False,
    ),
    (
        "spec-volume",
        {"spec": {"volumes": [{"name": "spec", "emptyDir": {}}]}},
        "template.spec.volumes[0].name",
        False,
    ),
    (
        "spec-mount",
        _main(volumeMounts=[{"name": "x", "mountPath": "/etc/lmforge/"}]),
        "template.spec.containers[0].volumeMounts[0]",
        False,
    ),
    (
        "own-env",
        _main(env=[{"name": "PET_NODE_RANK", "value": "0"}]),
        "template.spec.containers[0].env[0].name",
        False,
    ),
    (
        "gpus",
        _main(resources={"limits": {"nvidia.com/gpu": "8"}}),
        "template.spec.containers[0].resources.limits[nvidia.com/gpu]",
        False,
    ),
    (
        "own-label",
        {"metadata": {"labels": {"lmforge.io/name": "other"}}},
        'template.metadata.labels["lmforge.io/name"]',
        False,
    ),
]


@pytest.mark.parametrize(("case", "template", "field", "lifted"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_name_the_field(case: str, template: dict[str, Any], field: str, lifted: bool) -> None:
    with pytest.raises(BuildError) as refused:
        render(pretrain(template=template))
    assert refused.value.field == field, (case, refused.value)
    assert str(refused.value).startswith(f"spec.{field}: ")
    if lifted:
        assert "allowPrivileged" in refused.value.message
        job = job_of(render(pretrain(template=copy.deepcopy(template)), allow_privileged=True))
        assert restricted_problems(pod(job)) != []  # allowed, and visibly not restricted any more
    else:
        with pytest.raises(BuildError):
            render(pretrain(template=template), allow_privileged=True)


def test_host_network_keeps_the_rendezvous_resolvable() -> None:
    job = job_of(render(pretrain(template={"spec": {"hostNetwork": True}}), allow_privileged=True))
    assert pod(job)["hostNetwork"] is True
    assert pod(job)["dnsPolicy"] == "ClusterFirstWithHostNet"  # <job>-0.<service> still resolves


def test_the_spec_model_refuses_fields_it_does_not_merge() -> None:
    for template, field in [
        ({"spec": {"restartPolicy": "Always"}}, "spec.template.spec.restartPolicy"),
        ({"spec": {"containers": [{"image": "x"}]}}, "spec.template.spec.containers[0].name"),
        ({"spec": {"tolerations": "all"}}, "spec.template.spec.tolerations"),
    ]:
        _, found = parse_resource(pretrain(template=template))
        assert [p.field for p in found] == [field], found


# --------------------------------------------------------------------------------------- gang scheduling
@pytest.mark.parametrize(
    ("gang", "api", "scheduler"),
    [
        ("volcano", "scheduling.volcano.sh/v1beta1", "volcano"),
        ("coscheduling", "scheduling.x-k8s.io/v1alpha1", "scheduler-plugins-scheduler"),
    ],
)
def test_gang_scheduling_renders_an_owned_pod_group(gang: str, api: str, scheduler: str) -> None:
    template = {"spec": {"priorityClassName": "training-high"}}
    objs = render(pretrain(scheduling={"gang": gang}, template=template))
    kinds = [o["kind"] for o in objs]
    assert kinds == ["ConfigMap", "Service", "NetworkPolicy", "PodGroup", "Job"]  # the group before the Job
    group, job = objs[3], job_of(objs)
    assert group["apiVersion"] == api
    assert group["metadata"]["name"] == job["metadata"]["name"] == "gpt-pretrain"
    assert group["metadata"]["ownerReferences"][0]["uid"] == UID
    assert group["metadata"]["ownerReferences"][0]["controller"] is True
    assert group["spec"]["minMember"] == 2 == job["spec"]["parallelism"]
    assert problems(group, allow_unknown=True) == []
    meta = job["spec"]["template"]["metadata"]
    if gang == "volcano":
        assert meta["annotations"]["scheduling.k8s.io/group-name"] == "gpt-pretrain"
        assert group["spec"]["priorityClassName"] == "training-high"
    else:
        assert meta["labels"]["scheduling.x-k8s.io/pod-group"] == "gpt-pretrain"
    assert pod(job)["schedulerName"] == scheduler
    assert pod(job)["priorityClassName"] == "training-high"
    # a template's schedulerName wins (a scheduler installed under another name)
    objs = render(pretrain(scheduling={"gang": gang}, template={"spec": {"schedulerName": "my-gang"}}))
    assert pod(job_of(objs))["schedulerName"] == "my-gang"


def test_gang_none_and_corpus_members() -> None:
    assert "PodGroup" not in [o["kind"] for o in render(pretrain(scheduling={"gang": "none"}))]
    objs = render(corpus(scheduling={"gang": "volcano"}))
    (group,) = [o for o in objs if o["kind"] == "PodGroup"]
    assert group["spec"]["minMember"] == 3  # the workers that run at once, not the 8 tasks


def test_rbac_allows_pod_groups_of_both_schedulers() -> None:
    for group in ("scheduling.volcano.sh", "scheduling.x-k8s.io"):
        assert rbac.allows(group, "podgroups", "create")
        assert rbac.allows(group, "podgroups", "get")
        assert not rbac.allows(group, "podgroups", "update")


# ------------------------------------------------------------------------------------------ end to end
def test_operator_applies_defaults_and_template_and_says_so(tmp_path: Any) -> None:
    ns = "podtemplate"
    template = {
        "spec": {
            "tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [{"name": "main", "resources": {"limits": {"rdma/ib": "1"}}}],
        }
    }
    bad = {"spec": {"hostNetwork": True}}
    with Cluster() as cluster, Operator(cluster, ns, pod_template_defaults={"PretrainRun": DEFAULTS}):
        cluster.create(pretrain(template=template), ns)
        cluster.create({**pretrain(template=bad), "metadata": {"name": "hostnet"}}, ns)
        job = cluster.wait(lambda: cluster.get("Job", "gpt-pretrain", ns), 30, "Job gpt-pretrain")
        spec = pod(job)
        assert [t["key"] for t in spec["tolerations"]] == ["nvidia.com/gpu", "pool", "spot"]
        assert spec["nodeSelector"] == {"pool": "gpu", "zone": "a"}
        assert main(job)["resources"]["limits"]["rdma/ib"] == "1"
        assert problems(job) == []

        def note() -> Any:
            return [e for e in cluster.list("Event", ns) if e["reason"] == "PodTemplateDefaults"]

        (event,) = cluster.wait(note, 30, "the PodTemplateDefaults Event")
        assert event["type"] == "Normal" and event["involvedObject"]["name"] == "gpt"
        assert "nodeSelector, tolerations" in event["message"] and "gpt-pretrain" in event["message"]

        # a gang scheduler whose CRDs the API server does not serve: Waiting, naming the field
        cluster.refuse(
            "POST", "/podgroups", 404, "NotFound", "the server could not find the requested resource"
        )
        cluster.create({**pretrain(scheduling={"gang": "volcano"}), "metadata": {"name": "gang"}}, ns)
        status = cluster.wait_phase("PretrainRun", "gang", "Waiting", ns)
        waiting = next(c for c in status["conditions"] if c["type"] == "Waiting")
        assert "spec.scheduling.gang" in waiting["message"] and "PodGroup" in waiting["message"], waiting
        assert cluster.get("Job", "gang-pretrain", ns) is None
        # once the scheduler is installed: the PodGroup, owned by the run, then the Job that joins it
        assert cluster.emulator is not None
        cluster.emulator.refusals.clear()
        job = cluster.wait(lambda: cluster.get("Job", "gang-pretrain", ns), 30, "Job gang-pretrain")
        (group,) = [
            g
            for g in cluster.list("PodGroup.scheduling.volcano.sh", ns)
            if g["metadata"]["name"] == "gang-pretrain"
        ]
        assert group["metadata"]["ownerReferences"][0]["name"] == "gang" and group["spec"]["minMember"] == 2
        assert pod(job)["schedulerName"] == "volcano"
        posted = [
            c for c in cluster.calls if c.method == "POST" and c.status < 300 and c.name == "gang-pretrain"
        ]
        # the group before the Job (after the Service and NetworkPolicy of the same name)
        assert [c.path.rsplit("/", 1)[-1] for c in posted] == [
            "services",
            "networkpolicies",
            "podgroups",
            "jobs",
        ]

        status = cluster.wait_phase("PretrainRun", "hostnet", "Invalid", ns)
        invalid = next(c for c in status["conditions"] if c["type"] == "Invalid")
        assert "spec.template.spec.hostNetwork" in invalid["message"], invalid
        assert cluster.get("Job", "hostnet-pretrain", ns) is None
        # every call the operator made (PodGroups included) is one its RBAC rules allow
        for call in cluster.calls:
            parts = call.path.strip("/").split("/")
            if not call.by_operator or "namespaces" not in parts:
                continue
            group = "" if parts[0] == "api" else parts[1]
            rest = parts[parts.index("namespaces") + 2 :]
            verb = rbac.verb_for(call.method, named=len(rest) > 1, watch=call.params.get("watch") == "true")
            resource = f"{rest[0]}/{rest[2]}" if len(rest) > 2 else rest[0]
            assert rbac.allows(group, resource, verb), f"{verb} {group}/{resource}: {call.path}"


# ------------------------------------------------------------------------------------- the docs' recipes
def _recipes() -> dict[str, dict[str, Any]]:
    """The ``spec:`` YAML blocks of docs/cluster.md's pod-template and fast-networking sections."""
    import re

    import yaml

    text = (ROOT / "docs" / "cluster.md").read_text()
    start = text.index("## Pod templates: placement, devices, registries")
    end = text.index("## Gang scheduling, priorities and preemption")
    blocks = re.findall(r"```yaml\n(.*?)```", text[start:end], re.S)
    return {
        f"recipe-{i}": yaml.safe_load(block)["spec"]
        for i, block in enumerate(blocks)
        if block.startswith("spec:")
    }


RECIPES = _recipes()


@pytest.mark.parametrize("name", list(RECIPES))
def test_docs_recipes_render_valid_jobs(name: str) -> None:
    spec = RECIPES[name]
    privileged = "hostNetwork" in yaml_text(spec)
    objs = render(pretrain(**spec), allow_privileged=privileged)
    job = job_of(objs)
    assert pod(job)["subdomain"] == "gpt-pretrain"
    if not privileged:
        assert restricted_problems(pod(job)) == []
        assert "allowPrivileged" not in str(spec)


def test_docs_have_the_recipes() -> None:
    texts = [yaml_text(spec) for spec in RECIPES.values()]
    for needle in ("rdma/", "vpc.amazonaws.com/efa", "FI_PROVIDER", "NCCL_SOCKET_IFNAME", "tcpgpudmarxd"):
        assert any(needle in t for t in texts), needle


def yaml_text(value: Any) -> str:
    import json

    return json.dumps(value)


def test_the_template_is_merged_as_written_and_the_job_accepts_its_configmap(tmp_path: Path) -> None:
    from lmforge_jobs.entry import load_job_resource

    template = {
        "spec": {
            "containers": [
                {
                    "name": "main",
                    "env": [
                        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
                        {"name": "SCRATCH", "value": "pvc://scratch/tmp"},
                    ],
                }
            ]
        }
    }
    cm, *_, job = render(pretrain(template=template))
    env = by_name(main(job)["env"])
    assert env["SCRATCH"]["value"] == "pvc://scratch/tmp"  # not a lmforge URI: left alone
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
    assert not [name for name in env if name.startswith("LMFORGE_SECRET_")]
    assert "scratch" not in str(pod(job)["volumes"])
    manifest = tmp_path / "spec.yaml"
    manifest.write_text(cm["data"]["spec.yaml"])
    loaded = load_job_resource(str(manifest), "PretrainRun")  # what the job does with --manifest
    assert loaded.spec.template.spec.containers[0].name == "main"


def test_superseded_evaluation_rounds_take_their_pod_groups_with_them() -> None:
    import asyncio
    from types import SimpleNamespace

    from lmforge_operator.controller.eval_rounds import KEEP_ROUNDS, prune_rounds

    class Api:
        def __init__(self) -> None:
            self.deleted: list[tuple[str, str]] = []

        async def delete(self, kind: str, ns: str, name: str) -> bool:
            self.deleted.append((kind, name))
            return True

    doc = {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": "Evaluation",
        "metadata": {"name": "ev"},
        "spec": {
            "model": {"pretrainRun": "gpt"},
            "checkpoints": "every",
            "perplexity": {"data": "s3://bucket/heldout"},
            "parallelism": {"nodes": 2, "gpusPerNode": 2},
            "scheduling": {"gang": "coscheduling"},
            "output": "s3://bucket/evals/ev",
        },
    }
    res = parsed(doc)
    ctl = SimpleNamespace(api=Api(), jobs={})
    asyncio.run(prune_rounds(ctl, res, "ml", KEEP_ROUNDS, list(range(KEEP_ROUNDS + 1))))  # type: ignore[arg-type]
    assert ctl.api.deleted == [
        ("Job", "ev-evaluate"),
        ("ConfigMap", "ev-evaluate-spec"),
        ("PodGroup.scheduling.x-k8s.io", "ev-evaluate"),
    ]


def test_chart_passes_the_defaults_to_the_operator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from helm import render_without_crds

    objects = render_without_crds(
        {"podTemplate": {"allowPrivileged": True, "defaults": {"PretrainRun": DEFAULTS}}}
    )
    (deployment,) = [d for d in objects if d["kind"] == "Deployment"]
    container_env = {
        e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    monkeypatch.setenv("LMFORGE_POD_TEMPLATE_DEFAULTS", container_env["LMFORGE_POD_TEMPLATE_DEFAULTS"])
    monkeypatch.setenv(
        "LMFORGE_POD_TEMPLATE_ALLOW_PRIVILEGED", container_env["LMFORGE_POD_TEMPLATE_ALLOW_PRIVILEGED"]
    )
    config = Config()
    assert config.pod_template_allow_privileged is True
    assert config.template_defaults() == {"PretrainRun": DEFAULTS}
    assert json.loads(container_env["LMFORGE_POD_TEMPLATE_DEFAULTS"])["Corpus"] == {}
