"""Every spec rule refuses a bad manifest twice: in `lmforge validate` (naming the field) and in the CRD
(OpenAPI schema or CEL rule), as the API server would at admission."""

from __future__ import annotations

import pytest
import yaml
from bad_manifests import BASE, CASES, manifest
from crdcheck import admission_errors

from lmforge_operator.cli import main


def _crd_names_field(errors: list[str], field: str) -> bool:
    """An admission error sits at the field, or at an ancestor and names the field in its message."""
    last = field.rsplit(".", 1)[-1].split("[")[0]
    for err in errors:
        path, _, message = err.partition(": ")
        path = path.lstrip(".")
        if path == field or (field.startswith(path) and (last in message or path == field.rsplit(".", 1)[0])):
            return True
    return False


def test_enough_cases() -> None:
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("case", "kind", "patch", "field", "by_crd"), CASES, ids=[c[0] for c in CASES])
def test_refused_with_field_path(tmp_path, capsys, case, kind, patch, field, by_crd) -> None:
    doc = manifest(kind, patch)
    path = tmp_path / f"{case}.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{kind}/bad: {field}:" in err, err
    assert "Traceback" not in err
    errors = admission_errors(doc)
    if by_crd:
        assert errors, "the CRD accepted an invalid resource"
        assert _crd_names_field(errors, field), errors
    else:
        assert errors == []  # documented gap: only validate and the operator catch it


@pytest.mark.parametrize("kind", list(BASE))
def test_base_manifests_are_valid(tmp_path, capsys, kind) -> None:
    doc = manifest(kind, {}, name="good")
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    assert admission_errors(doc) == []


@pytest.mark.parametrize("name", ["Bad_Name", "9starts-with-digit", "x" * 41])
def test_bad_names(tmp_path, capsys, name) -> None:
    doc = manifest("Evaluation", {}, name=name)
    path = tmp_path / "n.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["validate", str(path)]) == 1
    assert "metadata.name" in capsys.readouterr().err
    assert any("metadata.name" in e for e in admission_errors(doc))


def test_credentials_in_a_uri_are_not_echoed(tmp_path, capsys) -> None:
    doc = manifest("AlignmentRun", {"spec.dataset.path": "https://user:hunter2@example.com/prefs.jsonl"})
    path = tmp_path / "creds.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert "spec.dataset.path" in err and "Secret" in err
    assert "hunter2" not in err


@pytest.mark.parametrize(
    ("patch", "kind"),
    [
        ({"spec.resources": {"cpu": "500m", "memory": "16Gi", "ephemeralStorage": "0.5Ti"}}, "Corpus"),
        ({"spec.resources": {"cpu": 4, "gpu": 8}}, "PretrainRun"),
        ({"spec.image": "registry.example:5000/team/lmforge-jobs:0.1.0-rc.1"}, "Evaluation"),
        ({"spec.image": "lmforge-jobs@sha256:" + "a" * 64}, "AlignmentRun"),
        (
            {"spec.output": "pvc://lmforge-storage/runs/./x..y/...", "spec.optimizer": {"warmupSteps": 1000}},
            "PretrainRun",
        ),
        ({"spec.dataset.path": "hf://datasets/org/prefs@main/train.jsonl"}, "AlignmentRun"),
    ],
)
def test_what_the_new_rules_still_accept(tmp_path, capsys, patch, kind) -> None:
    doc = manifest(kind, patch, name="good")
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    assert admission_errors(doc) == []
