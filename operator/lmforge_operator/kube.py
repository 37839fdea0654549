"""A small asynchronous Kubernetes API client for the operator's own calls (children, status, events).

kopf watches the resources; this client does everything else with the same credentials (kopf's
:class:`kopf.ConnectionInfo`, from the operator's login handler). It speaks plain JSON over aiohttp (a kopf
dependency), so the operator needs neither the ``kubernetes`` package nor its thread pool, and every call is a
coroutine on kopf's event loop.

Errors are :class:`ApiError` with the HTTP status; :meth:`Kube.get` answers ``None`` for 404 and
:meth:`Kube.create` tolerates 409 (create-if-absent under deterministic names).
"""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

from lmforge_jobs.kinds import KINDS as LMFORGE_KINDS
from lmforge_jobs.spec import GROUP_VERSION

# kind -> (apiVersion, plural) of everything the operator reads or writes.
KINDS: dict[str, tuple[str, str]] = {
    **{kind.name: (GROUP_VERSION, kind.plural) for kind in LMFORGE_KINDS.values()},
    "Job": ("batch/v1", "jobs"),
    "ConfigMap": ("v1", "configmaps"),
    "Service": ("v1", "services"),
    "Deployment": ("apps/v1", "deployments"),  # an Evaluation's voting page (arena.human)
    "NetworkPolicy": ("networking.k8s.io/v1", "networkpolicies"),
    "Lease": ("coordination.k8s.io/v1", "leases"),
    "Pod": ("v1", "pods"),
    "Event": ("v1", "events"),
    # Gang scheduling (spec.scheduling.gang): two schedulers' PodGroups share the kind, so the key names
    # the group (kind_key).
    "PodGroup.scheduling.volcano.sh": ("scheduling.volcano.sh/v1beta1", "podgroups"),
    "PodGroup.scheduling.x-k8s.io": ("scheduling.x-k8s.io/v1alpha1", "podgroups"),
}


def kind_key(obj: Mapping[str, Any]) -> str:
    """The :data:`KINDS` key of ``obj``: its kind, qualified by its API group where groups share a kind."""
    kind = str(obj["kind"])
    qualified = f"{kind}.{str(obj.get('apiVersion', '')).rpartition('/')[0]}"
    return qualified if qualified in KINDS else kind


class ApiError(Exception):
    """A refused API call: ``status`` is the HTTP status, ``reason`` the Status reason."""

    def __init__(self, status: int, reason: str, message: str, method: str = "", path: str = ""):
        super().__init__(f"{method} {path}: {status} {reason}: {message}".strip())
        self.status = status
        self.reason = reason
        self.message = message


def path_for(
    kind: str, namespace: str | None, name: str | None = None, subresource: str | None = None
) -> str:
    """URL path of a collection or object of ``kind`` (one of :data:`KINDS`)."""
    api_version, plural = KINDS[kind]
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = base + (f"/namespaces/{quote(namespace)}" if namespace else "") + f"/{plural}"
    if name:
        path += f"/{quote(name)}"
    if subresource:
        path += f"/{subresource}"
    return path


def _ssl_context(info: Any) -> ssl.SSLContext | bool:
    if getattr(info, "insecure", False):
        return False
    ctx = ssl.create_default_context(cafile=getattr(info, "ca_path", None) or None)
    ca_data = getattr(info, "ca_data", None)
    if ca_data:
        text = ca_data.decode() if isinstance(ca_data, bytes) else str(ca_data)
        if "BEGIN CERTIFICATE" not in text:
            text = base64.b64decode(text).decode()
        ctx.load_verify_locations(cadata=text)
    cert, key = getattr(info, "certificate_path", None), getattr(info, "private_key_path", None)
    if cert:
        ctx.load_cert_chain(cert, key)
    elif getattr(info, "certificate_data", None):
        import os
        import tempfile

        # ssl needs files; write them private to this process (the kubeconfig held them inline).
        fd, both = tempfile.mkstemp(prefix="lmforge-client-", suffix=".pem")
        with os.fdopen(fd, "wb") as fh:
            for blob in (info.certificate_data, info.private_key_data):
                data = blob if isinstance(blob, bytes) else str(blob).encode()
                fh.write(data if b"BEGIN" in data else base64.b64decode(data))
                fh.write(b"\n")
        ctx.load_cert_chain(both)
        os.unlink(both)
    return ctx


