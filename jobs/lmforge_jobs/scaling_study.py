"""The ScalingStudy spec: IsoFLOP profiles of a template PretrainRun, fitted to a scaling law.

A study trains several model sizes at each compute budget C, each for D = C/(6·N) tokens, and fits
Chinchilla's approaches 2 and 3 (:mod:`lmforge_jobs.scaling`) to the final losses. Each (budget, size) is a
*point*: a child PretrainRun named ``<study>-b<II>n<JJ>`` (budget II, size JJ), the template with its
``model`` shape and ``budget: {tokens: D}`` written in (:func:`point_spec`).

The sizes are either listed (``shapes``: the same shapes at every budget) or derived per budget
(``sizes``, :func:`derive_shapes`): ``modelsPerBudget`` target sizes spread ``spread``× apart in N around the
budget's centre N_c = sqrt(C / (6·tokensPerParameter)) (with the default 20 tokens per parameter, the
Chinchilla-optimal N of Hoffmann et al. 2022), each turned into the shape whose parameter count is nearest
by a *fixed aspect ratio* rule: the template's head dimension (hidden/heads), its query heads per
key/value head, its feed-forward ratio (ffnHidden/hidden) and its width per layer (hidden/layers) are kept;
the width runs over multiples of head dimension × query heads per key/value head, the depth over the
depths that keep the width per layer within a factor 2 of the template's (at least 1); among the shapes
whose N is within 10 % of the target (else the nearest, in log), the one whose width per layer is nearest
the template's wins. N is the total parameter count (embeddings included), the
count ``lmforge plan`` reports and :func:`lmforge_jobs.scaling.points_from_runs` reads; with
``vocabSize: auto`` it needs the tokenizer's size, so shapes are derived when the study runs.

A study has no job of its own: ``lmforge run`` (``lmforge_operator.local.scaling``) runs its points and
fits. ``python -m lmforge_jobs.scaling_study --manifest study.yaml [--vocab-size V]`` checks a study and
prints its points (name, shape, N, D, C); a bad spec exits 64 with ``error: spec.<field>: <why>``.

This module is imported by :mod:`lmforge_jobs.manifest`; it reads the planner lazily.
"""

from __future__ import annotations

import itertools
import math
from enum import Enum
from typing import Annotated, Any

from pydantic import Field, StringConstraints, ValidationError, WithJsonSchema, model_validator

from lmforge_jobs.spec import Cel, Spec, SpecError, StatusBase, Uri, cel_exactly_one

POINT_SUFFIX_LENGTH = len("-b00n00")
MAX_BUDGETS = 16
MAX_SIZES = 16
SIZE_TOLERANCE = 0.1
"""A derived shape's N may miss its target by this much (relative) to keep the template's proportions."""
BUDGET_RTOL = 0.05
"""Budgets closer than this (relative) would be fitted as one (``lmforge_jobs.scaling.BUDGET_RTOL``)."""

JsonObject = Annotated[
    dict[str, Any], WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True})
]
Flops = Annotated[float, Field(gt=0, le=1e30)]


class FitApproach(str, Enum):
    """Which of Chinchilla's approaches the study fits."""

    approach2 = "approach2"
    approach3 = "approach3"
    both = "both"


