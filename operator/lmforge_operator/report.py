"""The run report of ``lmforge run``: one self-contained HTML file with plots, and the plots as PNG files.

Reads what the run left in the work directory — each resource's status.json, the jobs' metrics.jsonl
(one line per logged step) and the Corpus's stats.json — and draws the data funnel (documents left after
each filter), training and held-out loss, tokens/s and MFU over steps, alignment metrics, and the
evaluation table. ``lmforge report [--workdir]`` redraws it at any time.
"""

from __future__ import annotations

import base64
import html
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lmforge_jobs.kinds import KINDS
from lmforge_jobs.storage import read_json
from lmforge_operator.local.view import collect, status_rows


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by an interruption
    return rows


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key``; a resumed run repeats steps, and the last value of a step wins."""
    by_step: dict[float, float] = {}
    for row in rows:
        if key in row and row.get("step") is not None:
            by_step[float(row["step"])] = float(row[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


# removals after the filters, in the order the Corpus job applies them
_AFTER_FILTERS = ("duplicates", "nearDuplicates", "domains")


def funnel(stats: dict[str, Any]) -> list[tuple[str, int]]:
    """(step, documents left) from read through each removal, in pipeline order.

    The order comes from stats.json's ``filters`` list (each filter's position), not from the key order of
    ``removedBy``: status.json is written with sorted keys."""
    left = int(stats.get("read", 0))
    out = [("read", left)]
    removed = stats.get("removedBy") or {}
    ordered = ["extract"] if "extract" in removed else []
    filters = sorted(stats.get("filters") or [], key=lambda f: int(f.get("position", 0)))
    ordered += [f["name"] for f in filters if f.get("name") in removed and f["name"] not in ordered]
    ordered += [k for k in _AFTER_FILTERS if k in removed and k not in ordered]
    ordered += [k for k in removed if k not in ordered]
    for name in ordered:
        left -= int(removed[name])
        out.append((name, left))
    return out


class _Plots:
    def __init__(self, out: Path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt = plt
        self.out = out
        self.files: list[tuple[str, Path]] = []
        out.mkdir(parents=True, exist_ok=True)

    def save(self, fig: Any, name: str, title: str) -> None:
        path = self.out / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        self.plt.close(fig)
        self.files.append((title, path))


def build_report(workdir: Path, out: Path | None = None) -> Path:
    """Write ``report.html`` and ``report/*.png`` into ``workdir`` (or ``out``); return the HTML path."""
    workdir = Path(workdir)
    html_path = out or workdir / "report.html"
    plots = _Plots(html_path.parent / "report")
    plt = plots.plt
    resources = collect(workdir)
    evaluations: list[tuple[str, dict[str, Any]]] = []

    for kind, name, status in resources:
        # metrics.jsonl is in the run directory; stats.json beside the outputs (local or object storage)
        rows = _read_jsonl(workdir / KINDS[kind].singular / name / "metrics.jsonl")
        if kind == "Corpus":
            output = status.get("output") or str(workdir / KINDS[kind].singular / name)
            stats = read_json(f"{str(output).rstrip('/')}/stats.json")
            if not isinstance(stats, dict):
                stats = status.get("documents") or {}
            steps = funnel(stats)
            if len(steps) > 1:
                fig, ax = plt.subplots(figsize=(8, 3.5))
                labels, counts = zip(*steps, strict=True)
                ax.bar(range(len(counts)), counts, color="#4C72B0")
                ax.set_xticks(range(len(counts)), labels, rotation=30, ha="right", fontsize=8)
                for i, c in enumerate(counts):
                    ax.text(i, c, str(c), ha="center", va="bottom", fontsize=7)
                ax.set_ylabel("documents left")
                ax.set_title(f"Corpus/{name}: data funnel")
                plots.save(fig, f"corpus-{name}-funnel", f"Corpus/{name}: documents kept after each step")
        elif kind in ("PretrainRun", "AlignmentRun"):
            keys = [k for k in ("loss", "evalLoss") if series(rows, k)[0]]
            if keys:
                fig, ax = plt.subplots(figsize=(7, 3.5))
                for key in keys:
                    x, y = series(rows, key)
                    ax.plot(x, y, marker="." if key == "evalLoss" else None, label=key)
                ax.set_xlabel("step")
                ax.set_ylabel("loss")
                ax.legend()
                ax.set_title(f"{kind}/{name}: loss")
                plots.save(fig, f"{kind.lower()}-{name}-loss", f"{kind}/{name}: training and held-out loss")
            speed = [k for k in ("tokensPerSecond", "mfu") if series(rows, k)[0]]
            if speed:
                fig, axes = plt.subplots(1, len(speed), figsize=(7 * len(speed) / 1.5, 3.2), squeeze=False)
                for ax, key in zip(axes[0], speed, strict=True):
                    x, y = series(rows, key)
                    ax.plot(x, y)
                    ax.set_xlabel("step")
                    ax.set_title(key)
                plots.save(fig, f"{kind.lower()}-{name}-speed", f"{kind}/{name}: throughput")
            if kind == "AlignmentRun":
                extra = [
                    k
                    for k in ("rewardMargin", "rewardAccuracy", "meanReward", "kl", "entropy", "clipFraction")
                    if series(rows, k)[0]
                ]
                if extra:
                    fig, axes = plt.subplots(1, len(extra), figsize=(3.4 * len(extra), 3.0), squeeze=False)
                    for ax, key in zip(axes[0], extra, strict=True):
                        x, y = series(rows, key)
                        ax.plot(x, y, marker=".")
                        ax.set_xlabel("step")
                        ax.set_title(key)
                    plots.save(fig, f"alignmentrun-{name}-metrics", f"AlignmentRun/{name}: method metrics")
        elif kind == "Evaluation":
            evaluations.append((name, status))
            history = [h for h in status.get("history") or [] if h.get("perplexity") is not None]
            if len(history) > 1:
                fig, ax = plt.subplots(figsize=(7, 3.2))
                ax.plot(range(len(history)), [h["perplexity"] for h in history], marker="o")
                ax.set_xticks(
                    range(len(history)),
                    [h.get("checkpoint", str(i)) for i, h in enumerate(history)],
                    rotation=30,
                )
                ax.set_ylabel("perplexity")
                ax.set_title(f"Evaluation/{name}: perplexity per checkpoint")
                plots.save(fig, f"evaluation-{name}-history", f"Evaluation/{name}: perplexity per checkpoint")

    html_path.write_text(_html(workdir, plots.files, evaluations), encoding="utf-8")
    return html_path


def _table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def evaluation_rows(evaluations: list[tuple[str, dict[str, Any]]]) -> list[list[str]]:
    rows = [["evaluation", "metric", "value"]]
    for name, status in evaluations:
        results = status.get("results") or {}
        for key in ("perplexity", "nll", "bitsPerByte"):
            if results.get(key) is not None:
                rows.append([name, key, f"{results[key]:.4f}"])
        for task, metrics in (results.get("benchmarks") or {}).items():
            for metric, value in metrics.items():
                rows.append([name, f"{task} {metric}", f"{value:.4f}"])
        judge = results.get("judge") or {}
        if judge.get("winRate") is not None:
            ci = judge.get("ci95") or []
            ci_text = f" (95% CI {ci[0]:.3f}–{ci[1]:.3f})" if len(ci) == 2 else ""
            rows.append([name, "judge win rate", f"{judge['winRate']:.3f}{ci_text}"])
        for model, rating in (results.get("arena") or {}).items():
            rows.append([name, f"arena {model}", f"{rating.get('rating', 0):.0f}"])
        rows += human_rows(name, status)
    return rows


def human_rows(name: str, status: dict[str, Any]) -> list[list[str]]:
    """The human arena's ratings next to the judge's, when people voted (``lmforge arena serve``) and the
    votes are in the default SQLite file beside the Evaluation's results."""
    results_uri = str((status.get("outputs") or {}).get("results") or "")
    folder = Path(results_uri).parent if results_uri and "://" not in results_uri else None
    if folder is None or not (folder / "human-votes.sqlite").is_file():
        return []
    try:
        from lmforge_jobs.evaluate import human  # the arena extra: absent, no human rows
    except ImportError:
        return []
    board = human.human_ratings(folder, f"sqlite:///{folder / 'human-votes.sqlite'}")
    rows = []
    for model in board.get("models", []):
        rating, ci = model["human"]["rating"], model["human"].get("ci95") or []
        ci_text = f" (95% CI {ci[0]:.0f}–{ci[1]:.0f})" if len(ci) == 2 else ""
        rows.append([name, f"human arena {model['name']}", f"{rating:.0f}{ci_text}, {model['votes']} votes"])
    for pair in board.get("pairs", []):
        if pair["rate"] is not None:
            rows.append(
                [name, f"human–judge agreement {pair['pair'][0]} vs {pair['pair'][1]}", f"{pair['rate']:.2f}"]
            )
    return rows


def _html(workdir: Path, files: list[tuple[str, Path]], evaluations: list[tuple[str, dict[str, Any]]]) -> str:
    figures = []
    for title, path in files:
        data = base64.b64encode(path.read_bytes()).decode()
        figures.append(
            f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(title)}</figcaption></figure>"
        )
    evals = evaluation_rows(evaluations)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lmforge run report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} th, td {{ border: 1px solid #ccc; padding: 4px 8px; }}
th {{ background: #f3f3f3; text-align: left; }} figure {{ display: inline-block; margin: 1em; }}
img {{ max-width: 900px; }} figcaption {{ color: #555; font-size: 90%; }}
</style></head><body>
<h1>lmforge run report</h1>
<p>Work directory <code>{html.escape(str(workdir))}</code>, written {when}.</p>
<h2>Resources</h2>
{_table(status_rows(workdir))}
<h2>Evaluation</h2>
{_table(evals) if len(evals) > 1 else "<p>No evaluation results.</p>"}
<h2>Plots</h2>
{"".join(figures) or "<p>No metrics recorded.</p>"}
</body></html>
"""
