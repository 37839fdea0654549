"""Pure builders of an Evaluation's human arena on a cluster (``spec.arena.human``): a Deployment and a Service.

The voting page (:mod:`lmforge_jobs.evaluate.human`, the jobs image with the arena extra) is a web server,
not a batch job, so it runs as a one-replica **Deployment** ``<name>-arena`` behind a ClusterIP **Service**
``<name>-arena`` (port 80 → the container's ``http`` port 8080), both owned by the Evaluation
(``controller: true``: they go away with it). The operator never imports the page: the pod runs
``python -m lmforge_jobs.evaluate.human --host 0.0.0.0 --port 8080 --rate-limit N`` and reads

* the results (the Evaluation's output directory with its ``judgments*.jsonl``) from ``$LMFORGE_ARENA_RESULTS``
  (a ``pvc://`` output mounted read-only; object storage through the same settings the Jobs get);
* the database: ``arena.human.database`` (a Secret key holding a SQLAlchemy URL, PostgreSQL) as the
  ``$LMFORGE_ARENA_DB`` ``secretKeyRef`` the kubelet resolves — the operator never reads it; else SQLite in
  ``/var/lib/lmforge-arena`` on ``arena.human.storage.claimName`` or, without one, an emptyDir (votes lost
  when the pod moves).

Restricted Pod Security like the Jobs (non-root 10001, no privilege escalation, no capabilities,
RuntimeDefault seccomp, no service account token) plus a read-only root filesystem with an emptyDir ``/tmp``.
Startup and readiness probes GET ``/healthz`` (``ok`` when the database answers), the liveness probe
``/livez`` (``ok`` while the process serves: a database outage makes the page unready, never restarts it). The strategy is
Recreate: a SQLite file has one writer, and a ReadWriteOnce claim one node.

The pods' labels are not the Evaluation's Job selector (no ``lmforge.io/kind``): the Evaluation's headless
Service and NetworkPolicy never select them. ``lmforge.io/arena-digest`` on the Deployment is a digest of
its spec, which the reconcile compares to patch a Deployment whose spec changed.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from lmforge_jobs.manifest import Resource
from lmforge_operator import builders

PORT = 8080
SERVICE_PORT = 80
PORT_NAME = "http"
CONTAINER = "arena"
COMPONENT = "arena"
VOTES_DIR = "/var/lib/lmforge-arena"
VOTES_FILE = "human-votes.sqlite"
HEALTH_PATH = "/healthz"  # ok when the database answers: startup and readiness
LIVE_PATH = "/livez"  # ok when the process answers: liveness (a database outage must not restart the page)
LEADERBOARD_PATH = "/leaderboard.json"
LABEL_ARENA = "lmforge.io/arena"
ANNOTATION_DIGEST = "lmforge.io/arena-digest"
RESULTS_ENV = "LMFORGE_ARENA_RESULTS"  # lmforge_jobs.evaluate.human.RESULTS_ENV (not imported: starlette)
DB_ENV = "LMFORGE_ARENA_DB"  # lmforge_jobs.evaluate.human.DB_ENV
# The page is light (a bootstrap of the ratings per new vote); memory grows with the items held.
RESOURCES = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}


def human(resource: Resource[Any, Any]) -> Any:
    """``spec.arena.human`` when it is set and enabled, else None."""
    arena = getattr(resource.spec, "arena", None)
    page = getattr(arena, "human", None)
    return page if page is not None and page.enabled else None


def arena_name(resource: Resource[Any, Any]) -> str:
    """Name of the Deployment and the Service: ``<name>-arena`` (a DNS label, so also a DNS-1035 one)."""
    return builders.child_name(resource.name, COMPONENT)


def pod_labels(resource: Resource[Any, Any]) -> dict[str, str]:
    """Labels of the page's pods, the Deployment's and the Service's selector."""
    return {
        "app.kubernetes.io/name": "lmforge-arena",
        "app.kubernetes.io/part-of": "lmforge",
        "app.kubernetes.io/managed-by": "lmforge-operator",
        "app.kubernetes.io/component": COMPONENT,
        LABEL_ARENA: resource.name,
    }


def _metadata(resource: Resource[Any, Any], owner: dict[str, Any] | None) -> dict[str, Any]:
    meta = builders._metadata(resource, arena_name(resource), owner)
    meta["labels"]["app.kubernetes.io/component"] = COMPONENT
    return meta


