"""The Sweep spec: a template run, the parameters to search, the objective, how to search and prune.

A trial is the template with its parameters written at their paths (:func:`trial_spec`); a path must
name a field of the template kind's spec (``optimizer.lr``, ``budget.steps``), and the objective a metric
the template kind reports in status.metrics (:data:`lmforge_jobs.kinds.STATUS_METRICS`).
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, Field, StringConstraints, ValidationError, WithJsonSchema, model_validator

from lmforge_jobs.kinds import STATUS_METRICS
from lmforge_jobs.spec import Cel, Spec, SpecError, StatusBase, Uri, cel_exactly_one

TEMPLATE_KINDS = ("PretrainRun", "AlignmentRun")
"""Kinds a Sweep can search over: those that train and report metrics while they run."""

TRIAL_SUFFIX_LENGTH = len("-t000")
MAX_TRIALS = 1000
MAX_INTERMEDIATE = 64
"""Intermediate values kept per trial in a Sweep's status (the operator reports at most one per twentieth
of a trial's steps)."""

JsonObject = Annotated[
    dict[str, Any], WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True})
]
Scalar = Union[bool, int, float, str]  # noqa: UP007 - pydantic tries the members in this order
ParamPath = Annotated[
    str,
    StringConstraints(
        min_length=1, max_length=253, pattern=r"^[A-Za-z][A-Za-z0-9]*(\.[A-Za-z][A-Za-z0-9]*)*$"
    ),
]


def _spec_model(kind: str) -> type[BaseModel]:
    from lmforge_jobs.manifest import MODELS  # manifest imports this module for the Sweep kind

    return MODELS[kind].model_fields["spec"].annotation  # type: ignore[return-value]


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field's annotation may hold (through Optional and Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def _field(model: type[BaseModel], alias: str) -> Any:
    for name, info in model.model_fields.items():
        if alias in (name, info.alias):
            return info
    return None


def path_exists(kind: str, path: str) -> bool:
    """Whether ``path`` (camelCase, dotted) names a field of ``kind``'s spec."""
    models: list[type[BaseModel]] = [_spec_model(kind)]
    for part in path.split("."):
        found = [info for m in models if (info := _field(m, part)) is not None]
        if not found:
            return False
        models = [m for info in found for m in _models_in(info.annotation)]
    return True


def reported_metrics(kind: str) -> tuple[str, ...]:
    """The numbers ``kind`` reports in status.metrics (camelCase), the possible objectives."""
    status = next(a for a in get_args(_status_model(kind)) if a is not type(None))
    metrics = _models_in(status.model_fields["metrics"].annotation)[0]
    return tuple(
        info.alias or name
        for name, info in metrics.model_fields.items()
        if get_origin(info.annotation) is not dict and "dict" not in str(info.annotation)
    )


def _status_model(kind: str) -> Any:
    from lmforge_jobs.manifest import MODELS

    return MODELS[kind].model_fields["status"].annotation


class Direction(str, Enum):
    """Whether a smaller or a larger objective is better."""

    minimize = "minimize"
    maximize = "maximize"


class Algorithm(str, Enum):
    """How the next trial's parameters are chosen (Optuna samplers)."""

    grid = "grid"
    random = "random"
    tpe = "tpe"


class Pruner(str, Enum):
    """How bad trials are stopped early from their intermediate objective."""

    none = "none"
    median = "median"
    asha = "asha"


class SweepTemplate(Spec):
    """The run every trial starts from."""

    __cel__ = (
        Cel(
            "self.kind in ['PretrainRun', 'AlignmentRun']", "kind must be PretrainRun or AlignmentRun", "kind"
        ),
    )

    kind: Literal["PretrainRun", "AlignmentRun"]
    """Kind of the trials."""
    spec: JsonObject
    """Spec of the trials (a full PretrainRun or AlignmentRun spec); each trial's parameters are written into
    it, and its output defaults to the trial's own folder."""