class Kube:
    """JSON calls against one API server. Create with a ConnectionInfo (or a server URL), then ``await
    start()``; ``await close()`` at shutdown."""

    TIMEOUT = 30.0
    """Seconds a call to the API server may take."""
    SCRAPE_TIMEOUT = 3.0
    """Seconds a job pod's Prometheus endpoint may take to answer."""

    def __init__(self, info: Any) -> None:
        self.info = info
        self.server = str(getattr(info, "server", info)).rstrip("/")
        self.session: Any = None
        self.pod_index: Callable[[str, str], list[dict[str, Any]]] | None = None
        """The pods of a Job by (namespace, job name) from a pod watch, when the operator has one
        (mirror.job_pods reads it instead of LISTing)."""

    async def start(self) -> None:
        import aiohttp

        headers = {"Accept": "application/json", "User-Agent": "lmforge-operator"}
        token = getattr(self.info, "token", None)
        if token:
            headers["Authorization"] = f"{getattr(self.info, 'scheme', None) or 'Bearer'} {token}"
        auth = None
        if getattr(self.info, "username", None):
            auth = aiohttp.BasicAuth(self.info.username, self.info.password or "")
        ssl_ctx = _ssl_context(self.info) if self.server.startswith("https") else False
        self.session = aiohttp.ClientSession(
            headers=headers,
            auth=auth,
            connector=aiohttp.TCPConnector(ssl=ssl_ctx, limit=64),
            timeout=aiohttp.ClientTimeout(total=self.TIMEOUT),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        if self.session is None:
            await self.start()
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if data is not None else None
        async with self.session.request(
            method, self.server + path, data=data, params=params, headers=headers
        ) as resp:
            text = await resp.text()
            if resp.status >= 400:
                try:
                    status = json.loads(text)
                    reason, message = status.get("reason", ""), status.get("message", text)
                except ValueError:
                    reason, message = resp.reason or "", text[:200]
                raise ApiError(resp.status, str(reason), str(message)[:500], method, path)
            return json.loads(text) if text else None

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return await self.request("GET", path_for(kind, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, kind: str, namespace: str | None, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        """Objects carrying all ``labels`` (selected by the server and checked again here)."""
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        found = await self.request("GET", path_for(kind, namespace), params={"labelSelector": selector})
        items = (found or {}).get("items") or []
        return [
            i
            for i in items
            if all(((i.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in labels.items())
        ]

    async def create(self, obj: Mapping[str, Any], namespace: str) -> tuple[dict[str, Any] | None, bool]:
        """Create ``obj`` if absent: (object, True) when created, (None, False) when it already existed."""
        try:
            created = await self.request("POST", path_for(kind_key(obj), namespace), body=obj)
            return created, True
        except ApiError as exc:
            if exc.status == 409:
                return None, False
            raise

    async def patch(
        self, kind: str, namespace: str, name: str, patch: Mapping[str, Any], subresource: str | None = None
    ) -> dict[str, Any] | None:
        """JSON merge patch; None when the object is gone."""
        try:
            return await self.request(
                "PATCH",
                path_for(kind, namespace, name, subresource),
                body=patch,
                content_type="application/merge-patch+json",
            )
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete with background propagation; False when it was already gone."""
        try:
            await self.request(
                "DELETE",
                path_for(kind, namespace, name),
                body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"},
            )
            return True
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise

    async def scrape(self, url: str) -> str | None:
        """Text of a job pod's Prometheus endpoint, or None when it does not answer."""
        import aiohttp

        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.SCRAPE_TIMEOUT)) as session,
                session.get(url) as resp,
            ):
                return await resp.text() if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None


__all__ = ["KINDS", "ApiError", "Kube", "kind_key", "path_for"]
