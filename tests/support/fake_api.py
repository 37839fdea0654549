"""An in-memory stand-in for the operator's API client (``lmforge_operator.kube.Api``), for reconcile tests
that need no HTTP: objects in a dict keyed by (kind, namespace, name), every call recorded.

It answers as the client answers a real API server (not as kmock does):

- ``get`` returns a copy of the stored object, or None (404);
- ``create`` of an existing name returns (None, False) (409 AlreadyExists), else stores a copy;
- ``patch`` applies a JSON merge patch (RFC 7386, the ``application/merge-patch+json`` the client sends):
  objects merge key by key, ``null`` removes a key, lists and scalars are replaced whole; it returns the
  patched object, or None when the object does not exist (404); a ``status`` subresource patch changes only
  ``status``, any other patch leaves ``status`` alone, as the API server does for kinds with a status
  subresource;
- ``list`` selects by equality on every given label;
- ``delete`` returns False when the object was already gone;
- ``scrape`` finds no Prometheus endpoint.

``calls`` holds (verb, kind or kind/subresource, name) of every get, create, patch and delete; Events are
kept apart in ``events`` and not stored or recorded.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

Key = tuple[str, str, str]


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: ``patch`` applied to ``target`` (neither is changed)."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    merged = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


class FakeApi:
    """The operator's API client over objects in a dict (see the module's docstring)."""

    def __init__(self, objects: Mapping[Key, dict[str, Any]] | None = None) -> None:
        self.objects: dict[Key, dict[str, Any]] = {k: copy.deepcopy(v) for k, v in (objects or {}).items()}
        self.calls: list[tuple[str, str, str]] = []
        self.events: list[dict[str, Any]] = []

    async def get(self, kind: str, ns: str, name: str) -> dict[str, Any] | None:
        self.calls.append(("get", kind, name))
        return copy.deepcopy(self.objects.get((kind, ns, name)))

    async def create(self, obj: Mapping[str, Any], ns: str) -> tuple[dict[str, Any] | None, bool]:
        if obj["kind"] == "Event":
            self.events.append(dict(obj))
            return dict(obj), True
        key = (obj["kind"], ns, obj["metadata"]["name"])
        self.calls.append(("create", key[0], key[2]))
        if key in self.objects:
            return None, False
        self.objects[key] = copy.deepcopy(dict(obj))
        return copy.deepcopy(self.objects[key]), True

    async def patch(
        self, kind: str, ns: str, name: str, patch: Mapping[str, Any], subresource: str | None = None
    ) -> dict[str, Any] | None:
        self.calls.append(("patch", kind if subresource is None else f"{kind}/{subresource}", name))
        stored = self.objects.get((kind, ns, name))
        if stored is None:
            return None
        if subresource == "status":
            patch = {"status": patch.get("status")} if "status" in patch else {}
        else:
            patch = {k: v for k, v in patch.items() if k != "status"}
        self.objects[(kind, ns, name)] = merge_patch(stored, patch)
        return copy.deepcopy(self.objects[(kind, ns, name)])

    async def delete(self, kind: str, ns: str, name: str) -> bool:
        self.calls.append(("delete", kind, name))
        return self.objects.pop((kind, ns, name), None) is not None

    async def list(self, kind: str, ns: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        return [
            copy.deepcopy(obj)
            for (k, n, _), obj in self.objects.items()
            if k == kind
            and n == ns
            and all(((obj.get("metadata") or {}).get("labels") or {}).get(a) == b for a, b in labels.items())
        ]

    async def scrape(self, url: str) -> str | None:
        return None

    async def close(self) -> None:
        pass
