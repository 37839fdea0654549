"""Scaling laws fitted on small runs: Chinchilla's approaches 2 and 3 (Hoffmann et al. 2022).

    python -m lmforge_jobs.scaling fit points.jsonl --out law.json [--approach 3] [--bootstrap 200]
    python -m lmforge_jobs.scaling points WORKDIR --out points.jsonl    # from `lmforge run` PretrainRuns
    lmforge plan run.yaml --law law.json                                  # plan with the fitted law

A point is one finished training run: its parameters N, its training tokens D, its compute C (6·N·D unless
given) and its final held-out loss L. Points come as ``Point``s, as mappings (``params``/``tokens``/
``loss``/``flops``, or ``N``/``D``/``L``/``C``) or as tuples ``(N, D, L)`` / ``(N, D, C, L)``.

Approach 2 (IsoFLOP profiles): the points are grouped by compute budget; per budget a parabola of the loss
against log N gives the loss-minimising N_opt(C), with D_opt = C/(6·N_opt); then N_opt ∝ C^a and
D_opt ∝ C^b are fitted as straight lines in log-log space. Approach 3 (parametric loss): L(N, D) = E +
A/N^α + B/D^β, fitted by minimising the Huber loss (δ = 1e-3) of log L̂ − log L over every point, with
log L̂ = LSE(a − α·log N, b − β·log D, e) (A = e^a, B = e^b, E = e^e), by L-BFGS from a grid of starts;
under C = 6ND its compute-optimal frontier is N_opt = G·(C/6)^(β/(α+β)) with G = (αA/(βB))^(1/(α+β)).
Both report bootstrap intervals: points are resampled with replacement within each budget (seeded).

The fit result (``ScalingFit``) is JSON (``save``/``load``) and evaluating it (``predict``) needs no
third-party package, so ``lmforge plan --law`` works where numpy and scipy are not installed; the fitting
functions import them when called.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "lmforge-scaling-law/v1"
HUBER_DELTA = 1e-3
"""Hoffmann et al. 2022, section 3.3: Huber δ = 10⁻³ on the log-loss residuals."""
BUDGET_RTOL = 0.05
"""Points whose compute differs by less than this (relative) belong to one IsoFLOP budget."""

# Hoffmann et al.'s grid of L-BFGS initialisations (appendix D.2): α, β ∈ {0, 0.5, …, 2},
# e ∈ {-1, -0.5, …, 1}, a, b ∈ {0, 5, …, 25}: 4,500 starts.
GRID_ALPHA = (0.0, 0.5, 1.0, 1.5, 2.0)
GRID_E = (-1.0, -0.5, 0.0, 0.5, 1.0)
GRID_AB = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
LBFGS_STARTS = 12
"""L-BFGS runs from this many of the grid's starts, the ones with the lowest objective (every grid start is
evaluated; descending from the 4,500 is what the paper does and costs seconds per fit for the same optimum)."""


# --------------------------------------------------------------------------------------------- points
@dataclass(frozen=True)
class Point:
    """One finished run: parameters, training tokens, final held-out loss, and its compute."""

    params: float
    tokens: float
    loss: float
    compute: float | None = None
    """Training FLOPs; 6·params·tokens when not given."""

    @property
    def flops(self) -> float:
        return self.compute if self.compute is not None else 6.0 * self.params * self.tokens


_ALIASES = {
    "params": ("params", "parameters", "N"),
    "tokens": ("tokens", "D"),
    "loss": ("loss", "evalLoss", "eval_loss", "L"),
    "compute": ("compute", "flops", "C"),
}


def _from_mapping(row: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, names in _ALIASES.items():
        for name in names:
            if row.get(name) not in (None, ""):
                out[key] = float(row[name])
                break
    return out


def as_points(rows: Iterable[Point | Mapping[str, Any] | Sequence[float]]) -> list[Point]:
    """Points from ``Point``s, mappings or tuples; a ValueError names the first unusable one."""
    points = []
    for i, row in enumerate(rows):
        if isinstance(row, Point):
            values = asdict(row)
        elif isinstance(row, Mapping):
            values = _from_mapping(row)
        else:
            seq = [float(v) for v in row]
            if len(seq) == 3:
                values = dict(params=seq[0], tokens=seq[1], loss=seq[2])
            elif len(seq) == 4:
                values = dict(params=seq[0], tokens=seq[1], compute=seq[2], loss=seq[3])
            else:
                raise ValueError(f"point {i}: expected (N, D, L) or (N, D, C, L), got {len(seq)} values")
        missing = [k for k in ("params", "tokens", "loss") if values.get(k) is None]
        if missing:
            raise ValueError(f"point {i} ({row!r}): missing {', '.join(missing)}")
        for key in ("params", "tokens", "loss", "compute"):
            v = values.get(key)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(
                    f"point {i} ({_describe(values)}): {key} must be positive and finite, not {v}"
                )
        points.append(Point(values["params"], values["tokens"], values["loss"], values.get("compute")))
    return points


def _describe(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in values.items() if isinstance(v, float | int))


def group_budgets(points: Sequence[Point], rtol: float = BUDGET_RTOL) -> list[tuple[float, list[Point]]]:
    """IsoFLOP groups: points sorted by compute, a new group where compute jumps by more than ``rtol``.
    Each group's budget is the geometric mean of its points' compute."""
    groups: list[list[Point]] = []
    for p in sorted(points, key=lambda p: p.flops):
        if groups and p.flops <= groups[-1][0].flops * (1 + rtol):
            groups[-1].append(p)
        else:
            groups.append([p])
    return [(math.exp(sum(math.log(p.flops) for p in g) / len(g)), g) for g in groups]


def _budget_indices(points: Sequence[Point], rtol: float) -> list[Any]:
    """``group_budgets`` as arrays of indices into ``points``."""
    import numpy as np

    order = sorted(range(len(points)), key=lambda i: points[i].flops)
    groups: list[list[int]] = []
    for i in order:
        if groups and points[i].flops <= points[groups[-1][0]].flops * (1 + rtol):
            groups[-1].append(i)
        else:
            groups.append([i])
    return [np.array(g) for g in groups]


# ------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Estimate:
    """A fitted value with its bootstrap interval (None without a bootstrap)."""

    value: float
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class IsoFlop:
    """Approach 2's fit of one budget: loss = c0 + c1·x + c2·x² with x = ln N."""

    flops: float
    points: int
    params_opt: float
    tokens_opt: float
    loss_min: float | None = None
    coefficients: tuple[float, float, float] | None = None
    """None where the optimum was given rather than fitted (``fit_optima``)."""
    extrapolated: bool = False
    """The minimum lies outside the sizes trained at this budget."""


