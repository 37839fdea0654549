"""Every package the operator and the jobs import is declared in pyproject.toml, in the extra of the side
that imports it, and imports in this environment: a fresh install must not depend on what a dependency
happens to pull in, nor on which pip resolved it.

IMPORTS is the one table of what each extra must provide (module the code imports → the distribution
that provides it). The tests check it three ways: the code imports nothing third-party that the table
lacks, the table names nothing its extra does not declare, and everything in it is installed and imports
here (a failure names the package to install). Importing the ML extras loads torch, transformers, trl,
datatrove, spacy and mlflow, seconds each: the default suite imports the light extras and finds every
other module and its distribution; the slow pass imports them all."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

import pytest
from repo import ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS: dict[str, list[str]] = PYPROJECT["project"]["optional-dependencies"]
BASE = {"yaml": "pyyaml", "pydantic": "pydantic", "pydantic_core": "pydantic"}

IMPORTS: dict[str, dict[str, str]] = {
    "operator": {
        "kopf": "kopf",
        "aiohttp": "aiohttp",
        "prometheus_client": "prometheus-client",
        "optuna": "optuna",  # a Sweep's study (controller/sweeps.py, through lmforge_jobs.sweep.search)
        # a ScalingStudy's fit (controller/scaling_studies.py, through lmforge_jobs.scaling)
        "numpy": "numpy",
        "scipy": "scipy",
    },
    "run": {"rich": "rich", "matplotlib": "matplotlib", "torchx": "torchx-nightly"},
    "data": {
        "datatrove": "datatrove",
        # The extractor's path: datatrove → trafilatura → jusText → lxml.html.clean (lxml_html_clean).
        "trafilatura": "trafilatura",
        "lxml_html_clean": "lxml_html_clean",
        "inscriptis": "inscriptis",
        "warcio": "warcio",
        "resiliparse": "resiliparse",
        "fastwarc": "fastwarc",
        "cchardet": "faust-cchardet",
        "tldextract": "tldextract",
        "fasttext": "fasttext-numpy2-wheel",
        "fsspec": "fsspec",
        "s3fs": "s3fs",  # fsspec's s3:// (loaded by protocol name, not imported by the code)
        "multiprocess": "multiprocess",  # datatrove's process pool (its workers die with the job)
        "spacy": "spacy",
        "tokenizers": "tokenizers",
        "prometheus_client": "prometheus-client",
    },
    "train": {
        "torch": "torch",
        "numpy": "numpy",
        "scipy": "scipy",
        "tokenizers": "tokenizers",
        "fsspec": "fsspec",
        "s3fs": "s3fs",
        "torchx": "torchx-nightly",
        "transformers": "transformers",
        "safetensors": "safetensors",
        "huggingface_hub": "huggingface-hub",
        "pynvml": "nvidia-ml-py",
        "prometheus_client": "prometheus-client",
    },
    "align": {"trl": "trl", "peft": "peft", "datasets": "datasets", "pyarrow": "pyarrow"},
    "eval": {"lm_eval": "lm-eval", "datasets": "datasets", "pyarrow": "pyarrow"},
    "arena": {
        "starlette": "starlette",
        "uvicorn": "uvicorn",
        "sqlalchemy": "sqlalchemy",
        "multipart": "python-multipart",  # starlette's form parser, imported by it when a form is read
        "jinja2": "jinja2",
        "numpy": "numpy",
        "fsspec": "fsspec",  # --results in object storage
        "s3fs": "s3fs",
    },
    "sweep": {"optuna": "optuna"},
    "tracking": {"mlflow": "mlflow-skinny", "tensorboard": "tensorboard"},
    "wandb": {"wandb": "wandb"},  # imported only when WANDB_MODE=offline
    "fp8": {"torchao": "torchao"},  # imported only when a PretrainRun asks for precision fp8 on a GPU
}
# Extras CI does not install (GPU-only, or opt-in like wandb); their imports are declared and tabled but
# not imported here.
NOT_INSTALLED = {"fp8", "wandb"}
# Imported through a declared package on a path the jobs take; checked to import, not to be declared.
TRANSITIVE = {"data": {"justext": "jusText", "lxml.html.clean": "lxml_html_clean"}}
SIDES = {
    "operator": ("operator", "run"),
    "jobs": ("data", "train", "align", "eval", "arena", "sweep", "fp8", "tracking", "wandb"),
}


def _name(requirement: str) -> str:
    """The normalized distribution name of a requirement string (PEP 503)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match[1]).lower()


