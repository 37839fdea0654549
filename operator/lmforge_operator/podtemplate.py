"""Pod templates: a resource's ``spec.template`` (and the operator's defaults for its kind before it, a Corpus
stage's ``spec.stages.<stage>.template`` after it) merged into the pod template of a Job the builders made,
with Kubernetes' strategic-merge semantics. Pure functions::

    pod = job["spec"]["template"]                        # {"metadata": ..., "spec": ...} from build_job
    pod = merge(pod, [("template", spec_template)], allow_privileged=False)

How each field merges (the overlay wins where the two disagree):

=====================================================  ==============================================
metadata.labels, metadata.annotations, nodeSelector    maps merged key by key
affinity, securityContext (pod and container)          objects merged recursively; lists replaced
tolerations, topologySpreadConstraints, envFrom        appended (an entry already there is not repeated)
imagePullSecrets, volumes, containers, env             by name (a volume or container merged, an env
                                                       entry replaced)
volumeMounts                                           by mountPath (replaced)
resources.requests, resources.limits                   maps merged (devices: rdma/ib, EFA, MIG)
scalars (priorityClassName, schedulerName, …)          replaced
=====================================================  ==============================================

A container named ``main`` is the job's; any other name is a native sidecar (an init container with
``restartPolicy: Always``, so a daemon that never exits does not keep the Job from completing), which starts
from lmforge's restricted security context. What would break the Job is refused (always), naming the field under
``spec``: the job container's command, args, image, ports or probes; a sidecar port on the metrics or
rendezvous port; the ``spec`` volume (the resource's ConfigMap) and its mount at /etc/lmforge; lmforge's own
labels, ``lmforge.io/`` annotations and ``LMFORGE_*`` / ``PET_*`` variables; cpu, memory, ephemeral-storage,
nvidia.com/gpu and MIG devices (spec.resources and spec.parallelism say those: ``resources.gpuResource``
names a MIG profile, which replaces nvidia.com/gpu). What would weaken the restricted Pod
Security Standard is refused unless the operator allows privileged pods (the chart's
``podTemplate.allowPrivileged``): hostNetwork, hostPID, hostPath volumes, privileged containers, privilege
escalation, added capabilities (NET_BIND_SERVICE aside), capabilities not dropped, running as root,
an unconfined seccomp or AppArmor profile, an unmasked /proc. hostIPC is refused always.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lmforge_operator.builders import (
    CONTAINER,
    GPU_RESOURCE,
    LABEL_KIND,
    LABEL_NAME,
    LABEL_STAGE,
    METRICS_PORT,
    MIG_PREFIX,
    QUEUE_LABEL,
    RDZV_PORT,
    SPEC_DIR,
    BuildError,
)

SPEC_VOLUME = "spec"
# What the job's container takes from a template; anything else (command, args, image, ports, probes…)
# would change what the Job runs or how it is reached.
MAIN_CONTAINER_FIELDS = ("name", "env", "envFrom", "volumeMounts", "resources", "securityContext")
# Set by spec.resources / spec.parallelism: a template must not contradict them.
OWN_RESOURCES = ("cpu", "memory", "ephemeral-storage", GPU_RESOURCE)
OWN_ENV_PREFIXES = ("LMFORGE_", "PET_")
OWN_ANNOTATION_PREFIX = "lmforge.io/"
# The children's labels (builders.labels): the Service, NetworkPolicy and PodMonitor select on them.
OWN_LABELS = {
    "app.kubernetes.io/name",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/component",
    LABEL_KIND,
    LABEL_NAME,
    LABEL_STAGE,
    QUEUE_LABEL,
}
RESERVED_PORTS = {METRICS_PORT: "metrics", RDZV_PORT: "rdzv"}
# Restricted PSS allows adding this capability alone.
ALLOWED_ADDED_CAPABILITIES = {"NET_BIND_SERVICE"}


# --------------------------------------------------------------------------------------------- checks
def _security_problems(context: Mapping[str, Any], where: str, container: bool) -> list[tuple[str, str]]:
    """(field, why) for each setting of a SecurityContext that weakens the restricted profile."""
    found: list[tuple[str, str]] = []
    if container and context.get("privileged") is True:
        found.append((f"{where}.privileged", "privileged containers are not allowed"))
    if container and context.get("allowPrivilegeEscalation") is True:
        found.append((f"{where}.allowPrivilegeEscalation", "privilege escalation is not allowed"))
    caps = context.get("capabilities") or {}
    if container and isinstance(caps, Mapping):
        added = [c for c in caps.get("add") or [] if c not in ALLOWED_ADDED_CAPABILITIES]
        if added:
            found.append((f"{where}.capabilities.add", f"adding capabilities {added} is not allowed"))
        if "drop" in caps and "ALL" not in (caps.get("drop") or []):
            found.append((f"{where}.capabilities.drop", "must keep dropping ALL capabilities"))
    if context.get("runAsUser") == 0:
        found.append((f"{where}.runAsUser", "running as root (uid 0) is not allowed"))
    if context.get("runAsNonRoot") is False:
        found.append((f"{where}.runAsNonRoot", "must stay true"))
    seccomp = (context.get("seccompProfile") or {}).get("type")
    if seccomp is not None and seccomp not in ("RuntimeDefault", "Localhost"):
        found.append(
            (f"{where}.seccompProfile.type", f"{seccomp!r} is not allowed (RuntimeDefault, Localhost)")
        )
    apparmor = (context.get("appArmorProfile") or {}).get("type")
    if apparmor == "Unconfined":
        found.append((f"{where}.appArmorProfile.type", "'Unconfined' is not allowed"))
    if container and context.get("procMount") not in (None, "Default"):
        found.append((f"{where}.procMount", "only Default is allowed"))
    if (context.get("windowsOptions") or {}).get("hostProcess") is True:
        found.append((f"{where}.windowsOptions.hostProcess", "host processes are not allowed"))
    return found


def check(template: Mapping[str, Any], where: str = "template", *, allow_privileged: bool = False) -> None:
    """Raise :class:`BuildError` naming the first field of ``template`` (a PodTemplate as a camelCase dict)
    that would break the Job, or weaken Pod Security while ``allow_privileged`` is false."""
    refusals: list[tuple[str, str]] = []  # always refused
    weakening: list[tuple[str, str]] = []  # refused unless allow_privileged
    meta = template.get("metadata") or {}
    for key in meta.get("labels") or {}:
        if key in OWN_LABELS or key.startswith(OWN_ANNOTATION_PREFIX):
            refusals.append((f'{where}.metadata.labels["{key}"]', "is lmforge's own label"))
    for key in meta.get("annotations") or {}:
        if key.startswith(OWN_ANNOTATION_PREFIX):
            refusals.append(
                (f'{where}.metadata.annotations["{key}"]', "lmforge.io/ annotations are lmforge's")
            )

    spec = template.get("spec") or {}
    at = f"{where}.spec"
    if spec.get("hostIPC") is True:
        refusals.append(
            (f"{at}.hostIPC", "sharing the node's IPC namespace is not allowed (/dev/shm is a volume)")
        )
    for name in ("hostNetwork", "hostPID"):
        if spec.get(name) is True:
            weakening.append((f"{at}.{name}", "the node's namespaces are not allowed"))
    weakening += _security_problems(spec.get("securityContext") or {}, f"{at}.securityContext", False)
    for i, volume in enumerate(spec.get("volumes") or []):
        if volume.get("name") == SPEC_VOLUME:
            refusals.append((f"{at}.volumes[{i}].name", f"{SPEC_VOLUME!r} is the volume of the job's spec"))
        if "hostPath" in volume:
            weakening.append((f"{at}.volumes[{i}].hostPath", "hostPath volumes are not allowed"))
    for i, c in enumerate(spec.get("containers") or []):
        cat = f"{at}.containers[{i}]"
        if c.get("name") == CONTAINER:
            for key in c:
                if key not in MAIN_CONTAINER_FIELDS:
                    refusals.append(
                        (
                            f"{cat}.{key}",
                            f"the job's container takes only {', '.join(MAIN_CONTAINER_FIELDS[1:])} from a "
                            "template (its command, image and ports are lmforge's)",
                        )
                    )
            for j, env in enumerate(c.get("env") or []):
                if str(env.get("name", "")).startswith(OWN_ENV_PREFIXES):
                    refusals.append((f"{cat}.env[{j}].name", "LMFORGE_* and PET_* variables are lmforge's"))
            for j, mount in enumerate(c.get("volumeMounts") or []):
                if (
                    mount.get("name") == SPEC_VOLUME
                    or str(mount.get("mountPath", "")).rstrip("/") == SPEC_DIR
                ):
                    refusals.append((f"{cat}.volumeMounts[{j}]", f"{SPEC_DIR} holds the job's spec"))
            for part in ("requests", "limits"):
                for key in (c.get("resources") or {}).get(part) or {}:
                    if key in OWN_RESOURCES:
                        refusals.append(
                            (
                                f"{cat}.resources.{part}[{key}]",
                                "set by spec.resources (and nvidia.com/gpu by spec.parallelism.gpusPerNode)",
                            )
                        )
                    elif str(key).startswith(MIG_PREFIX):
                        refusals.append(
                            (
                                f"{cat}.resources.{part}[{key}]",
                                "a MIG device is asked for with spec.resources.gpuResource, which replaces "
                                "nvidia.com/gpu (beside it, the pod would ask for a whole GPU too)",
                            )
                        )
        else:
            for j, port in enumerate(c.get("ports") or []):
                if port.get("containerPort") in RESERVED_PORTS or port.get("name") in RESERVED_PORTS.values():
                    refusals.append(
                        (
                            f"{cat}.ports[{j}]",
                            f"ports {METRICS_PORT} (metrics) and {RDZV_PORT} (rdzv) are the job's",
                        )
                    )
        weakening += _security_problems(c.get("securityContext") or {}, f"{cat}.securityContext", True)
    problems = refusals + ([] if allow_privileged else weakening)
    if problems:
        field, why = problems[0]
        if (field, why) in weakening:
            why += " (the operator's podTemplate.allowPrivileged is false)"
        raise BuildError(field, why)


# ---------------------------------------------------------------------------------------------- merge
def _deep(base: Any, overlay: Any) -> Any:
    """Objects merged recursively; anything else (lists included) replaced by the overlay."""
    if isinstance(base, Mapping) and isinstance(overlay, Mapping):
        out = dict(base)
        for key, value in overlay.items():
            out[key] = _deep(out.get(key), value) if key in out else copy.deepcopy(value)
        return out
    return copy.deepcopy(overlay)


def _appended(base: Sequence[Any] | None, extra: Iterable[Any]) -> list[Any]:
    out = list(base or [])
    for item in extra:
        if item not in out:
            out.append(copy.deepcopy(item))
    return out


def _by_key(
    base: Sequence[Mapping[str, Any]] | None, extra: Iterable[Mapping[str, Any]], key: str, merge: Any
) -> list[Any]:
    """Entries of ``extra`` merged (``merge(old, new)``) into the entry of ``base`` with the same ``key``, else
    appended."""
    out = [dict(item) for item in base or []]
    for item in extra:
        for i, existing in enumerate(out):
            if existing.get(key) == item.get(key):
                out[i] = merge(existing, item)
                break
        else:
            out.append(copy.deepcopy(dict(item)))
    return out


def _replace(_: Any, new: Any) -> Any:
    return copy.deepcopy(dict(new))


def _container(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overlay.items():
        if key == "env":
            out[key] = _by_key(out.get(key), value, "name", _replace)
        elif key == "envFrom":
            out[key] = _appended(out.get(key), value)
        elif key == "volumeMounts":
            out[key] = _by_key(out.get(key), value, "mountPath", _replace)
        elif key == "ports":
            out[key] = _by_key(out.get(key), value, "containerPort", _deep)
        elif key in ("resources", "securityContext"):
            out[key] = _deep(out.get(key) or {}, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _containers(
    spec: dict[str, Any], overlay: Iterable[Mapping[str, Any]], sidecar_security: Mapping[str, Any]
) -> None:
    """Merge ``overlay`` into ``spec``: ``main`` into the job's container, any other name into the native
    sidecars (init containers with ``restartPolicy: Always``, Kubernetes 1.29+: they start before the job's
    container and are stopped once it exits, so the Job still completes), a new one starting from lmforge's
    restricted security context."""
    containers = [dict(c) for c in spec.get("containers") or []]
    sidecars = [dict(c) for c in spec.get("initContainers") or []]
    for item in overlay:
        targets = containers if item.get("name") == CONTAINER else sidecars
        for i, existing in enumerate(targets):
            if existing.get("name") == item.get("name"):
                targets[i] = _container(existing, item)
                break
        else:
            base = {"restartPolicy": "Always", "securityContext": copy.deepcopy(dict(sidecar_security))}
            targets.append(_container(base, item))
    spec["containers"] = containers
    if sidecars:
        spec["initContainers"] = sidecars


def merge_one(pod: Mapping[str, Any], template: Mapping[str, Any]) -> dict[str, Any]:
    """``pod`` (a PodTemplateSpec dict: metadata, spec) with ``template`` (a PodTemplate dict) merged in."""
    out = copy.deepcopy(dict(pod))
    meta = out.setdefault("metadata", {})
    for key in ("labels", "annotations"):
        extra = (template.get("metadata") or {}).get(key)
        if extra:
            meta[key] = {**(meta.get(key) or {}), **extra}
    spec = out.setdefault("spec", {})
    main = next((c for c in spec.get("containers") or [] if c.get("name") == CONTAINER), {})
    for key, value in (template.get("spec") or {}).items():
        if value is None:
            continue
        if key == "nodeSelector":
            spec[key] = {**(spec.get(key) or {}), **value}
        elif key in ("tolerations", "topologySpreadConstraints"):
            spec[key] = _appended(spec.get(key), value)
        elif key in ("imagePullSecrets", "volumes"):
            spec[key] = _by_key(spec.get(key), value, "name", _deep)
        elif key in ("affinity", "securityContext"):
            spec[key] = _deep(spec.get(key) or {}, value)
        elif key == "containers":
            _containers(spec, value, main.get("securityContext") or {})
        else:
            spec[key] = copy.deepcopy(value)
    if spec.get("hostNetwork") and "dnsPolicy" not in (template.get("spec") or {}):
        # the pods still resolve the rendezvous endpoint <job>-0.<service> through cluster DNS
        spec["dnsPolicy"] = "ClusterFirstWithHostNet"
    return out


def merge(
    pod: Mapping[str, Any],
    layers: Sequence[tuple[str, Mapping[str, Any] | None]],
    *,
    allow_privileged: bool = False,
) -> dict[str, Any]:
    """``pod`` with each ``(where, template)`` of ``layers`` checked (:func:`check`, fields named under
    ``where``) and merged in order: later layers win (the operator's defaults first, the resource's
    template last)."""
    out = copy.deepcopy(dict(pod))
    for where, template in layers:
        if not template:
            continue
        check(template, where, allow_privileged=allow_privileged)
        out = merge_one(out, template)
    return out


def fields_set(template: Mapping[str, Any] | None) -> list[str]:
    """The top-level fields a template sets (``nodeSelector``, ``tolerations``, ``metadata.labels``…), for
    the Event saying which defaults applied."""
    if not template:
        return []
    found = [f"metadata.{k}" for k, v in (template.get("metadata") or {}).items() if v]
    found += [k for k, v in (template.get("spec") or {}).items() if v is not None]
    return found


__all__ = ["check", "fields_set", "merge", "merge_one"]
