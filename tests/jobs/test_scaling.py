"""Scaling-law fits (Chinchilla approaches 2 and 3) on planted and published data, and ``lmforge plan --law``."""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from repo import ROOT

from lmforge_jobs import scaling
from lmforge_jobs.scaling import Point, ScalingFit, fit_approach2, fit_approach3, fit_optima
from lmforge_operator.cli import main

EXAMPLE = ROOT / "examples" / "cluster" / "02-pretrain.yaml"

# Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", approach 3's published fit.
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
TRUE_A = BETA / (ALPHA + BETA)  # N_opt ∝ C^a
TRUE_B = ALPHA / (ALPHA + BETA)  # D_opt ∝ C^b
BUDGETS = (1e17, 1e18, 1e19, 1e20, 1e21)


def law(n: float, d: float) -> float:
    return E + A / n**ALPHA + B / d**BETA


def isoflop_points(seed: int = 0, noise: float = 0.01, sizes: int = 7) -> list[tuple[float, float, float]]:
    """IsoFLOP profiles of the planted law: per budget, ``sizes`` model sizes log-spaced from 1/8× to 8× the
    true optimum (as a study centred by a pilot would train), losses with 1 % multiplicative noise."""
    rng = np.random.default_rng(seed)
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    points = []
    for c in BUDGETS:
        n_opt = g * (c / 6) ** TRUE_A
        for factor in np.exp(np.linspace(-math.log(8), math.log(8), sizes)):
            n = n_opt * factor
            d = c / (6 * n)
            points.append((n, d, law(n, d) * (1 + noise * rng.standard_normal())))
    return points


# ------------------------------------------------------------------------------------ planted constants
# Tolerances: fitting the same 35 points under 100 noise seeds (0-99), the worst deviations from the
# planted constants were E 0.13, A ×1.8, B ×1.6, α 0.04, β 0.03, approach 3's a 0.025 and approach 2's
# a and b 0.04 (1 % noise on a loss near 2.5 is ±0.025, the size of the IsoFLOP valleys' depth at the
# edges). The tolerances are those worst cases rounded up: a fit off by more than noise explains fails.
@pytest.fixture(scope="module")
def approach3() -> ScalingFit:
    """Approach 3 on the planted points with a bootstrap (shared by the tests that need a fit). Each
    replicate is a fit of its own; 10 are enough for the interval checks below."""
    return fit_approach3(isoflop_points(), bootstrap=10, seed=1)


def test_approach3_recovers_the_planted_law(approach3: ScalingFit):
    fit = approach3
    assert fit.approach == 3 and len(fit.points) == 35
    assert fit.value("E") == pytest.approx(E, abs=0.15)
    assert abs(math.log(fit.value("A") / A)) < math.log(2)
    assert abs(math.log(fit.value("B") / B)) < math.log(2)
    assert fit.value("alpha") == pytest.approx(ALPHA, abs=0.05)
    assert fit.value("beta") == pytest.approx(BETA, abs=0.04)
    assert fit.value("a") == pytest.approx(TRUE_A, abs=0.03)
    assert fit.value("a") + fit.value("b") == pytest.approx(1)
    # the bootstrap interval brackets the estimate, and is not degenerate
    for name in ("E", "alpha", "beta", "a"):
        est = fit.parameters[name]
        assert est.low < est.value < est.high, name
    # The frontier and the loss extrapolated 100× beyond the largest budget: the prediction's own errors
    # partly cancel (a too-large α with a too-large A), so it is tighter than the constants.
    target = 1e23
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    n_true = g * (target / 6) ** TRUE_A
    pred = fit.predict(target)
    assert pred.params == pytest.approx(n_true, rel=0.5)
    assert pred.tokens == pytest.approx(target / (6 * pred.params))
    assert pred.loss == pytest.approx(law(n_true, target / (6 * n_true)), rel=0.02)
    assert pred.params_interval[0] < pred.params < pred.params_interval[1]


def test_approach2_recovers_the_planted_exponents():
    fit = fit_approach2(isoflop_points(), bootstrap=100, seed=1)
    assert fit.approach == 2 and len(fit.isoflops) == len(BUDGETS)
    assert [i.points for i in fit.isoflops] == [7] * len(BUDGETS)
    assert fit.value("a") == pytest.approx(TRUE_A, abs=0.05)
    assert fit.value("b") == pytest.approx(TRUE_B, abs=0.05)
    low, high = fit.parameters["a"].low, fit.parameters["a"].high
    assert low < fit.value("a") < high and high - low < 0.2
    for iso in fit.isoflops:  # each budget's minimum is near the planted optimum (within the size grid)
        g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
        assert iso.params_opt == pytest.approx(g * (iso.flops / 6) ** TRUE_A, rel=0.6)
        assert not iso.extrapolated
    assert fit.predict(1e22).loss is None


