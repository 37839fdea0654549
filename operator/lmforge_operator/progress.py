"""What ``lmforge run`` shows while it works: a live line per resource and a Prometheus endpoint.

On a terminal each resource gets a rich progress bar (stage, step/total, tokens/s, loss, ETA); elsewhere
(CI, a log file) a plain line every few seconds. The endpoint mirrors each job's progress.json as
``lmforge_*`` gauges with ``kind`` and ``name`` labels, the same series names the jobs export in a cluster.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from lmforge_jobs.manifest import Resource
from lmforge_jobs.telemetry import metric_name, progress_names

PLAIN_EVERY_SECONDS = 5.0

_F = TypeVar("_F", bound=Callable[..., Any])


def _locked(method: _F) -> _F:
    """One call of the display at a time: a Sweep's trials may run side by side in threads."""

    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return call  # type: ignore[return-value]


def describe(progress: dict[str, Any]) -> str:
    """One line: stage, step/total, tokens/s, loss, ETA."""
    parts = []
    if progress.get("stage"):
        parts.append(str(progress["stage"]))
    if progress.get("totalSteps"):
        parts.append(f"step {progress.get('step', 0)}/{progress['totalSteps']}")
    metrics = progress.get("metrics") or {}
    if "tokensPerSecond" in metrics:
        parts.append(f"{metrics['tokensPerSecond']:,.0f} tok/s")
    if "documentsPerSecond" in metrics:
        parts.append(f"{metrics['documentsPerSecond']:,.0f} docs/s")
    for key in ("loss", "evalLoss", "rewardMargin", "meanReward", "perplexity"):
        if key in metrics:
            parts.append(f"{key} {metrics[key]:.4g}")
    if progress.get("etaSeconds") is not None and progress.get("state", "Running") == "Running":
        eta = int(progress["etaSeconds"])
        parts.append(f"ETA {eta // 60}m{eta % 60:02d}s")
    return "  ".join(parts)


class Display:
    """Live progress of a run; rich bars on a terminal, plain lines otherwise."""

    def __init__(self, rich: bool | None = None, stream: Any = None):
        self.stream = stream or sys.stdout
        use_rich = self.stream.isatty() if rich is None else rich
        self._progress = None
        self._tasks: dict[str, Any] = {}
        self._last_plain: dict[str, float] = {}
        self._lock = threading.RLock()
        if use_rich:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("[bold]{task.fields[ref]:<28}"),
                BarColumn(bar_width=28),
                TextColumn("{task.percentage:>3.0f}%"),
                TimeElapsedColumn(),
                TextColumn("{task.fields[line]}"),
                console=Console(file=self.stream),
            )
            self._progress.start()

    @_locked
    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()

    @_locked
    def print(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text, highlight=False, markup=False)
        else:
            print(text, file=self.stream, flush=True)

    @_locked
    def started(self, resource: Resource[Any, Any], nproc: int, gpus: int) -> None:
        where = f"{nproc} process(es) on {'GPU' if gpus else 'CPU'}"
        if self._progress is not None:
            self._tasks[resource.ref] = self._progress.add_task(
                "", total=100, ref=resource.ref, line="starting"
            )
        self.print(f"▶ {resource.ref}: started ({where})")

    @_locked
    def plan(self, resource: Resource[Any, Any], text: str) -> None:
        self.print(
            f"  compute plan of {resource.ref}:\n" + "\n".join("    " + line for line in text.splitlines())
        )

    @_locked
    def progress(self, resource: Resource[Any, Any], progress: dict[str, Any]) -> None:
        line = describe(progress)
        percent = float(progress.get("percent") or 0.0)
        if self._progress is not None and resource.ref in self._tasks:
            self._progress.update(self._tasks[resource.ref], completed=percent, line=line)
            return
        now = time.monotonic()
        if now - self._last_plain.get(resource.ref, 0.0) >= PLAIN_EVERY_SECONDS and line:
            self._last_plain[resource.ref] = now
            self.print(f"  {resource.ref}: {percent:5.1f}%  {line}")

    @_locked
    def note(self, resource: Resource[Any, Any], text: str) -> None:
        self.print(f"  {resource.ref}: {text}")

    @_locked
    def log(self, resource: Resource[Any, Any], tail: str) -> None:
        if tail.strip():
            self.print(
                f"  last lines of {resource.ref}'s log:\n" + "\n".join("    " + t for t in tail.splitlines())
            )

    @_locked
    def skipped(self, resource: Resource[Any, Any], why: str) -> None:
        self.print(f"✓ {resource.ref}: {why}, skipped")

    @_locked
    def finished(self, resource: Resource[Any, Any], phase: str, message: str) -> None:
        if self._progress is not None and resource.ref in self._tasks:
            task = self._tasks.pop(resource.ref)
            if phase == "Succeeded":
                self._progress.update(task, completed=100)
            self._progress.remove_task(task)
        mark = "✓" if phase == "Succeeded" else "✗"
        self.print(f"{mark} {resource.ref}: {phase}" + (f": {message}" if message else ""))


class RunMetrics:
    """A Prometheus endpoint on localhost mirroring each job's progress.json."""

    def __init__(self, port: int = 0, address: str = "127.0.0.1"):
        from prometheus_client import CollectorRegistry, start_http_server

        self.registry = CollectorRegistry()
        server, _ = start_http_server(port, addr=address, registry=self.registry)
        self._server = server
        self.port = int(server.server_address[1])
        self._gauges: dict[str, Any] = {}

    def _gauge(self, name: str) -> Any:
        from prometheus_client import Gauge

        if name not in self._gauges:
            self._gauges[name] = Gauge(name, f"lmforge run: {name}", ("kind", "name"), registry=self.registry)
        return self._gauges[name]

    def observe(self, resource: Resource[Any, Any], progress: dict[str, Any]) -> None:
        labels = {"kind": resource.kind, "name": resource.name}
        names = progress_names(resource.kind)
        for key in ("step", "totalSteps", "tokens", "etaSeconds"):
            if isinstance(progress.get(key), (int, float)):
                self._gauge(names[key]).labels(**labels).set(progress[key])
        if isinstance(progress.get("percent"), (int, float)):
            self._gauge(names["progress"]).labels(**labels).set(progress["percent"] / 100.0)
        for key, value in (progress.get("metrics") or {}).items():
            if isinstance(value, (int, float)):
                self._gauge(metric_name(resource.kind, key)).labels(**labels).set(value)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
