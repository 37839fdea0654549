"""`lmforge validate` on files, directories, YAML errors and the examples."""

from __future__ import annotations

import subprocess
import sys

from repo import ROOT

from lmforge_operator.cli import main


def test_examples_validate(capsys) -> None:
    assert main(["validate", str(ROOT / "examples")]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    for ref in ("Corpus/", "PretrainRun/", "AlignmentRun/", "Evaluation/"):
        assert ref in out


def test_examples_pass_crd_admission() -> None:
    from crdcheck import admission_errors

    from lmforge_jobs.manifest import iter_manifest_files, load_yaml_documents

    checked = 0
    for file in iter_manifest_files([ROOT / "examples"]):
        for doc in load_yaml_documents(file.read_text()):
            if isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith("lmforge.io/"):
                assert admission_errors(doc) == [], file
                checked += 1
    assert checked >= 10


def test_invalid_yaml_and_missing_file(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [unclosed\n")
    assert main(["validate", str(bad), str(tmp_path / "missing.yaml")]) == 1
    err = capsys.readouterr().err
    assert "invalid YAML" in err and "no such file" in err


def test_duplicates_and_multi_document(tmp_path, capsys) -> None:
    doc = (
        "apiVersion: lmforge.io/v1alpha1\nkind: Evaluation\nmetadata: {name: e}\n"
        "spec: {model: {huggingface: org/m}, benchmarks: [{task: hellaswag}]}\n"
    )
    (tmp_path / "a.yaml").write_text(doc + "---\n" + doc)
    assert main(["validate", str(tmp_path)]) == 1
    assert "duplicate Evaluation/e" in capsys.readouterr().err


def test_no_resources_is_an_error(tmp_path, capsys) -> None:
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    assert main(["validate", str(tmp_path)]) == 1


def test_console_script_never_prints_a_traceback(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: lmforge.io/v1alpha1\nkind: PretrainRun\nmetadata: {name: p}\n"
        "spec: {corpus: {name: c}, model: {hidden: 100, heads: 3}}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge_operator", "validate", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "PretrainRun/p: spec.model.hidden:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_internal_errors_are_one_line(monkeypatch, capsys) -> None:
    import lmforge_jobs.manifest as manifest

    def boom(paths):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(manifest, "load_resources", boom)
    monkeypatch.delenv("LMFORGE_DEBUG", raising=False)
    assert main(["validate", "x.yaml"]) == 70
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: simulated bug" in err and "Traceback" not in err
