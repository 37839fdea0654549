"""A Kubernetes API emulator (kmock) and the lmforge operator (kopf), each on its own thread and event loop.

Used by tests/operator/ and bench/operator.py::

    with Cluster() as cluster, Operator(cluster) as op:
        cluster.create(manifest)                  # POST over HTTP, like kubectl
        cluster.wait(lambda: cluster.jobs())      # poll with a deadline
        cluster.finish_job("ns", "job-name")      # play the Job controller: PATCH .../status
        op.wait_reconciled("PretrainRun", "run")  # what the operator has seen so far is reconciled

"Nothing changes for a while" is checked after events, not after a sleep: ``op.wait_reconciled`` (the
resource neither queued nor being reconciled), ``op.wait_reconciles`` (n more reconciles of a kind, the
operator's own counter), ``op.wait_resyncs`` (the periodic resync came to each resource n times) and
``op.wait_until`` (a predicate on the controller: its cache of Jobs, its pod index); what reads the
controller's state is evaluated on the operator's loop.

kmock's gaps, handled here: it assigns no uid/resourceVersion/generation (every POST gets a uid and
generation 1 here, as the API server would give), replays existing objects as ADDED when a watch connects, ignores label selectors (the
operator filters again), has no garbage collector and no Job controller (``start_job``/``finish_job``
patch a Job's status the way the Job controller would, ``fail_job_by_policy`` the way it does when a
podFailurePolicy rule matches, and ``add_pod`` creates its pods, with any ``pod_status`` the kubelet could
write). ``refuse`` makes the API server answer chosen requests with an error Status (a quota, admission).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import kmock

from lmforge_operator import rbac
from lmforge_operator.kube import KINDS, path_for

NAMESPACE = "ml"

RESOURCES = {
    "lmforge.io/v1alpha1/corpora": ("Corpus", {"status"}),
    "lmforge.io/v1alpha1/pretrainruns": ("PretrainRun", {"status"}),
    "lmforge.io/v1alpha1/alignmentruns": ("AlignmentRun", {"status"}),
    "lmforge.io/v1alpha1/evaluations": ("Evaluation", {"status"}),
    "lmforge.io/v1alpha1/sweeps": ("Sweep", {"status"}),
    "lmforge.io/v1alpha1/scalingstudies": ("ScalingStudy", {"status"}),
    "batch/v1/jobs": ("Job", {"status"}),
    "v1/configmaps": ("ConfigMap", set()),
    "v1/services": ("Service", set()),
    "apps/v1/deployments": ("Deployment", set()),
    "networking.k8s.io/v1/networkpolicies": ("NetworkPolicy", set()),
    "coordination.k8s.io/v1/leases": ("Lease", set()),
    "v1/pods": ("Pod", {"status"}),
    "v1/events": ("Event", set()),
    "events.k8s.io/v1/events": ("Event", set()),
}
# Declared for kopf's discovery (it waits for them to exist), never served to the operator.
CLUSTER_RESOURCES = {
    "v1/namespaces": "Namespace",
    "apiextensions.k8s.io/v1/customresourcedefinitions": "CustomResourceDefinition",
}


@attrs.frozen
class Call:
    """One request the emulator served."""

    time: float
    method: str
    path: str
    params: dict[str, str]
    status: int
    agent: str
    name: str  # metadata.name of a POSTed object

    @property
    def by_operator(self) -> bool:
        return not self.agent.startswith("Python-urllib")


@attrs.define(kw_only=True)
class RecordingEmulator(kmock.KubernetesEmulator):
    """kmock's emulator, recording (monotonic time, method, path, query, status) of every request."""

    calls: list[Call] = attrs.field(factory=list)
    inflight: list[Any] = attrs.field(factory=list)
    indexed: bool = True  # False: kmock's stock lookup (a scan of every stored object per request)
    # (method, path suffix, object name or "", status, reason, message): requests the API server refuses
    # (a quota, an admission webhook)
    refusals: list[tuple[str, str, str, int, str, str]] = attrs.field(factory=list)

    def _KubernetesEmulator__get_objs(self, request: Any, strict: bool) -> list[Any]:
        """kmock finds an object by scanning every stored object per request (quadratic over a run): look a
        named object up by its key instead; lists and cluster-wide requests keep kmock's own scan."""
        named = request.name is not None and request.resource is not None
        if (
            self.indexed and named and (strict or request.namespace is not None)
        ):  # the one key kmock's scan would match
            obj = self._objects._objects.get((request.resource, request.namespace, request.name))
            return [] if obj is None else [obj]
        return self._scan_objs(request, strict)

    def _scan_objs(self, request: Any, strict: bool) -> list[Any]:
        return kmock.KubernetesEmulator._KubernetesEmulator__get_objs(self, request, strict)  # type: ignore[attr-defined]

    async def _handle(self, request: Any) -> Any:
        started = time.monotonic()
        code = 0
        # kmock matches each request by scanning every request it ever served (quadratic): keep only those
        # in flight (no reaction here counts requests); the full record is self.calls.
        self.inflight.append(request)
        self._requests[:] = self.inflight
        if str(request.method.value).upper() == "POST" and isinstance(request.data, dict):
            # what the API server assigns to every new object (the operator's children need a uid to own
            # theirs: a Sweep's trials own their Jobs)
            meta = request.data.setdefault("metadata", {})
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("generation", 1)
        try:
            refused = self._refusal(request)
            response = refused if refused is not None else await super()._handle(request)
            code = int(getattr(response, "status", 200))
            return response
        except Exception as exc:
            code = int(getattr(exc, "status", 500))
            raise
        finally:
            with contextlib.suppress(ValueError):
                self.inflight.remove(request)
            data = request.data if isinstance(request.data, dict) else {}
            self.calls.append(
                Call(
                    time=started,
                    method=str(request.method.value).upper(),
                    path=request.url.path,
                    params=dict(request.params),
                    status=code,
                    agent=str(request.headers.get("User-Agent", "")),
                    name=str((data.get("metadata") or {}).get("name") or ""),
                )
            )

    def _refusal(self, request: Any) -> Any:
        """The refusal of ``request`` the test asked for (a Status body, as the API server sends), or None."""
        import aiohttp.web

        method = str(request.method.value).upper()
        data = request.data if isinstance(request.data, dict) else {}
        name = str((data.get("metadata") or {}).get("name") or "")
        for m, suffix, only, code, reason, message in self.refusals:
            if m == method and request.url.path.endswith(suffix) and only in ("", name):
                body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason}
                return aiohttp.web.json_response({**body, "message": message, "code": code}, status=code)
        return None