def test_approach3_without_noise_is_exact():
    fit = fit_approach3(isoflop_points(noise=0.0), bootstrap=0)
    for name, true in (("E", E), ("A", A), ("B", B), ("alpha", ALPHA), ("beta", BETA)):
        assert fit.value(name) == pytest.approx(true, rel=0.02), name


# ---------------------------------------------------------------------------- a published IsoFLOP result
# Hoffmann et al. 2022, Table 3 ("Estimated optimal training FLOPs and training tokens for various model
# sizes"), which projects approach 1's fit (N_opt ∝ C^0.50); Table 2 reports a = 0.49 [0.462, 0.534],
# b = 0.51 [0.483, 0.529] for approach 2. Parameters, FLOPs, tokens:
#     400M  1.92e19    8.0B  |  1B   1.21e20   20.2B  |  10B  1.23e22  205.1B
#     67B   5.76e23    1.5T  |  175B 3.85e24    3.7T  |  280B 9.90e24    5.9T
#     520B  3.43e25   11.0T  |  1T   1.27e26   21.2T  |  10T  1.30e28  216.2T
CHINCHILLA_TABLE_3 = [
    (1.92e19, 400e6, 8.0e9),
    (1.21e20, 1e9, 20.2e9),
    (1.23e22, 10e9, 205.1e9),
    (5.76e23, 67e9, 1.5e12),
    (3.85e24, 175e9, 3.7e12),
    (9.90e24, 280e9, 5.9e12),
    (3.43e25, 520e9, 11.0e12),
    (1.27e26, 1e12, 21.2e12),
    (1.30e28, 10e12, 216.2e12),
]


def test_reproduces_chinchilla_exponents():
    fit = fit_optima([(c, n, d) for c, n, d in CHINCHILLA_TABLE_3], bootstrap=200, seed=0)
    assert fit.value("a") == pytest.approx(0.5, abs=0.03)
    assert fit.value("b") == pytest.approx(0.5, abs=0.03)
    # Table 3's tokens are rounded to 2-3 digits, so D_opt = C/(6·N_opt) reproduces them only roughly:
    assert fit_optima([(c, n) for c, n, _ in CHINCHILLA_TABLE_3], bootstrap=0).value("b") == pytest.approx(
        fit.value("b"), abs=0.01
    )
    # the published approach-2 interval and ours overlap
    assert fit.parameters["a"].low < 0.534 and fit.parameters["a"].high > 0.462
    assert fit.describe() == "(approach 2, fitted on 9 given optima)"
    # Chinchilla itself: 5.76e23 FLOPs → ~70B parameters, ~1.4T tokens (~20 tokens per parameter)
    pred = fit.predict(5.76e23)
    assert pred.params == pytest.approx(67e9, rel=0.1)
    assert pred.tokens_per_parameter == pytest.approx(20, rel=0.15)


# ------------------------------------------------------------------------------------------------ errors
def test_too_few_sizes_names_the_budget():
    points = [p for p in isoflop_points() if not (p[0] * p[1] * 6 > 5e18 and p[0] * p[1] * 6 < 5e19)]
    points += [(3e8, 1e19 / 6 / 3e8, 3.0), (6e8, 1e19 / 6 / 6e8, 2.9)]  # budget 1e19 with 2 sizes
    with pytest.raises(ValueError, match=r"budget 1e\+19 FLOPs: 2 model size\(s\).*at least 3"):
        fit_approach2(points, bootstrap=0)


def test_downward_parabola_names_the_budget():
    c = 1e18
    sizes = [1e7, 3e7, 1e8]
    hump = [(n, c / (6 * n), loss) for n, loss in zip(sizes, [3.0, 3.4, 3.0], strict=True)]
    valley = [(n, 1e19 / (6 * n), loss) for n, loss in zip(sizes, [3.0, 2.8, 3.0], strict=True)]
    with pytest.raises(ValueError, match=r"budget 1e\+18 FLOPs: the parabola .* opens downward"):
        fit_approach2(hump + valley, bootstrap=0)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ((1e8, 2e9, -1.0), r"point 3 .*loss must be positive"),
        ((0.0, 2e9, 3.0), r"point 3 .*params must be positive"),
        ({"params": 1e8, "loss": 3.0}, r"point 3 .*missing tokens"),
        ((1e8, 2e9), r"point 3: expected \(N, D, L\)"),
        ((1e8, float("nan"), 3.0), r"point 3 .*tokens must be positive"),
    ],
)
def test_unusable_points_are_named(row, message):
    rows = [*isoflop_points()[:3], row]
    with pytest.raises(ValueError, match=message):
        fit_approach3(rows, bootstrap=0)


