"""The run report's experiment sections: a ScalingStudy's IsoFLOP curves, fitted frontier and target, and a
Sweep's trial table with the objective against each parameter; every text from a status is escaped."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from lmforge_jobs.scaling import fit
from lmforge_operator.report import build_report

E, A, B, ALPHA, BETA = 1.8, 60.0, 300.0, 0.35, 0.30
BUDGETS = (1e12, 1e13, 1e14)


def planted(n: float, d: float) -> float:
    return E + A / n**ALPHA + B / d**BETA


def write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def scaling_workdir(workdir: Path) -> Path:
    """A finished study's folder: status.json with 3 budgets × 5 sizes and both laws beside it."""
    folder = workdir / "scalingstudy" / "iso"
    rows = []
    for i, c in enumerate(BUDGETS):
        centre = math.sqrt(c / 120)
        for j, factor in enumerate((0.25, 0.5, 1, 2, 4)):
            n = round(centre * factor)
            d = round(c / (6 * n))
            rows.append(
                {"name": f"iso-b{i:02d}n{j:02d}", "budget": c, "parameters": n, "tokens": d, "flops": 6.0 * n * d,
                 "loss": planted(n, d), "phase": "Succeeded", "shape": {}}
            )  # fmt: skip
    points = [(r["parameters"], r["tokens"], r["budget"], r["loss"]) for r in rows]
    folder.mkdir(parents=True)
    fit(points, 2, bootstrap=0).save(folder / "scaling-approach2.json")
    law = fit(points, 3, bootstrap=3)  # enough for an interval
    law.save(folder / "scaling-approach3.json")
    law.save(folder / "scaling.json")
    pred = law.predict(1e16)
    status = {
        "phase": "Succeeded",
        "points": rows,
        "pointsDone": len(rows),
        "pointsTotal": len(rows),
        "lossMetric": "evalLoss",
        "fits": [
            {"approach": 3, "parameters": {k: {"value": e.value} for k, e in law.parameters.items()}},
            {"approach": 2, "error": "budget 1e12: <b>not bracketed</b>"},
        ],
        "target": {"approach": 3, "flops": 1e16, "parameters": pred.params, "tokens": pred.tokens,
                   "parametersInterval": list(pred.params_interval), "loss": pred.loss},
    }  # fmt: skip
    write(folder / "status.json", status)
    return folder


def sweep_workdir(workdir: Path) -> None:
    trials = [
        {"name": f"lr-t{i:03d}", "number": i, "phase": phase, "objective": objective, "pruned": phase == "Pruned",
         "parameters": {"optimizer.lr": lr, "<script>alert(1)</script>": kind}}
        for i, (lr, kind, objective, phase) in enumerate(
            [(1e-4, "cosine", 4.1, "Succeeded"), (1e-3, "linear", 3.2, "Succeeded"),
             (1e-2, "cosine", 5.7, "Pruned"), (3e-2, "linear", None, "Failed")]
        )
    ]  # fmt: skip
    write(workdir / "sweep" / "lr" / "status.json", {"phase": "Succeeded", "trials": trials})


def images(page: str) -> dict[str, str]:
    """caption → base64 PNG of every figure."""
    found = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)
    return {alt: data for alt, data in found}


@pytest.fixture(scope="module")
def scaling_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, list[Any]]]:
    """A finished study's report, fitted and drawn once for this module's tests, which only read it: its
    work directory, the page, and what went on the axes (each call of plot, scatter and errorbar)."""
    import matplotlib.axes

    workdir = tmp_path_factory.mktemp("scaling")
    scaling_workdir(workdir)
    drawn: dict[str, list[Any]] = {"plot": [], "scatter": [], "errorbar": []}
    with pytest.MonkeyPatch.context() as monkeypatch:
        for method in drawn:
            original = getattr(matplotlib.axes.Axes, method)

            def spy(self, *args, _original=original, _method=method, **kwargs):
                drawn[_method].append((args, kwargs))
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(matplotlib.axes.Axes, method, spy)
        page = build_report(workdir).read_text()
    return workdir, page, drawn


def test_the_report_draws_a_scaling_study(scaling_report: tuple[Path, str, dict[str, list[Any]]]) -> None:
    workdir, page, _ = scaling_report
    assert "<h2>Experiments</h2>" in page and "<h3>ScalingStudy/iso</h3>" in page
    figures = images(page)
    isoflops = "ScalingStudy/iso: loss against model size at each compute budget, with the fitted minima"
    frontier = "ScalingStudy/iso: compute-optimal N against compute, extrapolated to the target budget"
    assert isoflops in figures and frontier in figures
    assert len(figures[isoflops]) > 1000 and len(figures[frontier]) > 1000
    assert (workdir / "report" / "scalingstudy-iso-isoflops.png").is_file()
    # the fits' table: parameters, the failed fit's error (escaped) and the prediction at the target
    assert "<td>approach 3</td><td>alpha</td>" in page
    assert "&lt;b&gt;not bracketed&lt;/b&gt;" in page and "<b>not bracketed" not in page
    assert "<td>target 1e+16 FLOPs</td><td>N_opt</td>" in page
    assert "<td>target 1e+16 FLOPs</td><td>predicted loss</td>" in page


def test_the_isoflop_plot_draws_each_budgets_parabola_and_minimum(
    scaling_report: tuple[Path, str, dict[str, list[Any]]],
) -> None:
    """What goes on the axes: a curve and a starred minimum per budget, the frontier through to the target."""
    workdir, _, drawn = scaling_report
    stars = [args for args, kwargs in drawn["scatter"] if kwargs.get("marker") == "*"]
    assert len(stars) == len(BUDGETS)
    from lmforge_jobs.scaling import ScalingFit

    approach2 = ScalingFit.load(workdir / "scalingstudy" / "iso" / "scaling-approach2.json")
    assert sorted(s[0][0] for s in stars) == sorted(i.params_opt for i in approach2.isoflops)
    curves = [args for args, _ in drawn["plot"]]
    assert len(curves) == len(BUDGETS) + 1  # a parabola per budget, and the frontier
    frontier = curves[-1]
    assert frontier[0][0] == min(BUDGETS) and frontier[0][-1] == 1e16  # runs out to the target budget
    [(target, kwargs)] = drawn["errorbar"]
    assert target[0] == [1e16] and kwargs["yerr"] is not None


def test_the_report_tables_and_plots_a_sweep_and_escapes_parameter_names(tmp_path: Path) -> None:
    sweep_workdir(tmp_path)
    page = build_report(tmp_path).read_text()
    assert "<h3>Sweep/lr</h3>" in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    header = re.search(r"<th>trial</th>(.*?)</tr>", page).group(1)
    assert header == (
        "<th>&lt;script&gt;alert(1)&lt;/script&gt;</th><th>optimizer.lr</th><th>objective</th><th>phase</th>"
        "<th>pruned</th>"
    )
    assert (
        "<tr><td>lr-t002</td><td>cosine</td><td>0.01</td><td>5.7</td><td>Pruned</td><td>yes</td></tr>" in page
    )
    assert "<tr><td>lr-t003</td><td>linear</td><td>0.03</td><td></td><td>Failed</td><td></td></tr>" in page
    assert "Sweep/lr: objective against each parameter (pruned trials in red)" in images(page)


def test_no_experiments_no_section(tmp_path: Path) -> None:
    assert "Experiments" not in build_report(tmp_path).read_text()
