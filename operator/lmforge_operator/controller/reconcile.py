"""The reconciler: level-based, restart-safe, dependency-ordered.

kopf feeds watch events of the four kinds and of the operator's Jobs into :meth:`Controller.observe` and
:meth:`Controller.observe_job`; those only update an in-memory cache and put the resource's key on a work
queue (a key is queued at most once; a key re-queued while it is being reconciled runs again afterwards).
Workers take keys off the queue and :meth:`reconcile` them from scratch:

1. validate the spec (the same models ``lmforge validate`` uses) → Invalid naming the field, no children;
   a reference to itself or a cycle → Invalid; a PretrainRun whose compute plan does not fit in GPU memory
   → Invalid (``status.plan`` is written at admission either way);
2. look for the children under their deterministic names (builders.py): none yet → check dependencies
   (Waiting with the reason until every referenced resource has the needed phase and outputs), resolve the
   references to their status.outputs and create the ConfigMap, Service and Job if absent (409 is fine);
3. otherwise mirror the Job's state into the conditions: progress and metrics from the rank-0 pod's
   Prometheus endpoint while it runs, the container's termination message when it ends, outputs on success;
   a Corpus advances stage by stage (one Indexed Job each); an Evaluation with ``checkpoints: every`` runs
   one Job per round, a new round whenever its PretrainRun has landed new checkpoints (rounds older than
   the newest two are deleted, their results kept in status.history);
4. patch ``status`` (validated by the kind's status model) only when it changed, post a Kubernetes Event on
   every phase transition, and wake the resources that depend on this one.

A periodic resync re-queues every resource that is not finished, so nothing depends on an event arriving.
There is no finalizer: children carry ownerReferences and the garbage collector deletes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from lmforge_jobs.manifest import KINDS as RESOURCE_KINDS
from lmforge_jobs.manifest import Resource, parse_resource
from lmforge_jobs.resolve import (
    NEEDS_RUNNING,
    UnresolvedReference,
    default_output,
    dependencies,
    expected_outputs,
    resolve,
)
from lmforge_jobs.spec import EXIT_CONFIG_ERROR
from lmforge_operator import status as st
from lmforge_operator.kube import ApiError, Kube

log = logging.getLogger("lmforge.operator")

Key = tuple[str, str, str]  # (kind, namespace, name)
TERMINAL = ("Succeeded", "Failed")
SPEC_ANNOTATION = "lmforge.io/spec"
SPEC_HASH_ANNOTATION = "lmforge.io/spec-digest"
CHECKPOINTS_ANNOTATION = "lmforge.io/checkpoints"
MAX_ROUNDS = 1000
KEEP_ROUNDS = 2  # round Jobs (and their pods and spec ConfigMaps) kept per Evaluation with checkpoints: every
_ROUND = re.compile(r"round (\d+): ")


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
    resync_seconds: float = field(
        default_factory=lambda: float(os.environ.get("LMFORGE_RESYNC_SECONDS", "15"))
    )
    """How often unfinished resources are reconciled without an event ($LMFORGE_RESYNC_SECONDS)."""
    workers: int = field(default_factory=lambda: int(os.environ.get("LMFORGE_WORKERS", "16")))
    """Resources reconciled concurrently ($LMFORGE_WORKERS)."""
    gpu: str = field(default_factory=lambda: os.environ.get("LMFORGE_GPU", "h100"))
    """GPU type the compute plan assumes ($LMFORGE_GPU: h100, h200, a100, l40s)."""
    scrape: bool = True
    """Read rank 0's Prometheus endpoint while a job runs."""
    events: bool = True
    """Post Kubernetes Events on phase transitions."""