@dataclass(frozen=True)
class Prediction:
    """Compute-optimal size at a budget; intervals from the bootstrap samples when the fit has them."""

    flops: float
    params: float
    tokens: float
    loss: float | None
    """L(N_opt, D_opt) for approach 3; approach 2 does not model the loss (None)."""
    params_interval: tuple[float, float] | None = None
    tokens_interval: tuple[float, float] | None = None
    loss_interval: tuple[float, float] | None = None

    @property
    def tokens_per_parameter(self) -> float:
        return self.tokens / self.params


@dataclass
class ScalingFit:
    """A fitted scaling law.

    Approach 2's parameters are ``a``, ``b`` (N_opt = n_coef·C^a, D_opt = d_coef·C^b) with ``n_coef`` and
    ``d_coef``; approach 3's are ``E``, ``A``, ``B``, ``alpha``, ``beta`` and the derived ``a``, ``b`` and
    ``G``. ``samples`` are the bootstrap replicates' parameters, kept so predictions get intervals.
    """

    approach: int
    parameters: dict[str, Estimate]
    points: list[Point]
    isoflops: list[IsoFlop] = field(default_factory=list)
    confidence: float = 0.95
    bootstrap: int = 0
    """Bootstrap replicates that produced a fit (a replicate can fail, e.g. its resampled budget lost its
    third size)."""
    seed: int | None = None
    notes: list[str] = field(default_factory=list)
    samples: list[dict[str, float]] = field(default_factory=list)
    source: str = ""
    """The file it was loaded from, if any."""

    def value(self, name: str) -> float:
        return self.parameters[name].value

    def describe(self) -> str:
        """``law.json (approach 3, fitted on 28 points)``."""
        where = f"{self.source} " if self.source else ""
        data = f"{len(self.points)} points" if self.points else f"{len(self.isoflops)} given optima"
        return f"{where}(approach {self.approach}, fitted on {data})"

    def predict(self, flops: float) -> Prediction:
        """Compute-optimal parameters, tokens and (approach 3) loss for a budget of ``flops``."""
        if not (math.isfinite(flops) and flops > 0):
            raise ValueError(f"flops must be positive, not {flops}")
        n, d, loss = _optimum(self.approach, {k: e.value for k, e in self.parameters.items()}, flops)
        intervals: dict[str, tuple[float, float] | None] = {"params": None, "tokens": None, "loss": None}
        if self.samples:
            rows = [_optimum(self.approach, s, flops) for s in self.samples]
            for i, key in enumerate(("params", "tokens", "loss")):
                values = [r[i] for r in rows if r[i] is not None]
                if values:
                    intervals[key] = _percentiles(values, self.confidence)
        return Prediction(
            flops=flops,
            params=n,
            tokens=d,
            loss=loss,
            params_interval=intervals["params"],
            tokens_interval=intervals["tokens"],
            loss_interval=intervals["loss"],
        )

    def flops_for_params(self, params: float) -> float:
        """The budget whose compute-optimal model has ``params`` parameters (the frontier inverted)."""
        if self.approach == 2:
            return (params / self.value("n_coef")) ** (1 / self.value("a"))
        return 6.0 * (params / self.value("G")) ** (1 / self.value("a"))

    def tokens_for_params(self, params: float) -> float:
        """Compute-optimal training tokens for a model of ``params`` parameters."""
        return self.predict(self.flops_for_params(params)).tokens

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source")
        return {"format": FORMAT, **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "") -> ScalingFit:
        if d.get("format") != FORMAT:
            raise ValueError(
                f"{source or 'law'}: not a scaling-law fit (format {d.get('format')!r}, want {FORMAT})"
            )
        try:
            approach = int(d["approach"])
            if approach not in (2, 3):
                raise ValueError(f"approach must be 2 or 3, not {approach}")
            parameters = {k: Estimate(**v) for k, v in d["parameters"].items()}
            need = (
                {"a", "b", "n_coef", "d_coef"}
                if approach == 2
                else {"E", "A", "B", "alpha", "beta", "a", "G"}
            )
            if need - set(parameters):
                raise ValueError(f"missing parameters {sorted(need - set(parameters))}")
            return cls(
                approach=approach,
                parameters=parameters,
                points=[Point(**p) for p in d.get("points", [])],
                isoflops=[
                    IsoFlop(
                        **{**i, "coefficients": tuple(i["coefficients"]) if i.get("coefficients") else None}
                    )
                    for i in d.get("isoflops", [])
                ],
                confidence=float(d.get("confidence", 0.95)),
                bootstrap=int(d.get("bootstrap", 0)),
                seed=d.get("seed"),
                notes=list(d.get("notes", [])),
                samples=[dict(s) for s in d.get("samples", [])],
                source=source,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source or 'law'}: not a valid scaling-law fit: {exc}") from exc

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> ScalingFit:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a scaling-law fit (a JSON object is expected)")
        return cls.from_dict(data, source=path.name)