def test_too_little_data():
    with pytest.raises(ValueError, match="at least 2 compute budgets"):
        fit_approach2(isoflop_points()[:7], bootstrap=0)
    with pytest.raises(ValueError, match="at least 5 points"):
        fit_approach3(isoflop_points()[:4], bootstrap=0)
    with pytest.raises(ValueError, match="approach must be 2 or 3"):
        scaling.fit(isoflop_points(), approach=1)


def test_points_in_every_form_and_explicit_compute():
    points = scaling.as_points(
        [
            Point(1e8, 2e9, 3.0),
            {"N": 1e8, "D": 2e9, "L": 3.0},
            {"parameters": "1e8", "tokens": "2e9", "evalLoss": "3.0", "flops": "1.3e18"},
            (1e8, 2e9, 3.0),
            (1e8, 2e9, 1.3e18, 3.0),
        ]
    )
    assert [p.flops for p in points] == [1.2e18, 1.2e18, 1.3e18, 1.2e18, 1.3e18]
    assert len(scaling.group_budgets(points)) == 2  # 1.2e18 and 1.3e18 are 8 % apart


# ----------------------------------------------------------------------------------- files and the CLI
def test_fit_round_trips_through_json(tmp_path, approach3: ScalingFit):
    fit = approach3
    path = fit.save(tmp_path / "law.json")
    loaded = ScalingFit.load(path)
    assert loaded.source == "law.json"
    assert loaded.parameters == fit.parameters and loaded.points == fit.points
    assert loaded.predict(1e22) == fit.predict(1e22)
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a scaling-law fit"):
        ScalingFit.load(tmp_path / "bad.json")