class FloatRange(Spec):
    """Real numbers from min to max, every step apart when step is set."""

    __cel__ = (
        Cel("self.min < self.max", "min must be less than max", "max"),
        Cel("!has(self.step) || self.step > 0.0", "step must be greater than zero", "step"),
    )

    min: float
    """Smallest value."""
    max: float
    """Largest value."""
    step: float | None = None
    """Spacing of the values (unset: any real number)."""

    @model_validator(mode="after")
    def _rules(self) -> FloatRange:
        if not self.min < self.max:
            raise SpecError("max", "min must be less than max")
        if self.step is not None and self.step <= 0:
            raise SpecError("step", "step must be greater than zero")
        return self


class LogRange(Spec):
    """Positive numbers from min to max, uniform in their logarithm (learning rates, weight decays)."""

    __cel__ = (
        Cel("self.min > 0.0", "min must be greater than zero", "min"),
        Cel("self.min < self.max", "min must be less than max", "max"),
    )

    min: float
    """Smallest value (> 0)."""
    max: float
    """Largest value."""

    @model_validator(mode="after")
    def _rules(self) -> LogRange:
        if self.min <= 0:
            raise SpecError("min", "min must be greater than zero")
        if not self.min < self.max:
            raise SpecError("max", "min must be less than max")
        return self


class IntRange(Spec):
    """Integers from min to max, step apart."""

    __cel__ = (Cel("self.min < self.max", "min must be less than max", "max"),)

    min: int
    """Smallest value."""
    max: int
    """Largest value."""
    step: Annotated[int, Field(ge=1)] = 1
    """Spacing of the values."""

    @model_validator(mode="after")
    def _rules(self) -> IntRange:
        if not self.min < self.max:
            raise SpecError("max", "min must be less than max")
        return self


PARAMETER_KINDS = (
    ("values", "values"),
    ("range", "range"),
    ("log_uniform", "logUniform"),
    ("integer", "integer"),
)


class Parameter(Spec):
    """One searched field of the template: its path and where its values come from (exactly one)."""

    __cel__ = (
        Cel(
            cel_exactly_one(("values", "range", "logUniform", "integer")),
            "exactly one of values, range, logUniform, integer must be set",
        ),
    )

    path: ParamPath
    """Dotted camelCase path of the field in the template's spec, e.g. optimizer.lr or budget.steps."""
    values: (
        Annotated[
            list[Scalar],
            Field(min_length=1, max_length=256),
            WithJsonSchema(
                {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 256,
                    "items": {"x-kubernetes-preserve-unknown-fields": True},
                }
            ),
        ]
        | None
    ) = None
    """The values to try (numbers, strings or booleans)."""
    range: FloatRange | None = None
    """A range of real numbers."""
    log_uniform: LogRange | None = None
    """A range of positive numbers searched on a log scale."""
    integer: IntRange | None = None
    """A range of integers."""

    @model_validator(mode="after")
    def _rules(self) -> Parameter:
        found = [alias for name, alias in PARAMETER_KINDS if getattr(self, name) is not None]
        if len(found) != 1:
            raise SpecError(
                found[1] if len(found) > 1 else "values",
                f"exactly one of values, range, logUniform, integer must be set (found: {', '.join(found) or 'none'})",
            )
        return self

    @property
    def discrete(self) -> bool:
        """Whether the values can be listed (a grid can search it)."""
        return (
            self.values is not None
            or self.integer is not None
            or (self.range is not None and self.range.step is not None)
        )

    def grid(self) -> list[Any]:
        """Every value, for the grid sampler."""
        if self.values is not None:
            return list(self.values)
        if self.integer is not None:
            return list(range(self.integer.min, self.integer.max + 1, self.integer.step))
        if self.range is not None and self.range.step is not None:
            count = int((self.range.max - self.range.min) / self.range.step + 1e-9) + 1
            return [round(self.range.min + i * self.range.step, 12) for i in range(count)]
        raise ValueError(f"{self.path}: not discrete")