def _optimum(approach: int, p: Mapping[str, float], flops: float) -> tuple[float, float, float | None]:
    if approach == 2:
        return p["n_coef"] * flops ** p["a"], p["d_coef"] * flops ** p["b"], None
    n = p["G"] * (flops / 6) ** p["a"]
    d = flops / (6 * n)
    return n, d, p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


def _percentiles(values: Sequence[float], confidence: float) -> tuple[float, float]:
    """Percentile interval (linear interpolation, numpy's default), in pure Python."""
    xs = sorted(values)
    tail = (1 - confidence) / 2

    def q(f: float) -> float:
        pos = f * (len(xs) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return q(tail), q(1 - tail)


def _estimates(
    fitted: Mapping[str, float], samples: Sequence[Mapping[str, float]], confidence: float
) -> dict[str, Estimate]:
    out = {}
    for key, value in fitted.items():
        if samples:
            low, high = _percentiles([s[key] for s in samples], confidence)
            out[key] = Estimate(value, low, high)
        else:
            out[key] = Estimate(value)
    return out


# ----------------------------------------------------------------------------------------- approach 2
def fit_isoflop(flops: float, points: Sequence[Point]) -> IsoFlop:
    """The parabola of loss against ln N over one budget's points, and its minimum."""
    import numpy as np

    sizes = sorted({p.params for p in points})
    if len(sizes) < 3:
        raise ValueError(
            f"budget {flops:.3g} FLOPs: {len(sizes)} model size(s) ({', '.join(f'{s:.3g}' for s in sizes)}); "
            "approach 2 needs at least 3 sizes per budget to fit its parabola"
        )
    x = np.log([p.params for p in points])
    y = np.array([p.loss for p in points])
    c2, c1, c0 = np.polyfit(x, y, 2)
    if not c2 > 0:
        raise ValueError(
            f"budget {flops:.3g} FLOPs: the parabola of loss against log(params) opens downward "
            f"(curvature {c2:.3g}), so it has no minimum; the sizes ({', '.join(f'{s:.3g}' for s in sizes)}) "
            "do not bracket the optimum: add smaller and larger models at this budget"
        )
    x_opt = -c1 / (2 * c2)
    if abs(x_opt) > 700:  # math.exp overflows: a curvature of almost nothing
        raise ValueError(
            f"budget {flops:.3g} FLOPs: the parabola is nearly flat (curvature {c2:.3g}) and its minimum lies "
            f"at e^{x_opt:.0f} parameters: add smaller and larger models at this budget"
        )
    n_opt = math.exp(x_opt)
    return IsoFlop(
        flops=flops,
        points=len(points),
        params_opt=n_opt,
        tokens_opt=flops / (6 * n_opt),
        loss_min=float(c0 + c1 * x_opt + c2 * x_opt**2),
        coefficients=(float(c0), float(c1), float(c2)),
        extrapolated=not sizes[0] <= n_opt <= sizes[-1],
    )


def power_law(flops: Sequence[float], values: Sequence[float]) -> tuple[float, float]:
    """Least squares of ln v = ln k + e·ln C: returns (e, k)."""
    import numpy as np

    if len({round(math.log(c), 9) for c in flops}) < 2:
        raise ValueError("a power law in compute needs at least 2 distinct budgets")
    e, log_k = np.polyfit(np.log(flops), np.log(values), 1)
    return float(e), float(math.exp(log_k))


def _frontier(flops: Sequence[float], n_opt: Sequence[float], d_opt: Sequence[float]) -> dict[str, float]:
    a, n_coef = power_law(flops, n_opt)
    b, d_coef = power_law(flops, d_opt)
    return {"a": a, "b": b, "n_coef": n_coef, "d_coef": d_coef}


def fit_approach2(
    rows: Iterable[Point | Mapping[str, Any] | Sequence[float]],
    *,
    bootstrap: int = 200,
    seed: int = 0,
    confidence: float = 0.95,
    rtol: float = BUDGET_RTOL,
) -> ScalingFit:
    """Chinchilla approach 2: IsoFLOP parabolas per budget, then N_opt ∝ C^a and D_opt ∝ C^b.

    The bootstrap resamples the points of each budget with replacement and refits everything; a replicate
    whose resampled budget cannot be fitted (fewer than 3 sizes left, a parabola opening downward) is
    dropped, and ``bootstrap`` in the result counts the ones kept.
    """
    import numpy as np

    points = as_points(rows)
    budgets = group_budgets(points, rtol)
    if len(budgets) < 2:
        raise ValueError(f"approach 2 needs at least 2 compute budgets, got {len(budgets)}")
    isoflops = [fit_isoflop(c, pts) for c, pts in budgets]
    fitted = _frontier(
        [i.flops for i in isoflops], [i.params_opt for i in isoflops], [i.tokens_opt for i in isoflops]
    )
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        try:
            fits = [
                fit_isoflop(c, [pts[j] for j in rng.integers(0, len(pts), len(pts))]) for c, pts in budgets
            ]
        except ValueError:
            continue
        samples.append(
            _frontier([f.flops for f in fits], [f.params_opt for f in fits], [f.tokens_opt for f in fits])
        )
    notes = [
        f"budget {i.flops:.3g} FLOPs: the minimum ({i.params_opt:.3g} parameters) lies outside the sizes trained"
        for i in isoflops
        if i.extrapolated
    ]
    if bootstrap and len(samples) < bootstrap:
        notes.append(f"{bootstrap - len(samples)} of {bootstrap} bootstrap replicates could not be fitted")
    return ScalingFit(
        approach=2,
        parameters=_estimates(fitted, samples, confidence),
        points=points,
        isoflops=isoflops,
        confidence=confidence,
        bootstrap=len(samples),
        seed=seed,
        notes=notes,
        samples=samples,
    )


def fit_optima(
    optima: Iterable[Sequence[float]], *, bootstrap: int = 200, seed: int = 0, confidence: float = 0.95
) -> ScalingFit:
    """Approach 2's second step alone, on published or precomputed optima ``(C, N_opt)`` or
    ``(C, N_opt, D_opt)`` (D_opt = C/(6·N_opt) when not given). The bootstrap resamples the budgets."""
    import numpy as np

    rows = [tuple(float(v) for v in o) for o in optima]
    for i, r in enumerate(rows):
        if len(r) not in (2, 3) or not all(math.isfinite(v) and v > 0 for v in r):
            raise ValueError(f"optimum {i} {r}: expected positive (C, N_opt) or (C, N_opt, D_opt)")
    flops = [r[0] for r in rows]
    n_opt = [r[1] for r in rows]
    d_opt = [r[2] if len(r) == 3 else r[0] / (6 * r[1]) for r in rows]
    fitted = _frontier(flops, n_opt, d_opt)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        idx = rng.integers(0, len(rows), len(rows))
        try:
            samples.append(
                _frontier([flops[i] for i in idx], [n_opt[i] for i in idx], [d_opt[i] for i in idx])
            )
        except ValueError:
            continue
    isoflops = [
        IsoFlop(flops=c, points=0, params_opt=n, tokens_opt=d)
        for c, n, d in zip(flops, n_opt, d_opt, strict=True)
    ]
    return ScalingFit(
        approach=2,
        parameters=_estimates(fitted, samples, confidence),
        points=[],
        isoflops=isoflops,
        confidence=confidence,
        bootstrap=len(samples),
        seed=seed,
        notes=["fitted on given optima, not on IsoFLOP points"],
        samples=samples,
    )


# ----------------------------------------------------------------------------------------- approach 3
def _huber_objective(theta: Any, x: Any, y: Any, log_loss: Any, delta: float) -> tuple[float, Any]:
    """Σ Huber_δ(LSE(a − α·x, b − β·y, e) − log L) and its gradient in θ = (a, b, e, α, β)."""
    import numpy as np

    a, b, e, alpha, beta = theta
    u = np.stack([a - alpha * x, b - beta * y, np.full_like(x, e)])
    top = u.max(axis=0)
    w = np.exp(u - top)
    total = w.sum(axis=0)
    r = top + np.log(total) - log_loss
    w /= total  # softmax: d LSE / d u
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum()
    g = np.where(small, r, delta * np.sign(r))
    grad = np.array(
        [(g * w[0]).sum(), (g * w[1]).sum(), (g * w[2]).sum(), -(g * w[0] * x).sum(), -(g * w[1] * y).sum()]
    )
    return float(value), grad


def _grid() -> Any:
    import numpy as np

    mesh = np.meshgrid(GRID_AB, GRID_AB, GRID_E, GRID_ALPHA, GRID_ALPHA, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)  # columns a, b, e, α, β


def _grid_values(grid: Any, x: Any, y: Any, log_loss: Any, delta: float) -> Any:
    import numpy as np

    a, b, e, alpha, beta = (grid[:, i : i + 1] for i in range(5))
    u = np.stack([a - alpha * x, b - beta * y, np.broadcast_to(e, (len(grid), len(x)))])
    top = u.max(axis=0)
    r = np.abs(top + np.log(np.exp(u - top).sum(axis=0)) - log_loss)
    return np.where(r <= delta, 0.5 * r * r, delta * (r - 0.5 * delta)).sum(axis=1)


def _minimize() -> Any:
    """``scipy.optimize.minimize``, its OpenBLAS loaded single-threaded when this is the first import.

    L-BFGS-B calls BLAS on vectors of 5: a threaded OpenBLAS spends 30× the arithmetic waking its threads
    (6 ms a step on a busy 2-core machine instead of 0.2). OpenBLAS reads the variable once, when scipy's
    copy loads; the environment is left as it was.
    """
    import os

    if "scipy.optimize" in sys.modules or "OPENBLAS_NUM_THREADS" in os.environ:
        from scipy.optimize import minimize

        return minimize
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        from scipy.optimize import minimize
    finally:
        del os.environ["OPENBLAS_NUM_THREADS"]
    return minimize


def _minimise(starts: Any, x: Any, y: Any, log_loss: Any, delta: float) -> tuple[float, Any]:
    minimize = _minimize()
    best: tuple[float, Any] | None = None
    for theta0 in starts:
        res = minimize(
            _huber_objective,
            theta0,
            args=(x, y, log_loss, delta),
            jac=True,
            method="L-BFGS-B",
            # The objective is ~δ·|r| per point (1e-5): scipy's default tolerances would stop at the start.
            options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12},
        )
        if best is None or res.fun < best[0]:
            best = (float(res.fun), res.x)
    assert best is not None
    return best


