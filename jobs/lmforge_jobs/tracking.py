"""Experiment tracking of a job: MLflow runs, TensorBoard event files, W&B offline runs.

Every job reports through :class:`lmforge_jobs.telemetry.Telemetry`; the speaking process's Telemetry
forwards the same numbers to the job's :class:`Tracker`, which :func:`lmforge_jobs.entry.job_main`
activates for the resource being run (:func:`activate`). No job logs to a tracker by itself.

What is logged where:

* **MLflow** (``spec.tracking.mlflow``; unset: whenever ``MLFLOW_TRACKING_URI`` is set). One run per
  resource in experiment ``spec.tracking.experiment``, else ``<namespace>/<name>``; a Sweep's trial (label
  ``lmforge.io/sweep``) goes to ``<namespace>/<sweep>``, as a child of one parent run named after the
  sweep. Parameters: the flattened spec (``spec.model.layers``…), values longer than
  :data:`MAX_PARAM_LENGTH` cut and suffixed with their digest. Metrics: what Telemetry reports at each
  step (loss, tokensPerSecond, mfu, evalLoss, lr…), sent in batches; at the end the numeric results
  (``results.<path>``). Artifacts: outputs.json, results.json, a model card (README.md of a local model
  output) and report plots (``*.png``, ``*.html`` in the run directory) when present.
* **TensorBoard** (``spec.tracking.tensorboard: true``): the same scalars as event files in
  ``<output>/tensorboard/``; an output on object storage gets them written locally and uploaded there
  at every saved checkpoint (``Telemetry.saved``), every few minutes, at every forced progress update (a
  stop, an export) and at the end.
* **W&B** (``WANDB_MODE=offline`` in the environment): an offline run in ``<output>/wandb/`` when
  ``wandb`` is importable (``wandb sync`` uploads it later); otherwise a message says it is not installed.

Resuming: the MLflow run id (and the W&B run id) is kept in ``<output>/tracking.json`` with the spec's
digest; a resumed job of the same spec continues that run instead of starting another.

The server's address and credentials come from the environment only (``MLFLOW_TRACKING_URI``,
``MLFLOW_TRACKING_USERNAME``/``_PASSWORD`` or ``_TOKEN``): the chart's ``tracking`` values on a cluster,
the shell of ``lmforge run`` on a laptop. A tracking backend that fails (the server is down, a value is
refused) prints one warning and is switched off for the rest of the job: tracking never fails a run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge_jobs import storage
from lmforge_jobs.kinds import SWEEP_LABEL

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
WANDB_MODE_ENV = "WANDB_MODE"
STATE_FILE = "tracking.json"
TENSORBOARD_DIR = "tensorboard"
MAX_PARAM_LENGTH = 500
"""Longer parameter values are cut and end in ``…sha256:<16 hex digits>`` of the whole value."""
FLUSH_SECONDS = 10.0
"""Metrics go to MLflow in one request at most this often (and at every forced update and the end)."""
UPLOAD_SECONDS = 300.0
"""TensorBoard files of an output on object storage are uploaded at least this often."""
MAX_ARTIFACT_BYTES = 50 * 1024 * 1024
# A tracking server that is down must cost seconds, not MLflow's default of 7 retries with backoff.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}
_KEY_BAD = re.compile(r"[^\w\-. /:]")


# ------------------------------------------------------------------------------------------- helpers
def param_value(value: Any) -> str:
    """A parameter's text, cut to :data:`MAX_PARAM_LENGTH` with the digest of the whole value."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    if len(text) <= MAX_PARAM_LENGTH:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    suffix = f"…sha256:{digest}"
    return text[: MAX_PARAM_LENGTH - len(suffix)] + suffix


def flatten(doc: Any, prefix: str = "") -> dict[str, str]:
    """``{"model": {"layers": 2}, "sources": [{"jsonl": …}]}`` → ``{"model.layers": "2",
    "sources.0.jsonl": …}``: one parameter per leaf; a list of scalars stays one value."""
    out: dict[str, str] = {}
    if isinstance(doc, Mapping):
        for key, value in doc.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(doc, list) and any(isinstance(v, Mapping | list) for v in doc):
        for i, value in enumerate(doc):
            out.update(flatten(value, f"{prefix}.{i}" if prefix else str(i)))
    elif prefix:
        out[metric_key(prefix)] = param_value(doc)
    return out


def metric_key(key: str) -> str:
    """``key`` with the characters MLflow refuses in names (``,`` of ``acc,none``…) replaced by ``_``."""
    return _KEY_BAD.sub("_", key)[:250]


