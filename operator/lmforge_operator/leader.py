"""Leader election over a ``coordination.k8s.io/v1`` Lease, so that only one of several operator replicas
reconciles at a time.

Every replica watches (kopf keeps its cache warm); only the holder of the Lease runs the controller's
workers. The algorithm is client-go's: the holder renews ``spec.renewTime`` every ``renew_seconds``; a
candidate takes the Lease over once it has seen the same record (holder, renewTime) unchanged for
``leaseDurationSeconds`` on its *own* monotonic clock (no comparison of clocks across machines), or at once
when the Lease has no holder (the previous leader released it on a graceful stop). Writes are merge patches
carrying the ``resourceVersion`` that was read, so when two candidates race, the API server lets exactly one
win (409 Conflict for the other). A leader that cannot renew within ``renew_deadline`` stops reconciling
before its Lease can expire, so two replicas never reconcile at once.

RBAC: ``get``, ``create`` and ``patch`` on ``leases`` in the Lease's namespace (the operator's own; the
chart grants them with a Role there, :data:`lmforge_operator.rbac.LEADER_RULES`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from lmforge_operator.kube import ApiError, Kube

log = logging.getLogger("lmforge.operator")

Callback = Callable[[], Awaitable[None]]


def _micro_time() -> str:
    """Now as a Kubernetes MicroTime (RFC 3339, microseconds, UTC)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElection:
    """Campaign for the Lease ``namespace/name`` as ``identity``; call ``on_started`` when this replica
    becomes the leader and ``on_stopped`` when it stops being one (lost, or not renewed in time)."""

    def __init__(
        self,
        namespace: str,
        name: str,
        identity: str,
        *,
        lease_seconds: float = 15.0,
        renew_seconds: float | None = None,
        retry_seconds: float | None = None,
    ) -> None:
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_seconds = lease_seconds
        self.renew_seconds = renew_seconds or max(0.1, lease_seconds / 3)
        self.retry_seconds = retry_seconds or max(0.1, lease_seconds / 5)
        self.renew_deadline = lease_seconds * 2 / 3
        self.api: Kube | None = None
        self.leading = False
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._renewed_at = 0.0
        self._api_ready = asyncio.Event()
        self._task: asyncio.Task[Any] | None = None

    def set_api(self, api: Kube) -> None:
        self.api = api
        self._api_ready.set()

    # ---------------------------------------------------------------------------------- one attempt
    async def try_acquire_or_renew(self) -> bool:
        """One round: True when this replica holds the Lease afterwards."""
        assert self.api is not None
        now = time.monotonic()
        lease = await self.api.get("Lease", self.namespace, self.name)
        stamp = _micro_time()
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(stamp, stamp, 0),
            }
            _, created = await self.api.create(body, self.namespace)
            return created  # False: another replica created it first
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), spec.get("leaseTransitions"))
        if record != self._observed:
            self._observed, self._observed_at = record, now
        duration = float(spec.get("leaseDurationSeconds") or self.lease_seconds)
        if holder and holder != self.identity and now - self._observed_at < duration:
            return False  # held by another replica that keeps renewing it
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if holder == self.identity else 1)
        acquired = spec.get("acquireTime") if holder == self.identity else stamp
        try:
            written = await self.api.patch(
                "Lease",
                self.namespace,
                self.name,
                self._guarded(lease, self._spec(acquired or stamp, stamp, transitions)),
            )
        except ApiError as exc:
            if exc.status == 409:  # another candidate wrote first
                return False
            raise
        return ((written or {}).get("spec") or {}).get("holderIdentity") == self.identity

    @staticmethod
    def _guarded(lease: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
        """A merge patch carrying the resourceVersion that was read: the API server refuses it (409) when the
        Lease changed since, so of two racing candidates only one wins."""
        version = (lease.get("metadata") or {}).get("resourceVersion")
        return {"metadata": {"resourceVersion": version}, "spec": spec} if version else {"spec": spec}

    def _spec(self, acquired: str, renewed: str, transitions: int) -> dict[str, Any]:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.lease_seconds)),
            "acquireTime": acquired,
            "renewTime": renewed,
            "leaseTransitions": transitions,
        }

    async def release(self) -> None:
        """Give the Lease up (a graceful stop): the next candidate takes it at once."""
        if not self.leading or self.api is None:
            return
        self.leading = False
        with contextlib.suppress(Exception):
            lease = await self.api.get("Lease", self.namespace, self.name)
            if lease is not None and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                released = {"holderIdentity": None, "leaseDurationSeconds": 1}
                await self.api.patch("Lease", self.namespace, self.name, self._guarded(lease, released))

    # ----------------------------------------------------------------------------------- the loop
    async def run(self, on_started: Callback, on_stopped: Callback) -> None:
        """Campaign forever (until cancelled)."""
        await self._api_ready.wait()
        while True:
            try:  # a leader's attempt may not outlast its renew deadline (the API call could hang)
                timeout = self._until_deadline() if self.leading else None
                held = await asyncio.wait_for(self.try_acquire_or_renew(), timeout)
            except Exception as exc:  # the API server is unreachable: keep the Lease until the deadline
                log.warning("leader election: %s", exc or type(exc).__name__)
                held = self.leading and self._until_deadline() > 0
            else:
                if held:
                    self._renewed_at = time.monotonic()
            if held and not self.leading:
                self.leading = True
                log.info("leader election: %s leads (Lease %s/%s)", self.identity, self.namespace, self.name)
                await on_started()
            elif not held and self.leading:
                self.leading = False
                log.warning("leader election: %s lost Lease %s/%s", self.identity, self.namespace, self.name)
                await on_stopped()
            pause = min(self.renew_seconds, self._until_deadline()) if self.leading else self.retry_seconds
            await asyncio.sleep(max(0.01, pause))

    def _until_deadline(self) -> float:
        """Seconds left before a leader that has not renewed must stop reconciling."""
        return self._renewed_at + self.renew_deadline - time.monotonic()

    def start(self, on_started: Callback, on_stopped: Callback) -> None:
        self._task = asyncio.create_task(self.run(on_started, on_stopped), name="lmforge-leader-election")

    async def stop(self) -> None:
        """Stop campaigning and release the Lease when held."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        await self.release()
        if self.api is not None:
            await self.api.close()


__all__ = ["LeaderElection"]
