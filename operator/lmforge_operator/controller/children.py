"""Child resources owned by a resource that has no Job of its own (a Sweep's trials, a ScalingStudy's
points): found in the watch cache under their deterministic names, created if absent, adopted when they
are the owner's, waited for when an earlier owner of the same name left them behind.

A child is the owner's when its controller ownerReference carries the owner's uid. One under a child's
name with another uid belongs to an earlier resource of the same name (deleted, its dependents not yet
collected): it is never adopted; the reconcile waits (OldChildrenPresent) until the garbage collector
removes it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lmforge_operator import status as status_helpers
from lmforge_operator.controller.outcomes import Failed, Invalid, Waiting
from lmforge_operator.kube import ApiError

if TYPE_CHECKING:
    from lmforge_operator.controller.reconcile import Controller
    from lmforge_operator.controller.workqueue import Key

log = logging.getLogger("lmforge.operator")


def controller_uid(obj: dict[str, Any]) -> str | None:
    """The uid of the object's controller ownerReference (None: it has none)."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


def owned_children(
    ctrl: Controller,
    kind: str,
    ns: str,
    uid: str | None,
    is_child: Callable[[str], bool],
    owner_label: str,
) -> dict[str, dict[str, Any]]:
    """The owner's children of ``kind`` in the watch cache (those whose names ``is_child``), by name;
    raises Waiting when one belongs to someone else (``owner_label``, e.g. ``Sweep``, names the owner's
    kind in the message)."""
    found: dict[str, dict[str, Any]] = {}
    for (k, n, name), body in list(ctrl.cache.items()):
        if k != kind or n != ns or not is_child(name):
            continue
        if uid and controller_uid(body) != uid:
            raise Waiting(
                status_helpers.OLD_CHILDREN,
                f"{kind} {name} exists and is not this {owner_label}'s (owner uid {controller_uid(body)}); "
                "waiting for it to be deleted",
            )
        found[name] = body
    return found


async def create_owned(
    ctrl: Controller, key: Key, owner: dict[str, Any], objs: list[dict[str, Any]]
) -> list[str]:
    """Create each of ``objs`` if absent (their names are deterministic); the names created now. One that
    exists and is the owner's is adopted; one of an earlier owner raises Waiting; a refusal of the API
    server raises Failed (403: a quota or policy) or Invalid (an object it will never accept); its
    trouble (5xx, 404, 408, 409, 429) is raised as is, for a retry with backoff."""
    _, ns, _ = key
    assert ctrl.api is not None
    created: list[str] = []
    for obj in objs:
        kind, child = obj["kind"], obj["metadata"]["name"]
        try:
            _, fresh = await ctrl.api.create(obj, ns)
        except ApiError as exc:
            if exc.status >= 500 or exc.status in (404, 408, 409, 429):
                raise
            cls = Failed if exc.status == 403 else Invalid
            raise cls(
                status_helpers.CHILD_REJECTED,
                f"the API server refused {kind} {child}: {exc.status} {exc.reason}: {exc.message}",
            ) from None
        if fresh:
            log.info("%s/%s/%s: created %s %s", *key, kind, child)
            created.append(child)
            continue
        there = await ctrl.api.get(kind, ns, child)  # made before; the cache has not seen it yet
        if there is not None and owner.get("uid") and controller_uid(there) != owner["uid"]:
            raise Waiting(
                status_helpers.OLD_CHILDREN,
                f"{kind} {child} exists and is not this {owner.get('kind')}'s; waiting for it to be deleted",
            )
    return created


__all__ = ["controller_uid", "create_owned", "owned_children"]