class PointShape(Spec):
    """One model size of a study: the fields written into the template's ``model``."""

    __cel__ = (
        Cel("self.hidden % self.heads == 0", "hidden must be divisible by heads", field="hidden"),
        Cel(
            "!has(self.kvHeads) || (self.kvHeads <= self.heads && self.heads % self.kvHeads == 0)",
            "kvHeads must divide heads",
            field="kvHeads",
        ),
    )

    layers: Annotated[int, Field(ge=1, le=512)]
    """Transformer blocks."""
    hidden: Annotated[int, Field(ge=8, le=65536)]
    """Model width."""
    heads: Annotated[int, Field(ge=1, le=1024)]
    """Attention heads."""
    kv_heads: Annotated[int, Field(ge=1, le=1024)] | None = None
    """Key/value heads (unset: the template's rule, else heads)."""
    ffn_hidden: Annotated[int, Field(ge=1, le=262144)] | None = None
    """Feed-forward width (unset: the SwiGLU default for the width)."""

    @model_validator(mode="after")
    def _rules(self) -> PointShape:
        if self.hidden % self.heads:
            raise SpecError("hidden", f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.kv_heads is not None and (self.kv_heads > self.heads or self.heads % self.kv_heads):
            raise SpecError("kvHeads", f"kvHeads ({self.kv_heads}) must divide heads ({self.heads})")
        return self

    def model(self) -> dict[str, Any]:
        """The camelCase fields written into the template's ``model``."""
        return self.model_dump(by_alias=True, exclude_none=True)


class Sizes(Spec):
    """Model sizes derived per budget (see the module docstring for the width/depth rule)."""

    models_per_budget: Annotated[int, Field(ge=2, le=MAX_SIZES)] = 3
    """Sizes trained at each budget (approach 2 needs 3 or more)."""
    spread: Annotated[float, Field(gt=1, le=16)] = 2.0
    """Ratio of the parameter counts of neighbouring sizes."""
    tokens_per_parameter: Annotated[float, Field(gt=0, le=100000)] = 20.0
    """Tokens per parameter at the centre size: N_c = sqrt(C / (6·tokensPerParameter)); 20 centres the sizes
    on Hoffmann et al.'s compute-optimal N. Tiny CPU studies use less (fewer tokens, bigger models)."""


class ScalingStudySpec(Spec):
    """IsoFLOP profiles of a template PretrainRun at several compute budgets, fitted to a scaling law."""

    __cel__ = (
        Cel(cel_exactly_one(("shapes", "sizes")), "exactly one of shapes, sizes must be set"),
        Cel(
            "!has(self.fit) || self.fit == 'approach3' || size(self.budgets) >= 2",
            "approach 2 needs at least 2 budgets",
            "budgets",
        ),
        Cel(
            "!has(self.fit) || self.fit == 'approach3' || (has(self.shapes) ? size(self.shapes) >= 3 : "
            "(!has(self.sizes) || !has(self.sizes.modelsPerBudget) || self.sizes.modelsPerBudget >= 3))",
            "approach 2 needs at least 3 model sizes per budget",
            "fit",
        ),
        Cel(
            "!has(self.fit) || self.fit == 'approach2' || size(self.budgets) * (has(self.shapes) ? "
            "size(self.shapes) : (has(self.sizes) && has(self.sizes.modelsPerBudget) ? "
            "self.sizes.modelsPerBudget : 3)) >= 5",
            "approach 3 fits 5 constants: it needs at least 5 points (budgets × sizes)",
            "fit",
        ),
        Cel(
            "self.budgets.all(x, self.budgets.filter(y, double(y) <= double(x) * 1.05 "
            "&& double(y) * 1.05 >= double(x)).size() == 1)",
            "budgets must differ by more than 5%: closer ones are fitted as one budget",
            "budgets",
        ),
    )

    template: JsonObject
    """The PretrainRun spec every point starts from; each point replaces its model shape (layers, hidden,
    heads, kvHeads, ffnHidden), its budget (tokens: C/(6·N)) and its output."""
    budgets: Annotated[list[Flops], Field(min_length=1, max_length=MAX_BUDGETS)]
    """Compute budgets C in training FLOPs (6·N·D), e.g. [1.0e17, 3.0e17, 1.0e18]."""
    shapes: Annotated[list[PointShape], Field(min_length=1, max_length=MAX_SIZES)] | None = None
    """Model shapes trained at every budget (exactly one of shapes and sizes)."""
    sizes: Sizes | None = None
    """Derive the shapes per budget around its compute-optimal size (exactly one of shapes and sizes)."""
    target_budget: Flops | None = None
    """A budget in FLOPs to predict the compute-optimal N, D and loss for (status.target)."""
    fit: FitApproach = FitApproach.both
    """approach2 (IsoFLOP parabolas), approach3 (parametric loss) or both."""
    bootstrap: Annotated[int, Field(ge=0, le=2000)] = 200
    """Bootstrap replicates for the intervals (0: none)."""
    seed: Annotated[int, Field(ge=0)] = 0
    """Seed of the bootstrap."""
    output: Uri | None = None
    """Where the points' outputs go (each in <output>/<point>); unset: each point's default folder."""
    max_parallel: Annotated[int, Field(ge=1, le=MAX_BUDGETS * MAX_SIZES)] | None = None
    """Points training at once on a cluster (unset: all of them); ``lmforge run`` trains one at a time."""

    @model_validator(mode="after")
    def _rules(self) -> ScalingStudySpec:
        if (self.shapes is None) == (self.sizes is None):
            raise SpecError(
                "shapes" if self.shapes is not None else "sizes", "exactly one of shapes, sizes must be set"
            )
        ordered = sorted(range(len(self.budgets)), key=lambda i: self.budgets[i])
        for i, j in itertools.pairwise(ordered):
            if self.budgets[j] <= self.budgets[i] * (1 + BUDGET_RTOL):
                raise SpecError(
                    f"budgets[{j}]",
                    f"{self.budgets[j]:.4g} is within 5% of budgets[{i}] ({self.budgets[i]:.4g}): "
                    "the fit would take them for one budget",
                )
        per_budget = len(self.shapes) if self.shapes is not None else self.sizes.models_per_budget  # type: ignore[union-attr]
        if self.fit != FitApproach.approach3:
            if len(self.budgets) < 2:
                raise SpecError(
                    "budgets", "approach 2 needs at least 2 budgets (fit: approach3 needs 5 points)"
                )
            if per_budget < 3:
                field = "shapes" if self.shapes is not None else "sizes.modelsPerBudget"
                raise SpecError(
                    field, f"approach 2 needs at least 3 model sizes per budget, not {per_budget}"
                )
        if self.fit != FitApproach.approach2 and len(self.budgets) * per_budget < 5:
            raise SpecError(
                "fit",
                f"approach 3 fits 5 constants: it needs at least 5 points, and "
                f"{len(self.budgets)} budget(s) × {per_budget} size(s) give {len(self.budgets) * per_budget}",
            )
        self.check_template()
        vocab = (self.template.get("model") or {}).get("vocabSize")
        if isinstance(vocab, int):  # N is known before the tokenizer is: check the points now
            study_points(self, "study", None)
        return self

    def check_template(self) -> None:
        """The template is a decoder PretrainRun spec, valid with the first point's shape and budget."""
        from lmforge_jobs.manifest import MODELS, validation_problems

        model = MODELS["PretrainRun"].model_fields["spec"].annotation
        shape = self.shapes[0].model() if self.shapes is not None else {}
        try:
            spec = model.model_validate(point_spec(self.template, shape, 1))  # type: ignore[union-attr]
        except ValidationError as exc:
            problem = validation_problems(exc, "", "")[0]
            field = "template" + ("" if problem.field == "(document)" else f".{problem.field}")
            raise SpecError(field, problem.message) from None
        if spec.model.architecture.value != "decoder":
            raise SpecError("template.model.architecture", "a scaling study plans decoder models only")
        if spec.model.init is not None:
            raise SpecError("template.model.init", "a scaling study trains from scratch; remove model.init")


def point_name(study: str, budget: int, size: int) -> str:
    """The deterministic name of a study's point: ``<study>-b01n02`` (budget 1, size 2)."""
    return f"{study}-b{budget:02d}n{size:02d}"


def point_spec(template: dict[str, Any], shape: dict[str, Any], tokens: int) -> dict[str, Any]:
    """The template with ``shape`` written into its model and ``budget: {tokens}``; the template is kept."""
    import copy

    spec = copy.deepcopy(template)
    model = spec.get("model") if isinstance(spec.get("model"), dict) else {}
    spec["model"] = {**model, **shape}
    spec["budget"] = {"tokens": int(tokens)}
    return spec


def tokens_for(flops: float, params: int) -> int:
    """D = C / (6·N), rounded."""
    return max(1, round(flops / (6.0 * params)))


def _template_shape(template: dict[str, Any]) -> Any:
    from lmforge_jobs.pretrain.config import ModelShape

    return ModelShape.model_validate(template.get("model") or {})


def parameters_of(template: dict[str, Any], shape: dict[str, Any], vocab_size: int | None) -> int:
    """N of ``shape`` in the template (total parameters, as ``lmforge plan`` counts them)."""
    from lmforge_jobs.plan import count_parameters
    from lmforge_jobs.pretrain.config import ModelShape

    model = ModelShape.model_validate({**(template.get("model") or {}), **shape})
    return count_parameters(model, vocab_size).total


def shape_for(template: dict[str, Any], params: float, vocab_size: int | None) -> dict[str, Any]:
    """The shape (aspect ratio rule, module docstring) whose N is nearest ``params`` in log; among those
    within ``SIZE_TOLERANCE`` of it (or equally near), the one whose width per layer is nearest the
    template's."""
    base = _template_shape(template)
    head_dim = base.head_dim
    group = base.heads // base.n_kv_heads
    aspect = base.hidden / base.layers
    ffn_ratio = base.ffn_hidden / base.hidden if base.ffn_hidden else None
    step = head_dim * group
    best: tuple[float, float, dict[str, Any]] | None = None
    hidden = step
    while hidden <= 65536:
        heads = hidden // head_dim
        depth = hidden / aspect
        smallest = None
        for layers in range(max(1, math.ceil(depth / 2)), min(512, max(1, math.floor(depth * 2))) + 1):
            shape: dict[str, Any] = {
                "layers": layers,
                "hidden": hidden,
                "heads": heads,
                "kvHeads": heads // group,
            }
            if ffn_ratio is not None:
                shape["ffnHidden"] = max(1, round(ffn_ratio * hidden))
            n = parameters_of(template, shape, vocab_size)
            smallest = n if smallest is None else min(smallest, n)
            # every shape within SIZE_TOLERANCE of the target is as near as any other
            miss = max(0.0, abs(math.log(n / params)) - math.log(1 + SIZE_TOLERANCE))
            key = (round(miss, 9), abs(math.log(layers / depth)))
            if best is None or key < best[:2]:
                best = (*key, shape)
        if smallest is not None and smallest > params * 4:
            break
        hidden += step
    assert best is not None
    return best[2]


def derive_shapes(spec: ScalingStudySpec, flops: float, vocab_size: int | None) -> list[dict[str, Any]]:
    """The shapes of one budget, smallest first: the listed ones, or ``sizes``' rule around N_c."""
    if spec.shapes is not None:
        return [s.model() for s in spec.shapes]
    sizes = spec.sizes
    assert sizes is not None
    centre = math.sqrt(flops / (6.0 * sizes.tokens_per_parameter))
    k = sizes.models_per_budget
    return [
        shape_for(spec.template, centre * sizes.spread ** (j - (k - 1) / 2), vocab_size) for j in range(k)
    ]


def study_points(spec: ScalingStudySpec, name: str, vocab_size: int | None) -> list[dict[str, Any]]:
    """Every point: name, budget index, budget, shape, N and D. A ValueError names the field at fault: two
    sizes of one budget with the same shape, or a budget that gives a point fewer tokens than one step."""
    global_tokens = int(((spec.template.get("batch") or {}).get("globalTokens")) or 524288)
    points = []
    for i, flops in enumerate(spec.budgets):
        shapes = derive_shapes(spec, flops, vocab_size)
        seen: dict[int, int] = {}
        for j, shape in enumerate(shapes):
            n = parameters_of(spec.template, shape, vocab_size)
            if n in seen:
                field = "sizes.spread" if spec.sizes is not None else f"shapes[{j}]"
                raise SpecError(
                    field,
                    f"budget {flops:.3g}: sizes {seen[n]} and {j} are the same model ({n} parameters); "
                    "spread the sizes further apart or widen the template",
                )
            seen[n] = j
            tokens = tokens_for(flops, n)
            if tokens < global_tokens:
                raise SpecError(
                    f"budgets[{i}]",
                    f"{flops:.3g} FLOPs give the {n}-parameter model {tokens} tokens, less than one step of "
                    f"batch.globalTokens ({global_tokens}): raise the budget or lower globalTokens",
                )
            points.append(
                {
                    "name": point_name(name, i, j),
                    "budgetIndex": i,
                    "budget": flops,
                    "shape": shape,
                    "parameters": n,
                    "tokens": tokens,
                }
            )
    return points


# ------------------------------------------------------------------------------------------------ status
class PointPhase(str, Enum):
    """Where a point is."""

    pending = "Pending"
    running = "Running"
    succeeded = "Succeeded"
    failed = "Failed"


class Estimate(Spec):
    """A fitted value and its bootstrap interval."""

    value: float
    """The fitted value."""
    low: float | None = None
    """Lower end of the interval (unset without a bootstrap)."""
    high: float | None = None
    """Upper end of the interval."""


class PointStatus(Spec):
    """One (budget, size) of the study."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=63)]
    """The point's PretrainRun."""
    budget: float
    """Its compute budget C (FLOPs)."""
    shape: JsonObject = {}
    """Its model shape (layers, hidden, heads, kvHeads, ffnHidden)."""
    parameters: Annotated[int, Field(ge=0)]
    """N: its parameters."""
    tokens: Annotated[int, Field(ge=0)]
    """D: the tokens it trains on (C / (6·N); the run trained on whole steps)."""
    flops: float
    """6·N·D."""
    loss: float | None = None
    """Its final loss (status.lossMetric says which)."""
    phase: PointPhase
    """Pending, Running, Succeeded or Failed."""


class FitResult(Spec):
    """One approach's fit."""

    approach: Annotated[int, Field(ge=2, le=3)]
    """2 or 3."""
    parameters: Annotated[dict[str, Estimate], Field(max_length=16)] = {}
    """Approach 2: a, b, nCoef, dCoef; approach 3: E, A, B, alpha, beta, a, b, G."""
    notes: Annotated[list[Annotated[str, StringConstraints(max_length=1024)]], Field(max_length=32)] = []
    """What the fit noticed (extrapolated minima, failed bootstrap replicates)."""
    error: Annotated[str, StringConstraints(max_length=4096)] | None = None
    """Why the fit failed."""
    law: Uri | None = None
    """Its scaling-law JSON (lmforge plan --law)."""


class TargetPrediction(Spec):
    """The compute-optimal model at spec.targetBudget, with intervals."""

    approach: Annotated[int, Field(ge=2, le=3)]
    """The fit that predicted it (approach 3 when it worked, else 2)."""
    flops: float
    """The target budget."""
    parameters: float
    """N_opt."""
    parameters_interval: Annotated[list[float], Field(min_length=2, max_length=2)] | None = None
    """Its bootstrap interval."""
    tokens: float
    """D_opt."""
    tokens_interval: Annotated[list[float], Field(min_length=2, max_length=2)] | None = None
    """Its bootstrap interval."""
    loss: float | None = None
    """Predicted loss L(N_opt, D_opt) (approach 3 only)."""
    loss_interval: Annotated[list[float], Field(min_length=2, max_length=2)] | None = None
    """Its bootstrap interval."""


class ScalingStudyStatus(StatusBase):
    """Observed state of a ScalingStudy."""

    points: Annotated[list[PointStatus], Field(max_length=MAX_BUDGETS * MAX_SIZES)] = []
    """Every point, budget by budget."""
    points_done: Annotated[int, Field(ge=0)] | None = None
    """Points finished (succeeded or failed)."""
    points_total: Annotated[int, Field(ge=0)] | None = None
    """Points in all."""
    loss_metric: Annotated[str, StringConstraints(max_length=63)] | None = None
    """evalLoss when every point reported a held-out loss, else loss (the final training loss)."""
    fits: Annotated[list[FitResult], Field(max_length=2)] = []
    """The fits made."""
    target: TargetPrediction | None = None
    """Compute-optimal N, D and loss at spec.targetBudget."""
    outputs: Annotated[dict[str, Uri], Field(max_length=16)] | None = None
    """law: the scaling-law JSON that lmforge plan --law reads."""


# ------------------------------------------------------------------------------- status from the points
def _row(point: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """A point's status row from its plan (a row of :func:`study_points`) and its child's status (the
    PretrainRun's status.json under ``lmforge run``, its ``.status`` on a cluster); ``_losses`` holds both
    losses for the fit."""
    phase = child.get("phase")
    tokens = (child.get("progress") or {}).get("tokens") if phase == "Succeeded" else None
    tokens = int(tokens or point["tokens"])
    row = {
        "name": point["name"],
        "budget": point["budget"],
        "shape": point["shape"],
        "parameters": point["parameters"],
        "tokens": tokens,
        "flops": 6.0 * point["parameters"] * tokens,
        "phase": {
            "Succeeded": PointPhase.succeeded,
            "Running": PointPhase.running,
            "Failed": PointPhase.failed,
            "Invalid": PointPhase.failed,
        }.get(phase or "", PointPhase.pending).value,
    }
    metrics = child.get("metrics") or {}
    row["_losses"] = {k: metrics[k] for k in ("evalLoss", "loss") if isinstance(metrics.get(k), int | float)}
    return row


def point_rows(plan: list[dict[str, Any]], children: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The status rows of the planned points, given each one's child status, with the study's loss
    (:func:`loss_metric`): the same rule for ``lmforge run`` and the operator."""
    rows = [_row(point, child) for point, child in zip(plan, children, strict=True)]
    metric = loss_metric(rows)
    for row in rows:
        if metric in row["_losses"]:
            row["loss"] = row["_losses"][metric]
    return rows


def loss_metric(rows: list[dict[str, Any]]) -> str:
    """evalLoss when every succeeded point reported it, else loss."""
    done = [r for r in rows if r["phase"] == PointPhase.succeeded.value]
    return "evalLoss" if done and all("evalLoss" in r["_losses"] for r in done) else "loss"


def fit_entry(approach: int, result: Any) -> dict[str, Any]:
    """status.fits[] of a fitted approach: its finite constants with their intervals, and its notes."""
    parameters = {
        name: {
            k: v
            for k, v in (("value", e.value), ("low", e.low), ("high", e.high))
            if v is not None and math.isfinite(v)
        }
        for name, e in result.parameters.items()
        if math.isfinite(e.value)
    }
    return {"approach": approach, "parameters": parameters, "notes": [n[:1024] for n in result.notes[:32]]}


def fit_study(spec: Any, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[int, Any], Any]:
    """The approaches ``spec.fit`` asks for, fitted on the succeeded rows with the study's loss
    (:func:`loss_metric`): each fit's status entry (or its error: too few points, no minimum, a diverged
    fit), the fitted results by approach, and the law to predict with — approach 3 when it was fitted and
    has a frontier (every constant finite), else approach 2, None when no fit has one. The same rule for
    ``lmforge run`` and the operator; CPU-bound (the bootstrap)."""
    from lmforge_jobs import scaling

    metric = loss_metric(rows)
    points = [
        scaling.Point(
            float(r["parameters"]), float(r["tokens"]), float(r["_losses"][metric]), float(r["budget"])
        )
        for r in rows
        if r["phase"] == PointPhase.succeeded.value and metric in r["_losses"]
    ]
    approaches = {FitApproach.approach2: (2,), FitApproach.approach3: (3,), FitApproach.both: (2, 3)}[
        spec.fit
    ]
    fits: list[dict[str, Any]] = []
    results: dict[int, Any] = {}
    for approach in approaches:
        try:
            result = scaling.fit(points, approach, bootstrap=spec.bootstrap, seed=spec.seed)
        except (ValueError, ArithmeticError) as exc:
            fits.append({"approach": approach, "error": str(exc)[:4096]})
            continue
        fits.append(fit_entry(approach, result))
        results[approach] = result

    def has_frontier(result: Any) -> bool:
        return all(math.isfinite(e.value) for e in result.parameters.values())

    law = next((results[a] for a in (3, 2) if a in results and has_frontier(results[a])), None)
    return fits, results, law


def target_prediction(law: Any, flops: float) -> dict[str, Any]:
    """status.target: the compute-optimal N, D (and loss, approach 3) of ``law`` at ``flops``."""
    pred = law.predict(flops)
    out: dict[str, Any] = {
        "approach": law.approach,
        "flops": flops,
        "parameters": pred.params,
        "tokens": pred.tokens,
    }
    if pred.params_interval:
        out["parametersInterval"] = list(pred.params_interval)
    if pred.tokens_interval:
        out["tokensInterval"] = list(pred.tokens_interval)
    if pred.loss is not None and math.isfinite(pred.loss):
        out["loss"] = pred.loss
        if pred.loss_interval:
            out["lossInterval"] = list(pred.loss_interval)
    return out


def main(argv: list[str] | None = None) -> int:
    """Check a study and print its points; 64 on a configuration error."""
    import argparse
    import sys

    from lmforge_jobs.manifest import ManifestError, load_spec
    from lmforge_jobs.spec import EXIT_CONFIG_ERROR

    parser = argparse.ArgumentParser(prog="python -m lmforge_jobs.scaling_study", description=main.__doc__)
    parser.add_argument("--manifest", required=True, help="YAML file with one ScalingStudy")
    parser.add_argument("--vocab-size", type=int, default=None, help="the tokenizer's size (vocabSize: auto)")
    args = parser.parse_args(argv)
    try:
        study = load_spec(args.manifest, "ScalingStudy")
        points = study_points(study.spec, study.name, args.vocab_size)
    except ManifestError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except SpecError as exc:
        print(f"error: spec.{exc.field}: {exc.args[0]}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    for p in points:
        shape = " ".join(f"{k}={v}" for k, v in p["shape"].items())
        print(f"{p['name']}  C={p['budget']:.3g}  N={p['parameters']}  D={p['tokens']}  {shape}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "POINT_SUFFIX_LENGTH",
    "FitApproach",
    "PointPhase",
    "PointShape",
    "ScalingStudySpec",
    "ScalingStudyStatus",
    "Sizes",
    "derive_shapes",
    "fit_entry",
    "fit_study",
    "loss_metric",
    "main",
    "point_name",
    "point_rows",
    "point_spec",
    "study_points",
    "target_prediction",
    "tokens_for",
]
