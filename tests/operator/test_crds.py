"""The CRDs in crds/ are what `lmforge crds` generates, are structural, and carry CEL rules that compile."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from crdcheck import committed_crd, compiled, generated_crd, generated_crd_files
from repo import ROOT

import lmforge_operator.crds
from lmforge_jobs.kinds import KINDS
from lmforge_operator.cli import main

CRDS = sorted((ROOT / "crds").glob("*.yaml"))


def build_crd(kind: str) -> dict[str, Any]:
    """``lmforge_operator.crds.build_crd``, generated once per test process (crdcheck)."""
    return generated_crd(kind)


def test_crds_are_up_to_date() -> None:
    expected = generated_crd_files()
    assert sorted(p.name for p in CRDS) == sorted(expected)
    for path in CRDS:
        assert path.read_text() == expected[path.name], f"{path.name} is stale: run `lmforge crds`"


def test_crds_check_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the command's writing and comparing, with the generation test_crds_are_up_to_date checks, done once
    monkeypatch.setattr(lmforge_operator.crds, "crd_files", generated_crd_files)
    assert main(["crds", "--out", str(tmp_path)]) == 0
    assert main(["crds", "--check", "--out", str(tmp_path)]) == 0
    target = next(tmp_path.glob("pretrainruns*"))
    target.write_text(target.read_text().replace("Model width.", "Width."))
    assert main(["crds", "--check", "--out", str(tmp_path)]) == 1


def _walk(node: dict[str, Any], path: str):
    yield path, node
    for key, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def _structural_problems(schema: dict[str, Any]) -> list[str]:
    """Kubernetes' structural schema rules (apiextensions 'Specifying a structural schema')."""
    problems = []
    for path, node in _walk(schema, ""):
        if "$ref" in node or "$defs" in node or "definitions" in node:
            problems.append(f"{path}: $ref/$defs are not allowed")
        if node.get("x-kubernetes-int-or-string"):
            if node.get("anyOf") != [{"type": "integer"}, {"type": "string"}] or "type" in node:
                problems.append(f"{path}: int-or-string must be exactly anyOf integer/string, untyped")
        elif not node.get("x-kubernetes-preserve-unknown-fields") and "type" not in node:
            problems.append(f"{path}: no type")
        elif "anyOf" in node or "oneOf" in node or "allOf" in node or "not" in node:
            problems.append(f"{path}: logical junctors are not allowed here")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{path}: additionalProperties beside properties")
        if node.get("type") == "null" or node.get("nullable") is False:
            problems.append(f"{path}: null type")
        if "default" in node and node["default"] is None:
            problems.append(f"{path}: null default")
        for key in ("title", "const", "examples"):
            if key in node:
                problems.append(f"{path}: {key} is not allowed")
        if isinstance(node.get("exclusiveMinimum"), int | float) and not isinstance(
            node["exclusiveMinimum"], bool
        ):
            problems.append(f"{path}: exclusiveMinimum must be a boolean in OpenAPI v3.0")
        if node.get("type") == "array" and "maxItems" not in node:
            problems.append(f"{path}: unbounded list (CEL cost estimation needs maxItems)")
        if node.get("type") == "object" and "additionalProperties" in node and "maxProperties" not in node:
            problems.append(f"{path}: unbounded map (CEL cost estimation needs maxProperties)")
        if "description" not in node and path.count(".") > 1 and not path.endswith(("[]", "}")):
            problems.append(f"{path}: no description")
    return problems


@pytest.mark.parametrize("kind", list(KINDS))
def test_schema_is_structural(kind: str) -> None:
    schema = build_crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert _structural_problems(schema) == []


def test_structural_checker_catches_violations() -> None:
    bad = {
        "type": "object",
        "properties": {
            "a": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            "b": {"type": "object", "properties": {}, "additionalProperties": False},
        },
    }
    problems = _structural_problems(bad)
    assert any(".a: no type" in p for p in problems)
    assert any(".b: additionalProperties beside properties" in p for p in problems)


@pytest.mark.parametrize("path", CRDS, ids=[p.name for p in CRDS])
def test_crd_passes_official_schema(path: Path) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(committed_crd(path), "1.31.0", strict=True)


@pytest.mark.parametrize("kind", list(KINDS))
def test_cel_rules_compile_and_field_paths_exist(kind: str) -> None:
    schema = build_crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    count = 0
    for path, node in _walk(schema, ""):
        for rule in node.get("x-kubernetes-validations", []):
            compiled(rule["rule"])  # raises on a syntax error
            assert rule["message"]
            assert rule.get("reason", "FieldValueInvalid") in {
                "FieldValueInvalid",
                "FieldValueForbidden",
                "FieldValueRequired",
                "FieldValueDuplicate",
            }
            target = node
            for part in rule.get("fieldPath", "").lstrip(".").split(".") if rule.get("fieldPath") else []:
                assert part in target.get("properties", {}), (
                    f"{path}: fieldPath {rule['fieldPath']} not in schema"
                )
                target = target["properties"][part]
            count += 1
    assert count >= 2