def numeric_leaves(doc: Any, prefix: str) -> dict[str, float]:
    """The finite numbers in a JSON-like document by dotted path (booleans left out)."""
    out: dict[str, float] = {}
    if isinstance(doc, Mapping):
        for key, value in doc.items():
            out.update(numeric_leaves(value, f"{prefix}.{key}"))
    elif isinstance(doc, int | float) and not isinstance(doc, bool) and math.isfinite(doc):
        out[metric_key(prefix)] = float(doc)
    return out


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Settings:
    """What a job tracks, from its resource and the environment (see the module docstring)."""

    mlflow: bool
    tensorboard: bool
    wandb: bool
    experiment: str
    run_name: str
    sweep: str | None
    output: str | None
    tags: dict[str, str]
    params: dict[str, str]
    spec_digest: str

    @classmethod
    def of(cls, resource: Any) -> Settings:
        spec = resource.spec
        tracking = getattr(spec, "tracking", None)
        doc = spec.to_yaml_dict()
        doc.pop("tracking", None)  # switching a tracker on for a resumed run keeps its MLflow run
        labels = resource.metadata.labels or {}
        sweep = labels.get(SWEEP_LABEL)
        namespace = resource.metadata.namespace or os.environ.get("LMFORGE_NAMESPACE") or "default"
        experiment = (tracking.experiment if tracking else None) or f"{namespace}/{sweep or resource.name}"
        uri = os.environ.get(TRACKING_URI_ENV, "").strip()
        wanted = tracking.mlflow if tracking and tracking.mlflow is not None else bool(uri)
        if wanted and not uri:
            print(
                f"warning: spec.tracking.mlflow is true but ${TRACKING_URI_ENV} is not set: not logging to MLflow"
            )
        tags = {
            "lmforge.kind": resource.kind,
            "lmforge.name": resource.name,
            "lmforge.namespace": namespace,
            "lmforge.specHash": _digest(doc),
        }
        if sweep:
            tags["lmforge.sweep"] = sweep
        return cls(
            mlflow=bool(wanted and uri),
            tensorboard=bool(tracking and tracking.tensorboard),
            wandb=os.environ.get(WANDB_MODE_ENV, "").strip().lower() == "offline",
            experiment=experiment,
            run_name=resource.name,
            sweep=sweep,
            output=str(spec.output) if spec.output else None,
            tags=tags,
            params=flatten(doc, "spec"),
            spec_digest=tags["lmforge.specHash"],
        )


class _State:
    """``<output>/tracking.json``: the run ids to continue when the same spec resumes."""

    def __init__(self, output: str | None):
        self.uri = storage.join(output, STATE_FILE) if output else None
        doc = storage.read_json(self.uri) if self.uri else None
        self.doc: dict[str, Any] = doc if isinstance(doc, dict) else {}

    def get(self, backend: str, digest: str) -> str | None:
        entry = self.doc.get(backend)
        if isinstance(entry, dict) and entry.get("specHash") == digest:
            return entry.get("runId")
        return None

    def put(self, backend: str, digest: str, run_id: str, **extra: str) -> None:
        self.doc[backend] = {"runId": run_id, "specHash": digest, **extra}
        if self.uri:
            storage.write_text_atomic(self.uri, json.dumps(self.doc, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------- backends
class _MLflow:
    def __init__(self, settings: Settings, state: _State):
        for key, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(os.environ[TRACKING_URI_ENV])
        self.pending: list[Any] = []
        self.last_flush = time.monotonic()
        experiment = self.client.get_experiment_by_name(settings.experiment)
        self.experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(settings.experiment)
        )
        run_id = state.get("mlflow", settings.spec_digest)
        if run_id is not None:
            try:
                run = self.client.get_run(run_id)
            except Exception:  # deleted, or another server: a new run
                run = None
            if run is not None and run.info.lifecycle_stage == "active":
                self.run_id = run_id
                self.client.update_run(run_id, status="RUNNING")
                print(f"MLflow: continuing run {run_id} in experiment {settings.experiment!r}")
                return
        tags = dict(settings.tags)
        if settings.sweep:
            tags["mlflow.parentRunId"] = self._parent(settings)
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=settings.run_name)
        self.run_id = run.info.run_id
        self._log_params(settings.params)
        state.put("mlflow", settings.spec_digest, self.run_id, experimentId=self.experiment_id)
        print(f"MLflow: run {self.run_id} in experiment {settings.experiment!r}")

    def _parent(self, settings: Settings) -> str:
        """The sweep's parent run, created by the first trial; trials that race to create it settle on
        the oldest and delete their own."""
        query = f"tags.`lmforge.sweep` = '{settings.sweep}' and tags.`lmforge.role` = 'sweep'"

        def oldest() -> Any:
            runs = self.client.search_runs(
                [self.experiment_id], query, order_by=["attributes.start_time ASC"]
            )
            return runs[0] if runs else None

        found = oldest()
        if found is not None:
            return found.info.run_id
        tags = {"lmforge.kind": "Sweep", "lmforge.sweep": str(settings.sweep), "lmforge.role": "sweep"}
        mine = self.client.create_run(self.experiment_id, tags=tags, run_name=settings.sweep).info.run_id
        self.client.set_terminated(mine, "FINISHED")
        winner = oldest()
        if winner is not None and winner.info.run_id != mine:
            self.client.delete_run(mine)
            return winner.info.run_id
        return mine

    def _log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per request
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log(self, step: int, metrics: Mapping[str, float], wall: float) -> None:
        from mlflow.entities import Metric

        stamp = int(wall * 1000)
        self.pending.extend(Metric(metric_key(k), v, stamp, step) for k, v in metrics.items())
        if len(self.pending) >= 900 or time.monotonic() - self.last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        self.last_flush = time.monotonic()
        for i in range(0, len(pending), 1000):
            self.client.log_batch(self.run_id, metrics=pending[i : i + 1000])

    def artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def end(self, status: str) -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status)


