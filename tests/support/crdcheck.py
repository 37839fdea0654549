"""Validate a custom resource the way the API server would, offline: defaults from the CRD schema,
then the OpenAPI schema (openapi-schema-validator), then every CEL rule (cel-python).

Generating the CRDs, parsing the committed ones, compiling and evaluating CEL rules are pure and add up to
seconds over the tests: each happens once per test process (:func:`generated_crd_files`,
:func:`generated_crd`, :func:`committed_crd`, :func:`compiled`, :func:`cel_errors`), and callers get
copies of what they could change."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import celpy
import yaml
from openapi_schema_validator import OAS30Validator
from repo import ROOT

CRD_FILES = {
    "Corpus": "corpora",
    "PretrainRun": "pretrainruns",
    "AlignmentRun": "alignmentruns",
    "Evaluation": "evaluations",
    "Sweep": "sweeps",
    "ScalingStudy": "scalingstudies",
}


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@cache
def _committed(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=_LOADER)


def committed_crd(path: Path) -> dict[str, Any]:
    """A CRD file (crds/*.yaml) as parsed YAML; a copy of its own for every caller."""
    return copy.deepcopy(_committed(Path(path)))


@cache
def crd_schema(kind: str) -> dict[str, Any]:
    crd = _committed(ROOT / "crds" / f"{CRD_FILES[kind]}.lmforge.io.yaml")
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@cache
def _generated_files() -> dict[str, str]:
    from lmforge_operator.crds import crd_files

    return crd_files()


def generated_crd_files() -> dict[str, str]:
    """What `lmforge crds` writes (file name → text), generated once per test process."""
    return dict(_generated_files())


@cache
def _generated(kind: str) -> dict[str, Any]:
    from lmforge_operator.crds import build_crd

    return build_crd(kind)


def generated_crd(kind: str) -> dict[str, Any]:
    """``lmforge_operator.crds.build_crd(kind)``, built once per test process; a copy for every caller."""
    return copy.deepcopy(_generated(kind))


def apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """Structural defaulting: fill missing properties that have a default, recursively."""
    if isinstance(value, dict) and "properties" in schema:
        for key, sub in schema["properties"].items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(value[key], sub)
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key in value:
            value[key] = apply_defaults(value[key], schema["additionalProperties"])
    elif isinstance(value, list) and "items" in schema:
        return [apply_defaults(v, schema["items"]) for v in value]
    return value


_env = celpy.Environment()


@cache
def compiled(rule: str) -> Any:
    """A CEL rule compiled to a program (raises on a syntax error), once per test process."""
    return _env.program(_env.compile(rule))


def as_schema_types(value: Any, schema: dict[str, Any]) -> Any:
    """``value`` with every number under a ``type: number`` node a float: the API server hands CEL a
    double there whatever the JSON looked like (``1.0e19`` reads as an integer beyond int64 otherwise)."""
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        return {
            k: as_schema_types(v, props.get(k) or (extra if isinstance(extra, dict) else {}))
            for k, v in value.items()
        }
    if isinstance(value, list) and "items" in schema:
        return [as_schema_types(v, schema["items"]) for v in value]
    return value


# (rule, repr(value)) → whether the rule holds, and the evaluation error if one stopped it
_VERDICTS: dict[tuple[str, str], tuple[bool, str | None]] = {}


def _evaluate(rule: str, activation: dict[str, Any]) -> tuple[bool, str | None]:
    try:
        ok = compiled(rule).evaluate(activation)
    except Exception as exc:
        return False, str(exc)
    return bool(ok), None


def cel_errors(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Messages of every CEL rule that evaluates to false (or fails) on ``value``.

    A rule reads only ``self``: its verdict is a pure function of the rule and the value (``repr`` tells 1
    from 1.0 and "1"), and the many manifests the tests check share most of their nodes, so each pair is
    evaluated once per test process."""
    value = as_schema_types(value, schema)
    errors: list[str] = []
    rules = schema.get("x-kubernetes-validations", [])
    text = repr(value) if rules else ""
    activation: dict[str, Any] | None = None
    for entry in rules:
        key = (entry["rule"], text)
        if key not in _VERDICTS:
            activation = activation or {"self": celpy.json_to_cel(value)}
            _VERDICTS[key] = _evaluate(entry["rule"], activation)
        ok, error = _VERDICTS[key]
        if error is not None:  # an evaluation error rejects the object, as in the API server
            entry = {**entry, "message": f"{entry['message']} (evaluation error: {error})"}
        if not ok:
            errors.append(f"{path}{entry.get('fieldPath', '')}: {entry['message']}")
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                errors += cel_errors(value[key], sub, f"{path}.{key}")
        if isinstance(schema.get("additionalProperties"), dict):
            for key, item in value.items():
                errors += cel_errors(item, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += cel_errors(item, schema["items"], f"{path}[{i}]")
    return errors


def _strip_extensions(schema: Any) -> Any:
    """OAS30Validator treats unknown objects as open; drop our x- keys (CEL is checked separately)."""
    if isinstance(schema, dict):
        return {k: _strip_extensions(v) for k, v in schema.items() if k != "x-kubernetes-validations"}
    if isinstance(schema, list):
        return [_strip_extensions(v) for v in schema]
    return schema


def _closed(schema: Any) -> Any:
    """The API server prunes (and kubectl's strict field validation refuses) unknown fields."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


@cache
def _validator(kind: str) -> OAS30Validator:
    schema = _closed(_strip_extensions(crd_schema(kind)))
    schema["properties"]["metadata"] = {"type": "object"}
    return OAS30Validator(schema)


def schema_errors(doc: dict[str, Any]) -> list[str]:
    return [f"{json_path(e.absolute_path)}: {e.message}" for e in _validator(doc["kind"]).iter_errors(doc)]


def json_path(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def admission_errors(doc: dict[str, Any]) -> list[str]:
    """Everything the API server would refuse in ``doc``: schema errors, then CEL errors."""
    doc = apply_defaults(copy.deepcopy(doc), crd_schema(doc["kind"]))
    errors = schema_errors(doc)
    if errors:  # the API server evaluates CEL only on schema-valid objects
        return errors
    return cel_errors(doc, crd_schema(doc["kind"]))