def _exp(x: float) -> float:
    """e^x, infinite where a float overflows (a diverged fit, dropped by the finiteness checks)."""
    return math.exp(x) if x < 709.0 else float("inf")


def _law_parameters(theta: Sequence[float]) -> dict[str, float]:
    a, b, e, alpha, beta = (float(v) for v in theta)
    A, B, E = _exp(a), _exp(b), _exp(e)
    out = {"E": E, "A": A, "B": B, "alpha": alpha, "beta": beta}
    if alpha > 0 and beta > 0:
        out["a"] = beta / (alpha + beta)
        out["b"] = alpha / (alpha + beta)
        try:
            out["G"] = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
        except OverflowError:
            out["G"] = float("inf")
    else:  # no interior optimum: one of the terms does not decrease
        out["a"] = out["b"] = out["G"] = float("nan")
    return out


def fit_approach3(
    rows: Iterable[Point | Mapping[str, Any] | Sequence[float]],
    *,
    bootstrap: int = 200,
    seed: int = 0,
    confidence: float = 0.95,
    delta: float = HUBER_DELTA,
    starts: int = LBFGS_STARTS,
    rtol: float = BUDGET_RTOL,
) -> ScalingFit:
    """Chinchilla approach 3: L(N, D) = E + A/N^α + B/D^β by Huber loss on log L, L-BFGS from a grid.

    Every start of the paper's grid is evaluated; L-BFGS descends from the ``starts`` best of them and the
    lowest objective wins. Bootstrap replicates resample the points within each compute budget and start
    from the full fit plus the replicate's 2 best grid starts.
    """
    import numpy as np

    points = as_points(rows)
    if len(points) < 5:
        raise ValueError(f"approach 3 fits 5 constants: it needs at least 5 points, got {len(points)}")
    if len({p.params for p in points}) < 2 or len({p.tokens for p in points}) < 2:
        raise ValueError("approach 3 needs points at 2 or more model sizes and 2 or more token counts")
    x = np.log([p.params for p in points])
    y = np.log([p.tokens for p in points])
    log_loss = np.log([p.loss for p in points])
    grid = _grid()

    def fit(x: Any, y: Any, log_loss: Any, n_starts: int, extra: Sequence[Any] = ()) -> Any:
        order = np.argsort(_grid_values(grid, x, y, log_loss, delta))[:n_starts]
        return _minimise([*extra, *grid[order]], x, y, log_loss, delta)[1]

    theta = fit(x, y, log_loss, starts)
    fitted = _law_parameters(theta)
    notes = []
    if not (fitted["alpha"] > 0 and fitted["beta"] > 0):
        notes.append(
            f"alpha {fitted['alpha']:.3g} or beta {fitted['beta']:.3g} is not positive: no compute-optimal frontier"
        )
    groups = _budget_indices(points, rtol)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        idx = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        replicate = _law_parameters(fit(x[idx], y[idx], log_loss[idx], 2, [theta]))
        if all(math.isfinite(v) for v in replicate.values()):
            samples.append(replicate)
    if bootstrap and len(samples) < bootstrap:
        notes.append(f"{bootstrap - len(samples)} of {bootstrap} bootstrap replicates had no frontier")
    return ScalingFit(
        approach=3,
        parameters=_estimates(fitted, samples, confidence),
        points=points,
        confidence=confidence,
        bootstrap=len(samples),
        seed=seed,
        notes=notes,
        samples=samples,
    )


