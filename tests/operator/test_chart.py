"""The Helm chart (charts/lmforge) rendered by a real helm binary, and the Kueue example.

helm comes from ``$LMFORGE_HELM``, else ``.ci/bin/helm`` (installed by ``bash .ci/get-helm.sh``), else
``helm`` on PATH. Without one the tests skip, except under CI=true, where they fail.

Every rendered object is checked with kubernetes-validate --strict (prometheus-operator kinds against a
strict subset of their v1 schema, below); RBAC against operator/lmforge_operator/rbac.py; pod templates
against the restricted Pod Security Standard; the dashboard's queries against the telemetry name table.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import k8s_validate
import kubernetes_validate
import pytest
import yaml
from crdcheck import generated_crd_files
from helm import CHART, NAMESPACE, RELEASE, render_without_crds, require_helm, run_helm, schema_refusals
from helm import render as helm_render
from helm import template_error as helm_template_error
from repo import ROOT

# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest kubernetes-validate knows.
_MIN_K8S = re.fullmatch(
    r">=(\d+\.\d+\.\d+)-0", yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
)
K8S_VERSIONS = (_MIN_K8S[1], kubernetes_validate.utils.latest_version())
KINDS = ("Corpus", "PretrainRun", "AlignmentRun", "Evaluation")
PLURALS = ("corpora", "pretrainruns", "alignmentruns", "evaluations")

SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "namespaced": {"rbac": {"namespaced": True}, "watchNamespaces": ["team-a", "team-b"]},
    "monitors": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "podMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "networkPolicy": {
            "enabled": True,
            "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
        },
        "dashboard": {"annotations": {"grafana_folder": "LLM"}},
    },
}


# ------------------------------------------------------------------------------------------------ helm
@pytest.fixture(scope="module")
def helm() -> str:
    return require_helm()


def test_missing_helm_fails_under_ci(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LMFORGE_HELM", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"get-helm\.sh"):
        require_helm(tmp_path)
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        require_helm(tmp_path)


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def render(helm: str, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The chart's objects for ``values`` (helm template; the schema check included); a fresh copy."""
    return helm_render(values, helm)


def scenario_objects(helm: str, name: str) -> list[dict[str, Any]]:
    """The chart's objects in a scenario: the default's all, the others' but the CRDs, the same in every
    scenario (the CRD template reads crds.* only, and labels no scenario sets) and checked in the default."""
    return render(helm) if name == "default" else variant(helm, SCENARIOS[name])


def variant(helm: str, values: dict[str, Any]) -> list[dict[str, Any]]:
    """The chart's objects but its CRDs for ``values`` (helm.render_without_crds): for the tests of a
    setting that reads other objects; the CRDs are most of a render's time."""
    return render_without_crds(values, helm)


def template_error(helm: str, values: dict[str, Any]) -> str:
    return helm_template_error(values, helm)


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def chart_meta() -> dict[str, Any]:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())


# ------------------------------------------------------------------------------------------- lint, schema
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_helm_lint_strict(helm: str, scenario: str, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(SCENARIOS[scenario]))
    proc = run_helm(helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE, "--values", str(values))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


BAD_VALUES = [
    ({"replicas": 2}, "replicas"),  # unknown top-level key
    ({"image": {"repo": "x"}}, "repo"),  # unknown nested key
    ({"rbac": {"namespaced": "yes"}}, "namespaced"),  # wrong type
    ({"operator": {"metricsPort": 70000}}, "metricsPort"),  # out of range
    ({"watchNamespaces": ["Team_A"]}, "watchNamespaces"),  # not a namespace name
    ({"image": {"digest": "latest"}}, "digest"),  # not a digest
    ({"serviceMonitor": {"interval": "often"}}, "interval"),  # not a duration
    ({"podLabels": {"team": 1}}, "podLabels"),  # label values are strings
]


@pytest.mark.parametrize(
    ("case", "needle"),
    [(i, needle) for i, (_, needle) in enumerate(BAD_VALUES)],
    ids=[n for _, n in BAD_VALUES],
)
def test_schema_refuses_bad_values(helm: str, case: int, needle: str) -> None:
    """helm's schema check refuses each value, with an error at (or naming) it: one render for all."""
    refusals = schema_refusals([values for values, _ in BAD_VALUES], helm)[case]
    assert refusals, f"helm template accepted {BAD_VALUES[case][0]}"
    assert any(needle in line for line in refusals), refusals