def _digest(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def service_url(resource: Resource[Any, Any], namespace: str, path: str = LEADERBOARD_PATH) -> str:
    """URL of ``path`` on the page through its Service's cluster DNS name."""
    return f"http://{arena_name(resource)}.{namespace}.svc:{SERVICE_PORT}{path}"


def build_deployment(
    resource: Resource[Any, Any],
    owner: dict[str, Any] | None,
    *,
    image: str,
    results: str,
    storage: Any = None,
    template_defaults: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The apps/v1 Deployment of the voting page over ``results`` (the Evaluation's output directory).
    ``storage`` is the operator's default storage section (used when the spec has none), as for the Jobs.
    Of the pod templates (``template_defaults``, the operator's for Evaluations, then ``spec.template``)
    only ``imagePullSecrets`` apply, to pull the same image: their placement is the GPU Jobs', not the page's."""
    page = human(resource)
    if page is None:
        raise ValueError(f"{resource.kind}/{resource.name} has no enabled spec.arena.human")
    located, pvc_volumes, pvc_mounts = builders.localize({"results": results})
    object_storage = builders.storage_env(builders.effective_storage(resource, storage))
    pod_security, container_security = builders._security_context()
    container_security = {**container_security, "readOnlyRootFilesystem": True}

    env: list[dict[str, Any]] = [
        {"name": RESULTS_ENV, "value": builders.literal(located["results"])},
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        # X-Forwarded-Proto from the Ingress/Gateway, whatever its address: it only makes the cookies
        # Secure, so a forged header can only make a client's own cookies stricter
        {"name": "FORWARDED_ALLOW_IPS", "value": "*"},
    ]
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    if page.database is not None:
        ref = {"name": page.database.name, "key": page.database.key}
        env.append({"name": DB_ENV, "valueFrom": {"secretKeyRef": ref}})
    else:
        env.append({"name": DB_ENV, "value": f"sqlite:///{VOTES_DIR}/{VOTES_FILE}"})
        if page.storage is not None:
            volumes.append({"name": "votes", "persistentVolumeClaim": {"claimName": page.storage.claim_name}})
        else:
            volumes.append({"name": "votes", "emptyDir": {}})
        mounts.append({"name": "votes", "mountPath": VOTES_DIR})

    def probe(period: int, failures: int, path: str = HEALTH_PATH) -> dict[str, Any]:
        return {
            "httpGet": {"path": path, "port": PORT_NAME},
            "periodSeconds": period,
            "timeoutSeconds": 5,
            "failureThreshold": failures,
        }

    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "lmforge_jobs.evaluate.human"],
        "args": ["--host", "0.0.0.0", "--port", str(PORT), "--rate-limit", str(page.rate_limit)],
        "env": [*env, *object_storage.env],
        "ports": [{"name": PORT_NAME, "containerPort": PORT, "protocol": "TCP"}],
        # reading the transcripts (object storage) comes before the server listens: up to 5 minutes
        "startupProbe": probe(5, 60),
        "readinessProbe": probe(10, 3),
        "livenessProbe": probe(20, 3, LIVE_PATH),
        "resources": json.loads(json.dumps(RESOURCES)),
        "volumeMounts": [*mounts, *pvc_mounts, *object_storage.mounts],
        "securityContext": container_security,
    }
    if object_storage.env_from:
        container["envFrom"] = object_storage.env_from
    pull_secrets: dict[str, dict[str, Any]] = {}
    for template in (template_defaults, builders.spec_template(resource)):
        for ref in ((template or {}).get("spec") or {}).get("imagePullSecrets") or []:
            pull_secrets[ref["name"]] = {"name": ref["name"]}
    labels = pod_labels(resource)
    spec: dict[str, Any] = {
        "replicas": 1,
        "revisionHistoryLimit": 2,
        "strategy": {"type": "Recreate"},
        "selector": {"matchLabels": dict(labels)},
        "template": {
            "metadata": {"labels": dict(labels)},
            "spec": {
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "securityContext": pod_security,
                "containers": [container],
                "volumes": [*volumes, *pvc_volumes, *object_storage.volumes],
            },
        },
    }
    if pull_secrets:
        spec["template"]["spec"]["imagePullSecrets"] = list(pull_secrets.values())
    meta = _metadata(resource, owner)
    meta["annotations"][ANNOTATION_DIGEST] = _digest(spec)
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": spec}


def build_service(resource: Resource[Any, Any], owner: dict[str, Any] | None) -> dict[str, Any]:
    """The ClusterIP Service of the voting page: port 80 (``http``) to the pods' port 8080, for an
    Ingress or Gateway (behind the cluster's authentication) and for the operator's ratings mirror."""
    spec = {
        "type": "ClusterIP",
        "selector": pod_labels(resource),
        "ports": [{"name": PORT_NAME, "port": SERVICE_PORT, "targetPort": PORT_NAME, "protocol": "TCP"}],
    }
    meta = _metadata(resource, owner)
    meta["annotations"][ANNOTATION_DIGEST] = _digest(spec)
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


__all__ = [
    "ANNOTATION_DIGEST",
    "LEADERBOARD_PATH",
    "PORT",
    "arena_name",
    "build_deployment",
    "build_service",
    "human",
    "pod_labels",
    "service_url",
]
