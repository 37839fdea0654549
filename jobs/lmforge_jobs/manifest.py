"""Loading and validating lmforge manifests (multi-document YAML) into typed resources.

Used by every job's ``--manifest FILE`` and by ``lmforge validate`` / ``lmforge run``. Errors are
collected as :class:`Problem` values (resource, field path, message) — never raised as tracebacks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from lmforge_jobs.align.config import AlignmentRunSpec, AlignmentRunStatus
from lmforge_jobs.data.config import CorpusSpec, CorpusStatus
from lmforge_jobs.evaluate.config import EvaluationSpec, EvaluationStatus
from lmforge_jobs.pretrain.config import PretrainRunSpec, PretrainRunStatus
from lmforge_jobs.scaling_study import POINT_SUFFIX_LENGTH, ScalingStudySpec, ScalingStudyStatus
from lmforge_jobs.spec import GROUP_VERSION, SpecError
from lmforge_jobs.sweep.config import TRIAL_SUFFIX_LENGTH, SweepSpec, SweepStatus

# A resource name becomes the prefix of Job, Service and pod names (pod hostnames are DNS-1123 labels of
# at most 63 characters, and the operator appends suffixes such as "-tokenize-12-abcde").
NAME_MAX_LENGTH = 40
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"

S = TypeVar("S", bound=BaseModel)
T = TypeVar("T", bound=BaseModel)


class ObjectMeta(BaseModel):
    """The parts of metadata lmforge reads; the rest is kept but not checked."""

    model_config = ConfigDict(extra="allow")

    name: Annotated[str, StringConstraints(min_length=1, max_length=NAME_MAX_LENGTH, pattern=NAME_PATTERN)]
    namespace: str | None = None
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    uid: str | None = None
    generation: int | None = None


class Resource(BaseModel, Generic[S, T]):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    api_version: Literal["lmforge.io/v1alpha1"] = Field(alias="apiVersion")
    kind: str
    metadata: ObjectMeta
    spec: S
    status: T | None = None

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def ref(self) -> str:
        return f"{self.kind}/{self.metadata.name}"


class Corpus(Resource[CorpusSpec, CorpusStatus]):
    kind: Literal["Corpus"]


class PretrainRun(Resource[PretrainRunSpec, PretrainRunStatus]):
    kind: Literal["PretrainRun"]


class AlignmentRun(Resource[AlignmentRunSpec, AlignmentRunStatus]):
    kind: Literal["AlignmentRun"]


class Evaluation(Resource[EvaluationSpec, EvaluationStatus]):
    kind: Literal["Evaluation"]


class Sweep(Resource[SweepSpec, SweepStatus]):
    kind: Literal["Sweep"]

    @model_validator(mode="after")
    def _trial_names_fit(self) -> Sweep:
        # its trials are named <sweep>-t<NNN>, and those names obey NAME_MAX_LENGTH too
        if len(self.name) > name_max_length(self.kind):
            raise SpecError(
                "metadata.name",
                f"at most {name_max_length(self.kind)} characters: trials are named <sweep>-t<NNN>",
            )
        return self


class ScalingStudy(Resource[ScalingStudySpec, ScalingStudyStatus]):
    kind: Literal["ScalingStudy"]

    @model_validator(mode="after")
    def _point_names_fit(self) -> ScalingStudy:
        # its points are named <study>-b<II>n<JJ>, and those names obey NAME_MAX_LENGTH too
        if len(self.name) > name_max_length(self.kind):
            raise SpecError(
                "metadata.name",
                f"at most {name_max_length(self.kind)} characters: points are named <study>-b<II>n<JJ>",
            )
        return self


CHILD_SUFFIX_LENGTH = {"Sweep": TRIAL_SUFFIX_LENGTH, "ScalingStudy": POINT_SUFFIX_LENGTH}
"""What the names of a kind's children add to its own name."""


def name_max_length(kind: str) -> int:
    """The longest name a resource of ``kind`` may have: a Sweep's trials add ``-t<NNN>`` to its name, a
    ScalingStudy's points ``-b<II>n<JJ>``."""
    return NAME_MAX_LENGTH - CHILD_SUFFIX_LENGTH.get(kind, 0)


MODELS: dict[str, type[Resource[Any, Any]]] = {
    model.__name__: model for model in (Corpus, PretrainRun, AlignmentRun, Evaluation, Sweep, ScalingStudy)
}
"""The model (spec and status) of each kind; the rest of what is fixed about a kind is in
:data:`lmforge_jobs.kinds.KINDS`, in the same order."""


