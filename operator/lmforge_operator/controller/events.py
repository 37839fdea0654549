"""Kubernetes Events: one per transition of a resource (its phase, or the reason it is in it)."""

from __future__ import annotations

import logging
import time
from typing import Any

from lmforge_operator import status as status_helpers
from lmforge_operator.controller.outcomes import Outcome
from lmforge_operator.kube import ApiError, Kube

log = logging.getLogger("lmforge.operator")


async def post_event(api: Kube, host: str, body: dict[str, Any], phase: str, outcome: Outcome) -> None:
    """Post the Event saying the resource of ``body`` is now in ``phase`` because of ``outcome``; a Warning
    when it is Failed or Invalid. Best effort: a refusal is logged at debug level."""
    warning = phase in ("Failed", "Invalid")
    await post_note(api, host, body, outcome.reason, f"{phase}: {outcome.message}", warning=warning)


async def post_note(
    api: Kube, host: str, body: dict[str, Any], reason: str, message: str, *, warning: bool = False
) -> None:
    """Post a Normal (or Warning) Event about the resource of ``body`` with ``reason`` and ``message``
    (``kubectl describe`` shows it). Best effort: a refusal is logged at debug level."""
    meta = body.get("metadata") or {}
    ns = meta.get("namespace") or "default"
    stamp = status_helpers.now_iso()
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta.get('name')}.{time.time_ns():x}", "namespace": ns},
        "involvedObject": {
            "apiVersion": body.get("apiVersion"),
            "kind": body.get("kind"),
            "name": meta.get("name"),
            "namespace": ns,
            "uid": meta.get("uid"),
        },
        "reason": reason,
        "message": message[:1024],
        "type": "Warning" if warning else "Normal",
        "source": {"component": "lmforge-operator", "host": host},
        "reportingComponent": "lmforge.io/operator",
        "reportingInstance": host,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }
    try:
        await api.create(event, ns)
    except ApiError as exc:
        log.debug("event not posted: %s", exc)


__all__ = ["post_event", "post_note"]