def fit(
    rows: Iterable[Point | Mapping[str, Any] | Sequence[float]], approach: int = 3, **kwargs: Any
) -> ScalingFit:
    """``fit_approach2`` or ``fit_approach3``."""
    if approach == 2:
        return fit_approach2(rows, **kwargs)
    if approach == 3:
        return fit_approach3(rows, **kwargs)
    raise ValueError(f"approach must be 2 or 3, not {approach}")


# ------------------------------------------------------------------------------------------ reading
def read_points(path: str | Path) -> list[Point]:
    """Points from a JSONL file (one object per line) or a CSV file with a header (see ``as_points``)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        rows: list[Any] = list(csv.DictReader(text.splitlines()))
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not JSON: {exc}") from exc
    try:
        return as_points(rows)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def points_from_runs(workdir: str | Path) -> list[Point]:
    """Points from the succeeded PretrainRuns of an ``lmforge run`` work directory: parameters and tokens
    from ``status.plan`` (the tokens the run reached, from ``status.progress``, when present) and the final
    ``status.metrics.evalLoss``. Runs without an eval loss are skipped."""
    points = []
    for path in sorted(Path(workdir).glob("pretrainrun/*/status.json")):
        status = json.loads(path.read_text(encoding="utf-8"))
        plan = status.get("plan") or {}
        loss = (status.get("metrics") or {}).get("evalLoss")
        tokens = (status.get("progress") or {}).get("tokens") or plan.get("tokens")
        if status.get("phase") != "Succeeded" or not loss or not plan.get("parameters") or not tokens:
            continue
        points.append(Point(float(plan["parameters"]), float(tokens), float(loss)))
    return points


# ---------------------------------------------------------------------------------------------- CLI
def summary(result: ScalingFit) -> str:
    lines = [
        f"approach {result.approach}, {len(result.points)} points, {result.bootstrap} bootstrap replicates"
    ]
    for name, est in result.parameters.items():
        interval = f"  [{est.low:.4g}, {est.high:.4g}]" if est.low is not None else ""
        lines.append(f"  {name:<7} {est.value:.4g}{interval}")
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmforge_jobs.scaling", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fit", help="fit a scaling law to points (JSONL or CSV) and write it as JSON")
    p.add_argument("points", help="JSONL or CSV of params, tokens, loss (and flops)")
    p.add_argument("--out", required=True, help="where to write the fit (JSON)")
    p.add_argument("--approach", type=int, choices=[2, 3], default=3)
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap replicates (0 = no intervals)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=None, help="a budget in FLOPs to predict the optimum for")
    p = sub.add_parser(
        "points", help="collect points from the PretrainRuns of an `lmforge run` work directory"
    )
    p.add_argument("workdir")
    p.add_argument("--out", required=True, help="JSONL file to write")
    args = parser.parse_args(argv)
    try:
        if args.command == "points":
            points = points_from_runs(args.workdir)
            Path(args.out).write_text("".join(json.dumps(asdict(p)) + "\n" for p in points), encoding="utf-8")
            print(f"{len(points)} points → {args.out}")
            return 0
        result = fit(read_points(args.points), args.approach, bootstrap=args.bootstrap, seed=args.seed)
        result.save(args.out)
        print(summary(result))
        if args.target:
            pred = result.predict(args.target)
            print(f"at {pred.flops:.3g} FLOPs:")
            for name, value, interval in (
                ("parameters", pred.params, pred.params_interval),
                ("tokens", pred.tokens, pred.tokens_interval),
                ("loss", pred.loss, pred.loss_interval),
            ):
                if value is not None:
                    bounds = f"  [{interval[0]:.4g}, {interval[1]:.4g}]" if interval else ""
                    print(f"  {name:<10} {value:.4g}{bounds}")
        print(f"wrote {args.out}")
        return 0
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