class _TensorBoard:
    def __init__(self, settings: Settings):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        output = settings.output
        self.remote = storage.join(output, TENSORBOARD_DIR) if output and storage.is_remote(output) else None
        if self.remote:
            self.dir = Path(tempfile.mkdtemp(prefix="lmforge-tensorboard-"))
            if storage.exists(self.remote):  # a resumed run: keep the earlier event files
                storage.download_tree(self.remote, self.dir)
        else:
            base = storage.local_path(output) if output else Path(tempfile.mkdtemp(prefix="lmforge-"))
            self.dir = base / TENSORBOARD_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.writer = EventFileWriter(str(self.dir))
        self.last_upload = time.monotonic()

    def log(self, step: int, metrics: Mapping[str, float], wall: float) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=k, simple_value=v) for k, v in metrics.items()]
        self.writer.add_event(Event(wall_time=wall, step=step, summary=Summary(value=values)))
        if self.remote and time.monotonic() - self.last_upload >= UPLOAD_SECONDS:
            self.flush()

    def flush(self) -> None:
        self.writer.flush()
        if self.remote:
            storage.upload_tree(self.dir, self.remote)
            self.last_upload = time.monotonic()

    def end(self, status: str) -> None:
        self.writer.close()
        if self.remote:
            storage.upload_tree(self.dir, self.remote)
            shutil.rmtree(self.dir, ignore_errors=True)