def declared(extra: str) -> set[str]:
    """Distributions an extra declares, with the lmforge[...] extras it includes."""
    names: set[str] = set()
    for requirement in EXTRAS[extra]:
        if _name(requirement) == "lmforge":
            inner = re.search(r"\[([^\]]+)\]", requirement)
            assert inner, requirement
            for other in inner[1].split(","):
                names |= declared(other.strip())
        else:
            names.add(_name(requirement))
    return names


def code_imports(package_dir: Path) -> set[str]:
    """Top-level names of the third-party modules a package's source imports, anywhere in a file."""
    found: set[str] = set()
    for path in package_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and not m.startswith("lmforge_")}


@pytest.mark.parametrize(
    ("side", "package_dir"),
    [("operator", ROOT / "operator" / "lmforge_operator"), ("jobs", ROOT / "jobs" / "lmforge_jobs")],
)
def test_every_import_of_the_code_is_in_the_table(side: str, package_dir: Path) -> None:
    tabled = set(BASE) | {m.split(".")[0] for extra in SIDES[side] for m in IMPORTS[extra]}
    missing = sorted(code_imports(package_dir) - tabled)
    assert not missing, f"{package_dir.name} imports {missing}: add each to IMPORTS and to its extra"


@pytest.mark.parametrize("extra", sorted(IMPORTS))
def test_the_extra_declares_what_it_must_provide(extra: str) -> None:
    undeclared = sorted({_name(d) for d in IMPORTS[extra].values()} - declared(extra))
    assert not undeclared, f"pyproject.toml's {extra!r} extra does not declare {undeclared}"


def test_base_dependencies_are_declared() -> None:
    base = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert {_name(d) for d in BASE.values()} <= base


def _installed(extra: str) -> None:
    if extra in NOT_INSTALLED:
        pytest.skip(f"CI does not install the {extra} extra (GPU images or opt-in)")


@pytest.mark.parametrize("extra", sorted(IMPORTS))
def test_the_extra_is_installed(extra: str) -> None:
    """Every module of the extra is found here, and the distribution the table names for it is installed."""
    _installed(extra)
    failures = []
    for module, dist in {**IMPORTS[extra], **TRANSITIVE.get(extra, {})}.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError as exc:  # a dotted module whose parent package is missing
            found, dist = False, f"{dist} (missing: {exc.name})"
        if not found:
            failures.append(f"{module}: not found — pip install {dist}")
            continue
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            failures.append(f"{module}: its distribution {dist} is not installed — pip install {dist}")
    assert not failures, f"the {extra!r} extra is not installed:\n" + "\n".join(failures)


# Importing these loads torch, transformers, trl, datatrove, spacy or mlflow (seconds each); the slow pass
# imports them, the default suite finds them (test_the_extra_is_installed).
HEAVY_IMPORTS = {"align", "arena", "data", "eval", "tracking", "train"}


@pytest.mark.parametrize(
    "extra",
    [pytest.param(e, marks=pytest.mark.slow) if e in HEAVY_IMPORTS else e for e in sorted(IMPORTS)],
)
def test_the_extra_imports(extra: str) -> None:
    _installed(extra)
    failures = []
    for module, dist in {**IMPORTS[extra], **TRANSITIVE.get(extra, {})}.items():
        try:
            importlib.import_module(module)
        except ImportError as exc:
            # A module missing deeper down (a dependency's dependency) is named too.
            deeper = f" (missing: {exc.name})" if exc.name and exc.name != module else ""
            failures.append(f"{module}: pip install {dist}{deeper} — {exc}")
    assert not failures, f"the {extra!r} extra's imports fail:\n" + "\n".join(failures)


HTML = "<html><body><p>hello world</p></body></html>"


def test_trafilatura_extracts() -> None:
    """The corpus job's extractor path, which imports lxml.html.clean only when it first extracts."""
    import trafilatura

    assert "hello world" in (trafilatura.extract(HTML) or "")


def test_datatrove_trafilatura_extractor_extracts() -> None:
    from datatrove.pipeline.extractors import Trafilatura

    extractor = Trafilatura(favour_precision=False, timeout=10)
    assert "hello world" in (extractor.extract(HTML) or "")