# ------------------------------------------------------------------------------------------------ YAML
class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats, as the Kubernetes API server reads them: ``2.5e9`` and ``1e-4``
    are numbers (PyYAML's YAML 1.1 rules would make them strings)."""


_FLOAT_12 = re.compile(
    r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
)
_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in list("-+0123456789."):
    _Loader.yaml_implicit_resolvers[_first] = [
        (tag, rx)
        for tag, rx in _Loader.yaml_implicit_resolvers.get(_first, [])
        if tag != "tag:yaml.org,2002:float"
    ]
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def _construct_float(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    text = loader.construct_scalar(node)
    value = yaml.SafeLoader.construct_yaml_float(loader, node)
    # Integral numbers written with an exponent (2.5e9) stay exact integers when they are whole.
    if re.fullmatch(r"[-+]?[0-9_]+(\.[0-9_]*)?[eE][-+]?[0-9]+", str(text)) and value.is_integer():
        return int(value)
    return value


_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def load_yaml_documents(text: str) -> list[Any]:
    """Parse multi-document YAML with Kubernetes-like number rules. Raises yaml.YAMLError."""
    return [doc for doc in yaml.load_all(text, Loader=_Loader) if doc is not None]


# ---------------------------------------------------------------------------------------------- problems
@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest."""

    source: str  # file (and document number)
    resource: str  # Kind/name, or "?" when unknown
    field: str  # dotted path, e.g. spec.model.heads
    message: str

    def __str__(self) -> str:
        where = f"{self.resource}: " if self.resource != "?" else ""
        return f"{self.source}: {where}{self.field}: {self.message}"


def _is_tag(item: Any) -> bool:
    """Union-member and validator tags pydantic puts into locations (``function-after[_rules()]``,
    ``literal['auto']``, ``int``), which are not field names."""
    return isinstance(item, str) and (
        item in {"int", "str", "float", "bool"}
        or item.startswith(("function-", "lax-", "json-or-python", "literal[", "constrained-"))
    )


def _loc_to_path(loc: Iterable[Any]) -> str:
    """("spec", "sources", 0, "jsonl") -> "spec.sources[0].jsonl"."""
    path = ""
    for item in loc:
        if isinstance(item, int):
            path += f"[{item}]"
        else:
            path += ("." if path else "") + str(item)
    return path


def validation_problems(exc: ValidationError, source: str, resource: str) -> list[Problem]:
    """Turn a pydantic ValidationError into Problems with camelCase field paths."""
    problems: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    for err in exc.errors(include_url=False):
        loc = [p for p in err["loc"] if not _is_tag(p)]
        message = err["msg"]
        error = (err.get("ctx") or {}).get("error")
        if isinstance(error, SpecError):
            loc = [*loc, *error.field.split(".")]
            message = error.message
        elif message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        elif err["type"] == "missing":
            message = "required field is missing"
        path = _loc_to_path(loc) or "(document)"
        if (path, message) in seen:
            continue
        seen.add((path, message))
        problems.append(Problem(source, resource, path, message))
    return problems


def parse_resource(doc: Any, source: str = "<manifest>") -> tuple[Resource[Any, Any] | None, list[Problem]]:
    """Validate one YAML document as an lmforge resource."""
    if not isinstance(doc, dict):
        return None, [
            Problem(source, "?", "(document)", "expected a mapping with apiVersion, kind, metadata, spec")
        ]
    kind = doc.get("kind")
    name = (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None
    resource = f"{kind}/{name}" if kind and name else (str(kind) if kind else "?")
    if doc.get("apiVersion") != GROUP_VERSION:
        return None, [
            Problem(
                source, resource, "apiVersion", f"expected {GROUP_VERSION}, got {doc.get('apiVersion')!r}"
            )
        ]
    if kind not in MODELS:
        return None, [
            Problem(source, resource, "kind", f"unknown kind {kind!r}; expected one of {', '.join(MODELS)}")
        ]
    try:
        return MODELS[kind].model_validate(doc), []
    except ValidationError as exc:
        problems = validation_problems(exc, source, resource)
        for i, p in enumerate(problems):
            if p.field.startswith("metadata.name"):
                problems[i] = Problem(
                    p.source,
                    p.resource,
                    p.field,
                    f"{p.message} (a lowercase DNS label starting with a letter, at most "
                    f"{NAME_MAX_LENGTH} characters: child Jobs and pods add suffixes)",
                )
        return None, problems


def iter_manifest_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """YAML files named, or found (recursively, sorted) in directories named."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
        else:
            yield path


def load_resources(paths: Iterable[str | Path]) -> tuple[list[Resource[Any, Any]], list[Problem]]:
    """Load and validate every lmforge resource in the given files and directories.

    Documents of other kinds (e.g. a Kueue ClusterQueue beside the runs) are skipped, not errors.
    Duplicate Kind/name pairs are problems.
    """
    resources: list[Resource[Any, Any]] = []
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for file in iter_manifest_files(paths):
        if not file.exists():
            problems.append(Problem(str(file), "?", "(file)", "no such file or directory"))
            continue
        try:
            docs = load_yaml_documents(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(str(file), "?", "(file)", f"cannot read: {exc}"))
            continue
        except yaml.YAMLError as exc:
            problems.append(Problem(str(file), "?", "(file)", f"invalid YAML: {exc}".replace("\n", " ")))
            continue
        for index, doc in enumerate(docs):
            source = f"{file}" + (f"#{index}" if len(docs) > 1 else "")
            if isinstance(doc, dict) and not str(doc.get("apiVersion", "")).startswith("lmforge.io/"):
                continue  # another API's object in the same directory
            resource, found = parse_resource(doc, source)
            problems.extend(found)
            if resource is not None:
                if resource.ref in seen:
                    problems.append(
                        Problem(
                            source,
                            resource.ref,
                            "metadata.name",
                            f"duplicate {resource.ref} (also in {seen[resource.ref]})",
                        )
                    )
                    continue
                seen[resource.ref] = source
                resources.append(resource)
    return resources, problems


def load_spec(path: str | Path, kind: str) -> Resource[Any, Any]:
    """Load the single resource of ``kind`` from a manifest file, for a job's ``--manifest``.

    Raises ManifestError (with every problem in its message) when the file is invalid.
    """
    resources, problems = load_resources([path])
    if problems:
        raise ManifestError(problems)
    matching = [r for r in resources if r.kind == kind]
    if len(matching) != 1:
        raise ManifestError(
            [Problem(str(path), "?", "kind", f"expected exactly one {kind}, found {len(matching)}")]
        )
    return matching[0]


class ManifestError(Exception):
    """A manifest is invalid; ``problems`` lists why."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))