def test_schema_is_strict_everywhere() -> None:
    """Every object the schema declares properties for refuses unknown keys (additionalProperties false)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    loose = []

    def walk(node: dict[str, Any], path: str) -> None:
        if "properties" in node:
            if node.get("additionalProperties") is not False:
                loose.append(path or "(root)")
            for key, child in node["properties"].items():
                walk(child, f"{path}.{key}".lstrip("."))
        if isinstance(node.get("items"), dict):
            walk(node["items"], path + "[]")

    walk(schema, "")
    assert loose == ["operator.extraEnv[]"], loose  # EnvVar items: name required, the rest is Kubernetes'
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.validate(values, schema)


def _schema_keys(node: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    keys = []
    for key, child in node.get("properties", {}).items():
        keys.append((*path, key))
        keys.extend(_schema_keys(child, (*path, key)))
    return keys


def test_every_values_key_has_a_comment() -> None:
    """Each key the chart defines (the schema's properties) is documented by a comment line above it."""
    text = (CHART / "values.yaml").read_text()
    lines = text.splitlines()
    positions: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                positions[(*path, key.value)] = key.start_mark.line
                walk(value, (*path, key.value))

    walk(yaml.compose(text), ())
    schema = json.loads((CHART / "values.schema.json").read_text())
    undocumented = []
    for key in _schema_keys(schema):
        if key == ("global",):
            continue  # Helm's own, not in values.yaml
        assert key in positions, f"{'.'.join(key)} is in values.schema.json but not in values.yaml"
        above = lines[positions[key] - 1].strip() if positions[key] else ""
        if not above.startswith("#"):
            undocumented.append(".".join(key))
    assert undocumented == []
    extra = {k for k in positions if len(k) == 1} - {k[:1] for k in _schema_keys(schema)}
    assert extra == set(), f"values.yaml keys missing from the schema: {extra}"


# ------------------------------------------------------------------------------------ object validation
METADATA_ONLY = {"apiVersion": "v1", "kind": "ConfigMap"}
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
_RELABEL = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "sourceLabels": {
            "type": "array",
            "items": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"},
        },
        "separator": {"type": "string"},
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "modulus": {"type": "integer", "minimum": 0},
        "replacement": {"type": "string"},
        "action": {
            "enum": [
                *("replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod"),
                *("labelmap", "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep"),
                *("lowercase", "Lowercase", "uppercase", "Uppercase", "keepequal", "KeepEqual"),
                *("dropequal", "DropEqual"),
            ]
        },
    },
}
_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "port": {"type": "string"},
        "path": {"type": "string"},
        "interval": _DURATION,
        "scrapeTimeout": _DURATION,
        "honorLabels": {"type": "boolean"},
        "relabelings": {"type": "array", "items": _RELABEL},
        "metricRelabelings": {"type": "array", "items": _RELABEL},
    },
}
_NAMESPACE_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}},
}


def _monitor_schema(kind: str, endpoints: str) -> dict[str, Any]:
    """A strict subset of prometheus-operator's monitoring.coreos.com/v1 schema: the fields the chart uses,
    with their upstream types; anything else is refused. (kubernetes-validate has no CRD schemas.)"""
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": {"type": "object"},
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", endpoints],
                "properties": {
                    "jobLabel": {"type": "string"},
                    "namespaceSelector": _NAMESPACE_SELECTOR,
                    "selector": _LABEL_SELECTOR,
                    endpoints: {"type": "array", "minItems": 1, "items": _ENDPOINT},
                },
            },
        },
    }


MONITOR_SCHEMAS = {
    "ServiceMonitor": _monitor_schema("ServiceMonitor", "endpoints"),
    "PodMonitor": _monitor_schema("PodMonitor", "podMetricsEndpoints"),
}


def object_problems(obj: dict[str, Any]) -> list[str]:
    """kubernetes-validate --strict on every version, the client's models and the API server's rules
    (k8s_validate); a monitor against the strict subset of its schema above, its metadata as a core
    object's."""
    if not obj["apiVersion"].startswith("monitoring.coreos.com/"):
        return k8s_validate.problems(obj, versions=K8S_VERSIONS)
    schema = MONITOR_SCHEMAS[obj["kind"]]
    found = [
        f"{'.'.join(str(p) for p in error.absolute_path)}: {error.message}"
        for error in jsonschema.validators.validator_for(schema)(schema).iter_errors(obj)
    ]
    found += k8s_validate.schema_problems({**METADATA_ONLY, "metadata": obj["metadata"]}, K8S_VERSIONS)
    return found + k8s_validate.problems(obj, versions=K8S_VERSIONS, allow_unknown=True)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rendered_objects_pass_kubernetes_validate_strict(helm: str, scenario: str) -> None:
    objects = scenario_objects(helm, scenario)
    assert objects
    for obj in objects:
        assert object_problems(obj) == [], f"{scenario}: {obj['kind']}/{obj['metadata']['name']}"


