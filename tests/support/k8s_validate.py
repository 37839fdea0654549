"""Validate rendered Kubernetes objects offline, as close to the API server as we can get without one.

Three checks, all offline:

1. **kubernetes-validate --strict** (the JSON schemas of the official OpenAPI spec, with unknown fields
   refused) for every version in :data:`VERSIONS`: the oldest Kubernetes lmforge supports (1.29) and the
   newest the installed kubernetes-validate knows.
2. **The kubernetes client's models** (``kubernetes`` 37 generates pydantic models, ``extra="forbid"``):
   ``V1Job.model_validate(obj)`` catches wrong types and unknown fields the schemas let through.
3. **API server rules the schemas do not carry**: DNS names of objects, labels, containers, ports and
   volumes; every volumeMount naming a volume; env var names; unique ports and volumes.

:func:`restricted_problems` checks a pod spec against the *restricted* Pod Security Standard.

Usage (other tests import it; ``tests/support/`` is on sys.path through conftest)::

    from k8s_validate import assert_valid, problems
    assert_valid(obj)                       # AssertionError listing every problem
    assert problems(obj) == []

Objects of kinds without a built-in schema (CRDs' instances such as a PodMonitor) raise
:class:`UnknownKind` unless ``allow_unknown=True``, which then runs only the generic metadata checks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any

import kubernetes.client as k8s_client
import kubernetes_validate
from kubernetes_validate.utils import SchemaNotFoundError
from pydantic import ValidationError

MIN_VERSION = "1.29.0"


@cache
def latest_version() -> str:
    return kubernetes_validate.latest_version()


VERSIONS: tuple[str, ...] = (MIN_VERSION, "latest")

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
PORT_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")  # IANA_SVC_NAME, ≤ 15 chars, a letter inside
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
C_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Kinds whose name is a DNS-1035 label (must start with a letter) rather than a DNS-1123 subdomain.
DNS_1035_NAMED = {"Service"}
# Kinds whose pod names are derived from their name: Job and pod hostnames are DNS labels.
DNS_LABEL_NAMED = {"Job", "Service", "Namespace", "StatefulSet"}


class UnknownKind(Exception):
    """No schema and no client model for this apiVersion/kind."""


# ------------------------------------------------------------------------------------------- client models
def model_class(api_version: str, kind: str) -> type | None:
    """The kubernetes client's model class for an apiVersion/kind (``batch/v1`` Job → V1Job,
    ``events.k8s.io/v1`` Event → EventsV1Event, ``v1`` Event → CoreV1Event), or None."""
    group, _, version = api_version.rpartition("/")
    v = version[:1].upper() + version[1:]
    group_word = "".join(p.capitalize() for p in re.split(r"[.\-]", group.split(".")[0])) if group else "Core"
    for candidate in (f"{v}{kind}", f"{group_word}{v}{kind}"):
        cls = getattr(k8s_client, candidate, None)
        if isinstance(cls, type) and hasattr(cls, "model_validate"):
            return cls
    return None


def model_problems(obj: Mapping[str, Any]) -> list[str]:
    """Problems the client's pydantic model finds (unknown fields, wrong types)."""
    cls = model_class(str(obj.get("apiVersion", "")), str(obj.get("kind", "")))
    if cls is None:
        raise UnknownKind(f"no kubernetes client model for {obj.get('apiVersion')} {obj.get('kind')}")
    try:
        cls.model_validate(obj)  # type: ignore[attr-defined]
    except ValidationError as exc:
        return [
            f"client model {cls.__name__}: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            for err in exc.errors(include_url=False)
        ]
    return []


# ---------------------------------------------------------------------------------------------- schemas
def schema_problems(obj: Mapping[str, Any], versions: Iterable[str] = VERSIONS) -> list[str]:
    """Problems kubernetes-validate --strict finds, for each Kubernetes version."""
    found: list[str] = []
    for version in versions:
        wanted = latest_version() if version == "latest" else version
        found += _strict_problems(_Same(obj), wanted)
    return found