def test_module_cli_fits_jsonl_and_csv(tmp_path, capsys):
    rows = isoflop_points()
    jsonl = tmp_path / "points.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"params": n, "tokens": d, "loss": loss}) + "\n" for n, d, loss in rows)
    )
    csv = tmp_path / "points.csv"
    csv.write_text("N,D,L\n" + "".join(f"{n},{d},{loss}\n" for n, d, loss in rows))
    assert scaling.main(["fit", str(csv), "--out", str(tmp_path / "a2.json"), "--approach", "2"]) == 0
    assert (
        scaling.main(
            ["fit", str(jsonl), "--out", str(tmp_path / "a3.json"), "--bootstrap", "3", "--target", "1e22"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "at 1e+22 FLOPs:" in printed and "loss" in printed and "wrote" in printed
    a3, a2 = ScalingFit.load(tmp_path / "a3.json"), ScalingFit.load(tmp_path / "a2.json")
    assert a3.approach == 3 and a2.approach == 2 and a2.bootstrap > 150
    assert a3.value("a") == pytest.approx(a2.value("a"), abs=0.05)
    (tmp_path / "bad.jsonl").write_text('{"params": 1, "tokens": 2, "loss": 0}\n')
    assert scaling.main(["fit", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "x.json")]) == 1


def test_points_from_runs(tmp_path):
    def status(name, phase, loss, params=164160, tokens=819200):
        d = tmp_path / "runs" / "pretrainrun" / name
        d.mkdir(parents=True)
        body = {
            "phase": phase,
            "plan": {"parameters": params, "tokens": tokens, "flops": 7.2e11},
            "progress": {"tokens": tokens},
            "metrics": {"evalLoss": loss} if loss else {},
        }
        (d / "status.json").write_text(json.dumps(body))

    status("a", "Succeeded", 3.42)
    status("b", "Failed", 5.0)
    status("c", "Succeeded", None)
    status("d", "Succeeded", 3.1, params=328320, tokens=1638400)
    assert scaling.points_from_runs(tmp_path / "runs") == [
        Point(164160.0, 819200.0, 3.42),
        Point(328320.0, 1638400.0, 3.1),
    ]
    out = tmp_path / "points.jsonl"
    assert scaling.main(["points", str(tmp_path / "runs"), "--out", str(out)]) == 0
    assert len(scaling.read_points(out)) == 2


# ------------------------------------------------------------------------------------ lmforge plan --law
@pytest.fixture(scope="module")
def law_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An approach-3 law whose optimum is far from 20 tokens per parameter (B ≫ A: data is what limits)."""
    planted = dict(E=1.8, A=400.0, B=4000.0, alpha=0.34, beta=0.28)
    return _exact_law(**planted).save(tmp_path_factory.mktemp("law") / "law.json")


def _exact_law(E: float, A: float, B: float, alpha: float, beta: float) -> ScalingFit:
    points = []
    for c in BUDGETS:
        for n in np.geomspace(1e6, 1e9, 6):
            d = c / (6 * n)
            points.append((n, d, E + A / n**alpha + B / d**beta))
    return fit_approach3(points, bootstrap=0)


def test_plan_with_a_fitted_law(law_file, capsys):
    path = law_file
    law = ScalingFit.load(path)
    assert main(["plan", str(EXAMPLE), "--json"]) == 0
    (default,) = json.loads(capsys.readouterr().out).values()
    assert default["law"] == "chinchilla-2022 (published)"
    assert default["tokens"] == round(20 * default["parameters"])  # the example's tokensPerParameter: 20

    assert main(["plan", str(EXAMPLE), "--json", "--law", str(path)]) == 0
    (fitted,) = json.loads(capsys.readouterr().out).values()
    assert fitted["law"] == f"law.json (approach 3, fitted on {len(law.points)} points)"
    assert fitted["parameters"] == default["parameters"]
    per_param = fitted["tokens"] / fitted["parameters"]
    assert per_param > 40  # this law wants far more data per parameter than Chinchilla's 20
    assert fitted["tokens"] == pytest.approx(law.tokens_for_params(fitted["parameters"]), rel=1e-6)
    # and the model is that law's compute-optimal size for the FLOPs 6·N·D it now gets
    assert law.predict(6 * fitted["parameters"] * fitted["tokens"]).params == pytest.approx(
        fitted["parameters"]
    )
    assert fitted["flops"] > default["flops"]

    assert main(["plan", str(EXAMPLE), "--law", str(path)]) == 0
    text = capsys.readouterr().out
    assert "law" in text and "law.json (approach 3, fitted on" in text
    assert "tokensPerParameter 20 replaced by the fitted law" in text
    assert main(["plan", str(EXAMPLE)]) == 0
    assert "chinchilla-2022 (published)" in capsys.readouterr().out


def test_status_plan_names_the_law(law_file):
    from lmforge_jobs.manifest import load_resources
    from lmforge_jobs.plan import plan_pretrain

    (run,), problems = load_resources([EXAMPLE])
    assert not problems
    default = plan_pretrain(run.spec).to_status().model_dump(by_alias=True, exclude_none=True)
    assert default["law"] == "chinchilla-2022 (published)"
    fitted = plan_pretrain(run.spec, law=ScalingFit.load(law_file)).to_status()
    assert fitted.law.startswith("law.json (approach 3, fitted on") and fitted.tokens > default["tokens"]


def test_plan_gpu_hours_with_a_fitted_law(law_file, capsys, monkeypatch):
    from lmforge_jobs import plan

    # the text output below searches the same shape as the first --json call: search once
    monkeypatch.setattr(plan, "nearest_shape", functools.cache(plan.nearest_shape))
    path = law_file
    assert main(["plan", "--gpu-hours", "10000", "--json", "--law", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    pred = ScalingFit.load(path).predict(out["flops"])
    assert out["parameters"] == pytest.approx(pred.params) and out["loss"] == pytest.approx(pred.loss)
    assert out["law"].startswith("law.json (approach 3") and out["method"] is None
    assert main(["plan", "--gpu-hours", "10000", "--json"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert default["law"] == "chinchilla-2022 (published)" and default["method"] == "hoffmann"
    assert default["tokens"] / default["parameters"] == pytest.approx(20)
    assert out["tokens"] / out["parameters"] > 40
    assert main(["plan", "--gpu-hours", "10000", "--law", str(path)]) == 0
    assert "law.json (approach 3" in capsys.readouterr().out


def test_plan_law_errors(tmp_path, law_file, capsys):
    assert main(["plan", str(EXAMPLE), "--law", str(tmp_path / "missing.json")]) == 1
    assert "--law" in capsys.readouterr().err
    (tmp_path / "x.json").write_text("[1, 2]")
    assert main(["plan", str(EXAMPLE), "--law", str(tmp_path / "x.json")]) == 1
    assert "not a scaling-law fit" in capsys.readouterr().err
    assert main(["plan", "--gpu-hours", "10", "--law", str(law_file), "--method", "epoch"]) == 2


def test_loading_a_law_needs_no_numpy(law_file):
    path = law_file
    code = (
        "import sys; sys.modules['numpy'] = None; sys.modules['scipy'] = None\n"
        "from lmforge_operator.cli import main\n"
        f"assert main(['plan', '--gpu-hours', '100', '--law', {str(path)!r}]) == 0\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