class Objective(Spec):
    """What a trial is judged by: its final value of a metric it reports in status.metrics."""

    metric: Annotated[str, StringConstraints(min_length=1, max_length=63, pattern=r"^[a-zA-Z][a-zA-Z0-9]*$")]
    """A metric of the template kind's status.metrics, e.g. evalLoss, perplexity, loss, rewardMargin."""
    direction: Direction = Direction.minimize
    """minimize or maximize."""


class EarlyStopping(Spec):
    """Stopping trials whose intermediate objective is bad (Optuna pruners fed with the live metrics)."""

    pruner: Pruner = Pruner.median
    """median (stop a trial worse than the median of earlier trials at the same step), asha (successive
    halving) or none."""
    startup_trials: Annotated[int, Field(ge=0, le=MAX_TRIALS)] = 2
    """Trials that run to the end before any is pruned (median)."""
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    """Steps of a trial before it may be pruned (median)."""
    min_resource: Annotated[int, Field(ge=1)] = 1
    """Steps every trial gets before the first halving (asha)."""
    reduction_factor: Annotated[int, Field(ge=2, le=16)] = 3
    """1/reduction_factor of the trials go on at each rung (asha)."""


class SweepSpec(Spec):
    """A hyperparameter search: trials of a template run, each with parameters chosen by an Optuna sampler."""

    __cel__ = (
        Cel(
            " && ".join(
                f"(self.template.kind != '{kind}' || self.objective.metric in {list(STATUS_METRICS[kind])})"
                for kind in TEMPLATE_KINDS
            ),
            "objective.metric must be a metric the template kind reports in status.metrics",
            "objective.metric",
        ),
        Cel(
            "!has(self.maxParallel) || !has(self.maxTrials) || self.maxParallel <= self.maxTrials",
            "maxParallel must not exceed maxTrials",
            "maxParallel",
        ),
        Cel(
            "!has(self.algorithm) || self.algorithm != 'grid' || self.parameters.all(p, has(p.values) || has(p.integer) "
            "|| (has(p.range) && has(p.range.step)))",
            "grid needs discrete parameters: values, integer, or a range with a step",
            "parameters",
        ),
    )

    template: SweepTemplate
    """The run each trial is: kind and spec."""
    parameters: Annotated[list[Parameter], Field(min_length=1, max_length=32)]
    """The fields searched, each with its values or range."""
    objective: Objective
    """The metric the search optimises."""
    algorithm: Algorithm = Algorithm.tpe
    """grid (every combination, at most maxTrials), random or tpe (Optuna's tree-structured Parzen
    estimator)."""
    max_trials: Annotated[int, Field(ge=1, le=MAX_TRIALS)] = 10
    """Trials to run in all (a grid stops earlier once every combination ran)."""
    max_parallel: Annotated[int, Field(ge=1, le=MAX_TRIALS)] = 1
    """Trials running at once."""
    seed: Annotated[int, Field(ge=0)] | None = None
    """Seed of the sampler: the same seed proposes the same trials."""
    early_stopping: EarlyStopping | None = None
    """Pruning of bad trials (unset: every trial runs to the end)."""
    output: Uri | None = None
    """Where the trials' outputs go (each in <output>/<trial>); unset: beside the sweep."""

    @model_validator(mode="after")
    def _rules(self) -> SweepSpec:
        if self.max_parallel > self.max_trials:
            raise SpecError(
                "maxParallel",
                f"maxParallel ({self.max_parallel}) must not exceed maxTrials ({self.max_trials})",
            )
        kind = self.template.kind
        seen: set[str] = set()
        for i, parameter in enumerate(self.parameters):
            if parameter.path in seen:
                raise SpecError(f"parameters[{i}].path", f"{parameter.path} is searched twice")
            seen.add(parameter.path)
            if not path_exists(kind, parameter.path):
                raise SpecError(f"parameters[{i}].path", f"{parameter.path} is not a field of a {kind} spec")
            if self.algorithm == Algorithm.grid and not parameter.discrete:
                raise SpecError(
                    f"parameters[{i}]",
                    "grid needs discrete parameters: values, integer, or a range with a step",
                )
        metrics = STATUS_METRICS[kind]
        if self.objective.metric not in metrics:
            raise SpecError(
                "objective.metric",
                f"{kind} does not report {self.objective.metric!r}; it reports {', '.join(metrics)}",
            )
        self.check_template()
        return self

    def check_template(self) -> None:
        """The template, with the first value of every parameter, is a valid spec of its kind."""
        model = _spec_model(self.template.kind)
        sample = {p.path: first_value(p) for p in self.parameters}
        try:
            model.model_validate(apply_parameters(self.template.spec, sample))
        except ValidationError as exc:
            from lmforge_jobs.manifest import validation_problems

            problem = validation_problems(exc, "", "")[0]
            field = "template.spec" + ("" if problem.field == "(document)" else f".{problem.field}")
            raise SpecError(field, problem.message) from None


