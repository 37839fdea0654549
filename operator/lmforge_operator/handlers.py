"""kopf handlers of the lmforge operator.

Run it with ``lmforge operator`` or ``kopf run -m lmforge_operator`` (``kopf run -m
lmforge_operator.handlers`` works too). Importing this module registers the handlers in kopf's default
registry; ``lmforge_operator/__init__.py`` imports it only when the process is ``kopf run``, so the rest of
the CLI stays light.

The operator's pods (its labels) are indexed by (namespace, job name) with ``kopf.index``: the reconcile
reads a Job's pods from that index instead of LISTing them, and kopf starts the resource handlers only once
the index has listed every pod.

Only watch-event handlers are used (no ``on.create``/``on.update``/timers): they need no finalizer and no
progress annotations, so deleting a resource is never blocked while the operator is down, and a restarted
operator simply sees every resource again and reconciles it by level (see :mod:`lmforge_operator.controller`).

Environment: ``LMFORGE_JOBS_IMAGE`` (default jobs image), ``LMFORGE_STORAGE`` (root of spec.output when
unset), ``LMFORGE_RESYNC_SECONDS`` (15), ``LMFORGE_WORKERS`` (16), ``LMFORGE_GPU`` (h100, for the compute
plan), ``LMFORGE_OPERATOR_METRICS_PORT`` (8080; ``off`` for none); the rest in
:class:`~lmforge_operator.controller.Config` (leader election: with ``POD_NAMESPACE`` set, as the chart does,
only the holder of the Lease reconciles, see :mod:`lmforge_operator.leader`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf

from lmforge_jobs.kinds import KINDS
from lmforge_jobs.spec import API_GROUP, API_VERSION
from lmforge_operator.controller import Config, Controller
from lmforge_operator.kube import Kube
from lmforge_operator.leader import LeaderElection
from lmforge_operator.metrics import OperatorMetrics

log = logging.getLogger("lmforge.operator")

MANAGED = {"app.kubernetes.io/managed-by": "lmforge-operator"}

# One metrics registry per process (the HTTP endpoint outlives a restarted operator in tests).
METRICS = OperatorMetrics()


class Options:
    """Set by ``lmforge operator`` before kopf starts (kopf run reads the environment instead)."""

    metrics_port: int | None = None
    config: Config | None = None


def _metrics_port() -> int | None:
    if Options.metrics_port is not None:
        return Options.metrics_port if Options.metrics_port >= 0 else None
    raw = os.environ.get("LMFORGE_OPERATOR_METRICS_PORT", "8080").strip().lower()
    return None if raw in ("off", "none", "", "-1") else int(raw)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    settings.peering.standalone = True  # no kopf peering: replicas elect a leader over a Lease (leader.py)
    settings.scanning.disabled = True  # the CRDs are installed by the chart before the operator starts
    settings.posting.level = logging.WARNING  # kopf's own Events only for problems; ours mark transitions
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    port = _metrics_port()
    if port is not None:
        try:
            bound = METRICS.serve(port)
            log.info("operator metrics on :%d/metrics", bound)
        except OSError as exc:
            log.warning("operator metrics not served on port %s: %s", port, exc)
    controller = Controller(Options.config or Config(), METRICS)
    memo.lmforge = controller
    info = getattr(memo, "lmforge_login", None)
    if info is not None:
        controller.set_api(Kube(info))
    election = _election(controller.config)
    if election is None:
        await controller.start()
        return
    # Every replica watches (a warm cache); only the Lease holder runs the controller's workers.
    memo.lmforge_election = election
    if info is not None:
        election.set_api(Kube(info))

    async def lead() -> None:
        await controller.start()
        for key in list(controller.cache):  # what was watched while standing by
            controller.enqueue(key)

    election.start(lead, controller.stop)


def _election(config: Config) -> LeaderElection | None:
    if not config.leader_election or not config.lease_namespace:
        return None
    return LeaderElection(
        config.lease_namespace, config.lease_name, config.identity, lease_seconds=config.lease_seconds
    )


@kopf.on.login()
async def login(memo: Any, **kwargs: Any) -> kopf.ConnectionInfo | None:
    """In-cluster service account, else the kubeconfig; the operator's own client uses the same."""
    info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    if info is not None:
        memo.lmforge_login = info
        controller = getattr(memo, "lmforge", None)
        if controller is not None:
            controller.set_api(Kube(info))
        election = getattr(memo, "lmforge_election", None)
        if election is not None and election.api is None:
            election.set_api(Kube(info))
    return info


@kopf.on.cleanup()
async def cleanup(memo: Any, **_: Any) -> None:
    election = getattr(memo, "lmforge_election", None)
    if election is not None:  # stop campaigning, and hand the Lease over at once
        await election.stop()
    controller = getattr(memo, "lmforge", None)
    if controller is not None:
        await controller.stop()


POD_INDEX = "lmforge_pods"


@kopf.index("", "v1", "pods", labels=MANAGED, id=POD_INDEX)
def index_pod(body: Any, namespace: str | None, labels: Any, **_: Any) -> dict[Any, Any] | None:
    """A pod of one of the operator's Jobs under (namespace, job name): what the status reads of it."""
    job = labels.get("batch.kubernetes.io/job-name") or labels.get("job-name")
    if not job:
        return None
    return {(namespace or "", str(job)): slim_pod(body)}


def slim_pod(body: Any) -> dict[str, Any]:
    """The fields of a pod that its Job's status needs (rank, IP and metrics port, termination messages);
    the rest of a pod (env, volumes, managed fields) is not kept in memory."""
    meta = body.get("metadata") or {}
    containers = (body.get("spec") or {}).get("containers") or []
    return {
        "metadata": {
            k: meta[k]
            for k in ("name", "namespace", "labels", "annotations", "creationTimestamp")
            if k in meta
        },
        "spec": {"containers": [{"name": c.get("name"), "ports": c.get("ports") or []} for c in containers]},
        "status": dict(body.get("status") or {}),
    }


def _controller(memo: Any, kwargs: dict[str, Any]) -> Controller | None:
    controller: Controller | None = getattr(memo, "lmforge", None)
    pods = kwargs.get(POD_INDEX)
    if controller is not None and pods is not None:
        controller.set_pod_index(pods)
    return controller


def _register(kind: str, plural: str) -> None:
    @kopf.on.event(API_GROUP, API_VERSION, plural, id=f"observe-{plural}")
    async def observe(event: dict[str, Any], body: Any, memo: Any, **kwargs: Any) -> None:
        controller = _controller(memo, kwargs)
        if controller is not None:
            raw = dict(body)
            raw.setdefault("kind", kind)
            raw.setdefault("apiVersion", f"{API_GROUP}/{API_VERSION}")
            controller.observe(raw, event.get("type"))


for _kind in KINDS.values():  # a Sweep's trials are resources of these kinds: their events wake the Sweep
    _register(_kind.name, _kind.plural)


@kopf.on.event("batch", "v1", "jobs", labels=MANAGED, id="observe-jobs")
async def observe_job(event: dict[str, Any], body: Any, memo: Any, **kwargs: Any) -> None:
    controller = _controller(memo, kwargs)
    if controller is not None:
        controller.observe_job(dict(body), event.get("type"))


__all__ = ["METRICS", "Options", "cleanup", "index_pod", "login", "observe_job", "slim_pod", "startup"]
