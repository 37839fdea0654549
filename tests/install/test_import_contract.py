"""Layers point one way: the operator never imports ML libraries; jobs never import the operator or kopf."""

from __future__ import annotations

import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from repo import ROOT

HEAVY = ("torch", "transformers", "datatrove", "trl", "peft")


def _modules(package: str) -> list[str]:
    pkg = __import__(package)
    return [package] + [
        m.name for m in pkgutil.walk_packages(pkg.__path__, package + ".") if not m.name.endswith("__main__")
    ]


def _imported_after(*groups: list[str]) -> list[set[str]]:
    """The top-level packages loaded in a fresh interpreter after it imported each group in turn."""
    code = "import sys, importlib\n"
    for modules in groups:
        code += f"for m in {modules!r}: importlib.import_module(m)\n"
        code += "print(' '.join(sorted({n.split('.')[0] for n in sys.modules})))\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [set(line.split()) for line in proc.stdout.splitlines()]


def _job_configs() -> list[str]:
    return [m for m in _modules("lmforge_jobs") if m.endswith((".config", ".spec", ".manifest"))]


@pytest.fixture(scope="module")
def light() -> dict[str, set[str]]:
    """One interpreter imports every operator module, then every job config module (one start, not two)."""
    operator, configs = _imported_after(_modules("lmforge_operator"), _job_configs())
    return {"operator": operator, "configs": configs}


def test_operator_imports_no_ml_library(light: dict[str, set[str]]) -> None:
    loaded = light["operator"]
    assert "lmforge_operator" in loaded
    assert loaded.isdisjoint(HEAVY), loaded & set(HEAVY)


def test_job_configs_are_light(light: dict[str, set[str]]) -> None:
    """The operator composes CRDs from the job configs, so those must stay import-light too."""
    assert len(_job_configs()) >= 6
    loaded = light["configs"]
    assert loaded.isdisjoint(HEAVY), loaded & set(HEAVY)


@pytest.mark.slow
def test_jobs_import_no_operator() -> None:
    """At run time, as import-linter's contract says statically (test_import_linter_contracts); slow: it
    imports every job module, torch, transformers, trl and datatrove with them."""
    (loaded,) = _imported_after(_modules("lmforge_jobs"))
    assert "lmforge_operator" not in loaded and "kopf" not in loaded


def test_import_linter_contracts() -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    proc = subprocess.run(
        [exe, "--config", str(ROOT / "pyproject.toml")], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 kept, 0 broken" in proc.stdout