def spec_hash(spec: Any) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _changed_fields(old: Any, new: Any, prefix: str = "spec") -> list[str]:
    """Field paths whose values differ between two spec dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new)):
            out += _changed_fields(old.get(k), new.get(k), f"{prefix}.{k}")
        return out
    return [] if old == new else [prefix]


def _status_model(kind: str) -> Any:
    model = RESOURCE_KINDS[kind].model_fields["status"].annotation
    return next(a for a in getattr(model, "__args__", (model,)) if a is not type(None))


def _status_fields(kind: str) -> set[str]:
    return {f.alias or n for n, f in _status_model(kind).model_fields.items()}


def validated_status(kind: str, status: dict[str, Any]) -> dict[str, Any]:
    """The status checked against the kind's status model (the CRD's status schema); raises on a bug."""
    return (
        _status_model(kind).model_validate(status).model_dump(by_alias=True, exclude_none=True, mode="json")
    )


@dataclass
class Outcome:
    phase: str
    reason: str
    message: str = ""


class Controller:
    """The work queue, the cache and the reconcile logic; see the module docstring."""

    def __init__(self, config: Config | None = None, metrics: Any = None) -> None:
        self.config = config or Config()
        self.metrics = metrics
        self.api: Kube | None = None
        self.cache: dict[Key, dict[str, Any]] = {}
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}  # (namespace, name) -> Job, from its watch
        self._parsed: dict[Key, tuple[str, Resource[Any, Any] | None, list[Any]]] = {}
        self._queue: asyncio.Queue[Key] | None = None
        self._queued: set[Key] = set()
        self._active: set[Key] = set()
        self._dirty: set[Key] = set()
        self._failures: dict[Key, int] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._ready: asyncio.Event | None = None
        self._locks: dict[Key, asyncio.Lock] = {}
        self._dependents: dict[Key, set[Key]] = {}  # referenced resource -> resources referring to it
        self.host = socket.gethostname()

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

    # --------------------------------------------------------------------------------------- events
    def observe(self, body: dict[str, Any], event_type: str | None) -> None:
        """A watch event of one of the four kinds."""
        meta = body.get("metadata") or {}
        key = (str(body.get("kind")), str(meta.get("namespace") or ""), str(meta.get("name")))
        if event_type == "DELETED":
            self.cache.pop(key, None)
            self._parsed.pop(key, None)
            self._locks.pop(key, None)
            self._failures.pop(key, None)
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

    def observe_job(self, body: dict[str, Any], event_type: str | None = None) -> None:
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
        s = body.get("status") or {}
        gen = (body.get("metadata") or {}).get("generation")
        if key[0] == "Evaluation" and (body.get("spec") or {}).get("checkpoints") == "every":
            return True
        if s.get("observedGeneration") != gen:
            return True
        if s.get("phase") in TERMINAL:
            return False
        invalid = next((c for c in s.get("conditions") or [] if c.get("type") == "Invalid"), None)
        settled = (st.SPEC_INVALID, st.CONFIG_ERROR, st.SPEC_CHANGED)
        return not (s.get("phase") == "Invalid" and invalid and invalid.get("reason") in settled)

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.config.resync_seconds)
            for key, body in list(self.cache.items()):
                if self.needs_resync(key, body):
                    self.enqueue(key)

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

    async def reconcile_key(self, key: Key) -> str:
        """Reconcile one resource; never raises (errors are logged, counted and retried with backoff)."""
        body = self.cache.get(key)
        if body is None:
            return "gone"
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
        return result

    # ------------------------------------------------------------------------------------ reconcile
    def parse(self, key: Key, body: dict[str, Any]) -> tuple[Resource[Any, Any] | None, list[Any]]:
        """The validated resource (cached per spec), or the problems that make it invalid."""
        doc = {
            "apiVersion": body.get("apiVersion"),
            "kind": body.get("kind"),
            "metadata": {
                k: v
                for k, v in (body.get("metadata") or {}).items()
                if k in ("name", "namespace", "labels", "annotations", "uid", "generation")
            },
            "spec": body.get("spec"),
        }
        text = json.dumps(doc, sort_keys=True, default=str)
        cached = self._parsed.get(key)
        if cached is not None and cached[0] == text:
            return cached[1], cached[2]
        resource, problems = parse_resource(doc, f"{key[0]}/{key[2]}")
        self._parsed[key] = (text, resource, problems)
        if resource is not None:  # reverse index: stale entries only cause a spare reconcile
            for _, ref, _ in dependencies(resource):
                self._dependents.setdefault((ref[0], key[1], ref[1]), set()).add(key)
        return resource, problems

    async def reconcile(self, body: dict[str, Any]) -> Outcome | None:
        meta = body.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            return None
        kind, ns, name = str(body["kind"]), str(meta.get("namespace") or ""), str(meta["name"])
        key = (kind, ns, name)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            body = self.cache.get(key, body)
            old = {k: v for k, v in (body.get("status") or {}).items() if k in _status_fields(kind)}
            status = copy.deepcopy(old)
            gen = meta.get("generation")
            outcome = await self._reconcile(key, body, status, gen)
            if gen is not None:
                status["observedGeneration"] = gen
            try:
                new = validated_status(kind, status)
            except Exception as exc:  # a bug of ours: say so in the log, never write a broken status
                log.error("status of %s/%s/%s does not validate: %s", *key, exc)
                raise
            if new != old:
                patch = {k: None for k in old if k not in new}
                patch.update(new)
                assert self.api is not None
                updated = await self.api.patch(kind, ns, name, {"status": patch}, subresource="status")
                if updated is not None and key in self.cache:
                    self.cache[key] = updated
                elif key in self.cache:
                    self.cache[key] = {**self.cache[key], "status": new}
            old_phase, new_phase = old.get("phase"), new.get("phase")
            if self.metrics is not None and key in self.cache:
                self.metrics.phase(kind, ns, name, new_phase)
            old_reason = next(
                (
                    c.get("reason")
                    for c in old.get("conditions") or []
                    if c.get("type") == old_phase and c.get("status") == "True"
                ),
                None,
            )
            if outcome is not None and (new_phase, outcome.reason) != (old_phase, old_reason):
                await self._event(body, outcome)  # a transition: the phase, or why it is in it
            if new_phase != old_phase:
                self._wake_dependents(key)
            return outcome

    async def _reconcile(
        self, key: Key, body: dict[str, Any], status: dict[str, Any], gen: int | None
    ) -> Outcome:
        kind, ns, name = key

        def state(true: str | None, reason: str, message: str = "", **kw: Any) -> Outcome:
            phase = st.set_state(status, true, reason, message, gen, **kw)
            return Outcome(phase, reason, message)

        resource, problems = self.parse(key, body)
        if resource is None:
            message = "; ".join(f"{p.field}: {p.message}" for p in problems) or "invalid resource"
            return state("Invalid", st.SPEC_INVALID, message)

        # References to itself, and cycles through the cache.
        for field_, ref, _ in dependencies(resource):
            if ref == (kind, name):
                return state("Invalid", st.DEPENDENCY_CYCLE, f"spec.{field_}: refers to this {kind} itself")
        cycle = self._cycle(key)
        if cycle:
            path = " → ".join(f"{k}/{n}" for k, _, n in cycle)
            field_ = next(f for f, ref, _ in dependencies(resource) if ref == (cycle[1][0], cycle[1][2]))
            return state("Invalid", st.DEPENDENCY_CYCLE, f"spec.{field_}: dependency cycle {path}")

        # The compute plan, at admission; a run that cannot fit is refused.
        if kind == "PretrainRun":
            refused = self._plan(resource, status, ns)
            if refused:
                return state("Invalid", st.DOES_NOT_FIT, refused)

        from lmforge_operator import builders

        owner = builders.owner_reference(body)
        output = resource.spec.output or default_output(kind, name, self.config.storage, ns)
        if kind == "Corpus":
            return await self._corpus(key, resource, status, owner, state)
        if kind == "Evaluation" and resource.spec.checkpoints.value == "every":
            return await self._rounds(key, resource, status, owner, output, state)

        job_name = builders.job_name(resource)
        assert self.api is not None
        job = await self._job(ns, job_name, status)
        if job is None:
            waiting = self._check_dependencies(resource, ns)
            if isinstance(waiting, Outcome):
                return state("Waiting", waiting.reason, waiting.message)
            created = await self._create(key, resource, owner, waiting, stage=None)
            if isinstance(created, Outcome):
                return state(created.phase, created.reason, created.message)
            job = created or await self._job(ns, job_name, None)
            if job is None:
                return state(None, st.JOB_CREATED, f"Job {job_name} created")
        changed = self._spec_changed(job, resource)
        if changed:
            return state("Invalid", st.SPEC_CHANGED, changed)
        return await self._mirror(key, resource, status, job, output, state)

    # -------------------------------------------------------------------------------------- helpers
    async def _job(self, ns: str, name: str, status: dict[str, Any] | None) -> dict[str, Any] | None:
        """The Job from the watch cache. On a miss it is read from the API server only when the resource
        may have Jobs already (``status`` says it got past Waiting, or ``status`` is None: just created);
        a new resource's Job is created if absent anyway (409 tolerated), so no read is needed for it."""
        job = self.jobs.get((ns, name))
        if job is not None:
            return job
        phase = (status or {}).get("phase") if status is not None else "?"
        if phase in (None, "Waiting"):
            return None
        assert self.api is not None
        job = await self.api.get("Job", ns, name)
        if job is not None:
            self.jobs.setdefault((ns, name), job)
        return job

    def _image(self, resource: Resource[Any, Any]) -> str:
        return getattr(resource.spec, "image", None) or self.config.image

    def _cycle(self, key: Key) -> list[Key] | None:
        """The path key → … → key through references, when there is one (resources in the cache)."""
        ns = key[1]

        def deps_of(k: Key) -> list[Key]:
            body = self.cache.get(k)
            if body is None:
                return []
            resource, _ = self.parse(k, body)
            if resource is None:
                return []
            return [(ref[0], ns, ref[1]) for _, ref, _ in dependencies(resource)]

        stack: list[tuple[Key, list[Key]]] = [(key, [key])]
        seen: set[Key] = set()
        while stack:
            node, path = stack.pop()
            for nxt in deps_of(node):
                if nxt == key:
                    return [*path, key]
                if nxt not in seen and len(path) < 64:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    def _plan(self, resource: Resource[Any, Any], status: dict[str, Any], ns: str) -> str | None:
        """Write status.plan; the message naming the field when the run cannot fit in GPU memory."""
        from lmforge_jobs import plan as planner

        vocab = None
        spec = resource.spec
        if spec.model.vocab_size == "auto" and spec.corpus is not None:
            corpus = self.cache.get(("Corpus", ns, spec.corpus.name))
            train = ((corpus or {}).get("spec") or {}).get("tokenizer", {}).get("train") or {}
            if isinstance(train.get("vocabSize"), int):
                vocab = train["vocabSize"]
        try:
            plan = planner.plan_pretrain(spec, vocab_size=vocab, gpu=self.config.gpu)
        except ValueError:
            return None  # a shape the planner does not model (encoder, encoder-decoder): no plan
        status["plan"] = plan.to_status().to_yaml_dict()
        if plan.fits:
            return None
        where = "spec.batch.microBatchSize" if spec.batch.micro_batch_size > 1 else "spec.parallelism"
        return f"{where}: does not fit in GPU memory: {plan.reason}"

    def _check_dependencies(
        self, resource: Resource[Any, Any], ns: str
    ) -> Outcome | dict[tuple[str, str], dict[str, Any]]:
        """Outputs of every referenced resource, or why this one must wait."""
        outputs: dict[tuple[str, str], dict[str, Any]] = {}
        waits: list[tuple[str, str]] = []
        for field_, ref, needs in dependencies(resource):
            target = self.cache.get((ref[0], ns, ref[1]))
            label = f"{ref[0]}/{ref[1]}"
            if target is None:
                waits.append((st.DEPENDENCY_NOT_FOUND, f"spec.{field_}: {label} not found"))
                continue
            ts = target.get("status") or {}
            phase = ts.get("phase") or "Pending"
            if phase in ("Failed", "Invalid"):
                waits.append((st.DEPENDENCY_FAILED, f"spec.{field_}: {label} is {phase}"))
                continue
            ok = phase == "Succeeded" or (needs == NEEDS_RUNNING and phase == "Running")
            if not ok:
                waits.append((st.DEPENDENCY_NOT_READY, f"spec.{field_}: waiting for {label} ({phase})"))
                continue
            found = dict(ts.get("outputs") or {})
            if phase == "Running":  # followed while it runs (checkpoints: every): where it will write
                out = (target.get("spec") or {}).get("output") or default_output(
                    ref[0], ref[1], self.config.storage, ns
                )
                found = {**expected_outputs(ref[0], out), **found}
            outputs[ref] = found
        if waits:
            order = [st.DEPENDENCY_FAILED, st.DEPENDENCY_NOT_FOUND, st.DEPENDENCY_NOT_READY]
            reason = min((r for r, _ in waits), key=order.index)
            return Outcome("Waiting", reason, "; ".join(m for _, m in waits))
        return outputs

    def _resolved_doc(
        self, resource: Resource[Any, Any], outputs: dict[tuple[str, str], dict[str, Any]], ns: str
    ) -> dict[str, Any] | Outcome:
        root_default = default_output(resource.kind, resource.name, self.config.storage, ns)
        try:
            resolved = resolve(resource, outputs, root_default)
        except UnresolvedReference as exc:
            return Outcome("Waiting", st.DEPENDENCY_NOT_READY, exc.message)
        return resolved.model_dump(by_alias=True, exclude_none=True, mode="json")

    def _annotate(self, obj: dict[str, Any], resource: Resource[Any, Any], extra: dict[str, str]) -> None:
        spec = resource.spec.to_yaml_dict()
        ann = obj.setdefault("metadata", {}).setdefault("annotations", {})
        ann[SPEC_HASH_ANNOTATION] = spec_hash(spec)
        ann[SPEC_ANNOTATION] = json.dumps(spec, sort_keys=True, separators=(",", ":"))
        ann.update(extra)

    async def _create(
        self,
        key: Key,
        resource: Resource[Any, Any],
        owner: dict[str, Any],
        outputs: dict[tuple[str, str], dict[str, Any]],
        *,
        stage: Any = None,
        generation: int = 0,
        extra: dict[str, str] | None = None,
    ) -> dict[str, Any] | Outcome | None:
        """Create the step's children if absent, in order: the Job as created (None if it existed), or an
        Outcome when the resource cannot be built (Invalid naming the field) or must wait."""
        from lmforge_operator import builders

        kind, ns, _ = key
        doc = self._resolved_doc(resource, outputs, ns)
        if isinstance(doc, Outcome):
            return doc
        try:
            objs = builders.children(
                resource, doc, owner, image=self._image(resource), stage=stage, generation=generation
            )
        except builders.BuildError as exc:
            where = exc.field if exc.field.startswith("spec") else f"spec.{exc.field}"
            return Outcome("Invalid", st.SPEC_INVALID, f"{where}: {exc.message}")
        created_job = None
        assert self.api is not None
        for obj in objs:
            if obj.get("kind") == "Job":
                self._annotate(obj, resource, extra or {})
            obj.setdefault("metadata", {})["namespace"] = ns
            made, fresh = await self.api.create(obj, ns)
            if fresh and self.metrics is not None:
                self.metrics.children.labels(kind, str(obj.get("kind"))).inc()
            if obj.get("kind") == "Job" and fresh:
                created_job = made
                log.info("%s/%s/%s: created Job %s", *key, obj["metadata"]["name"])
        return created_job

    def _spec_changed(self, job: dict[str, Any], resource: Resource[Any, Any]) -> str | None:
        ann = (job.get("metadata") or {}).get("annotations") or {}
        spec = resource.spec.to_yaml_dict()
        if ann.get(SPEC_HASH_ANNOTATION) in (None, spec_hash(spec)):
            return None
        try:
            before = json.loads(ann.get(SPEC_ANNOTATION) or "{}")
        except ValueError:
            before = {}
        fields = _changed_fields(before, spec) or ["spec"]
        return (
            f"{', '.join(fields)}: cannot change after Job {job['metadata']['name']} was created "
            "(restore the previous value, or delete and re-create the resource to run it again)"
        )

    async def _pods(self, ns: str, job_name: str) -> list[dict[str, Any]]:
        assert self.api is not None
        return await self.api.list("Pod", ns, {"job-name": job_name})

    async def _summary(self, ns: str, job_name: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        pods = await self._pods(ns, job_name)
        summaries = [s for p in pods if (s := st.termination_summary(p))]
        pod = st.rank0_pod(pods)
        best = st.termination_summary(pod) if pod is not None else None
        if best is None and summaries:
            best = summaries[-1]
        return best, pods

    async def _scrape(self, kind: str, pods: list[dict[str, Any]]) -> dict[str, Any] | None:
        pod = st.rank0_pod(pods)
        url = st.metrics_url(pod) if pod is not None else None
        if url is None or self.api is None:
            return None
        text = await self.api.scrape(url)
        if not text:
            return None
        return st.progress_from_metrics(kind, st.parse_prometheus(text))

    @staticmethod
    def _apply_progress(status: dict[str, Any], kind: str, progress: dict[str, Any]) -> None:
        from lmforge_operator.local import apply_progress

        before = {k: v for k, v in (status.get("progress") or {}).items() if k != "updatedAt"}
        apply_progress(status, kind, progress)
        after = status.get("progress") or {}
        if before == {k: v for k, v in after.items() if k != "updatedAt"} and "updatedAt" in before:
            after["updatedAt"] = before["updatedAt"]  # unchanged numbers: no status write
        elif after:
            after["updatedAt"] = st.now_iso()
        if kind == "Corpus":
            status.pop("stage", None)  # the Corpus stage comes from its Jobs, not the job's names

    def _apply_summary(
        self, status: dict[str, Any], resource: Resource[Any, Any], summary: dict[str, Any], output: str
    ) -> None:
        kind = resource.kind
        progress = {k: summary[k] for k in ("step", "tokens") if k in summary}
        if summary.get("metrics"):
            progress["metrics"] = summary["metrics"]
        if progress:
            self._apply_progress(status, kind, progress)
        results = summary.get("results")
        if kind == "Evaluation" and isinstance(results, dict):
            status.update(st.evaluation_results(results))
        if kind == "Corpus":
            stats = results if isinstance(results, dict) else summary
            status.update(st.corpus_counts({"tokens": summary.get("tokens"), **stats}))

    def _outputs(
        self, resource: Resource[Any, Any], output: str, summary: dict[str, Any] | None
    ) -> dict[str, Any]:
        outputs = expected_outputs(resource.kind, output, resource.spec)
        reported = (summary or {}).get("outputs")
        if isinstance(reported, dict):
            outputs.update({k: str(v) for k, v in reported.items() if isinstance(v, str | int | float)})
        fields = _status_model(resource.kind).model_fields["outputs"].annotation
        model = next(a for a in getattr(fields, "__args__", (fields,)) if a is not type(None))
        allowed = {f.alias or n for n, f in model.model_fields.items()}
        return {k: v for k, v in outputs.items() if k in allowed}

    @staticmethod
    def _left_out(summary: dict[str, Any] | None, outputs: dict[str, Any]) -> str:
        """What an oversized termination summary left out of status, and where all of it is."""
        dropped = (summary or {}).get("truncated")
        if not isinstance(dropped, list) or not dropped:
            return ""
        where = outputs.get("results") or ", ".join(str(v) for v in outputs.values()) or "the job's output"
        what = ", ".join(str(d) for d in dropped)[:300]
        return f"; status lacks {what} (the 4 KiB termination message could not hold them): see {where}"

    def _failed(self, state: Any, job_name: str, js: st.JobState, summary: dict[str, Any] | None) -> Outcome:
        summary = summary or {}
        message = str(summary.get("message") or js.message or "the job failed")
        config_error = (
            summary.get("state") == "Invalid"
            or summary.get("exitCode") == EXIT_CONFIG_ERROR
            # no pod left to ask: the Job's own condition names the podFailurePolicy rule that matched
            or (js.message.startswith("PodFailurePolicy") and f"exit code {EXIT_CONFIG_ERROR}" in js.message)
        )
        if config_error:
            field_ = summary.get("field")
            where = f"spec.{field_}: " if field_ and not message.startswith("spec.") else ""
            return state("Invalid", st.CONFIG_ERROR, f"{where}{message} (Job {job_name})")
        return state("Failed", st.JOB_FAILED, f"Job {job_name}: {message}")

    async def _mirror(
        self,
        key: Key,
        resource: Resource[Any, Any],
        status: dict[str, Any],
        job: dict[str, Any],
        output: str,
        state: Any,
    ) -> Outcome:
        """Conditions, progress, metrics and outputs of a single-Job resource from its Job and pods."""
        kind, ns, _ = key
        js = st.job_state(job)
        if js.start_time and not status.get("startTime"):
            status["startTime"] = js.start_time
        if js.state == "Queued":
            queue = getattr(resource.spec, "queue", None)
            return state(
                "Waiting", st.QUEUED, f"Job {js.name} is suspended until Kueue admits it (queue {queue})"
            )
        if js.state == "Pending":
            return state(None, st.JOB_CREATED, f"Job {js.name} created, waiting for its pods")
        if js.state == "Running":
            if kind == "PretrainRun":
                status["outputs"] = {"checkpoint": expected_outputs(kind, output)["checkpoint"]}
            if self.config.scrape:
                progress = await self._scrape(kind, await self._pods(ns, js.name))
                if progress:
                    self._apply_progress(status, kind, progress)
            return state("Running", st.JOB_RUNNING, f"Job {js.name} is running")
        # a finished resource keeps its verdict: Invalid (exit 64) must not turn into Failed once the
        # failed pods (and their termination messages) are gone
        phase = status.get("phase")
        already = phase in ("Failed", "Invalid") or (phase == "Succeeded" and bool(status.get("outputs")))
        if js.state == "Succeeded":
            message = f"Job {js.name} succeeded"
            if not already:
                summary, _ = await self._summary(ns, js.name)
                if summary:
                    self._apply_summary(status, resource, summary, output)
                status["outputs"] = self._outputs(resource, output, summary)
                message += self._left_out(summary, status["outputs"])
                progress = dict(status.get("progress") or {})
                if progress.get("totalSteps"):
                    progress["step"] = max(progress.get("step", 0), progress["totalSteps"])
                progress.update(percent=100.0, etaSeconds=0, updatedAt=st.now_iso())
                status["progress"] = progress
            else:  # the pods may be gone: keep what was said when the summary was read
                message = (st.condition(status, "Succeeded") or {}).get("message") or message
            status.setdefault("completionTime", js.completion_time or st.now_iso())
            return state("Succeeded", st.JOB_SUCCEEDED, message)
        # Failed
        status.setdefault("completionTime", js.completion_time or st.now_iso())
        if already:
            c = st.condition(status, "Failed") or st.condition(status, "Invalid") or {}
            true = "Invalid" if (st.condition(status, "Invalid") or {}).get("status") == "True" else "Failed"
            return state(true, c.get("reason") or st.JOB_FAILED, c.get("message") or "")
        summary, _ = await self._summary(ns, js.name)
        return self._failed(state, js.name, js, summary)

    # ------------------------------------------------------------------------------------ Corpus
    async def _corpus(
        self,
        key: Key,
        resource: Resource[Any, Any],
        status: dict[str, Any],
        owner: dict[str, Any],
        state: Any,
    ) -> Outcome:
        from lmforge_jobs.data.stages import stages
        from lmforge_operator import builders

        kind, ns, _ = key
        output = resource.spec.output or default_output(kind, key[2], self.config.storage, ns)
        plan = stages(resource.spec)
        done: list[str] = []
        assert self.api is not None
        current: tuple[Any, dict[str, Any] | None] | None = None
        last_job: dict[str, Any] = {}
        for stage in plan:
            job = await self._job(ns, builders.job_name(resource, stage), status)
            if job is not None and st.job_state(job).state == "Succeeded":
                done.append(stage.name)
                last_job = job
                continue
            current = (stage, job)
            break
        status["completedStages"] = done
        n = len(plan)
        if current is None:  # every stage succeeded
            if not (status.get("phase") == "Succeeded" and status.get("outputs")):
                summary, _ = await self._summary(ns, last_job["metadata"]["name"])
                if summary:
                    self._apply_summary(status, resource, summary, output)
                status["outputs"] = self._outputs(resource, output, summary)
            status["stage"] = "Done"
            status["progress"] = {"step": n, "totalSteps": n, "percent": 100.0, "etaSeconds": 0}
            status.setdefault("completionTime", st.now_iso())
            return state("Succeeded", st.JOB_SUCCEEDED, f"all {n} stages succeeded")
        stage, job = current
        if job is None:
            made = await self._create(key, resource, owner, {}, stage=stage)
            if isinstance(made, Outcome):
                return state(made.phase, made.reason, made.message)
            job = made or await self._job(ns, builders.job_name(resource, stage), None)
            if job is None:
                return state(None, st.JOB_CREATED, f"stage {stage.name} created")
        changed = self._spec_changed(job, resource)
        if changed:
            return state("Invalid", st.SPEC_CHANGED, changed)
        js = st.job_state(job)
        status["stage"] = stage.phase
        frac = (js.succeeded / js.completions) if js.completions else 0.0
        percent = round(100.0 * (len(done) + frac) / n, 2)
        prev = status.get("progress") or {}
        progress = {"step": len(done), "totalSteps": n, "percent": percent}
        if {k: prev.get(k) for k in progress} != progress:
            progress["updatedAt"] = st.now_iso()
        else:
            progress = prev
        status["progress"] = progress
        if js.start_time and not status.get("startTime"):
            status["startTime"] = js.start_time
        if js.state == "Queued":
            return state(
                "Waiting", st.QUEUED, f"stage {stage.name}: Job {js.name} is suspended until Kueue admits it"
            )
        if js.state == "Failed":
            status.setdefault("completionTime", js.completion_time or st.now_iso())
            if status.get("phase") in ("Failed", "Invalid"):
                c = st.condition(status, status["phase"]) or {}
                return state(status["phase"], c.get("reason") or st.JOB_FAILED, c.get("message") or "")
            summary, _ = await self._summary(ns, js.name)
            return self._failed(state, js.name, js, summary)
        if js.state == "Pending":
            return state(
                None, st.JOB_CREATED, f"stage {stage.name}: Job {js.name} created, waiting for its pods"
            )
        if js.state == "Running" and self.config.scrape:
            scraped = await self._scrape(kind, await self._pods(ns, js.name))
            if scraped and scraped.get("metrics"):
                status["metrics"] = st.metrics_for_status(kind, scraped["metrics"]) or status.get("metrics")
        msg = f"stage {len(done) + 1}/{n} {stage.name}: {stage.description}"
        return state("Running", st.JOB_RUNNING, msg)

    # -------------------------------------------------------------------- Evaluation, checkpoints: every
    def _checkpoint_marker(self, resource: Resource[Any, Any], ns: str) -> tuple[str, bool] | None:
        """(marker of the checkpoints its PretrainRun has landed, whether that run is finished)."""
        ref = resource.spec.model.reference()
        target = self.cache.get((ref[0], ns, ref[1])) if ref else None
        if target is None:
            return None
        ts = target.get("status") or {}
        if ts.get("phase") == "Succeeded":
            return "final", True
        every = ((target.get("spec") or {}).get("checkpoint") or {}).get("everySteps") or 1000
        step = int((ts.get("progress") or {}).get("step") or 0)
        return str(step // int(every)), False

    async def _rounds(
        self,
        key: Key,
        resource: Resource[Any, Any],
        status: dict[str, Any],
        owner: dict[str, Any],
        output: str,
        state: Any,
    ) -> Outcome:
        from lmforge_operator import builders

        ns = key[1]
        assert self.api is not None

        # Rounds older than the last KEEP_ROUNDS are deleted once recorded in status.history: look from the
        # last recorded one on (from 0 when none is, or when that Job is gone too).
        recorded = [
            int(m.group(1))
            for h in status.get("history") or []
            if (m := _ROUND.match(str(h.get("checkpoint") or "")))
        ]
        seen: list[int] = []
        latest: tuple[int, dict[str, Any]] | None = None
        for first in dict.fromkeys((max(recorded, default=0), 0)):
            for r in range(first, MAX_ROUNDS):
                job = await self._job(ns, builders.job_name(resource, None, r), status)
                if job is None:
                    break
                seen.append(r)
                latest = (r, job)
            if latest is not None:
                break
        marker = self._checkpoint_marker(resource, ns)
        if latest is None:
            waiting = self._check_dependencies(resource, ns)
            if isinstance(waiting, Outcome):
                return state("Waiting", waiting.reason, waiting.message)
            if marker is None or marker[0] == "0":
                return state(
                    "Waiting", st.WAITING_FOR_CHECKPOINT, "no checkpoint of the model has landed yet"
                )
            made = await self._create(
                key, resource, owner, waiting, generation=0, extra={CHECKPOINTS_ANNOTATION: marker[0]}
            )
            if isinstance(made, Outcome):
                return state(made.phase, made.reason, made.message)
            return state(None, st.JOB_CREATED, f"round 0 created for checkpoints {marker[0]}")
        r, job = latest
        changed = self._spec_changed(job, resource)
        if changed:
            return state("Invalid", st.SPEC_CHANGED, changed)
        js = st.job_state(job)
        evaluated = js.annotations.get(CHECKPOINTS_ANNOTATION, "")
        if js.state in ("Pending", "Queued", "Running"):
            return await self._mirror(key, resource, status, job, output, state)
        if js.state == "Failed":
            return await self._mirror(key, resource, status, job, output, state)
        # The latest round succeeded: record its results once, then start another if checkpoints landed.
        history = status.setdefault("history", [])
        if not any(h.get("checkpoint") == f"round {r}: {evaluated}" for h in history):
            summary, _ = await self._summary(ns, js.name)
            results = (summary or {}).get("results")
            if isinstance(results, dict):
                from lmforge_jobs.evaluate.config import Results

                fields = {f.alias or n for n, f in Results.model_fields.items()}
                entry = {k: v for k, v in results.items() if k in fields}
                entry["checkpoint"] = f"round {r}: {evaluated}"
                history.append(entry)
                status["history"] = history[-1000:]
                status["results"] = {k: v for k, v in entry.items()}
            status["outputs"] = self._outputs(resource, output, summary)
        if marker is not None and marker[0] != evaluated:
            waiting = self._check_dependencies(resource, ns)
            outputs = waiting if not isinstance(waiting, Outcome) else {}
            made = await self._create(
                key, resource, owner, outputs, generation=r + 1, extra={CHECKPOINTS_ANNOTATION: marker[0]}
            )
            if isinstance(made, Outcome):
                return state(made.phase, made.reason, made.message)
            await self._prune_rounds(resource, ns, r + 1, seen)
            return state("Running", st.JOB_CREATED, f"round {r + 1} created for checkpoints {marker[0]}")
        if marker is not None and marker[1]:
            status.setdefault("completionTime", js.completion_time or st.now_iso())
            return state("Succeeded", st.JOB_SUCCEEDED, f"{r + 1} rounds evaluated, the final model included")
        return state("Running", st.WAITING_FOR_CHECKPOINT, f"round {r} done; waiting for the next checkpoint")

    async def _prune_rounds(
        self, resource: Resource[Any, Any], ns: str, newest: int, seen: list[int]
    ) -> None:
        """Round ``newest`` was just created: delete the Job (its pods with it) and spec ConfigMap of round
        ``newest - KEEP_ROUNDS`` (each older one went when its successor's successor came), and of any older
        round still seen. Their results are in status.history and results.json. Best effort: a refusal
        is logged, and the round is tried again only if it is seen again."""
        from lmforge_operator import builders

        assert self.api is not None
        cutoff = newest - KEEP_ROUNDS
        for r in sorted({r for r in seen if r < cutoff} | ({cutoff} if cutoff >= 0 else set())):
            job = builders.job_name(resource, None, r)
            try:
                await self.api.delete("Job", ns, job)
                await self.api.delete("ConfigMap", ns, builders.configmap_name(resource, r))
            except ApiError as exc:
                log.warning("%s/%s/%s: round %d not cleaned up: %s", resource.kind, ns, resource.name, r, exc)
                continue
            self.jobs.pop((ns, job), None)
            log.info("%s/%s/%s: deleted round %d (Job %s)", resource.kind, ns, resource.name, r, job)

    # ------------------------------------------------------------------------------------- events
    async def _event(self, body: dict[str, Any], outcome: Outcome) -> None:
        if not self.config.events or self.api is None:
            return
        meta = body.get("metadata") or {}
        ns = meta.get("namespace") or "default"
        warning = outcome.phase in ("Failed", "Invalid")
        stamp = st.now_iso()
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
            "reason": outcome.reason,
            "message": f"{outcome.phase}: {outcome.message}"[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": "lmforge-operator", "host": self.host},
            "reportingComponent": "lmforge.io/operator",
            "reportingInstance": self.host,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            await self.api.create(event, ns)
        except ApiError as exc:  # an event is best effort
            log.debug("event not posted: %s", exc)

    # ------------------------------------------------------------------------------------- testing
    def keys(self) -> Iterable[Key]:
        return list(self.cache)


__all__ = ["Config", "Controller", "default_image", "spec_hash", "validated_status"]
