"""The run report of ``lmforge run``: one self-contained HTML file with plots, and the plots as PNG files.

Reads what the run left in the work directory — each resource's status.json, the jobs' metrics.jsonl
(one line per logged step) and the Corpus's stats.json — and draws the data funnel (documents left after
each filter), training and held-out loss, tokens/s and MFU over steps, alignment metrics, and the
evaluation table; for experiments, a scaling study's IsoFLOP curves and fitted frontier (read from its
``scaling*.json`` laws) and a sweep's trial table with the objective against each parameter.
``lmforge report [--workdir]`` redraws it at any time.
"""

from __future__ import annotations

import base64
import html
import json
import math
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

    def save(self, fig: Any, name: str, title: str, listed: bool = True) -> Path:
        """Write the figure; ``listed``: shown under Plots (else its section embeds it)."""
        path = self.out / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        self.plt.close(fig)
        if listed:
            self.files.append((title, path))
        return path


def build_report(workdir: Path, out: Path | None = None) -> Path:
    """Write ``report.html`` and ``report/*.png`` into ``workdir`` (or ``out``); return the HTML path."""
    workdir = Path(workdir)
    html_path = out or workdir / "report.html"
    plots = _Plots(html_path.parent / "report")
    plt = plots.plt
    resources = collect(workdir)
    evaluations: list[tuple[str, dict[str, Any]]] = []
    experiments: list[str] = []

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
        elif kind == "ScalingStudy":
            experiments.append(scaling_section(plots, workdir / KINDS[kind].singular / name, name, status))
        elif kind == "Sweep":
            experiments.append(sweep_section(plots, name, status))
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

    html_path.write_text(_html(workdir, plots.files, evaluations, experiments), encoding="utf-8")
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


def _figure(title: str, path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (
        f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(title)}</figcaption></figure>"
    )


def _html(
    workdir: Path,
    files: list[tuple[str, Path]],
    evaluations: list[tuple[str, dict[str, Any]]],
    experiments: list[str] = (),  # type: ignore[assignment]
) -> str:
    figures = [_figure(title, path) for title, path in files]
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
{"<h2>Experiments</h2>" + "".join(experiments) if experiments else ""}
<h2>Plots</h2>
{"".join(figures) or "<p>No metrics recorded.</p>"}
</body></html>
"""


# ---------------------------------------------------------------------------------------- experiments
def _label(text: Any) -> str:
    """Text for a matplotlib label: ``$`` would start mathtext."""
    return str(text).replace("$", r"\$")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _fmt(value: Any) -> str:
    number = _number(value)
    return f"{number:.4g}" if number is not None else ("" if value is None else str(value))


def _law(folder: Path, file: str) -> Any:
    from lmforge_jobs.scaling import ScalingFit  # pure Python: no numpy needed to read or predict

    try:
        return ScalingFit.load(folder / file)
    except ValueError:
        return None


def _interval(values: Any) -> str:
    return f" [{values[0]:.4g}, {values[1]:.4g}]" if isinstance(values, list) and len(values) == 2 else ""


def scaling_section(plots: _Plots, folder: Path, name: str, status: dict[str, Any]) -> str:
    """A ScalingStudy: its IsoFLOP curves with their minima, the fitted frontier N_opt(C) with the
    extrapolated target, and the fits' parameters."""
    plt = plots.plt
    title = f"ScalingStudy/{name}"
    parts = [f"<h3>{html.escape(title)}</h3>"]
    points = [
        p for p in status.get("points") or [] if _number(p.get("loss")) and _number(p.get("parameters"))
    ]
    approach2, law = _law(folder, "scaling-approach2.json"), _law(folder, "scaling.json")
    target = status.get("target") or {}
    budgets = sorted({float(p["budget"]) for p in points})
    if points:
        fig, ax = plt.subplots(figsize=(7, 4))
        colours = plt.cm.viridis([i / max(1, len(budgets) - 1) for i in range(len(budgets))])
        for colour, budget in zip(colours, budgets, strict=True):
            row = sorted((p for p in points if float(p["budget"]) == budget), key=lambda p: p["parameters"])
            xs = [float(p["parameters"]) for p in row]
            ax.scatter(xs, [float(p["loss"]) for p in row], color=colour, label=f"C = {budget:.2g}")
            iso = next(
                (i for i in (approach2.isoflops if approach2 else []) if abs(i.flops / budget - 1) < 0.05),
                None,
            )
            if iso is not None and iso.coefficients:
                c0, c1, c2 = iso.coefficients
                lo, hi = math.log(min(xs[0], iso.params_opt)), math.log(max(xs[-1], iso.params_opt))
                grid = [lo + (hi - lo) * k / 60 for k in range(61)]
                ax.plot([math.exp(x) for x in grid], [c0 + c1 * x + c2 * x * x for x in grid], color=colour)
                ax.scatter([iso.params_opt], [iso.loss_min], color=colour, marker="*", s=160, edgecolor="k")
            elif law is not None and law.approach == 3:  # approach 3's loss along the budget
                p = {k: e.value for k, e in law.parameters.items()}
                grid = [xs[0] * (xs[-1] / xs[0]) ** (k / 60) for k in range(61)]
                losses = [
                    p["E"] + p["A"] / n ** p["alpha"] + p["B"] / (budget / (6 * n)) ** p["beta"] for n in grid
                ]
                ax.plot(grid, losses, color=colour, linestyle="--")
                best = law.predict(budget)
                ax.scatter([best.params], [best.loss], color=colour, marker="*", s=160, edgecolor="k")
        ax.set_xscale("log")
        ax.set_xlabel("parameters N")
        ax.set_ylabel(_label(status.get("lossMetric") or "loss"))
        ax.set_title(_label(f"{title}: IsoFLOP curves (★ fitted minimum)"))
        ax.legend(fontsize=7)
        caption = f"{title}: loss against model size at each compute budget, with the fitted minima"
        parts.append(
            _figure(caption, plots.save(fig, f"scalingstudy-{name}-isoflops", caption, listed=False))
        )
    if law is not None:
        fig, ax = plt.subplots(figsize=(7, 4))
        minima = approach2.isoflops if approach2 else []
        if minima:
            ax.scatter(
                [i.flops for i in minima], [i.params_opt for i in minima], label="IsoFLOP minima (approach 2)"
            )
        end = max([*budgets, float(target.get("flops") or 0), 1.0])
        start = min(budgets or [end])
        grid = [start * (end / start) ** (k / 60) for k in range(61)] if end > start else [start]
        ax.plot(grid, [law.predict(c).params for c in grid], label=f"N_opt(C), approach {law.approach}")
        if _number(target.get("flops")) and _number(target.get("parameters")):
            low_high = target.get("parametersInterval")
            errors = None
            if isinstance(low_high, list) and len(low_high) == 2:
                # a percentile interval need not contain the full fit's estimate
                errors = [
                    [max(0.0, target["parameters"] - low_high[0])],
                    [max(0.0, low_high[1] - target["parameters"])],
                ]
            ax.errorbar(
                [target["flops"]], [target["parameters"]], yerr=errors, fmt="o", color="crimson",
                capsize=4, label="target budget",
            )  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("compute C (FLOPs)")
        ax.set_ylabel("compute-optimal parameters")
        ax.set_title(_label(f"{title}: fitted frontier"))
        ax.legend(fontsize=7)
        caption = f"{title}: compute-optimal N against compute, extrapolated to the target budget"
        parts.append(
            _figure(caption, plots.save(fig, f"scalingstudy-{name}-frontier", caption, listed=False))
        )
    rows = [["fit", "parameter", "value", "interval"]]
    for fit in status.get("fits") or []:
        label = f"approach {fit.get('approach')}"
        if fit.get("error"):
            rows.append([label, "error", str(fit["error"]), ""])
        for key, est in (fit.get("parameters") or {}).items():
            low, high = est.get("low"), est.get("high")
            rows.append(
                [label, key, _fmt(est.get("value")), f"[{low:.4g}, {high:.4g}]" if low is not None else ""]
            )
    if target:
        for key, unit in (("parameters", "N_opt"), ("tokens", "D_opt"), ("loss", "predicted loss")):
            if target.get(key) is not None:
                rows.append(
                    [
                        f"target {target['flops']:.3g} FLOPs",
                        unit,
                        _fmt(target[key]),
                        _interval(target.get(f"{key}Interval")),
                    ]
                )
    if len(rows) > 1:
        parts.append(_table(rows))
    if len(parts) == 1:
        parts.append("<p>No finished points yet.</p>")
    return "".join(parts)


