"""The quick start's setup (.ci/setup, which ./quickstart and .ci/run share) on a machine that has nothing
but Python: a venv made by `python -m venv`, with the pip that interpreter bundles and nobody upgraded.
Afterwards the corpus job's extractor works in that venv, every extra imports, and `lmforge` runs.

Needs the package registries; with a warm pip cache it takes a few minutes (marked slow)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from repo import ROOT

pytestmark = pytest.mark.slow

EXTRACT = """
from datatrove.pipeline.extractors import Trafilatura
import trafilatura
html = "<html><body><p>hello world</p></body></html>"
assert "hello world" in (trafilatura.extract(html) or ""), trafilatura.extract(html)
assert "hello world" in (Trafilatura(timeout=10).extract(html) or "")
"""


def _env() -> dict[str, str]:
    """This process's environment without what would make the fresh venv see another one's packages."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def _run(argv: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=_env(), **kwargs)
    assert proc.returncode == 0, (
        f"{argv} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return proc


def test_setup_from_a_bare_venv(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    # As a newcomer gets it: the interpreter's bundled pip (23.2 for Python 3.11), not upgraded by hand.
    _run([sys.executable, "-m", "venv", str(venv)], timeout=300)
    python = str(venv / "bin" / "python")
    bundled = _run([python, "-m", "pip", "--version"], timeout=60).stdout
    print("bundled:", bundled)

    setup = _run(["bash", str(ROOT / ".ci" / "setup"), str(venv)], timeout=1800)
    assert "setup: done" in setup.stdout, setup.stdout
    assert (venv / ".lmforge-setup").is_file()

    _run([python, "-c", EXTRACT], timeout=300)
    # Every extra's imports, in the new venv (its own pytest, from the dev extra).
    _run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/install/test_dependencies.py"],
        timeout=600,
        cwd=ROOT,
    )
    lmforge = _run([str(venv / "bin" / "lmforge"), "--help"], timeout=120)
    assert "run" in lmforge.stdout

    # A second setup finds nothing to do.
    again = _run(["bash", str(ROOT / ".ci" / "setup"), str(venv)], timeout=120)
    assert "up to date" in again.stdout, again.stdout
    shutil.rmtree(venv, ignore_errors=True)
