"""The cache and the work queue: watch events in, keys out to the workers, a periodic resync.

kopf feeds watch events of the lmforge kinds and of the operator's Jobs into :meth:`WorkQueue.observe` and
:meth:`WorkQueue.observe_job`; those only update an in-memory cache and put the resource's key on the
queue (a key is queued at most once; a key re-queued while it is being reconciled runs again afterwards).
Workers take keys off the queue and reconcile them; a failed reconcile is retried with backoff.

The queue has two lanes: events (a watch event, a new resource, a dependency that changed, a retry) and
resyncs. Workers take from the resync lane only when the event lane is empty, so a resource created while
thousands are being resynced waits for one reconcile, not for all of them; a key waiting in the resync
lane that gets an event moves to the event lane. Each resource is resynced ``resync_seconds`` (± a random
``resync_jitter`` fraction) after its own last reconcile, so resyncs are spread over the period instead
of arriving all at once, and a resource an event just reconciled is not resynced right after.

Job pods come from kopf's pod index (:meth:`WorkQueue.set_pod_index`), fed by a watch of the operator's
pods, instead of a LIST per reconcile; until kopf has listed the pods the reconcile LISTs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from lmforge_operator import status as status_helpers
from lmforge_operator.controller.config import Config
from lmforge_operator.kube import ApiError, Kube

log = logging.getLogger("lmforge.operator")

Key = tuple[str, str, str]  # (kind, namespace, name)
TERMINAL = ("Succeeded", "Failed")
# Invalid for one of these reasons, a resource waits for a change of its spec or an event it gets anyway
SETTLED_INVALID = (status_helpers.SPEC_INVALID, status_helpers.CONFIG_ERROR, status_helpers.SPEC_CHANGED)
EVENT, RESYNC = 0, 1  # the queue's lanes, in the order workers take from them


class WorkQueue:
    """The cache of watched objects, the queue of keys to reconcile and its workers; :meth:`reconcile` is
    the subclass's."""

    def __init__(self, config: Config | None = None, metrics: Any = None) -> None:
        self.config = config or Config()
        self.metrics = metrics
        self.api: Kube | None = None
        self.cache: dict[Key, dict[str, Any]] = {}
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}  # (namespace, name) -> Job, from its watch
        self._lanes: tuple[deque[Key], deque[Key]] = (deque(), deque())
        self._queued: dict[Key, int] = {}  # key -> the lane it waits in (an entry elsewhere is stale)
        self._wakeup: asyncio.Event | None = None
        self._due: dict[Key, float] = {}  # key -> when it is resynced next (time.monotonic())
        self._due_heap: list[tuple[float, Key]] = []  # the same, ordered (entries not in _due are stale)
        self.pods: Mapping[tuple[str, str], Any] | None = None  # (namespace, job name) -> its pods
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
        self._due.pop(key, None)

    # ------------------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._ready = asyncio.Event()
        if self.api is not None:
            self._ready.set()
        if self._queued:
            self._wakeup.set()
        for i in range(max(1, self.config.workers)):
            self._tasks.append(asyncio.create_task(self._worker(), name=f"lmforge-worker-{i}"))
        self._tasks.append(asyncio.create_task(self._resync(), name="lmforge-resync"))

    def set_api(self, api: Kube) -> None:
        self.api = api
        self._attach_pod_index()
        if self._ready is not None:
            self._ready.set()

    def set_pod_index(self, pods: Mapping[tuple[str, str], Any]) -> None:
        """kopf's index of the operator's pods by (namespace, job name), complete from now on (kopf calls
        resource handlers only once every index has listed its objects)."""
        if self.pods is not pods:
            self.pods = pods
            self._attach_pod_index()

    def job_pods(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        """The pods of a Job, from the pod index (empty when it has none)."""
        assert self.pods is not None
        return [dict(p) for p in self.pods.get((namespace, job_name), ())]

    def _attach_pod_index(self) -> None:
        # mirror.job_pods(api, ...) reads the index through the client it is given; without one it LISTs
        if self.api is not None and self.pods is not None:
            reader: Callable[[str, str], list[dict[str, Any]]] = self.job_pods
            self.api.pod_index = reader

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
        """A watch event of one of the lmforge kinds."""
        meta = body.get("metadata") or {}
        key = (str(body.get("kind")), str(meta.get("namespace") or ""), str(meta.get("name")))
        if event_type == "DELETED":
            self.forget(key)
            if self.metrics is not None:
                self.metrics.phase(*key, None)
            self._wake_dependents(key)
            self._wake_owner(body)
            return
        prev = self.cache.get(key)
        self.cache[key] = body
        if prev is None or self._significant(prev, body):
            self.enqueue(key)
        if prev is None or prev.get("status") != body.get("status"):
            self._wake_owner(body)

    def _wake_owner(self, body: dict[str, Any]) -> None:
        """Reconcile the lmforge resource that controls ``body`` (a Sweep, of its trial): a trial's
        progress, metrics and end are what the Sweep reads."""
        meta = body.get("metadata") or {}
        for ref in meta.get("ownerReferences") or []:
            if ref.get("controller") and str(ref.get("apiVersion", "")).startswith("lmforge.io/"):
                owner = (str(ref.get("kind")), str(meta.get("namespace") or ""), str(ref.get("name")))
                if owner in self.cache:
                    self.enqueue(owner)

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
    def enqueue(self, key: Key, resync: bool = False) -> None:
        """Queue ``key`` in the event lane, or with ``resync`` in the resync lane (workers take from it only
        when the event lane is empty). A key already waiting in the resync lane moves to the event lane."""
        lane = RESYNC if resync else EVENT
        if key in self._active:
            if not resync:  # a resync of a resource being reconciled right now is moot
                self._dirty.add(key)
            return
        waiting = self._queued.get(key)
        if waiting is not None and waiting <= lane:
            return
        self._queued[key] = lane
        self._lanes[lane].append(key)
        if self._wakeup is not None:
            self._wakeup.set()
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._queued))

    def queued(self) -> list[Key]:
        """The keys waiting, in the order workers take them."""
        return [k for lane, q in enumerate(self._lanes) for k in q if self._queued.get(k) == lane]

    def _take(self) -> Key | None:
        for lane, q in enumerate(self._lanes):
            while q:
                key = q.popleft()
                if self._queued.get(key) == lane:
                    del self._queued[key]
                    return key
        return None

    def _wake_dependents(self, key: Key) -> None:
        """Reconcile the resources that refer to ``key`` (its phase or outputs changed, or it went away)."""
        for other in list(self._dependents.get(key, ())):
            if other in self.cache:
                self.enqueue(other)

    @staticmethod
    def needs_resync(key: Key, body: dict[str, Any]) -> bool:
        """Whether the periodic resync reconciles this resource: not when it is finished for its current
        generation (Succeeded, Failed, or Invalid for a reason only a spec change or an event it gets
        anyway can undo), except an Evaluation following checkpoints or running a voting page."""
        status = body.get("status") or {}
        generation = (body.get("metadata") or {}).get("generation")
        if key[0] == "Evaluation" and (body.get("spec") or {}).get("checkpoints") == "every":
            return True
        page = ((body.get("spec") or {}).get("arena") or {}).get("human")
        if key[0] == "Evaluation" and page is not None and page.get("enabled", True):
            return True  # its voting page's ratings are mirrored on every resync
        if status.get("observedGeneration") != generation:
            return True
        if status.get("phase") in TERMINAL:
            return False
        invalid = next((c for c in status.get("conditions") or [] if c.get("type") == "Invalid"), None)
        return not (status.get("phase") == "Invalid" and invalid and invalid.get("reason") in SETTLED_INVALID)

    def _schedule_resync(self, key: Key, now: float | None = None) -> None:
        """The next resync of ``key``: a period (± jitter) after now, its last reconcile."""
        jitter = max(0.0, min(1.0, self.config.resync_jitter))
        due = (time.monotonic() if now is None else now) + self.config.resync_seconds * random.uniform(
            1 - jitter, 1 + jitter
        )
        self._due[key] = due
        heapq.heappush(self._due_heap, (due, key))

    def resync_due(self, now: float | None = None) -> int:
        """Queue, in the resync lane, the resources whose resync is due; how many were queued. One that
        needs none (finished) is looked at again a period later."""
        now = time.monotonic() if now is None else now
        queued = 0
        heap = self._due_heap
        while heap and heap[0][0] <= now:
            due, key = heapq.heappop(heap)
            if self._due.get(key) != due:
                continue  # reconciled (and rescheduled) since, or forgotten
            del self._due[key]
            body = self.cache.get(key)
            if body is None:
                continue
            if self.needs_resync(key, body):
                self.enqueue(key, resync=True)
                queued += 1
            else:
                self._schedule_resync(key)
        if len(heap) > 4 * len(self._due) + 1024:  # drop stale entries now and then
            self._due_heap = [(d, k) for k, d in self._due.items()]
            heapq.heapify(self._due_heap)
        return queued

    async def _resync(self) -> None:
        tick = max(0.01, min(1.0, self.config.resync_seconds / 10))
        while True:
            await asyncio.sleep(tick)
            self.resync_due()

    # ------------------------------------------------------------------------------------ workers
    async def _worker(self) -> None:
        assert self._wakeup is not None and self._ready is not None
        while True:
            await self._ready.wait()
            key = self._take()
            if key is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            self._active.add(key)
            try:
                await self.reconcile_key(key)
            finally:
                self._active.discard(key)
                if key in self._dirty:
                    self._dirty.discard(key)
                    self.enqueue(key)
                if self.metrics is not None:
                    self.metrics.queue_depth.set(len(self._queued))

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
        if key in self.cache:
            self._schedule_resync(key)
        log.debug("reconciled %s/%s/%s in %.3fs: %s", *key, time.monotonic() - started, result)
        if self.metrics is not None:
            self.metrics.reconciles.labels(key[0], result).inc()
            self.metrics.duration.labels(key[0]).observe(time.monotonic() - started)


__all__ = ["EVENT", "RESYNC", "TERMINAL", "Key", "WorkQueue"]