def sweep_section(plots: _Plots, name: str, status: dict[str, Any]) -> str:
    """A Sweep: its trial table (parameters, objective, pruned) and the objective against each parameter."""
    plt = plots.plt
    title = f"Sweep/{name}"
    trials = status.get("trials") or []
    keys = sorted({k for t in trials for k in (t.get("parameters") or {})})
    parts = [f"<h3>{html.escape(title)}</h3>"]
    if not trials:
        return parts[0] + "<p>No trials yet.</p>"
    rows = [["trial", *keys, "objective", "phase", "pruned"]]
    for t in trials:
        values = t.get("parameters") or {}
        rows.append(
            [t.get("name", ""), *(_fmt(values.get(k)) for k in keys), _fmt(t.get("objective")), t.get("phase", ""),
             "yes" if t.get("pruned") else ""]
        )  # fmt: skip
    parts.append(_table(rows))
    scored = [t for t in trials if _number(t.get("objective")) is not None]
    if keys and scored:
        fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False)
        for ax, key in zip(axes[0], keys, strict=True):
            values = [(t.get("parameters") or {}).get(key) for t in scored]
            numeric = all(_number(v) is not None for v in values)
            if numeric:
                xs = [float(v) for v in values]
                if min(xs) > 0 and max(xs) / min(xs) >= 100:
                    ax.set_xscale("log")
            else:  # categories: one position per distinct value
                labels = sorted({str(v) for v in values})
                xs = [labels.index(str(v)) for v in values]
                ax.set_xticks(range(len(labels)), [_label(v) for v in labels], rotation=30, fontsize=7)
            colours = ["tab:red" if t.get("pruned") else "tab:blue" for t in scored]
            ax.scatter(xs, [float(t["objective"]) for t in scored], c=colours)
            ax.set_xlabel(_label(key))
            ax.set_ylabel("objective")
        fig.suptitle(_label(f"{title}: objective per parameter (red: pruned)"), fontsize=9)
        caption = f"{title}: objective against each parameter (pruned trials in red)"
        parts.append(_figure(caption, plots.save(fig, f"sweep-{name}-objective", caption, listed=False)))
    return "".join(parts)