def test_validation_is_strict(helm: str) -> None:
    """The validators above do refuse a misspelt field, for core kinds and monitors alike."""
    deployment = one(render(helm), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    assert any("livenesProbe" in p and "(strict)" in p for p in object_problems(deployment))
    monitor = one(scenario_objects(helm, "monitors"), "PodMonitor")
    monitor["spec"]["podMetricsEndpoints"][0]["prot"] = "metrics"
    assert any("prot" in p for p in object_problems(monitor))
    monitor["metadata"]["lables"] = {}
    assert any("lables" in p and "(strict)" in p for p in object_problems(monitor))


def test_every_object_is_labelled_and_namespaced(helm: str) -> None:
    for obj in render(helm) + scenario_objects(helm, "monitors"):
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "lmforge", obj["kind"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["helm.sh/chart"] == f"lmforge-{chart_meta()['version']}"
        cluster_scoped = obj["kind"] in ("CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding")
        assert ("namespace" in obj["metadata"]) != cluster_scoped, obj["kind"]


# ---------------------------------------------------------------------------------------------- CRDs
def test_chart_crds_are_the_generated_ones() -> None:
    """charts/lmforge/files/crds is a verbatim copy of what `lmforge crds` generates (and of crds/)."""
    expected = generated_crd_files()
    copied = {p.name: p.read_text() for p in (CHART / "files" / "crds").glob("*.yaml")}
    stale = sorted(n for n in expected.keys() | copied.keys() if expected.get(n) != copied.get(n))
    assert stale == [], f"stale chart CRDs {stale}: run `lmforge crds --out charts/lmforge/files/crds`"


def test_crds_templated_with_install_and_keep(helm: str) -> None:
    crds = by_kind(render(helm), "CustomResourceDefinition")
    assert sorted(c["spec"]["names"]["kind"] for c in crds) == sorted((*KINDS, "Sweep", "ScalingStudy"))
    for crd in crds:
        source = yaml.load(
            (CHART / "files" / "crds" / f"{crd['metadata']['name']}.yaml").read_text(), _LOADER
        )
        assert crd["spec"] == source["spec"]  # copied as text: every default and number unchanged
        assert crd["metadata"]["annotations"] == {
            "helm.sh/resource-policy": "keep",
            "argocd.argoproj.io/sync-options": "Prune=false,Delete=false",
        }
        assert source["metadata"]["labels"].items() <= crd["metadata"]["labels"].items()
    unkept = by_kind(render(helm, {"crds": {"keep": False}}), "CustomResourceDefinition")
    assert len(unkept) == len(crds) and all("annotations" not in c["metadata"] for c in unkept)
    # crds.install takes out the CRDs and changes nothing else (what variant() relies on)
    others = [o for o in render(helm) if o["kind"] != "CustomResourceDefinition"]
    assert render(helm, {"crds": {"install": False}}) == others
    # The templates are the only CRD source: Helm's crds/ folder is installed once and never upgraded.
    assert not (CHART / "crds").exists()


# ---------------------------------------------------------------------------------------------- RBAC
def _triples(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def _assert_no_wildcards_or_secret_reads(rules: list[dict[str, Any]], where: str) -> None:
    for rule in rules:
        for field in ("apiGroups", "resources", "verbs"):
            assert not any("*" in item for item in rule[field]), f"{where}: wildcard in {field}"
        assert not rule.get("nonResourceURLs"), where
    secret_reads = {
        (g, r, v) for g, r, v in _triples(rules) if r == "secrets" and v in ("get", "list", "watch")
    }
    assert secret_reads == set(), f"{where}: reads Secrets"


def test_cluster_rbac_matches_rbac_py(helm: str) -> None:
    from lmforge_operator import rbac

    objects = render(helm)
    deployment = one(objects, "Deployment")
    sa_name = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    assert one(objects, "ServiceAccount")["metadata"]["name"] == sa_name
    binding = one(objects, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa_name, "namespace": NAMESPACE}]
    role = next(
        r for r in by_kind(objects, "ClusterRole") if r["metadata"]["name"] == binding["roleRef"]["name"]
    )
    assert _triples(role["rules"]) == _triples(rbac.RULES)
    # the only Role: the leader-election Lease's, in the release namespace
    assert [r["metadata"]["name"] for r in by_kind(objects, "Role")] == [f"{RELEASE}-leader"]
    assert [b["metadata"]["name"] for b in by_kind(objects, "RoleBinding")] == [f"{RELEASE}-leader"]
    for obj in by_kind(objects, "ClusterRole"):
        _assert_no_wildcards_or_secret_reads(obj["rules"], obj["metadata"]["name"])
    # Every call rbac.allows() permits cluster-wide is granted by the rendered ClusterRole.
    for group, resource, verb in _triples(rbac.RULES):
        assert rbac.allows(group, resource, verb, namespaced=False)


def test_user_roles_aggregate_into_admin_edit_view(helm: str) -> None:
    roles = {r["metadata"]["name"]: r for r in by_kind(render(helm), "ClusterRole")}
    edit, view = roles[f"{RELEASE}-edit"], roles[f"{RELEASE}-view"]
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert {("lmforge.io", p, "create") for p in PLURALS} <= _triples(edit["rules"])
    assert {v for _, _, v in _triples(view["rules"])} == {"get", "list", "watch"}
    off = by_kind(variant(helm, {"rbac": {"aggregateToDefaultRoles": False}}), "ClusterRole")
    assert [r["metadata"]["name"] for r in off] == [RELEASE]


def test_namespaced_rbac_renders_only_roles(helm: str) -> None:
    from lmforge_operator import rbac

    objects = scenario_objects(helm, "namespaced")
    assert by_kind(objects, "ClusterRole") == [] and by_kind(objects, "ClusterRoleBinding") == []
    leader = f"{RELEASE}-leader"
    roles = [r for r in by_kind(objects, "Role") if r["metadata"]["name"] != leader]
    bindings = [b for b in by_kind(objects, "RoleBinding") if b["metadata"]["name"] != leader]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for role in roles:
        assert _triples(role["rules"]) == _triples(rbac.RULES)
        _assert_no_wildcards_or_secret_reads(role["rules"], role["metadata"]["namespace"])
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"][0]["namespace"] == NAMESPACE
    args = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args
    # No namespaces given: the release namespace only.
    alone = variant(helm, {"rbac": {"namespaced": True}})
    assert [
        r["metadata"]["namespace"] for r in by_kind(alone, "Role") if r["metadata"]["name"] != leader
    ] == [NAMESPACE]
    assert by_kind(variant(helm, {"rbac": {"create": False}}), "ClusterRole") == []


# ----------------------------------------------------------------------------------------- operator pod
def _operator_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def test_deployment_contract(helm: str) -> None:
    version = chart_meta()["appVersion"]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(rf'^version = "{re.escape(version)}"$', pyproject, re.M), "appVersion != project.version"
    objects = render(helm)
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    container = _operator_container(objects)
    assert container["image"] == f"ghcr.io/lmforge/lmforge-operator:{version}"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LMFORGE_JOBS_IMAGE"] == f"ghcr.io/lmforge/lmforge-jobs:{version}"
    assert container["args"][:1] == ["--all-namespaces"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    probe = container["livenessProbe"]["httpGet"]
    assert probe == {"path": "/healthz", "port": "health"}
    assert "--metrics-port=8080" in container["args"] and "--liveness-port=8081" in container["args"]
    service = one(objects, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()

    pinned = variant(helm, {"image": {"digest": "sha256:" + "a" * 64}, "jobs": {"image": {"tag": "dev"}}})
    container = _operator_container(pinned)
    assert container["image"] == "ghcr.io/lmforge/lmforge-operator@sha256:" + "a" * 64
    assert {e["name"]: e.get("value") for e in container["env"]}["LMFORGE_JOBS_IMAGE"].endswith(":dev")


def test_operator_args_are_accepted_by_the_cli(helm: str) -> None:
    """The chart's args parse as `lmforge operator ...` (the image's entrypoint) in both RBAC modes."""
    from lmforge_operator.cli import build_parser

    parser = build_parser()
    for scenario, expected in (("default", "--all-namespaces"), ("namespaced", "--namespace=team-a")):
        argv = _operator_container(scenario_objects(helm, scenario))["args"]
        assert expected in argv
        try:
            parsed = vars(parser.parse_args(["operator", *argv]))
        except SystemExit:
            pytest.fail(f"`lmforge operator` refuses the chart's args {argv}")
        flat = json.dumps(parsed, default=str)
        assert "8080" in flat and "8081" in flat, parsed
        if scenario == "namespaced":
            assert "team-a" in flat and "team-b" in flat, parsed


# Restricted Pod Security Standard (https://kubernetes.io/docs/concepts/security/pod-security-standards/).
_ALLOWED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}  # fmt: skip


def restricted_violations(pod: dict[str, Any], *, read_only_root: bool = True) -> list[str]:
    """What in a pod spec breaks the restricted Pod Security Standard (plus, with ``read_only_root``, a
    writable root filesystem: the operator's pod has none; job pods write caches and need one)."""
    bad: list[str] = []
    psc = pod.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            bad.append(field)
    if psc.get("sysctls"):
        bad.append("sysctls")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= _ALLOWED_VOLUMES:
            bad.append(f"volume {volume['name']}: {kinds}")
    containers = pod.get("initContainers", []) + pod.get("containers", [])
    for c in containers:
        sc = c.get("securityContext", {})
        name = c["name"]
        if sc.get("privileged"):
            bad.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation must be false")
        if not sc.get("runAsNonRoot", psc.get("runAsNonRoot")):
            bad.append(f"{name}: runAsNonRoot must be true")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            bad.append(f"{name}: runAsUser 0")
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{name}: seccompProfile {seccomp}")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            bad.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            bad.append(f"{name}: adds capabilities {caps['add']}")
        if sc.get("procMount", "Default") != "Default":
            bad.append(f"{name}: procMount")
        if read_only_root and sc.get("readOnlyRootFilesystem") is not True:
            bad.append(f"{name}: readOnlyRootFilesystem must be true")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            bad.append(f"{name}: hostPort")
    return bad


_WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_pod_templates_meet_restricted_pss(helm: str, scenario: str) -> None:
    objects = scenario_objects(helm, scenario)
    pods = [o["spec"]["template"]["spec"] for o in objects if o["kind"] in _WORKLOADS]
    pods += [o["spec"]["jobTemplate"]["spec"]["template"]["spec"] for o in objects if o["kind"] == "CronJob"]
    pods += [o["spec"] for o in objects if o["kind"] == "Pod"]
    assert pods
    for pod in pods:
        assert restricted_violations(pod) == []
        assert k8s_validate.restricted_problems(pod) == []  # the operator tests' own reading of the standard
        assert pod["securityContext"]["runAsUser"] == 10001  # the Dockerfile's USER
        mounts = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts  # the only writable path under a read-only root


def test_pss_check_catches_a_weakened_pod(helm: str) -> None:
    weakened = variant(
        helm,
        {
            "securityContext": {
                "allowPrivilegeEscalation": True,
                "runAsNonRoot": False,
                "readOnlyRootFilesystem": False,
                "capabilities": {"drop": [], "add": ["SYS_ADMIN"]},
            },
            "podSecurityContext": {"runAsNonRoot": False, "runAsUser": 0},
        },
    )
    pod = one(weakened, "Deployment")["spec"]["template"]["spec"]
    problems = " ".join(restricted_violations(pod))
    for needle in (
        "allowPrivilegeEscalation",
        "runAsNonRoot",
        "drop ALL",
        "SYS_ADMIN",
        "readOnlyRootFilesystem",
    ):
        assert needle in problems


# ---------------------------------------------------------------------------------- monitors, network
def test_monitors_off_by_default(helm: str) -> None:
    kinds = {o["kind"] for o in render(helm)}
    assert not kinds & {"ServiceMonitor", "PodMonitor", "NetworkPolicy"}


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if not selector["matchLabels"].items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        value = labels.get(expr["key"])
        ok = {
            "In": value in expr.get("values", []),
            "NotIn": value not in expr.get("values", []),
            "Exists": value is not None,
            "DoesNotExist": value is None,
        }[expr["operator"]]
        if not ok:
            return False
    return True


def _job_pod_labels(component: str, kind: str) -> dict[str, str]:
    """The labels the operator puts on every child (see the operator contract)."""
    return {
        "app.kubernetes.io/name": "lmforge",
        "app.kubernetes.io/part-of": "lmforge",
        "app.kubernetes.io/managed-by": "lmforge-operator",
        "app.kubernetes.io/component": component,
        "lmforge.io/kind": kind,
        "lmforge.io/name": "run",
    }


def relabel(rules: list[dict[str, Any]], pod_labels: dict[str, str]) -> dict[str, str] | None:
    """Prometheus relabeling of a pod target (the subset of actions the chart uses); None = dropped."""
    labels = {
        "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k): v for k, v in pod_labels.items()
    }
    for rule in rules:
        value = rule.get("separator", ";").join(labels.get(s, "") for s in rule.get("sourceLabels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace").lower()
        if action == "keep" and not match:
            return None
        if action == "drop" and match:
            return None
        if action == "replace" and match:
            labels[rule["targetLabel"]] = match.expand(rule.get("replacement", "$1").replace("$", "\\"))
    # a label whose value is empty does not exist for Prometheus (a replace of an absent source sets "")
    return {k: v for k, v in labels.items() if not k.startswith("__") and v != ""}


def test_monitors_select_the_operator_and_the_job_pods(helm: str) -> None:
    objects = scenario_objects(helm, "monitors")
    service_monitor, pod_monitor = one(objects, "ServiceMonitor"), one(objects, "PodMonitor")
    for monitor in (service_monitor, pod_monitor):
        assert monitor["metadata"]["labels"]["release"] == "prometheus"
    service = one(objects, "Service")
    assert _selects(service_monitor["spec"]["selector"], service["metadata"]["labels"])
    assert service_monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}

    spec = pod_monitor["spec"]
    assert spec["namespaceSelector"] == {"any": True}
    assert spec["podMetricsEndpoints"][0]["port"] == "metrics"
    for component, kind in zip(("corpus", "pretrain", "align", "evaluate"), KINDS, strict=True):
        assert _selects(spec["selector"], _job_pod_labels(component, kind))
    operator_pod = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not _selects(spec["selector"], operator_pod)  # its metrics come through the ServiceMonitor
    relabelings = spec["podMetricsEndpoints"][0]["relabelings"]
    # What Prometheus makes of each job pod: which are scraped, and the labels their series get.
    for component, kind, index, scraped in (
        ("corpus", "Corpus", "0", True),
        ("corpus", "Corpus", "3", False),  # data ranks > 0 serve no metrics
        ("align", "AlignmentRun", "1", False),
        ("pretrain", "PretrainRun", "0", True),
        ("pretrain", "PretrainRun", "3", True),  # every node reports its GPUs
        ("evaluate", "Evaluation", None, True),  # not an indexed Job
    ):
        pod = {**_job_pod_labels(component, kind), "lmforge.io/stage": "dedup"}
        if index is not None:
            pod["batch.kubernetes.io/job-completion-index"] = index
        target = relabel(relabelings, pod)
        assert (target is not None) == scraped, (component, index)
        if target is not None:
            assert target["lmforge_kind"] == kind and target["lmforge_name"] == "run"
            assert target["lmforge_stage"] == "dedup"  # the dashboard groups by these three
            assert "lmforge_sweep" not in target and "lmforge_study" not in target
    # a Sweep's trial and a ScalingStudy's point: the experiment's name becomes a label of the series
    for parent, label in (
        ("lmforge.io/sweep", "lmforge_sweep"),
        ("lmforge.io/scaling-study", "lmforge_study"),
    ):
        pod = {**_job_pod_labels("pretrain", "PretrainRun"), parent: "lr"}
        target = relabel(relabelings, pod)
        assert target is not None and target[label] == "lr" and target["lmforge_name"] == "run"

    scoped = one(variant(helm, {**SCENARIOS["namespaced"], "podMonitor": {"enabled": True}}), "PodMonitor")
    assert scoped["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def test_job_pods_built_by_the_operator_are_selected(helm: str) -> None:
    """A real Job from the operator's builders: the PodMonitor selects its pods and its port 'metrics'."""
    from lmforge_jobs.manifest import load_resources
    from lmforge_operator import builders

    # the top folder only: topology/ holds a second run, on its own queue
    resources, problems = load_resources(sorted((ROOT / "examples" / "kueue").glob("*.yaml")))
    assert problems == []
    run = next(r for r in resources if r.kind == "PretrainRun")
    body = {
        "apiVersion": "lmforge.io/v1alpha1",
        "kind": run.kind,
        "metadata": {"name": run.metadata.name, "namespace": "team-a", "uid": "0000", "generation": 1},
    }
    job = builders.build_job(run, builders.owner_reference(body), image="lmforge-jobs:test")
    template = job["spec"]["template"]
    selector = one(scenario_objects(helm, "monitors"), "PodMonitor")["spec"]["selector"]
    assert _selects(selector, template["metadata"]["labels"])
    ports = {
        p.get("name"): p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])
    }
    assert ports.get("metrics") == 9400
    assert restricted_violations(template["spec"], read_only_root=False) == []
    # Kueue admits the Job through its queue-name label (and starts it suspended until admitted).
    assert job["metadata"]["labels"].get("kueue.x-k8s.io/queue-name") == run.spec.queue


def test_network_policy(helm: str) -> None:
    objects = scenario_objects(helm, "monitors")
    policy = one(objects, "NetworkPolicy")
    deployment = one(objects, "Deployment")
    assert policy["spec"]["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    named_ports = {p["name"] for p in _operator_container(objects)["ports"]}
    ingress_ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert ingress_ports == named_ports == {"metrics", "health"}
    metrics_rule = next(r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "metrics")
    assert metrics_rule["from"] == SCENARIOS["monitors"]["networkPolicy"]["metricsFrom"]
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule.get("ports", [])}
    assert {53, 443, 6443, 9400} <= egress_ports


# ---------------------------------------------------------------------------------------------- dashboard
REQUIRED_PANELS = {
    "Tokens/s": {"lmforge_train_tokens_per_second"},
    "MFU": {"lmforge_train_mfu_ratio"},
    "GPU utilisation": {"lmforge_gpu_utilization_ratio"},
    "Loss": {"lmforge_train_loss"},
    "Eval loss": {"lmforge_eval_loss"},
    "ETA per run": {"lmforge_train_eta_seconds", "lmforge_data_eta_seconds"},
    "Documents/s per corpus stage": {"lmforge_data_documents_per_second"},
    "Sweep trials: held-out loss": {"lmforge_eval_loss"},
    "Scaling study points: loss": {"lmforge_train_loss"},
    "Experiments by phase": {"lmforge_operator_resources"},
}
_METRIC_IN_EXPR = re.compile(r"\b(lmforge_[a-z0-9_]+)\{")


@functools.cache
def metric_name_table() -> frozenset[str]:
    """Every series a job or the operator exports: telemetry's names for each kind's status metrics
    (from the CRDs), its progress series, and the operator's own registry."""
    from lmforge_jobs import telemetry
    from lmforge_operator.metrics import OperatorMetrics

    names: set[str] = set()
    for path in (ROOT / "crds").glob("*.yaml"):
        crd = yaml.load(path.read_text(), _LOADER)
        kind = crd["spec"]["names"]["kind"]
        status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
        keys = set(status.get("metrics", {}).get("properties", {})) - {"methodMetrics"}
        keys |= {"mfu", "gpuUtilization", "gpuMemoryBytes"}  # reported by every training job
        names |= {telemetry.metric_name(kind, key) for key in keys}
        names |= set(telemetry.progress_names(kind).values())
    for family in OperatorMetrics().registry.collect():
        names |= {sample.name for sample in family.samples}
    return frozenset(names)


def _dashboard(helm: str) -> tuple[dict[str, Any], dict[str, Any]]:
    configmap = next(
        o for o in by_kind(render(helm), "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")
    )
    return configmap, json.loads(configmap["data"]["lmforge.json"])


def test_dashboard_configmap_and_panels(helm: str) -> None:
    configmap, dashboard = _dashboard(helm)
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard == json.loads((CHART / "files" / "dashboards" / "lmforge.json").read_text())
    panels = {p["title"]: p for p in dashboard["panels"] if p["type"] != "row"}
    known = metric_name_table()
    for title, panel in panels.items():
        assert panel["targets"], title
        for target in panel["targets"]:
            used = set(_METRIC_IN_EXPR.findall(target["expr"]))
            assert used, f"{title}: no lmforge metric in {target['expr']!r}"
            assert used <= known, f"{title}: unknown series {used - known}"
    for title, metrics in REQUIRED_PANELS.items():
        assert title in panels, title
        used = {m for t in panels[title]["targets"] for m in _METRIC_IN_EXPR.findall(t["expr"])}
        assert metrics <= used, title
    stage_panel = panels["Documents/s per corpus stage"]["targets"][0]["expr"]
    assert "lmforge_stage" in stage_panel
    assert 'lmforge_sweep!=""' in panels["Sweep trials: held-out loss"]["targets"][0]["expr"]
    assert 'lmforge_study!=""' in panels["Scaling study points: loss"]["targets"][0]["expr"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert by_kind(variant(helm, {"dashboard": {"enabled": False}}), "ConfigMap") == []


def test_name_table_refuses_unknown_series() -> None:
    known = metric_name_table()
    assert "lmforge_train_tokens_per_second" in known and "lmforge_operator_resources" in known
    assert "lmforge_train_tokens_per_sec" not in known


# ------------------------------------------------------------------------------------------- Kueue
def test_kueue_example_wires_a_run_to_its_queue() -> None:
    from lmforge_jobs.manifest import load_resources

    docs = [
        d
        for path in sorted((ROOT / "examples" / "kueue").glob("*.yaml"))
        for d in yaml.safe_load_all(path.read_text())
        if d
    ]
    kueue = {d["kind"]: d for d in docs if d["apiVersion"].startswith("kueue.x-k8s.io/")}
    assert set(kueue) == {"ResourceFlavor", "ClusterQueue", "LocalQueue"}
    assert all(d["apiVersion"] == "kueue.x-k8s.io/v1beta1" for d in kueue.values())
    cluster_queue, local_queue = kueue["ClusterQueue"], kueue["LocalQueue"]
    assert local_queue["spec"]["clusterQueue"] == cluster_queue["metadata"]["name"]

    # the top folder only: topology/ holds a second run, on its own queue
    resources, problems = load_resources(sorted((ROOT / "examples" / "kueue").glob("*.yaml")))
    assert problems == []
    (run,) = [r for r in resources if r.kind == "PretrainRun"]
    assert run.spec.queue == local_queue["metadata"]["name"]
    run_doc = next(d for d in docs if d["kind"] == "PretrainRun")
    assert run_doc["metadata"].get("namespace") == local_queue["metadata"]["namespace"]

    # The queue admits the run: every resource it asks for is covered, within the nominal quota.
    nodes = run.spec.parallelism.nodes
    asked = {
        "nvidia.com/gpu": nodes * run.spec.resources.gpu,
        "cpu": nodes * _quantity(run.spec.resources.cpu),
        "memory": nodes * _quantity(run.spec.resources.memory),
    }
    (group,) = cluster_queue["spec"]["resourceGroups"]
    assert set(asked) <= set(group["coveredResources"])
    flavors = {
        f["name"]: {r["name"]: _quantity(r["nominalQuota"]) for r in f["resources"]} for f in group["flavors"]
    }
    assert set(flavors) <= {kueue["ResourceFlavor"]["metadata"]["name"]}
    assert any(all(quota.get(k, 0) >= v for k, v in asked.items()) for quota in flavors.values())


_SUFFIX = {
    "m": 1e-3,
    "": 1,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def _quantity(value: Any) -> float:
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match, value
    return float(match[1]) * _SUFFIX[match[2]]


def test_operator_settings_reach_its_config(helm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chart's env variables are the ones the operator's Config reads, with the values given."""
    from lmforge_operator.controller import Config

    values = {
        "operator": {"storage": "s3://bucket/lmforge", "gpu": "a100", "resyncSeconds": 30, "workers": 4}
    }
    env = {e["name"]: e["value"] for e in _operator_container(variant(helm, values))["env"] if "value" in e}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = Config()
    assert (config.storage, config.gpu, config.resync_seconds, config.workers) == (
        "s3://bucket/lmforge",
        "a100",
        30,
        4,
    )
    assert config.image == f"ghcr.io/lmforge/lmforge-jobs:{chart_meta()['appVersion']}"
    assert "gpu" in template_error(helm, {"operator": {"gpu": "tpu"}})


def test_install_notes(helm: str) -> None:
    """`helm install --dry-run=client` (no cluster) renders NOTES.txt for both RBAC modes."""
    proc = run_helm(helm, "install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client")
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "watches all namespaces" in notes and "pvc://lmforge-storage" in notes
    proc = run_helm(
        helm, "install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client",
        "--set", "rbac.namespaced=true", "--set", "crds.install=false", "--set", "watchNamespaces={team-a}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "watches team-a" in notes and "apply the CRDs yourself" in notes


def test_kube_version_is_the_projects_minimum() -> None:
    """Chart.yaml's kubeVersion is the oldest Kubernetes the operator's objects are validated against."""
    assert K8S_VERSIONS[0] == k8s_validate.MIN_VERSION


def test_per_run_network_policies_select_this_operator(helm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator's per-run NetworkPolicies admit the chart's operator pods (by their labels, in the
    release namespace) to the training pods' metrics port; perRun=false turns them off."""
    from lmforge_operator.controller import Config

    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    objects = variant(helm, {"networkPolicy": {"jobMetricsFrom": [peer]}})
    pod = one(objects, "Deployment")["spec"]["template"]
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    for name in ("LMFORGE_NETWORK_POLICY", "LMFORGE_OPERATOR_LABELS", "LMFORGE_JOB_METRICS_FROM"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.setenv("POD_NAMESPACE", NAMESPACE)  # the fieldRef the kubelet resolves
    isolation = Config().isolation()
    assert isolation is not None
    operator = isolation.operator_peer()
    assert operator["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}}
    assert operator["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert operator["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
    assert list(isolation.metrics_from) == [peer]

    off = one(variant(helm, {"networkPolicy": {"perRun": False}}), "Deployment")
    env = {e["name"]: e.get("value") for e in off["spec"]["template"]["spec"]["containers"][0]["env"]}
    monkeypatch.setenv("LMFORGE_NETWORK_POLICY", env["LMFORGE_NETWORK_POLICY"])
    assert Config().isolation() is None


def test_replicas_elect_a_leader_over_a_lease_in_the_release_namespace(helm: str) -> None:
    from lmforge_operator import rbac

    for name in ("default", "namespaced"):
        objects = scenario_objects(helm, name)
        (role,) = [r for r in by_kind(objects, "Role") if r["metadata"]["name"] == f"{RELEASE}-leader"]
        assert role["metadata"]["namespace"] == NAMESPACE
        assert _triples(role["rules"]) == _triples(rbac.LEADER_RULES)
        _assert_no_wildcards_or_secret_reads(role["rules"], "leader")
        (binding,) = [
            b for b in by_kind(objects, "RoleBinding") if b["metadata"]["name"] == f"{RELEASE}-leader"
        ]
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": role["metadata"]["name"],
        }
        sa = one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
        env = {e["name"]: e for e in _operator_container(objects)["env"]}
        # the operator's Config: the Lease <fullname> in POD_NAMESPACE, held under POD_NAME
        assert env["LMFORGE_LEASE_NAME"]["value"] == RELEASE
        assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    two = one(variant(helm, {"replicaCount": 2, "operator": {"leaseSeconds": 10}}), "Deployment")
    assert two["spec"]["replicas"] == 2
    assert two["spec"]["strategy"]["type"] == "RollingUpdate"
    env = {e["name"]: e.get("value") for e in two["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LMFORGE_LEASE_SECONDS"] == "10"
    assert by_kind(variant(helm, {"rbac": {"create": False}}), "Role") == []