def first_value(parameter: Parameter) -> Any:
    if parameter.values is not None:
        return parameter.values[0]
    source = parameter.integer or parameter.range or parameter.log_uniform
    return source.min  # type: ignore[union-attr]


def apply_parameters(spec: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with each value written at its dotted path (missing objects on the way are created); the
    template itself is not changed."""
    import copy

    out = copy.deepcopy(spec)
    for path, value in parameters.items():
        *parents, leaf = path.split(".")
        node = out
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[leaf] = value
    return out


def trial_name(sweep: str, number: int) -> str:
    """The deterministic name of a sweep's trial ``number``: ``<sweep>-t007``."""
    return f"{sweep}-t{number:03d}"


# ------------------------------------------------------------------------------------------------ status
class TrialPhase(str, Enum):
    """Where a trial is."""

    running = "Running"
    succeeded = "Succeeded"
    pruned = "Pruned"
    failed = "Failed"


class TrialStatus(Spec):
    """One trial of the sweep."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=63)]
    """The trial's resource (a PretrainRun or AlignmentRun)."""
    number: Annotated[int, Field(ge=0)]
    """Its number in the search (Optuna's)."""
    parameters: JsonObject = {}
    """The values of the searched paths."""
    phase: TrialPhase
    """Running, Succeeded, Pruned or Failed."""
    objective: float | None = None
    """The final objective (a pruned trial: its last intermediate value)."""
    step: Annotated[int, Field(ge=0)] | None = None
    """Last step whose objective was reported."""
    pruned: bool = False
    """Stopped early by the pruner."""
    intermediate: Annotated[dict[str, float], Field(max_length=MAX_INTERMEDIATE)] | None = None
    """Intermediate objective by step, as the pruner saw it (on a cluster: the study is rebuilt from
    this table on every reconcile)."""


class BestTrial(Spec):
    """The best finished trial so far."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=63)]
    """The trial's resource."""
    parameters: JsonObject = {}
    """Its parameters."""
    objective: float
    """Its objective."""
    outputs: Annotated[dict[str, Uri], Field(max_length=16)] = {}
    """Its status.outputs (model, checkpoint…): what a reference to the sweep resolves to."""


class SweepStatus(StatusBase):
    """Observed state of a Sweep."""

    trials: Annotated[list[TrialStatus], Field(max_length=MAX_TRIALS)] = []
    """Every trial started, in order."""
    trials_done: Annotated[int, Field(ge=0)] | None = None
    """Trials finished (succeeded, pruned or failed)."""
    trials_total: Annotated[int, Field(ge=0)] | None = None
    """Trials the sweep runs (maxTrials, or fewer for a small grid)."""
    best: BestTrial | None = None
    """The best trial so far."""
    outputs: Annotated[dict[str, Uri], Field(max_length=16)] | None = None
    """The best trial's outputs."""


__all__ = [
    "TEMPLATE_KINDS",
    "Algorithm",
    "BestTrial",
    "Direction",
    "EarlyStopping",
    "Objective",
    "Parameter",
    "Pruner",
    "SweepSpec",
    "SweepStatus",
    "SweepTemplate",
    "TrialPhase",
    "TrialStatus",
    "apply_parameters",
    "path_exists",
    "reported_metrics",
    "trial_name",
]
