"""The live view of a work directory: the status of every resource run there, and the rows
``lmforge status`` prints (like ``kubectl get lmforge``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge_jobs.kinds import KINDS

COLUMNS = ["KIND", "NAME", "PHASE", "PROGRESS", "STEP", "LOSS", "TOKENS/S", "ETA", "MESSAGE"]


def collect(workdir: Path) -> list[tuple[str, str, dict[str, Any]]]:
    """(kind, name, status) of every resource run in ``workdir``, kinds in pipeline order."""
    kind_of_folder = {kind.singular: name for name, kind in KINDS.items()}
    found = []
    for path in sorted(workdir.glob("*/*/status.json")):
        try:
            status = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        kind = kind_of_folder.get(path.parent.parent.name)
        if kind:
            found.append((kind, path.parent.name, status))
    rank = {kind: position for position, kind in enumerate(KINDS)}
    return sorted(found, key=lambda entry: (rank[entry[0]], entry[1]))


def format_eta(seconds: Any) -> str:
    """``1h05m`` from an hour on, else ``4m07s``; empty when unknown."""
    if not isinstance(seconds, (int, float)):
        return ""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def summary(kind: str, status: dict[str, Any]) -> str:
    """What a resource's row says in MESSAGE: why it is Invalid or Failed, else its headline result."""
    message = next(
        (
            c.get("message", "")
            for c in status.get("conditions", [])
            if c["type"] in ("Invalid", "Failed") and c["status"] == "True"
        ),
        "",
    )
    if message:
        return message
    if kind == "Corpus" and status.get("documents"):
        documents = status["documents"]
        return f"kept {documents.get('kept', 0)}/{documents.get('read', 0)} documents"
    if kind == "Evaluation" and status.get("results", {}).get("perplexity") is not None:
        return f"perplexity {status['results']['perplexity']:.3f}"
    if kind == "Sweep" and status.get("trialsTotal"):
        best = status.get("best")
        done = f"{status.get('trialsDone', 0)}/{status['trialsTotal']} trials"
        return f"{done}, best {best['name']}: {best['objective']:.4g}" if best else done
    if kind == "ScalingStudy" and status.get("pointsTotal"):
        done = f"{status.get('pointsDone', 0)}/{status['pointsTotal']} points"
        loss = (status.get("target") or {}).get("loss")
        return f"{done}, predicted loss {loss:.4g} at the target" if loss is not None else done
    return ""


def status_row(kind: str, name: str, status: dict[str, Any]) -> list[str]:
    progress = status.get("progress") or {}
    metrics = status.get("metrics") or {}
    step = (
        f"{progress.get('step', '')}/{progress.get('totalSteps', '')}" if progress.get("totalSteps") else ""
    )
    loss = metrics.get("loss")
    tokens_per_second = metrics.get("tokensPerSecond")
    running = status.get("phase") == "Running"
    return [
        kind,
        name,
        status.get("phase", "Pending"),
        f"{progress.get('percent', 0):.0f}%" if progress else "",
        step,
        f"{loss:.4f}" if isinstance(loss, (int, float)) else "",
        f"{tokens_per_second:,.0f}" if isinstance(tokens_per_second, (int, float)) else "",
        format_eta(progress.get("etaSeconds")) if running else "",
        summary(kind, status)[:80],
    ]


def status_rows(workdir: Path) -> list[list[str]]:
    """The rows `lmforge status` prints, like `kubectl get lmforge`: a header, then one per resource."""
    return [list(COLUMNS), *(status_row(kind, name, status) for kind, name, status in collect(workdir))]