def _serve_in_process(conn: Any, indexed: bool = True) -> None:
    """Child-process body of ``Cluster(process=True)``: kmock on this process's main thread; a thread answers
    the parent over ``conn`` (an int: the calls recorded from that index on; None: stop)."""
    cluster = Cluster(indexed=indexed)
    serving = threading.Thread(target=cluster._run, name="kmock", daemon=True)
    serving.start()
    if not cluster._ready.wait(30):
        conn.send(None)
        return
    conn.send(cluster.url)
    while True:
        try:
            since = conn.recv()
        except EOFError:
            break
        if since is None:
            break
        assert cluster.emulator is not None
        conn.send(cluster.emulator.calls[since:])
    if cluster._stop is not None:
        cluster.loop.call_soon_threadsafe(cluster._stop.set)
    serving.join(10)
    conn.send("stopped")


class Cluster:
    """kmock on a background thread (or, with ``process=True``, in a child process of its own, so that it
    shares no interpreter or GIL with the operator: the way an API server runs), with a blocking HTTP
    client for the test."""

    def __init__(self, process: bool = False, indexed: bool = True) -> None:
        self.process = process
        self.indexed = indexed
        self._child: Any = None
        self._conn: Any = None
        self._calls: list[Call] = []  # the child's record, as far as fetched
        self._lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="kmock", daemon=True)
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.emulator: RecordingEmulator | None = None
        self.url = ""
        self.tmp = tempfile.TemporaryDirectory(prefix="lmforge-kmock-")
        self.kubeconfig = Path(self.tmp.name) / "kubeconfig"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        # kmock re-raises every error it answered (404s, 409s) when it exits: those were expected here.
        with contextlib.suppress(BaseException):
            self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with RecordingEmulator(indexed=self.indexed) as emulator, kmock.Server(emulator) as server:
            for key, (kind, subresources) in RESOURCES.items():
                emulator.resources[key] = kmock.ResourceInfo(
                    kind=kind,
                    namespaced=True,
                    verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
                    subresources=subresources,
                )
            for key, kind in CLUSTER_RESOURCES.items():
                emulator.resources[key] = kmock.ResourceInfo(
                    kind=kind, namespaced=False, verbs={"get", "list", "watch"}
                )
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> Cluster:
        if self.process:
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")
            self._conn, child_conn = ctx.Pipe()
            self._child = ctx.Process(
                target=_serve_in_process, args=(child_conn, self.indexed), name="kmock", daemon=True
            )
            self._child.start()
            if not self._conn.poll(60) or not (url := self._conn.recv()):
                raise RuntimeError("kmock did not start")
            self.url = url
        else:
            self.thread.start()
            if not self._ready.wait(30):
                raise RuntimeError("kmock did not start")
        self.kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
                    "users": [{"name": "test", "user": {"token": "test-token"}}],
                    "contexts": [
                        {
                            "name": "kmock",
                            "context": {"cluster": "kmock", "user": "test", "namespace": NAMESPACE},
                        }
                    ],
                    "current-context": "kmock",
                }
            )
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._child is not None:
            with self._lock, contextlib.suppress(Exception):
                self._conn.send(None)
                self._conn.poll(15)
            self._child.join(5)
            if self._child.is_alive():
                self._child.terminate()
                self._child.join(5)
            self.tmp.cleanup()
            return
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(10)
        self.tmp.cleanup()

    # ------------------------------------------------------------------------------------------ HTTP
    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise
        return json.loads(text) if text else None

    def create(self, obj: dict[str, Any], namespace: str = NAMESPACE) -> dict[str, Any]:
        """POST an object (a uid and generation 1 added, as the API server would)."""
        obj = json.loads(json.dumps(obj))
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", namespace)
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("generation", 1)
        meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        return self.request("POST", path_for(obj["kind"], meta["namespace"]), obj)

    def get(self, kind: str, name: str, namespace: str = NAMESPACE) -> dict[str, Any] | None:
        return self.request("GET", path_for(kind, namespace, name))

    def list(self, kind: str, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
        return (self.request("GET", path_for(kind, namespace)) or {}).get("items") or []

    def patch(
        self, kind: str, name: str, patch: dict[str, Any], namespace: str = NAMESPACE, sub: str | None = None
    ) -> Any:
        return self.request(
            "PATCH", path_for(kind, namespace, name, sub), patch, content_type="application/merge-patch+json"
        )

    def status(self, kind: str, name: str, namespace: str = NAMESPACE) -> dict[str, Any]:
        return (self.get(kind, name, namespace) or {}).get("status") or {}

    def jobs(self, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
        return self.list("Job", namespace)

    def job_names(self, namespace: str = NAMESPACE) -> list[str]:
        return sorted(j["metadata"]["name"] for j in self.jobs(namespace))

    # --------------------------------------------------------------------------- the Job controller
    def start_job(self, name: str, namespace: str = NAMESPACE) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.patch("Job", name, {"status": {"active": 1, "ready": 1, "startTime": now}}, namespace, "status")

    def finish_job(
        self, name: str, namespace: str = NAMESPACE, *, failed: bool = False, message: str = ""
    ) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        job = self.get("Job", name, namespace) or {}
        completions = int((job.get("spec") or {}).get("completions") or 1)
        ctype = "Failed" if failed else "Complete"
        cond = {
            "type": ctype,
            "status": "True",
            "reason": "PodFailurePolicy" if failed else "Completed",
            "message": message,
            "lastTransitionTime": now,
        }
        status: dict[str, Any] = {"active": 0, "ready": 0, "conditions": [cond], "startTime": now}
        if failed:
            status["failed"] = 1
        else:
            status.update(succeeded=completions, completionTime=now)
        self.patch("Job", name, {"status": status}, namespace, "status")

    def add_pod(
        self,
        job_name: str,
        *,
        index: int = 0,
        ip: str | None = None,
        metrics_port: int | None = None,
        termination: dict[str, Any] | None = None,
        exit_code: int = 0,
        namespace: str = NAMESPACE,
        pod_status: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A pod of the Job: running with ``ip`` (its metrics port overridden), terminated with a message, or
        with the status ``pod_status`` given as is (e.g. Pending in ImagePullBackOff)."""
        job = self.get("Job", job_name, namespace)
        assert job is not None, job_name
        template = json.loads(json.dumps(job["spec"]["template"]))
        labels = dict(template["metadata"].get("labels") or {})
        labels.update({"job-name": job_name, "batch.kubernetes.io/job-completion-index": str(index)})
        spec = template["spec"]
        if metrics_port is not None:
            for port in spec["containers"][0].get("ports") or []:
                if port["name"] == "metrics":
                    port["containerPort"] = metrics_port
        status: dict[str, Any] = {"phase": "Running", "podIP": ip or "127.0.0.1"}
        if termination is not None:
            status = {
                "phase": "Succeeded" if exit_code == 0 else "Failed",
                "podIP": ip or "127.0.0.1",
                "containerStatuses": [
                    {
                        "name": "main",
                        "state": {"terminated": {"exitCode": exit_code, "message": json.dumps(termination)}},
                    }
                ],
            }
        if pod_status is not None:
            status = pod_status
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{job_name}-{index}-{uuid.uuid4().hex[:5]}", "labels": labels},
            "spec": spec,
            "status": status,
        }
        return self.create(pod, namespace)

    def refuse(
        self, method: str, path_suffix: str, code: int, reason: str, message: str, name: str = ""
    ) -> None:
        """From now on, answer ``method`` requests whose path ends with ``path_suffix`` (and whose body names
        ``name``, when given) with ``code`` and a Status of ``reason`` and ``message`` (a quota, an admission
        webhook; thread mode only). ``refusals.clear()`` on the emulator ends them."""
        assert self.emulator is not None
        self.emulator.refusals.append((method.upper(), path_suffix, name, code, reason, message))

    def fail_job_by_policy(self, name: str, message: str, namespace: str = NAMESPACE) -> None:
        """Fail a Job as the Job controller does when a podFailurePolicy FailJob rule matches: a
        FailureTarget condition, then Failed, both with reason PodFailurePolicy and ``message``."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        conds = [
            {"type": t, "status": "True", "reason": "PodFailurePolicy", "message": message}
            | {"lastTransitionTime": now}
            for t in ("FailureTarget", "Failed")
        ]
        status = {"active": 0, "ready": 0, "failed": 1, "conditions": conds, "startTime": now}
        self.patch("Job", name, {"status": status}, namespace, "status")

    # ------------------------------------------------------------------------------------- helpers
    @property
    def calls(self) -> list[Call]:
        return self.calls_since(0)

    def calls_since(self, since: int) -> list[Call]:
        """The requests kmock served, from the ``since``-th on (in order; ``Call.time`` is time.monotonic(),
        one clock for every process on the machine)."""
        if self._child is not None:
            with self._lock:  # fetch only what this side has not seen yet: polling stays linear
                self._conn.send(len(self._calls))
                self._calls.extend(self._conn.recv())
                return self._calls[since:]
        assert self.emulator is not None
        return list(self.emulator.calls[since:])

    def wait(self, predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
        """``predicate()`` once true, polled soon and then every 50 ms; an AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        pause = 0.005  # most conditions hold within one reconcile, some tens of milliseconds
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(pause)
            pause = min(0.05, pause * 2)

    def wait_phase(
        self, kind: str, name: str, phase: str, namespace: str = NAMESPACE, timeout: float = 30.0
    ) -> dict[str, Any]:
        last: dict[str, Any] = {}

        def check() -> Any:
            nonlocal last
            last = self.status(kind, name, namespace)
            return last if last.get("phase") == phase else None

        try:
            return self.wait(check, timeout, f"{kind}/{name} phase {phase}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last status: {json.dumps(last)[:1500]}") from None

    def wait_job(self, name: str, namespace: str = NAMESPACE, timeout: float = 20.0) -> dict[str, Any]:
        """The Job once it exists; on a timeout, the true conditions of every lmforge resource say why."""
        try:
            return self.wait(lambda: self.get("Job", name, namespace), timeout, f"Job {name}")
        except AssertionError as exc:
            phases = {
                f"{kind}/{o['metadata']['name']}": [
                    (c["type"], c["reason"], c["message"])
                    for c in (o.get("status") or {}).get("conditions", [])
                    if c["status"] == "True"
                ]
                for kind in ("Corpus", "PretrainRun", "AlignmentRun", "Evaluation")
                for o in self.list(kind, namespace)
            }
            raise AssertionError(f"{exc}; resources: {phases}") from None


class Operator:
    """The operator (kopf, handlers of lmforge_operator.handlers) on its own thread and event loop."""

    def __init__(self, cluster: Cluster, namespace: str = NAMESPACE, **config: Any) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.metrics_port = int(config.pop("metrics_port", -1))
        self.config = {"resync_seconds": 0.5, "workers": 8, **config}
        self.thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task[Any] | None = None
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.memo: Any = None
        self.error: BaseException | None = None

    def __enter__(self) -> Operator:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        os.environ["KUBECONFIG"] = str(self.cluster.kubeconfig)
        import kopf

        from lmforge_operator import handlers
        from lmforge_operator.controller import Config

        handlers.Options.config = Config(**self.config)
        handlers.Options.metrics_port = self.metrics_port
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.memo = kopf.Memo()

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            self.task = self.loop.create_task(
                kopf.operator(
                    namespaces=[self.namespace],
                    standalone=True,
                    stop_flag=self.stop_flag,
                    ready_flag=self.ready_flag,
                    memo=self.memo,
                )
            )
            try:
                self.loop.run_until_complete(self.task)
            except BaseException as exc:
                self.error = exc
            finally:
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
                self.loop.close()

        self.thread = threading.Thread(target=run, name="lmforge-operator", daemon=True)
        self.thread.start()
        if not self.ready_flag.wait(30):
            raise RuntimeError("the operator did not start")
        # The operator's watches are up once it has listed the kinds it watches.
        self.cluster.wait(lambda: self.controller is not None, 30, "the operator's controller")

    @property
    def controller(self) -> Any:
        return getattr(self.memo, "lmforge", None)

    # ------------------------------------------------------------------ what the controller has done
    def on_loop(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """``fn()`` run on the operator's event loop (between two of its steps), its result here."""
        assert self.loop is not None
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:  # handed to the waiting thread
                done.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return done.result(timeout)

    def reconciles(self, kind: str) -> int:
        """Reconciles of ``kind`` finished so far, ok or error (the controller's
        lmforge_operator_reconciles_total; its registry is the process's, and one operator runs at a time)."""
        counter = self.controller.metrics.reconciles
        return int(sum(counter.labels(kind, result)._value.get() for result in ("ok", "error")))

    def wait_reconciles(self, kind: str, n: int, since: int | None = None, timeout: float = 20.0) -> int:
        """Wait until ``n`` more reconciles of ``kind`` have finished than ``since`` (default: now); the
        count then. Reconciles of one resource never overlap: with ``n >= 2``, one of them began after
        ``since`` was counted."""
        start = self.reconciles(kind) if since is None else since
        return int(
            self.cluster.wait(
                lambda: (now := self.reconciles(kind)) >= start + n and now,
                timeout,
                f"{n} reconciles of {kind}",
            )
        )

    def wait_until(self, predicate: Callable[[Any], Any], what: str, timeout: float = 20.0) -> Any:
        """Wait until ``predicate(controller)``, evaluated on the operator's loop, is true (what it has seen:
        its cache of Jobs, its pod index); that value."""
        return self.cluster.wait(lambda: self.on_loop(lambda: predicate(self.controller)), timeout, what)

    def wait_resyncs(
        self, *resources: tuple[str, str], n: int = 2, namespace: str | None = None, timeout: float = 20.0
    ) -> None:
        """Wait until the next resync of each ``(kind, name)`` has been set ``n`` times from now: the periodic
        resync came to it ``n`` times (and reconciled it, or put it off a period when it needs none), or
        reconciles did."""
        keys = [(kind, namespace or self.namespace, name) for kind, name in resources]

        def due() -> list[float | None]:
            return [self.controller._due.get(key) for key in keys]

        seen = [[d] for d in self.on_loop(due)]

        def moved() -> bool:
            for history, now in zip(seen, self.on_loop(due), strict=True):
                if now is not None and now != history[-1]:
                    history.append(now)
            return all(len(history) > n for history in seen)

        self.cluster.wait(moved, timeout, f"{n} resyncs of {resources}")

    def wait_reconciled(
        self, kind: str, name: str, namespace: str | None = None, timeout: float = 20.0
    ) -> None:
        """Wait until the resource is neither queued nor being reconciled: every watch event the operator
        has seen of it (or of its Jobs) so far has been reconciled."""
        key = (kind, namespace or self.namespace, name)
        ctrl = self.controller

        def idle() -> bool:
            return key not in ctrl._queued and key not in ctrl._active and key not in ctrl._dirty

        self.cluster.wait(lambda: self.on_loop(idle), timeout, f"{kind}/{name} reconciled")

    def stop(self) -> None:
        """Graceful stop (SIGTERM)."""
        self.stop_flag.set()
        if self.thread is not None:
            self.thread.join(30)

    def kill(self) -> None:
        """Abrupt stop: cancel everything where it stands (no cleanup handlers beyond cancellation)."""
        if self.loop is not None and self.task is not None:
            self.loop.call_soon_threadsafe(self.task.cancel)
        if self.thread is not None:
            self.thread.join(30)
        self.stop_flag.set()  # kopf waits for it in an executor thread, which would outlive the loop


def kind_of(path: str) -> str | None:
    for kind in KINDS:
        if f"/{KINDS[kind][1]}" in path:
            return kind
    return None


def assert_rbac(cluster: Cluster) -> None:
    """Every API call the operator (kopf and lmforge's client) made is allowed by rbac.RULES."""
    checked = 0
    for call in cluster.calls:
        if not call.by_operator:
            continue
        parts = call.path.strip("/").split("/")
        if parts in (["api"], ["apis"], ["version"]) or (len(parts) <= 3 and "namespaces" not in parts):
            continue  # discovery: allowed to every authenticated user
        if parts[0] == "api":
            group, rest = "", parts[2:]
        else:
            group, rest = parts[1], parts[3:]
        namespaced = len(rest) >= 3 and rest[0] == "namespaces"
        if namespaced:
            rest = rest[2:]
        resource, named, sub = rest[0], len(rest) > 1, rest[2] if len(rest) > 2 else None
        verb = rbac.verb_for(call.method, named=named, watch=call.params.get("watch") == "true")
        full = f"{resource}/{sub}" if sub else resource
        assert rbac.allows(group, full, verb, namespaced=namespaced), f"{verb} {group}/{full}: {call.path}"
        checked += 1
    assert checked > 0