def test_printer_columns_and_names() -> None:
    for kind, _info in KINDS.items():
        names = build_crd(kind)["spec"]["names"]
        assert names["categories"] == ["lmforge"]
        assert names["shortNames"]
        columns = {c["name"] for c in build_crd(kind)["spec"]["versions"][0]["additionalPrinterColumns"]}
        assert {"Phase", "Age"} <= columns
    pretrain = {
        c["name"] for c in build_crd("PretrainRun")["spec"]["versions"][0]["additionalPrinterColumns"]
    }
    assert {"Progress", "Tokens/s", "MFU", "ETA"} <= pretrain


# ----------------------------------------------------------------------- what the API server checks on create
# Kubernetes (apiextensions-apiserver, CRD create/update) validates every `default` in the schema: the value
# must be pruned (no unknown fields), valid against its own schema node, and every `x-kubernetes-validations`
# rule of that node and of the nodes inside the value is evaluated against the default *as written* — nested
# defaults are not applied to a default first. A rule reading `self.workers` on an object whose default is
# `{}` is refused ("no such key: workers evaluating rule ..."). When a custom resource is stored, defaults are
# applied recursively (a defaulted object gets its own fields' defaults) and then every rule runs. Both are
# replayed here with cel-python; the rules read the same keys either way, so a missing key fails both.


def _defaulted_nodes(schema: dict[str, Any]):
    for path, node in _walk(schema, ""):
        if "default" in node:
            yield path, node


def _default_problems(schema: dict[str, Any]) -> list[str]:
    from crdcheck import _closed, _strip_extensions, cel_errors
    from openapi_schema_validator import OAS30Validator

    problems = []
    for path, node in _defaulted_nodes(schema):
        default = node["default"]
        # unknown fields in a default are refused (it must be pruned); x- keys are not OpenAPI
        for error in OAS30Validator(_closed(_strip_extensions(node))).iter_errors(default):
            problems.append(f"{path}.default: {error.message}")
        problems += [f"{path}.default{e}" for e in cel_errors(default, node)]
    return problems


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_default_passes_its_own_rules_as_written(kind: str) -> None:
    schema = build_crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert _default_problems(schema) == []


@pytest.mark.parametrize("path", CRDS, ids=[p.name for p in CRDS])
def test_committed_crd_defaults_pass_their_rules(path: Path) -> None:
    schema = committed_crd(path)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert _default_problems(schema) == []


def test_default_checker_refuses_an_empty_default_under_a_rule() -> None:
    """The case the API server refused: `default: {}` on an object whose rule reads a field."""
    node = {
        "type": "object",
        "default": {},
        "properties": {
            "tasks": {"type": "integer", "default": 1},
            "workers": {"type": "integer", "default": 1},
        },
        "x-kubernetes-validations": [
            {"rule": "self.workers <= self.tasks", "message": "workers must not exceed tasks"}
        ],
    }
    problems = _default_problems({"type": "object", "properties": {"parallelism": node}})
    assert problems and "workers must not exceed tasks" in problems[0]
    node["default"] = {"tasks": 1, "workers": 1}
    assert _default_problems({"type": "object", "properties": {"parallelism": node}}) == []
    node["default"] = {"tasks": 1, "workers": 1, "extra": 2}
    assert any(
        "extra" in p for p in _default_problems({"type": "object", "properties": {"parallelism": node}})
    )


def _minimal_manifests() -> list[dict[str, Any]]:
    """The smallest valid manifest of each kind in examples/ (fewest spec keys), as a user would write it."""
    from lmforge_jobs.manifest import load_yaml_documents

    smallest: dict[str, dict[str, Any]] = {}
    for path in sorted((ROOT / "examples").rglob("*.yaml")):
        for doc in load_yaml_documents(path.read_text()):
            if not isinstance(doc, dict) or doc.get("kind") not in KINDS:
                continue
            size = len(yaml.safe_dump(doc.get("spec", {})))
            if doc["kind"] not in smallest or size < smallest[doc["kind"]][0]:
                smallest[doc["kind"]] = (size, doc)
    return [doc for _, doc in smallest.values()]


@pytest.mark.parametrize("doc", _minimal_manifests(), ids=lambda d: d["kind"])
def test_stored_object_of_a_minimal_manifest_passes_every_rule(doc: dict[str, Any]) -> None:
    """Defaults applied recursively (as the API server stores the object), then schema and every rule."""
    from crdcheck import admission_errors

    assert admission_errors(doc) == []
