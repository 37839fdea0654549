"""Progress and metrics of a running job: Prometheus gauges, ``progress.json`` and the termination message.

Every job reports through one :class:`Telemetry` object, created on the process that speaks for the job
(global rank 0; other ranks pass ``enabled=False`` and every call becomes a no-op)::

    tel = Telemetry("PretrainRun", spec.output, enabled=rank == 0)
    tel.update(step=10, total_steps=200, tokens=40960, metrics={"loss": 3.2, "tokensPerSecond": 9e3})
    tel.finish({"model": ".../model", "checkpoint": ".../checkpoints"})

Three readers, one set of numbers:

* **Prometheus** scrapes ``:PORT/metrics`` (port argument, else ``$LMFORGE_METRICS_PORT``, else 9400;
  ``0`` picks a free port, ``off`` serves nothing). Series are named ``lmforge_<p>_<metric>`` with
  ``p`` = data | train | align | eval (each kind's ``metric_prefix`` in :data:`lmforge_jobs.kinds.KINDS`;
  see :func:`metric_name`).
* **The local runner** reads ``DIR/progress.json``: ``{kind, state, stage, step, totalSteps, tokens,
  percent, etaSeconds, updatedAt, metrics: {camelCase: value}, message, field}``, rewritten atomically at
  most once a second, and ``DIR/metrics.jsonl``, one line per update (``{time, step, tokens, stage,
  <metric>: value}``) — the curves of the run report. ``DIR/outputs.json`` (the resource's status.outputs)
  appears only on success: it is the resource's completion marker. ``DIR`` is ``$LMFORGE_RUN_DIR``, which
  the local runner sets to the resource's run directory (so a job whose output is ``s3://…`` is followed
  the same way), else the output itself when it is a local path (see :func:`report_dir`).
* **The operator** scrapes the pod's endpoint while it runs and reads the container's termination message
  (``$LMFORGE_TERMINATION_LOG``, else ``/dev/termination-log`` when writable; at most 4096 bytes of JSON)
  when it ends.

The same numbers go to the job's experiment trackers (MLflow, TensorBoard, W&B) when
:func:`lmforge_jobs.tracking.activate` started any (``spec.tracking``, ``$MLFLOW_TRACKING_URI``).

Only prometheus_client, the standard library and lmforge_jobs' own light modules (kinds, storage,
tracking; their heavy clients load lazily) are imported, so the operator can use the name table.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lmforge_jobs import storage, tracking
from lmforge_jobs.kinds import KINDS

DEFAULT_PORT = 9400
TERMINATION_LOG = "/dev/termination-log"
TERMINATION_MAX_BYTES = 4096
RUN_DIR_ENV = "LMFORGE_RUN_DIR"

# Series whose name does not follow lmforge_<prefix>_<snake_case(key)>.
_SPECIAL = {
    ("PretrainRun", "evalLoss"): "lmforge_eval_loss",
    ("PretrainRun", "mfu"): "lmforge_train_mfu_ratio",
    ("AlignmentRun", "mfu"): "lmforge_align_mfu_ratio",
    ("PretrainRun", "perplexity"): "lmforge_eval_perplexity_heldout",
    ("Evaluation", "perplexity"): "lmforge_eval_perplexity",
}
_GLOBAL = {
    "gpuUtilization": "lmforge_gpu_utilization_ratio",
    "gpuMemoryBytes": "lmforge_gpu_memory_used_bytes",
}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def metric_name(kind: str, key: str) -> str:
    """Prometheus name of the camelCase status metric ``key`` of ``kind``."""
    if key in _GLOBAL:
        return _GLOBAL[key]
    return _SPECIAL.get((kind, key)) or f"lmforge_{KINDS[kind].metric_prefix}_{_snake(key)}"


def progress_names(kind: str) -> dict[str, str]:
    """Prometheus names of the progress series: step, totalSteps, tokens, progress (0-1), etaSeconds."""
    p = KINDS[kind].metric_prefix
    return {
        "step": f"lmforge_{p}_step",
        "totalSteps": f"lmforge_{p}_total_steps",
        "tokens": f"lmforge_{p}_tokens_total",
        "progress": f"lmforge_{p}_progress_ratio",
        "etaSeconds": f"lmforge_{p}_eta_seconds",
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so a reader never sees half a file (write beside it, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _finite(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def local_dir(output: str | os.PathLike[str] | None) -> Path | None:
    """The local directory of an output URI (a plain path or file://), None for remote URIs."""
    if not output or storage.is_remote(output):
        return None
    return storage.local_path(output)


def report_dir(output: str | os.PathLike[str] | None) -> Path | None:
    """Where progress.json, metrics.jsonl and outputs.json go: ``$LMFORGE_RUN_DIR`` when the local runner
    sets it (it follows every job there, whatever its output), else beside a local output. A remote output
    (s3://, gs://…) without a run directory is followed through the Prometheus endpoint and the
    termination message instead."""
    run_dir = os.environ.get(RUN_DIR_ENV)
    return Path(run_dir) if run_dir else local_dir(output)


class _Registry:
    """One process-wide metrics server and gauge table (tests create many Telemetry objects)."""

    def __init__(self) -> None:
        self.gauges: dict[str, Any] = {}
        self.port: int | None = None

    def gauge(self, name: str, doc: str, labelnames: tuple[str, ...] = ()) -> Any:
        from prometheus_client import Gauge

        if name not in self.gauges:
            self.gauges[name] = Gauge(name, doc, labelnames)
        return self.gauges[name]

    def serve(self, port: int) -> int:
        if self.port is None:
            from prometheus_client import start_http_server

            server, _ = start_http_server(port)
            self.port = int(server.server_address[1])
        return self.port


_REGISTRY = _Registry()


def _resolve_port(port: int | str | None) -> int | None:
    raw = port if port is not None else os.environ.get("LMFORGE_METRICS_PORT", DEFAULT_PORT)
    if str(raw).strip().lower() in ("off", "none", "", "-1"):
        return None
    return int(raw)


class Telemetry:
    """Reports a job's progress; see the module docstring. Methods never raise for a reporting problem."""

    def __init__(
        self,
        kind: str,
        output: str | os.PathLike[str] | None,
        *,
        enabled: bool = True,
        port: int | str | None = None,
        total_steps: int | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        self.kind = kind
        self.enabled = enabled
        self.output = str(output) if output else None
        self.dir = report_dir(output)
        self.started = time.monotonic()
        self.state: dict[str, Any] = {"kind": kind, "state": "Running", "metrics": {}}
        if total_steps is not None:
            self.state["totalSteps"] = int(total_steps)
        self._last_write = 0.0
        self._first_step: tuple[int, float] | None = None
        self.port: int | None = None
        # the job's MLflow / TensorBoard / W&B runs (lmforge_jobs.tracking), when entry activated them
        self.tracker = tracking.current() if enabled else None
        if enabled:
            wanted = _resolve_port(port)
            if wanted is not None:
                try:
                    self.port = _REGISTRY.serve(wanted)
                except OSError as exc:  # a busy port must not kill a training run
                    print(f"warning: metrics server not started on port {wanted}: {exc}")

    # ------------------------------------------------------------------------------------------ metrics
    def gauge(self, name: str, doc: str, labelnames: tuple[str, ...] | list[str] = ()) -> Any:
        """A job-specific gauge (created once per process); a harmless dummy when disabled."""
        if not self.enabled:
            return _NullGauge()
        return _REGISTRY.gauge(name, doc, tuple(labelnames))

    def _set(self, name: str, value: float | None, doc: str) -> None:
        if value is not None:
            self.gauge(name, doc).set(value)

    # ----------------------------------------------------------------------------------------- progress
    def update(
        self,
        *,
        step: int | None = None,
        total_steps: int | None = None,
        tokens: int | None = None,
        stage: str | None = None,
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> None:
        """Record progress and metrics; progress.json is rewritten at most once a second unless ``force``."""
        if not self.enabled:
            return
        state = self.state
        if stage is not None:
            state["stage"] = stage
        if total_steps is not None:
            state["totalSteps"] = int(total_steps)
        if tokens is not None:
            state["tokens"] = int(tokens)
        if step is not None:
            state["step"] = int(step)
            now = time.monotonic()
            if self._first_step is None or step < self._first_step[0]:
                self._first_step = (int(step), now)
            total = state.get("totalSteps")
            if total:
                state["percent"] = round(min(100.0, 100.0 * step / total), 2)
                done, since = step - self._first_step[0], now - self._first_step[1]
                if done > 0 and since > 0:
                    state["etaSeconds"] = int(max(0, total - step) * since / done)
        for key, value in (metrics or {}).items():
            f = _finite(value)
            if f is not None:
                state["metrics"][key] = f
                self._set(metric_name(self.kind, key), f, f"{self.kind} {key}")
        names = progress_names(self.kind)
        for key in ("step", "totalSteps", "tokens", "etaSeconds"):
            self._set(names[key], _finite(state.get(key)), f"{self.kind} {key}")
        if state.get("percent") is not None:
            self._set(names["progress"], state["percent"] / 100.0, f"{self.kind} completion (0-1)")
        if step is not None or metrics:
            self._append_history(step, tokens, stage, metrics or {})
        if self.tracker is not None:
            tracked = {k: f for k, v in (metrics or {}).items() if (f := _finite(v)) is not None}
            if tokens is not None and tracked:
                tracked["tokens"] = float(tokens)
            self.tracker.log(step, tracked, force=force)
        if force or time.monotonic() - self._last_write >= 1.0:
            self._write_progress()

    def _append_history(
        self, step: int | None, tokens: int | None, stage: str | None, metrics: Mapping[str, Any]
    ) -> None:
        """One line per update in metrics.jsonl: the curves of the run report (loss, tokens/s, MFU…)."""
        if self.dir is None:
            return
        row: dict[str, Any] = {"time": round(time.time(), 3)}
        for key, value in (("step", step), ("tokens", tokens), ("stage", stage)):
            if value is not None:
                row[key] = value
        row.update({k: f for k, v in metrics.items() if (f := _finite(v)) is not None})
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(self.dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row, separators=(",", ":")) + "\n")
        except OSError as exc:
            print(f"warning: cannot append to metrics.jsonl: {exc}")

    def _write_progress(self) -> None:
        if self.dir is None:
            return
        self.state["updatedAt"] = _now()
        self.state["elapsedSeconds"] = round(time.monotonic() - self.started, 1)
        try:
            write_json_atomic(self.dir / "progress.json", self.state)
        except OSError as exc:
            print(f"warning: cannot write progress.json: {exc}")
        self._last_write = time.monotonic()

    def saved(self) -> None:
        """A checkpoint was saved: the trackers send what they hold (TensorBoard files on object storage
        are uploaded), so a run killed now loses no curve a resume cannot redo."""
        if self.tracker is not None:
            self.tracker.log(None, {}, force=True)

    # -------------------------------------------------------------------------------------------- end
    def finish(self, outputs: Mapping[str, Any], results: Mapping[str, Any] | None = None) -> None:
        """The job succeeded: final progress.json (state Succeeded), outputs.json, termination message."""
        if not self.enabled:
            return
        state = self.state
        state["state"] = "Succeeded"
        if state.get("totalSteps"):
            state["step"] = max(int(state.get("step", 0)), int(state["totalSteps"]))
        state["percent"], state["etaSeconds"] = 100.0, 0
        state["outputs"] = dict(outputs)
        if results is not None:
            state["results"] = dict(results)
        names = progress_names(self.kind)
        self._set(names["progress"], 1.0, f"{self.kind} completion (0-1)")
        self._set(names["etaSeconds"], 0.0, f"{self.kind} etaSeconds")
        self._write_progress()
        self._write_outputs(dict(outputs))
        summary = {"state": "Succeeded", "outputs": dict(outputs), "metrics": state["metrics"]}
        for key in ("step", "tokens"):
            if key in state:
                summary[key] = state[key]
        if results is not None:
            summary["results"] = dict(results)
        write_termination_message(summary)
        if self.tracker is not None:
            self.tracker.finish(outputs, results)

    def _write_outputs(self, outputs: dict[str, Any]) -> None:
        """outputs.json, the completion marker, written whole or not at all: beside the output (a local
        directory or object storage: what another job following this one reads) and in the run directory
        (what the local runner reads), when that is elsewhere."""
        beside = local_dir(self.output)
        if self.output and beside is None:
            try:
                storage.write_text_atomic(
                    storage.join(self.output, "outputs.json"), json.dumps(outputs, indent=2)
                )
            except Exception as exc:  # reporting never kills a finished job; the log says what is missing
                print(f"warning: cannot write outputs.json to {self.output}: {type(exc).__name__}: {exc}")
        for directory in {beside, self.dir} - {None}:
            try:
                write_json_atomic(directory / "outputs.json", outputs)  # type: ignore[operator]
            except OSError as exc:
                print(f"warning: cannot write outputs.json: {exc}")

    def fail(self, message: str, field: str | None = None, config_error: bool = False) -> None:
        """The job failed: progress.json says why (state Invalid for a configuration error, else Failed)."""
        if not self.enabled:
            return
        self.state.update(state="Invalid" if config_error else "Failed", message=message)
        if field:
            self.state["field"] = field
        self._write_progress()
        write_termination_message(
            {"state": self.state["state"], "message": message, **({"field": field} if field else {})}
        )
        if self.tracker is not None:
            self.tracker.end("FAILED")


class _NullGauge:
    def labels(self, *args: Any, **kwargs: Any) -> _NullGauge:
        return self

    def set(self, value: float) -> None:
        pass


def _without_stderr(results: dict[str, Any]) -> dict[str, Any]:
    bench = results.get("benchmarks")
    if not isinstance(bench, dict):
        return results
    kept = {
        task: {k: v for k, v in m.items() if not str(k).endswith("_stderr")} if isinstance(m, dict) else m
        for task, m in bench.items()
    }
    return {**results, "benchmarks": kept}


def _headline(results: dict[str, Any]) -> dict[str, Any]:
    bench = results.get("benchmarks")
    if not isinstance(bench, dict):
        return results
    kept = {
        task: dict(sorted(m.items())[:1]) if isinstance(m, dict) else m for task, m in bench.items()
    }  # one metric per task (the first by name: acc before acc_norm)
    return {**results, "benchmarks": kept}


# Ways to shrink a summary, least loss first: (what status loses, the top-level key, how; None drops the
# key). results.json and outputs.json keep everything; the termination message is what status shows once
# no pod can be scraped any more.
_SHRINK: list[tuple[str, str, Any]] = [
    ("results.history", "results", lambda r: {k: v for k, v in r.items() if k != "history"}),
    ("results.benchmarks.*_stderr", "results", _without_stderr),
    ("results.arena", "results", lambda r: {k: v for k, v in r.items() if k != "arena"}),
    ("metrics", "metrics", None),
    ("results.benchmarks (one metric per task)", "results", _headline),
    ("results", "results", None),
    ("outputs", "outputs", None),
]


def fit_termination_message(summary: Mapping[str, Any], limit: int = TERMINATION_MAX_BYTES) -> str:
    """The summary as compact JSON of at most ``limit`` bytes. An oversized one is shrunk step by step
    (results history, benchmark standard errors, arena, metrics, all but one metric per benchmark task,
    results, outputs, then the message's tail) until it fits; ``truncated`` lists what was left out."""
    data = dict(summary)
    dropped: list[str] = []

    def dump() -> str:
        doc = {**data, "truncated": dropped} if dropped else data
        return json.dumps(doc, separators=(",", ":"), default=str)

    text = dump()
    for what, key, shrink in _SHRINK:
        if len(text.encode()) <= limit:
            break
        if key not in data:
            continue
        if shrink is None:
            data.pop(key)
        elif isinstance(data[key], dict) and (smaller := shrink(data[key])) != data[key]:
            data[key] = smaller
        else:
            continue
        dropped.append(what)
        text = dump()
    if len(text.encode()) > limit and isinstance(data.get("message"), str):  # a long error message
        dropped.append("message (cut)")
        message = data["message"]
        while message and (size := len(dump().encode())) > limit:  # escapes make JSON longer than text
            message = message[: max(0, len(message) - (size - limit) - 3)]
            data["message"] = message + "..."
        text = dump()
    if len(text.encode()) > limit:  # nothing sensible left to drop: at least stay within the limit
        text = text.encode()[:limit].decode("utf-8", "ignore")
    return text


def write_termination_message(summary: Mapping[str, Any]) -> None:
    """Leave a JSON summary where Kubernetes reads a container's termination message (≤ 4096 bytes);
    see :func:`fit_termination_message` for what an oversized one loses."""
    path = os.environ.get("LMFORGE_TERMINATION_LOG") or TERMINATION_LOG
    target = Path(path)
    if not os.environ.get("LMFORGE_TERMINATION_LOG") and not (target.exists() and os.access(target, os.W_OK)):
        return
    with contextlib.suppress(OSError):
        target.write_text(fit_termination_message(summary), encoding="utf-8")


def read_progress(output: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The job's progress.json, or None when absent or half-written."""
    path = storage.local_path(output) / "progress.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


__all__ = [
    "DEFAULT_PORT",
    "RUN_DIR_ENV",
    "Telemetry",
    "fit_termination_message",
    "metric_name",
    "progress_names",
    "read_progress",
    "report_dir",
    "write_json_atomic",
    "write_termination_message",
]
