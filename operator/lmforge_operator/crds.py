"""CustomResourceDefinitions generated from the spec models in ``lmforge_jobs``.

``lmforge crds [--out crds/]`` writes one ``<plural>.lmforge.io.yaml`` per kind. The schema is the pydantic
JSON schema turned structural (Kubernetes' rules: every node typed, no $ref, no null branches, no
``additionalProperties`` beside ``properties``), with the field docstrings as descriptions, defaults, and
each model's CEL rules as ``x-kubernetes-validations``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from lmforge_jobs.kinds import KINDS
from lmforge_jobs.manifest import MODELS, NAME_PATTERN, name_max_length
from lmforge_jobs.spec import API_GROUP, API_VERSION, Cel, Spec


def _col(name: str, path: str, type_: str = "string", priority: int = 0, **extra: Any) -> dict[str, Any]:
    col = {"name": name, "type": type_, "jsonPath": path, **extra}
    if priority:
        col["priority"] = priority
    return col


_PHASE = _col("Phase", ".status.phase", description="Summary of the conditions")
_PROGRESS = _col("Progress", ".status.progress.percent", "number", description="Percent complete")
_ETA = _col("ETA", ".status.progress.etaSeconds", "integer", description="Seconds to completion")
_AGE = _col("Age", ".metadata.creationTimestamp", "date")

COLUMNS: dict[str, tuple[dict[str, Any], ...]] = {
    "Corpus": (
        _PHASE,
        _col("Stage", ".status.stage"),
        _col("Read", ".status.documents.read", "integer", description="Documents read"),
        _col("Kept", ".status.documents.kept", "integer", description="Documents kept"),
        _col("Tokens", ".status.tokens", "integer"),
        _col("Docs/s", ".status.metrics.documentsPerSecond", "number", priority=1),
        _PROGRESS,
        _ETA,
        _AGE,
    ),
    "PretrainRun": (
        _PHASE,
        _PROGRESS,
        _col("Loss", ".status.metrics.loss", "number"),
        _col("Tokens/s", ".status.metrics.tokensPerSecond", "number"),
        _col("MFU", ".status.metrics.mfu", "number"),
        _ETA,
        _col("Params", ".status.plan.parameters", "integer", priority=1),
        _col("Eval loss", ".status.metrics.evalLoss", "number", priority=1),
        _AGE,
    ),
    "AlignmentRun": (
        _col("Method", ".spec.method"),
        _PHASE,
        _PROGRESS,
        _col("Loss", ".status.metrics.loss", "number"),
        _col("Tokens/s", ".status.metrics.tokensPerSecond", "number"),
        _ETA,
        _AGE,
    ),
    "Evaluation": (
        _PHASE,
        _col("Perplexity", ".status.results.perplexity", "number"),
        _col("Win rate", ".status.results.judge.winRate", "number"),
        _PROGRESS,
        _AGE,
    ),
    "Sweep": (
        _PHASE,
        _col("Trials", ".status.trialsDone", "integer", description="Trials finished"),
        _col("Total", ".status.trialsTotal", "integer", description="Trials the sweep runs"),
        _col("Best", ".status.best.objective", "number", description="Objective of the best trial"),
        _col("Best trial", ".status.best.name", priority=1),
        _AGE,
    ),
    "ScalingStudy": (
        _PHASE,
        _col("Points", ".status.pointsDone", "integer", description="Points finished"),
        _col("Total", ".status.pointsTotal", "integer", description="Points the study trains"),
        _col(
            "Target loss", ".status.target.loss", "number", description="Predicted loss at spec.targetBudget"
        ),
        _col(
            "Target N",
            ".status.target.parameters",
            "number",
            priority=1,
            description="Compute-optimal N there",
        ),
        _AGE,
    ),
}
"""Printer columns of each kind (``kubectl get``)."""

CATEGORIES = ["lmforge"]


# ------------------------------------------------------------------------------------- schema rewriting
_DROP_KEYS = {
    "title",
    "additionalProperties",
    "discriminator",
    "examples",
    "propertyNames",
}  # not in Kubernetes


def _strip_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nulls(v) for v in value]
    return value


class _Structural:
    """Rewrites one pydantic JSON schema into a Kubernetes structural schema."""

    def __init__(self, root: dict[str, Any]):
        self.defs = root.get("$defs", {})

    def convert(self, node: dict[str, Any]) -> dict[str, Any]:
        node = dict(node)
        if "$ref" in node:
            target = self.defs[node.pop("$ref").split("/")[-1]]
            merged = {**copy.deepcopy(target), **node}  # the field's description/default win
            return self.convert(merged)
        if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
            branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
            if len(branches) != 1:
                raise ValueError(f"cannot express union {branches} structurally")
            rest = {k: v for k, v in node.items() if k != "default" or v is not None}
            return self.convert({**branches[0], **rest})
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in _DROP_KEYS and not (key == "additionalProperties" and isinstance(value, dict)):
                continue
            if key == "const":
                out["enum"] = [value]
            elif key == "properties":
                out["properties"] = {name: self.convert(sub) for name, sub in value.items()}
            elif key == "items":
                out["items"] = self.convert(value)
            elif key == "additionalProperties":
                out["additionalProperties"] = self.convert(value)
            elif key in ("exclusiveMinimum", "exclusiveMaximum"):
                bound = "minimum" if key == "exclusiveMinimum" else "maximum"
                out[bound] = value
                out[key] = True
            elif key == "default":
                if value is None:
                    continue
                out["default"] = _strip_nulls(value)
            elif key == "required":
                out["required"] = list(value)
            else:
                out[key] = value
        if "enum" in out and "type" not in out:
            out["type"] = "string" if all(isinstance(v, str) for v in out["enum"]) else "integer"
        if "properties" in out:
            out["type"] = "object"
        if out.get("type") == "object" and isinstance(out.get("default"), dict):
            out["default"] = _expanded_default(out["default"], out)
        return out


def _expanded_default(value: Any, schema: dict[str, Any]) -> Any:
    """A default with its own fields' defaults filled in, recursively.

    The API server evaluates every CEL rule against each ``default`` as written when the CRD is created and
    does not apply nested defaults to a default first: ``default: {}`` on an object whose rule reads
    ``self.workers`` makes the whole CRD invalid. Expanded defaults are exactly what a stored object holds.
    """
    if isinstance(value, dict) and "properties" in schema:
        out = dict(value)
        for key, sub in schema["properties"].items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
            if key in out:
                out[key] = _expanded_default(out[key], sub)
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_expanded_default(v, schema["items"]) for v in value]
    return value


def _apply_cel(model: type[BaseModel], schema: dict[str, Any]) -> None:
    rules: tuple[Cel, ...] = getattr(model, "__cel__", ())
    if rules:
        schema["x-kubernetes-validations"] = [_cel_entry(r) for r in rules]


def _cel_entry(rule: Cel) -> dict[str, Any]:
    entry: dict[str, Any] = {"rule": rule.rule, "message": rule.message}
    if rule.field:
        entry["fieldPath"] = "." + rule.field
    if rule.reason:
        entry["reason"] = rule.reason
    return entry


def _models(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Every model class reachable from ``root``, by class name (the JSON schema $defs key)."""
    found: dict[str, type[BaseModel]] = {}

    def visit(tp: Any) -> None:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp.__name__ in found:
                return
            found[tp.__name__] = tp
            for field in tp.model_fields.values():
                visit(field.annotation)
            return
        for arg in getattr(tp, "__args__", ()) or ():
            visit(arg)
        origin = getattr(tp, "__origin__", None)
        if origin is not None and origin is not tp:
            visit(origin)

    visit(root)
    return found