class _WandB:
    def __init__(self, settings: Settings, state: _State):
        import wandb

        output = settings.output
        local = storage.local_path(output) if output and not storage.is_remote(output) else None
        run_id = state.get("wandb", settings.spec_digest) or wandb.util.generate_id()
        self.run = wandb.init(
            mode="offline",
            dir=str(local) if local else None,
            id=run_id,
            resume="allow",
            project=re.sub(r"[^\w.-]", "-", settings.experiment),
            name=settings.run_name,
            group=settings.sweep,
            config=dict(settings.params),
            tags=[settings.tags["lmforge.kind"]],
        )
        state.put("wandb", settings.spec_digest, run_id)

    def log(self, step: int, metrics: Mapping[str, float], wall: float) -> None:
        self.run.log(dict(metrics), step=step)

    def flush(self) -> None:
        pass

    def end(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


# ------------------------------------------------------------------------------------------- tracker
class Tracker:
    """The job's trackers behind one interface; every call is safe: a backend that raises is reported
    once and dropped, the job goes on."""

    def __init__(self, settings: Settings, report_dir: Path | None = None):
        self.settings = settings
        self.report_dir = report_dir
        self.backends: dict[str, Any] = {}
        self.step = 0
        self.ended = False
        state = _State(settings.output) if settings.mlflow or settings.wandb else None
        starts: list[tuple[str, Callable[[], Any]]] = []
        if settings.mlflow:
            starts.append(("MLflow", lambda: _MLflow(settings, state)))  # type: ignore[arg-type]
        if settings.tensorboard:
            starts.append(("TensorBoard", lambda: _TensorBoard(settings)))
        if settings.wandb:
            try:
                import wandb  # noqa: F401
            except ImportError:
                print(
                    f"note: ${WANDB_MODE_ENV}=offline but wandb is not installed: no W&B run (pip install wandb)"
                )
            else:
                starts.append(("W&B", lambda: _WandB(settings, state)))  # type: ignore[arg-type]
        for name, start in starts:
            try:
                self.backends[name] = start()
            except Exception as exc:
                self._warn(name, exc)

    @property
    def active(self) -> bool:
        return bool(self.backends)

    def _warn(self, name: str, exc: BaseException) -> None:
        print(
            f"warning: {name} tracking switched off for this run (the run goes on): {type(exc).__name__}: {exc}"
        )

    def _each(self, call: Callable[[Any], Any]) -> None:
        for name in list(self.backends):
            self._each_one(name, call)

    def log(self, step: int | None, metrics: Mapping[str, float], force: bool = False) -> None:
        """Metrics at ``step`` (the last step seen when None); ``force`` sends what is pending now."""
        if step is not None:
            self.step = int(step)
        if metrics:
            wall = time.time()
            self._each(lambda b: b.log(self.step, metrics, wall))
        if force:
            self._each(lambda b: b.flush())

    def finish(self, outputs: Mapping[str, Any], results: Mapping[str, Any] | None = None) -> None:
        """The job succeeded: final results as metrics, the artifacts, the runs ended FINISHED."""
        if results:
            self.log(None, numeric_leaves(dict(results), "results"))
        if "MLflow" in self.backends:
            try:
                self._artifacts(outputs, results)
            except Exception as exc:  # gathering the files (a model folder gone, a full /tmp)
                self.backends.pop("MLflow", None)
                self._warn("MLflow", exc)
        self.end("FINISHED")

    def _artifacts(self, outputs: Mapping[str, Any], results: Mapping[str, Any] | None) -> None:
        """outputs.json, results.json, a model card, report plots: to MLflow."""
        files: list[tuple[Path, str | None]] = []
        scratch = Path(tempfile.mkdtemp(prefix="lmforge-artifacts-"))
        try:
            for name, doc in (("outputs.json", outputs), ("results.json", results)):
                if doc is not None:
                    path = scratch / name
                    path.write_text(json.dumps(dict(doc), indent=2, default=str) + "\n", encoding="utf-8")
                    files.append((path, None))
            for value in outputs.values():  # a model card beside a local model output
                if isinstance(value, str) and value and not storage.is_remote(value):
                    card = storage.local_path(value) / "README.md"
                    if card.is_file():
                        files.append((card, "model"))
            if self.report_dir is not None and self.report_dir.is_dir():
                for pattern in ("*.png", "*.html"):
                    files.extend((p, "report") for p in sorted(self.report_dir.glob(pattern)))
            for path, folder in files:
                if path.stat().st_size <= MAX_ARTIFACT_BYTES:
                    self._each_one("MLflow", lambda b, p=path, f=folder: b.artifact(p, f))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _each_one(self, name: str, call: Callable[[Any], Any]) -> None:
        backend = self.backends.get(name)
        if backend is None:
            return
        try:
            call(backend)
        except Exception as exc:
            self.backends.pop(name, None)
            self._warn(name, exc)

    def end(self, status: str = "FINISHED") -> None:
        """End every run: FINISHED, FAILED or KILLED (stopped by a signal; a resume continues it)."""
        if self.ended:
            return
        self.ended = True
        self._each(lambda b: b.end(status))


_CURRENT: Tracker | None = None


def activate(resource: Any, report_dir: Path | None = None) -> Tracker | None:
    """Start the trackers of ``resource`` for this process (the job's global rank 0 only); the
    Telemetry created afterwards reports to them. None when nothing is tracked."""
    global _CURRENT
    deactivate()
    if os.environ.get("RANK", "0") != "0" or os.environ.get("JOB_COMPLETION_INDEX", "0") != "0":
        return None  # one process speaks for the job: global rank 0 of the first pod
    try:
        tracker = Tracker(Settings.of(resource), report_dir)
    except Exception as exc:  # reading tracking.json, a temporary folder: never a reason to fail the job
        print(f"warning: no experiment tracking for this run: {type(exc).__name__}: {exc}")
        return None
    _CURRENT = tracker if tracker.active else None
    return _CURRENT


def current() -> Tracker | None:
    """The tracker :func:`activate` started, if any."""
    return _CURRENT


def deactivate(status: str = "FINISHED") -> None:
    """End the active tracker's runs (``status`` unless the job already ended them) and forget it."""
    global _CURRENT
    tracker, _CURRENT = _CURRENT, None
    if tracker is not None:
        tracker.end(status)


__all__ = [
    "MAX_PARAM_LENGTH",
    "STATE_FILE",
    "SWEEP_LABEL",
    "TENSORBOARD_DIR",
    "TRACKING_URI_ENV",
    "Settings",
    "Tracker",
    "activate",
    "current",
    "deactivate",
    "flatten",
    "metric_key",
    "numeric_leaves",
    "param_value",
]
