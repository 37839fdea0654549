"""Operator settings."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from typing import Any


def _flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    return default if not raw else raw not in ("0", "false", "no", "off")


def _labels(raw: str | None) -> dict[str, str] | None:
    """``k=v,k=v`` as a dict (None when unset or empty)."""
    pairs = [p.strip() for p in (raw or "").split(",") if p.strip()]
    return dict(p.split("=", 1) for p in pairs) or None


def default_image() -> str:
    """$LMFORGE_JOBS_IMAGE (set by the chart), else ghcr.io/lmforge/lmforge-jobs:<package version>."""
    from lmforge_operator.builders import default_image as image

    return image()


@dataclass
class Config:
    """Operator settings (environment variables in parentheses)."""

    image: str = field(default_factory=default_image)
    """Jobs image when spec.image is unset ($LMFORGE_JOBS_IMAGE)."""
    storage: str = field(default_factory=lambda: os.environ.get("LMFORGE_STORAGE", "pvc://lmforge-storage"))
    """Root of spec.output when it is unset: <storage>/<namespace>/<kind>/<name> ($LMFORGE_STORAGE)."""
    storage_endpoint: str | None = field(
        default_factory=lambda: os.environ.get("LMFORGE_STORAGE_ENDPOINT") or None
    )
    """S3-compatible endpoint of job pods whose spec has no storage section ($LMFORGE_STORAGE_ENDPOINT)."""
    storage_region: str | None = field(
        default_factory=lambda: os.environ.get("LMFORGE_STORAGE_REGION") or None
    )
    """Object-store region of those pods ($LMFORGE_STORAGE_REGION)."""
    storage_credentials_secret: str | None = field(
        default_factory=lambda: os.environ.get("LMFORGE_STORAGE_CREDENTIALS_SECRET") or None
    )
    """Secret (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) whose keys those pods get as environment variables,
    in the resource's namespace ($LMFORGE_STORAGE_CREDENTIALS_SECRET)."""
    resync_seconds: float = field(
        default_factory=lambda: float(os.environ.get("LMFORGE_RESYNC_SECONDS", "15"))
    )
    """How often unfinished resources are reconciled without an event ($LMFORGE_RESYNC_SECONDS), counted
    from each one's last reconcile."""
    resync_jitter: float = 0.2
    """Each resync comes a random fraction up to this earlier or later than ``resync_seconds`` after the
    last reconcile, so resources reconciled together are not resynced together for ever."""
    workers: int = field(default_factory=lambda: int(os.environ.get("LMFORGE_WORKERS", "16")))
    """Resources reconciled concurrently ($LMFORGE_WORKERS)."""
    gpu: str = field(default_factory=lambda: os.environ.get("LMFORGE_GPU", "h100"))
    """GPU type the compute plan assumes ($LMFORGE_GPU: h100, h200, a100, l40s)."""
    network_policy: bool = field(default_factory=lambda: _flag("LMFORGE_NETWORK_POLICY", True))
    """A NetworkPolicy per torchrun resource ($LMFORGE_NETWORK_POLICY; false on clusters without
    NetworkPolicy support)."""
    operator_namespace: str | None = field(default_factory=lambda: os.environ.get("POD_NAMESPACE") or None)
    """The operator's namespace, whose operator pods may scrape job pods ($POD_NAMESPACE; unset: any)."""
    operator_labels: dict[str, str] | None = field(
        default_factory=lambda: _labels(os.environ.get("LMFORGE_OPERATOR_LABELS"))
    )
    """Labels of the operator's pods ($LMFORGE_OPERATOR_LABELS, ``k=v,k=v``; default
    app.kubernetes.io/name=lmforge,app.kubernetes.io/component=operator)."""
    metrics_from: list[dict[str, Any]] = field(
        default_factory=lambda: json.loads(os.environ.get("LMFORGE_JOB_METRICS_FROM") or "[]")
    )
    """Further NetworkPolicyPeers that may scrape job pods' metrics ($LMFORGE_JOB_METRICS_FROM, JSON)."""

    leader_election: bool = field(default_factory=lambda: _flag("LMFORGE_LEADER_ELECTION", True))
    """Reconcile only while holding the Lease, so replicas never reconcile at once
    ($LMFORGE_LEADER_ELECTION; it also needs lease_namespace)."""
    lease_namespace: str | None = field(
        default_factory=lambda: (
            os.environ.get("LMFORGE_LEASE_NAMESPACE") or os.environ.get("POD_NAMESPACE") or None
        )
    )
    """Namespace of the leader-election Lease ($LMFORGE_LEASE_NAMESPACE, else $POD_NAMESPACE; unset: no
    leader election, one replica)."""
    lease_name: str = field(default_factory=lambda: os.environ.get("LMFORGE_LEASE_NAME", "lmforge-operator"))
    """Name of the Lease ($LMFORGE_LEASE_NAME; the chart: its full name)."""
    lease_seconds: float = field(default_factory=lambda: float(os.environ.get("LMFORGE_LEASE_SECONDS", "15")))
    """How long a Lease not renewed stays the holder's ($LMFORGE_LEASE_SECONDS): the longest a standby
    replica waits to take over from a leader that died."""
    pod_template_defaults: dict[str, Any] = field(
        default_factory=lambda: json.loads(os.environ.get("LMFORGE_POD_TEMPLATE_DEFAULTS") or "{}")
    )
    """Default pod template per kind (``{"PretrainRun": {"spec": {"tolerations": [...]}}}``), merged into
    the pods before each resource's spec.template, which wins ($LMFORGE_POD_TEMPLATE_DEFAULTS, JSON; the
    chart's podTemplate.defaults)."""
    pod_template_allow_privileged: bool = field(
        default_factory=lambda: _flag("LMFORGE_POD_TEMPLATE_ALLOW_PRIVILEGED", False)
    )
    """Let pod templates weaken the restricted Pod Security settings: hostNetwork, hostPID, hostPath
    volumes, privileged containers, added capabilities, root ($LMFORGE_POD_TEMPLATE_ALLOW_PRIVILEGED; the
    chart's podTemplate.allowPrivileged, default false)."""
    identity: str = field(
        default_factory=lambda: os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    )
    """This replica in the Lease ($POD_NAME, else host and process id)."""

    def storage_defaults(self) -> Any:
        """The default storage section (:class:`lmforge_jobs.spec.Storage`) for resources without one, or
        None when nothing is configured; a bad value raises ValueError naming the variable."""
        from pydantic import ValidationError

        from lmforge_jobs.spec import Storage

        values = {
            "endpoint": self.storage_endpoint,
            "region": self.storage_region,
            "credentials": {"secretName": self.storage_credentials_secret}
            if self.storage_credentials_secret
            else None,
        }
        if not any(values.values()):
            return None
        try:
            return Storage.model_validate({k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            where = ".".join(str(p) for p in exc.errors()[0]["loc"])
            raise ValueError(f"operator storage default {where}: {exc.errors()[0]['msg']}") from None

    def template_defaults(self) -> dict[str, dict[str, Any]]:
        """The default pod template of each kind that has one, validated (a PodTemplate as a camelCase
        dict) and checked like a resource's template; a bad one raises ValueError naming the kind and the
        field (podTemplate.defaults.<Kind>.<field>)."""
        from pydantic import ValidationError

        from lmforge_jobs.kinds import KINDS
        from lmforge_jobs.spec import PodTemplate
        from lmforge_operator import podtemplate
        from lmforge_operator.builders import BuildError

        out: dict[str, dict[str, Any]] = {}
        for kind, raw in (self.pod_template_defaults or {}).items():
            where = f"podTemplate.defaults.{kind}"
            if kind not in KINDS:
                raise ValueError(f"{where}: not a kind (one of {', '.join(KINDS)})")
            if not raw:
                continue
            try:
                template = PodTemplate.model_validate(raw).to_yaml_dict()
                podtemplate.check(template, where, allow_privileged=self.pod_template_allow_privileged)
            except ValidationError as exc:
                error = exc.errors()[0]
                field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
                raise ValueError(f"{where}{field}: {error['msg']}") from None
            except BuildError as exc:
                raise ValueError(f"{exc.field}: {exc.message}") from None
            out[kind] = template
        return out

    def isolation(self) -> Any:
        """The builders' :class:`~lmforge_operator.builders.Isolation`, or None for no NetworkPolicy."""
        from lmforge_operator import builders

        if not self.network_policy:
            return None
        return builders.Isolation(
            operator_namespace=self.operator_namespace,
            operator_labels=self.operator_labels or dict(builders.OPERATOR_LABELS),
            metrics_from=tuple(self.metrics_from),
        )


__all__ = ["Config", "default_image"]