def openapi_schema(model: type[Spec]) -> dict[str, Any]:
    """Structural OpenAPI v3 schema (as in a CRD) for a spec or status model."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    models = _models(model)
    for name, sub in models.items():  # attach CEL rules before $refs are inlined
        target = raw if name == model.__name__ else raw.get("$defs", {}).get(name)
        if target is not None:
            _apply_cel(sub, target)
    schema = _Structural(raw).convert({k: v for k, v in raw.items() if k != "$defs"})
    schema.pop("default", None)
    return schema


def resource_schema(kind: str) -> dict[str, Any]:
    """The whole openAPIV3Schema of a kind (apiVersion, kind, metadata, spec, status)."""
    resource = MODELS[kind]
    spec_model = resource.model_fields["spec"].annotation
    status_model = resource.model_fields["status"].annotation
    status_model = next(a for a in status_model.__args__ if a is not type(None))  # Optional[Status]
    spec = openapi_schema(spec_model)
    status = openapi_schema(status_model)
    longest = name_max_length(kind)
    return {
        "type": "object",
        "description": spec_model.__doc__.strip().splitlines()[0],
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "lmforge.io/v1alpha1"},
            "kind": {"type": "string", "description": kind},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": [
            {
                "rule": f"self.metadata.name.matches('{NAME_PATTERN}') && size(self.metadata.name) <= {longest}",
                "message": f"metadata.name must be a lowercase DNS label starting with a letter, at most "
                f"{longest} characters (child Jobs and pods add suffixes)",
            }
        ],
    }


def build_crd(kind: str) -> dict[str, Any]:
    """The CustomResourceDefinition manifest of a kind."""
    info = KINDS[kind]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{info.plural}.{API_GROUP}",
            "labels": {"app.kubernetes.io/name": "lmforge", "app.kubernetes.io/part-of": "lmforge"},
        },
        "spec": {
            "group": API_GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": info.plural,
                "singular": info.singular,
                "shortNames": list(info.short_names),
                "categories": CATEGORIES,
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [dict(c) for c in COLUMNS[kind]],
                    "schema": {"openAPIV3Schema": resource_schema(kind)},
                }
            ],
        },
    }


def render_crd(kind: str) -> str:
    header = "# Generated by `lmforge crds` from the spec models in jobs/lmforge_jobs. Do not edit.\n"
    return header + yaml.safe_dump(build_crd(kind), sort_keys=False, width=120, allow_unicode=True)


def crd_files() -> dict[str, str]:
    """File name → content for every CRD."""
    return {f"{info.plural}.{API_GROUP}.yaml": render_crd(kind) for kind, info in KINDS.items()}


def write_crds(out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in crd_files().items():
        path = out / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
