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


def _imported_after(modules: list[str]) -> set[str]:
    code = (
        "import sys, importlib\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print('\\n'.join(sorted({n.split('.')[0] for n in sys.modules})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(proc.stdout.split())


def test_operator_imports_no_ml_library() -> None:
    loaded = _imported_after(_modules("lmforge_operator"))
    assert "lmforge_operator" in loaded
    assert loaded.isdisjoint(HEAVY), loaded & set(HEAVY)


def test_job_configs_are_light() -> None:
    """The operator composes CRDs from the job configs, so those must stay import-light too."""
    configs = [m for m in _modules("lmforge_jobs") if m.endswith((".config", ".spec", ".manifest"))]
    assert len(configs) >= 6
    loaded = _imported_after(configs)
    assert loaded.isdisjoint(HEAVY), loaded & set(HEAVY)


@pytest.mark.slow
def test_jobs_import_no_operator() -> None:
    """At run time, as import-linter's contract says statically (test_import_linter_contracts); slow: it
    imports every job module, torch, transformers, trl and datatrove with them."""
    loaded = _imported_after(_modules("lmforge_jobs"))
    assert "lmforge_operator" not in loaded and "kopf" not in loaded


def test_import_linter_contracts() -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    proc = subprocess.run(
        [exe, "--config", str(ROOT / "pyproject.toml")], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 kept, 0 broken" in proc.stdout