class _Same:
    """An object as a cache key: equal to another exactly when both print the same (``repr`` tells a
    list from a tuple and 1 from "1", which a validator tells apart too); holds the object itself."""

    def __init__(self, obj: Mapping[str, Any]) -> None:
        self.obj, self.text = obj, repr(obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


@cache
def _strict_problems(same: _Same, version: str) -> list[str]:
    """Validation is a pure function of the object and the version: the chart's and the builders' tests
    validate the same objects (every render carries the CRDs) many times, each check runs once."""
    try:
        kubernetes_validate.validate(dict(same.obj), version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        return [f"kubernetes {exc.version} (strict): {path}: {exc.message}"]
    except SchemaNotFoundError as exc:
        raise UnknownKind(exc.message) from exc
    return []


# ------------------------------------------------------------------------------------------ server rules
def _metadata_problems(obj: Mapping[str, Any]) -> list[str]:
    found: list[str] = []
    kind = str(obj.get("kind", ""))
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    if not name and not meta.get("generateName"):
        found.append("metadata.name: required")
    elif name:
        pattern, limit = (
            (DNS_1035_LABEL, 63)
            if kind in DNS_1035_NAMED
            else (DNS_LABEL, 63)
            if kind in DNS_LABEL_NAMED
            else (DNS_SUBDOMAIN, 253)
        )
        if len(name) > limit or not pattern.match(name):
            found.append(f"metadata.name: {name!r} is not a valid {kind} name")
    found += _label_problems(meta.get("labels") or {}, "metadata.labels")
    found += _annotation_problems(meta.get("annotations") or {}, "metadata.annotations")
    for i, ref in enumerate(meta.get("ownerReferences") or []):
        for key in ("apiVersion", "kind", "name", "uid"):
            if not ref.get(key):
                found.append(f"metadata.ownerReferences[{i}].{key}: required")
    return found


def _qualified_name_problems(key: str, where: str) -> list[str]:
    prefix, _, name = key.rpartition("/")
    bad = []
    if prefix and (len(prefix) > 253 or not DNS_SUBDOMAIN.match(prefix)):
        bad.append(f"{where}: key prefix {prefix!r} is not a DNS subdomain")
    if not name or len(name) > 63 or not LABEL_NAME.match(name):
        bad.append(f"{where}: key {key!r} is not a qualified name")
    return bad


def _label_problems(labels: Mapping[str, Any], where: str) -> list[str]:
    found: list[str] = []
    for key, value in labels.items():
        found += _qualified_name_problems(str(key), where)
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.match(value):
            found.append(f"{where}[{key}]: value {value!r} is not a valid label value")
    return found


def _annotation_problems(annotations: Mapping[str, Any], where: str) -> list[str]:
    found: list[str] = []
    for key, value in annotations.items():
        found += _qualified_name_problems(str(key), where)
        if not isinstance(value, str):
            found.append(f"{where}[{key}]: value must be a string")
    return found


def _pod_spec_problems(spec: Mapping[str, Any], where: str) -> list[str]:
    found: list[str] = []
    volumes = [v.get("name") for v in spec.get("volumes") or []]
    for name in volumes:
        if not name or len(name) > 63 or not DNS_LABEL.match(name):
            found.append(f"{where}.volumes: {name!r} is not a DNS label")
    if len(set(volumes)) != len(volumes):
        found.append(f"{where}.volumes: duplicate names {volumes}")
    if spec.get("subdomain") and not DNS_LABEL.match(spec["subdomain"]):
        found.append(f"{where}.subdomain: {spec['subdomain']!r} is not a DNS label")
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    names = [c.get("name") for c in containers]
    if len(set(names)) != len(names):
        found.append(f"{where}.containers: duplicate names {names}")
    for c in containers:
        cw = f"{where}.containers[{c.get('name')}]"
        if not c.get("name") or not DNS_LABEL.match(c["name"]):
            found.append(f"{cw}.name: not a DNS label")
        if not c.get("image"):
            found.append(f"{cw}.image: required")
        ports = c.get("ports") or []
        port_names = [p.get("name") for p in ports if p.get("name")]
        if len(set(port_names)) != len(port_names):
            found.append(f"{cw}.ports: duplicate names {port_names}")
        numbers = [p.get("containerPort") for p in ports]
        if len(set(numbers)) != len(numbers):
            found.append(f"{cw}.ports: duplicate containerPort {numbers}")
        for p in ports:
            n = p.get("name")
            if n is not None and (
                len(n) > 15 or not PORT_NAME.match(n) or "--" in n or not re.search("[a-z]", n)
            ):
                found.append(f"{cw}.ports: {n!r} is not an IANA_SVC_NAME")
            if not isinstance(p.get("containerPort"), int) or not 1 <= p["containerPort"] <= 65535:
                found.append(f"{cw}.ports: containerPort {p.get('containerPort')} out of range")
        env_names = [e.get("name") for e in c.get("env") or []]
        for n in env_names:
            if not n or not ENV_NAME.match(n):
                found.append(f"{cw}.env: {n!r} is not a valid environment variable name")
        mounts = c.get("volumeMounts") or []
        paths = [m.get("mountPath") for m in mounts]
        if len(set(paths)) != len(paths):
            found.append(f"{cw}.volumeMounts: duplicate mountPath {paths}")
        for m in mounts:
            if m.get("name") not in volumes:
                found.append(f"{cw}.volumeMounts: {m.get('name')!r} names no volume")
        for res_key in ("requests", "limits"):
            for key in (c.get("resources") or {}).get(res_key) or {}:
                found += _qualified_name_problems(str(key), f"{cw}.resources.{res_key}")
    if spec.get("restartPolicy") not in (None, "Always", "OnFailure", "Never"):
        found.append(f"{where}.restartPolicy: {spec['restartPolicy']!r}")
    return found


def _job_problems(obj: Mapping[str, Any]) -> list[str]:
    spec = obj.get("spec") or {}
    found = _pod_spec_problems((spec.get("template") or {}).get("spec") or {}, "spec.template.spec")
    found += _label_problems(
        ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {},
        "spec.template.metadata.labels",
    )
    pod = (spec.get("template") or {}).get("spec") or {}
    if pod.get("restartPolicy") not in ("Never", "OnFailure"):
        found.append("spec.template.spec.restartPolicy: a Job needs Never or OnFailure")
    if spec.get("podFailurePolicy") and pod.get("restartPolicy") != "Never":
        found.append("spec.podFailurePolicy: needs restartPolicy Never")
    if spec.get("podFailurePolicy") and spec.get("podReplacementPolicy") not in (None, "Failed"):
        found.append("spec.podReplacementPolicy: must be Failed when podFailurePolicy is set")
    if spec.get("completionMode") == "Indexed":
        completions = spec.get("completions")
        if completions is None:
            found.append("spec.completions: required when completionMode is Indexed")
        elif not isinstance(completions, int):
            pass  # a wrong type: the schema and the client model report it
        elif isinstance(spec.get("maxFailedIndexes"), int) and spec["maxFailedIndexes"] > completions:
            found.append("spec.maxFailedIndexes: must not exceed completions")
        name = (obj.get("metadata") or {}).get("name", "")
        if isinstance(completions, int) and completions and len(f"{name}-{completions - 1}") > 63:
            found.append("metadata.name: pod hostnames <job>-<index> would exceed 63 characters")
    elif spec.get("backoffLimitPerIndex") is not None:
        found.append("spec.backoffLimitPerIndex: needs completionMode Indexed")
    if spec.get("maxFailedIndexes") is not None and spec.get("backoffLimitPerIndex") is None:
        found.append("spec.maxFailedIndexes: needs backoffLimitPerIndex")
    for i, rule in enumerate((spec.get("podFailurePolicy") or {}).get("rules") or []):
        if rule.get("action") == "FailIndex" and spec.get("backoffLimitPerIndex") is None:
            found.append(f"spec.podFailurePolicy.rules[{i}]: FailIndex needs backoffLimitPerIndex")
        on_exit = rule.get("onExitCodes") or {}
        if on_exit.get("containerName") and on_exit["containerName"] not in [
            c.get("name") for c in pod.get("containers") or []
        ]:
            found.append(f"spec.podFailurePolicy.rules[{i}].onExitCodes.containerName names no container")
        if on_exit.get("operator") == "In" and 0 in (on_exit.get("values") or []):
            found.append(f"spec.podFailurePolicy.rules[{i}].onExitCodes: 0 is not allowed with In")
    for key in ("parallelism", "completions"):
        if isinstance(spec.get(key), int) and spec[key] < 0:
            found.append(f"spec.{key}: must be non-negative")
    return found


def _service_problems(obj: Mapping[str, Any]) -> list[str]:
    spec = obj.get("spec") or {}
    found = _label_problems(spec.get("selector") or {}, "spec.selector")
    ports = spec.get("ports") or []
    names = [p.get("name") for p in ports]
    if len(ports) > 1 and (None in names or len(set(names)) != len(names)):
        found.append("spec.ports: several ports need unique names")
    if spec.get("clusterIP") == "None" and spec.get("type", "ClusterIP") != "ClusterIP":
        found.append("spec.clusterIP: None (headless) needs type ClusterIP")
    return found


def _configmap_problems(obj: Mapping[str, Any]) -> list[str]:
    found: list[str] = []
    key_pattern = re.compile(r"^[-._a-zA-Z0-9]+$")
    size = 0
    for section in ("data", "binaryData"):
        for key, value in (obj.get(section) or {}).items():
            if not key_pattern.match(key) or len(key) > 253:
                found.append(f"{section}[{key}]: not a valid ConfigMap key")
            size += len(str(value).encode())
    if size > 1024 * 1024:
        found.append(f"data: {size} bytes exceed the 1 MiB ConfigMap limit")
    return found


def server_problems(obj: Mapping[str, Any]) -> list[str]:
    """API-server validation the schemas leave out, for the kinds lmforge renders."""
    found = _metadata_problems(obj)
    kind = obj.get("kind")
    if kind == "Job":
        found += _job_problems(obj)
    elif kind == "Service":
        found += _service_problems(obj)
    elif kind == "ConfigMap":
        found += _configmap_problems(obj)
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
        template = (obj.get("spec") or {}).get("template") or {}
        found += _pod_spec_problems(template.get("spec") or {}, "spec.template.spec")
        found += _label_problems(
            (template.get("metadata") or {}).get("labels") or {}, "spec.template.metadata.labels"
        )
    elif kind == "Pod":
        found += _pod_spec_problems(obj.get("spec") or {}, "spec")
    return found


# -------------------------------------------------------------------------------- Pod Security Standards
RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def restricted_problems(pod: Mapping[str, Any], where: str = "spec") -> list[str]:
    """What in a pod spec breaks the *restricted* Pod Security Standard (which includes *baseline*), as the
    PodSecurity admission controller of Kubernetes 1.29+ checks it."""
    found: list[str] = []
    psc = pod.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            found.append(f"{where}.{key}: must not be true")
    for v in pod.get("volumes") or []:
        types = set(v) - {"name"}
        if not types <= RESTRICTED_VOLUME_TYPES:
            found.append(f"{where}.volumes[{v.get('name')}]: type {sorted(types)} not allowed")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_seccomp == "Unconfined":
        found.append(f"{where}.securityContext.seccompProfile: Unconfined")
    if psc.get("runAsUser") == 0:
        found.append(f"{where}.securityContext.runAsUser: 0")
    for sysctl in psc.get("sysctls") or []:
        found.append(f"{where}.securityContext.sysctls: {sysctl.get('name')} (only the safe set is allowed)")
    containers = [
        *(pod.get("initContainers") or []),
        *(pod.get("containers") or []),
        *(pod.get("ephemeralContainers") or []),
    ]
    for c in containers:
        cw = f"{where}.containers[{c.get('name')}].securityContext"
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            found.append(f"{cw}.privileged: must not be true")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{cw}.allowPrivilegeEscalation: must be false")
        if not (
            sc.get("runAsNonRoot") is True
            or (psc.get("runAsNonRoot") is True and sc.get("runAsNonRoot") is not False)
        ):
            found.append(f"{cw}.runAsNonRoot: must be true (here or on the pod)")
        if sc.get("runAsUser") == 0:
            found.append(f"{cw}.runAsUser: 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{cw}.seccompProfile: RuntimeDefault or Localhost required (here or on the pod)")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            found.append(f"{cw}.capabilities.drop: must include ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            found.append(f"{cw}.capabilities.add: only NET_BIND_SERVICE is allowed")
        if sc.get("procMount") not in (None, "Default"):
            found.append(f"{cw}.procMount: must be Default")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                found.append(f"{where}.containers[{c.get('name')}].ports: hostPort not allowed")
    return found


# ------------------------------------------------------------------------------------------------ entry
def problems(
    obj: Mapping[str, Any], *, versions: Iterable[str] = VERSIONS, allow_unknown: bool = False
) -> list[str]:
    """Every problem the three checks find (empty when the object is valid)."""
    found: list[str] = []
    try:
        found += schema_problems(obj, versions)
        found += model_problems(obj)
    except UnknownKind:
        if not allow_unknown:
            raise
    found += server_problems(obj)
    return found


def assert_valid(
    obj: Mapping[str, Any], *, versions: Iterable[str] = VERSIONS, allow_unknown: bool = False
) -> None:
    """Raise AssertionError listing every problem of ``obj``."""
    found = problems(obj, versions=versions, allow_unknown=allow_unknown)
    if found:
        kind = obj.get("kind")
        name = (obj.get("metadata") or {}).get("name")
        raise AssertionError(f"{kind}/{name} is invalid:\n  " + "\n  ".join(found))


__all__ = [
    "MIN_VERSION",
    "VERSIONS",
    "UnknownKind",
    "assert_valid",
    "model_class",
    "problems",
    "restricted_problems",
]
