"""The cache and the work queue: watch events in, keys out to the workers, a periodic resync.

kopf feeds watch events of the four kinds and of the operator's Jobs into :meth:`WorkQueue.observe` and
:meth:`WorkQueue.observe_job`; those only update an in-memory cache and put the resource's key on the
queue (a key is queued at most once; a key re-queued while it is being reconciled runs again afterwards).
Workers take keys off the queue and reconcile them; a failed reconcile is retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import Any

from lmforge_operator import status as status_helpers
from lmforge_operator.controller.config import Config
from lmforge_operator.kube import ApiError, Kube

log = logging.getLogger("lmforge.operator")

Key = tuple[str, str, str]  # (kind, namespace, name)
TERMINAL = ("Succeeded", "Failed")
# Invalid for one of these reasons, a resource waits for a change of its spec or an event it gets anyway
SETTLED_INVALID = (status_helpers.SPEC_INVALID, status_helpers.CONFIG_ERROR, status_helpers.SPEC_CHANGED)


class WorkQueue:
    """The cache of watched objects, the queue of keys to reconcile and its workers; :meth:`reconcile` is
    the subclass's."""

    def __init__(self, config: Config | None = None, metrics: Any = None) -> None:
        self.config = config or Config()
        self.metrics = metrics
        self.api: Kube | None = None
        self.cache: dict[Key, dict[str, Any]] = {}
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}  # (namespace, name) -> Job, from its watch
        self._queue: asyncio.Queue[Key] | None = None
        self._queued: set[Key] = set()
        self._active: set[Key] = set()
        self._dirty: set[Key] = set()
        self._failures: dict[Key, int] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._ready: asyncio.Event | None = None
        self._dependents: dict[Key, set[Key]] = {}  # referenced resource -> resources referring to it
        self.host = socket.gethostname()

    async def reconcile(self, body: dict[str, Any]) -> Any:
        raise NotImplementedError

    def forget(self, key: Key) -> None:
        """The resource is gone: drop what is remembered about it."""
        self.cache.pop(key, None)
        self._failures.pop(key, None)

    # ------------------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._ready = asyncio.Event()
        if self.api is not None:
            self._ready.set()
        for key in list(self._queued):
            self._queue.put_nowait(key)
        for i in range(max(1, self.config.workers)):
            self._tasks.append(asyncio.create_task(self._worker(), name=f"lmforge-worker-{i}"))
        self._tasks.append(asyncio.create_task(self._resync(), name="lmforge-resync"))

    def set_api(self, api: Kube) -> None:
        self.api = api
        if self._ready is not None:
            self._ready.set()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self.api is not None:
            await self.api.close()

    # ------------------------------------------------------------------------------- watch events
    def observe(self, body: dict[str, Any], event_type: str | None) -> None:
        """A watch event of one of the four kinds."""
        meta = body.get("metadata") or {}
        key = (str(body.get("kind")), str(meta.get("namespace") or ""), str(meta.get("name")))
        if event_type == "DELETED":
            self.forget(key)
            if self.metrics is not None:
                self.metrics.phase(*key, None)
            self._wake_dependents(key)
            return
        prev = self.cache.get(key)
        self.cache[key] = body
        if prev is None or self._significant(prev, body):
            self.enqueue(key)

    @staticmethod
    def _significant(prev: dict[str, Any], new: dict[str, Any]) -> bool:
        """A change the operator did not make itself (its own status patches only refresh the cache)."""
        pm, nm = prev.get("metadata") or {}, new.get("metadata") or {}
        return (
            prev.get("spec") != new.get("spec")
            or pm.get("generation") != nm.get("generation")
            or pm.get("deletionTimestamp") != nm.get("deletionTimestamp")
            or pm.get("uid") != nm.get("uid")
            or (prev.get("status") or {}).get("phase") != (new.get("status") or {}).get("phase")
        )

    def observe_job(self, body: dict[str, Any], event_type: str | None) -> None:
        """A watch event of a Job the operator created: remember it, and reconcile its owner."""
        meta = body.get("metadata") or {}
        job_key = (str(meta.get("namespace") or ""), str(meta.get("name")))
        if event_type == "DELETED":
            self.jobs.pop(job_key, None)
        else:
            self.jobs[job_key] = body
        labels = meta.get("labels") or {}
        kind, name = labels.get("lmforge.io/kind"), labels.get("lmforge.io/name")
        if kind and name:
            key = (kind, str(meta.get("namespace") or ""), name)
            if key in self.cache:
                self.enqueue(key)

    # -------------------------------------------------------------------------------------- queue
    def enqueue(self, key: Key) -> None:
        if key in self._active:
            self._dirty.add(key)
            return
        if key in self._queued:
            return
        self._queued.add(key)
        if self._queue is not None:
            self._queue.put_nowait(key)
            if self.metrics is not None:
                self.metrics.queue_depth.set(self._queue.qsize())

    def _wake_dependents(self, key: Key) -> None:
        """Reconcile the resources that refer to ``key`` (its phase or outputs changed, or it went away)."""
        for other in list(self._dependents.get(key, ())):
            if other in self.cache:
                self.enqueue(other)

    @staticmethod
    def needs_resync(key: Key, body: dict[str, Any]) -> bool:
        """Whether the periodic resync reconciles this resource: not when it is finished for its current
        generation (Succeeded, Failed, or Invalid for a reason only a spec change or an event it gets
        anyway can undo), except an Evaluation following checkpoints."""
        status = body.get("status") or {}
        generation = (body.get("metadata") or {}).get("generation")
        if key[0] == "Evaluation" and (body.get("spec") or {}).get("checkpoints") == "every":
            return True
        if status.get("observedGeneration") != generation:
            return True
        if status.get("phase") in TERMINAL:
            return False
        invalid = next((c for c in status.get("conditions") or [] if c.get("type") == "Invalid"), None)
        return not (status.get("phase") == "Invalid" and invalid and invalid.get("reason") in SETTLED_INVALID)

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.config.resync_seconds)
            for key, body in list(self.cache.items()):
                if self.needs_resync(key, body):
                    self.enqueue(key)

    # ------------------------------------------------------------------------------------ workers
    async def _worker(self) -> None:
        assert self._queue is not None and self._ready is not None
        while True:
            key = await self._queue.get()
            await self._ready.wait()
            self._queued.discard(key)
            self._active.add(key)
            try:
                await self.reconcile_key(key)
            finally:
                self._active.discard(key)
                if key in self._dirty:
                    self._dirty.discard(key)
                    self.enqueue(key)
                if self.metrics is not None:
                    self.metrics.queue_depth.set(self._queue.qsize())

    async def reconcile_key(self, key: Key) -> None:
        """Reconcile one resource; never raises (errors are logged, counted and retried with backoff)."""
        body = self.cache.get(key)
        if body is None:
            return
        started = time.monotonic()
        result = "ok"
        try:
            await self.reconcile(body)
            self._failures.pop(key, None)
        except Exception as exc:
            result = "error"
            n = self._failures[key] = self._failures.get(key, 0) + 1
            delay = min(60.0, 0.5 * 2 ** min(n, 7))
            log.warning("reconcile of %s/%s/%s failed (retry in %.1fs): %s", *key, delay, exc)
            if not isinstance(exc, ApiError):
                log.debug("traceback", exc_info=True)
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().call_later(delay, self.enqueue, key)
        log.debug("reconciled %s/%s/%s in %.3fs: %s", *key, time.monotonic() - started, result)
        if self.metrics is not None:
            self.metrics.reconciles.labels(key[0], result).inc()
            self.metrics.duration.labels(key[0]).observe(time.monotonic() - started)


__all__ = ["TERMINAL", "Key", "WorkQueue"]
