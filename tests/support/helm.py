"""The helm binary the chart tests run, and `helm template` of the chart with given values.

helm comes from `.ci/get-helm.sh` (or LMFORGE_HELM, or PATH); without one a test is skipped locally and
fails under CI=true, where it must exist. helm writes config, cache and registry data under HOME, so
every run gets a private writable one.

A render is a pure function of the chart and the values: :func:`helm_template` runs helm once per values
(and binary) in a test process and answers repeats from memory; :func:`render` parses a render once (with
libyaml) and hands every caller its own copy of the objects, so tests never see each other's edits.
"""

from __future__ import annotations

import atexit
import copy
import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from repo import ROOT

CHART = ROOT / "charts" / "lmforge"
RELEASE, NAMESPACE = "lmforge", "lmforge-system"
MISSING = "no helm binary: run `bash .ci/get-helm.sh` or set LMFORGE_HELM (see DEVELOPERS.md)"


def helm_binary(root: Path = ROOT) -> str | None:
    for candidate in (
        os.environ.get("LMFORGE_HELM"),
        str(root / ".ci" / "bin" / "helm"),
        shutil.which("helm"),
    ):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def require_helm(root: Path = ROOT) -> str:
    """The helm binary; without one, skip locally but fail under CI=true (CI installs it first)."""
    binary = helm_binary(root)
    if binary is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(MISSING)
        pytest.skip(MISSING)
    return binary


@functools.lru_cache(maxsize=1)
def helm_env() -> dict[str, str]:
    """The environment helm runs in: a private HOME and none of the caller's HELM_* settings."""
    home = tempfile.mkdtemp(prefix="lmforge-helm-")
    atexit.register(shutil.rmtree, home, True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELM_")}
    env.update(
        HOME=home,
        HELM_CONFIG_HOME=f"{home}/config",
        HELM_CACHE_HOME=f"{home}/cache",
        HELM_DATA_HOME=f"{home}/data",
    )
    return env


def run_helm(helm: str, *args: str, timeout: int = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm, *args], capture_output=True, text=True, env=helm_env(), timeout=timeout, check=False
    )


@functools.cache
def _template(helm: str, values_json: str) -> subprocess.CompletedProcess[str]:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        yaml.safe_dump(json.loads(values_json), fh)
    try:
        return run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--values", fh.name)
    finally:
        os.unlink(fh.name)


def _key(values: dict[str, Any] | None) -> str:
    return json.dumps(values or {}, sort_keys=True)


def helm_template(values: dict[str, Any], helm: str | None = None) -> subprocess.CompletedProcess[str]:
    """`helm template` of the chart with ``values`` (the values schema is checked by helm); run once per
    values in a test process, a fresh CompletedProcess for every caller."""
    proc = _template(helm or require_helm(), _key(values))
    return subprocess.CompletedProcess(list(proc.args), proc.returncode, proc.stdout, proc.stderr)


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.cache
def _objects(helm: str, values_json: str) -> list[dict[str, Any]]:
    proc = _template(helm, values_json)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.load_all(proc.stdout, Loader=_LOADER) if doc]


def render(values: dict[str, Any] | None = None, helm: str | None = None) -> list[dict[str, Any]]:
    """The chart's objects for ``values`` (helm template; the schema check included): a copy of its own
    for every caller."""
    return copy.deepcopy(_objects(helm or require_helm(), _key(values)))


def render_without_crds(
    values: dict[str, Any] | None = None, helm: str | None = None
) -> list[dict[str, Any]]:
    """:func:`render` with ``crds.install: false``: every object but the CRDs, which are most of helm's
    work. crds.install gates only templates/crds.yaml (test_chart checks the rest is unchanged)."""
    values = dict(values or {})
    values["crds"] = {**values.get("crds", {}), "install": False}
    return render(values, helm)


def _leaves(values: Any, path: str = "") -> list[str]:
    """JSON pointers of the leaves of ``values`` (helm's error locations: '/image/digest', '/a/0')."""
    if isinstance(values, dict) and values:
        return [leaf for key, sub in values.items() for leaf in _leaves(sub, f"{path}/{key}")]
    if isinstance(values, list) and values:
        return [leaf for i, sub in enumerate(values) for leaf in _leaves(sub, f"{path}/{i}")]
    return [path]


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(out.get(key), dict) else value
    return out


def _overlap(a: list[str], b: list[str]) -> bool:
    return any(x == y or x.startswith(y + "/") or y.startswith(x + "/") for x in a for y in b)


SCHEMA_REFUSED = "values don't meet the specifications of the schema"
_LOCATED = re.compile(r"^\s*- at '([^']*)': (.*)$", re.M)


def schema_refusals(cases: list[dict[str, Any]], helm: str | None = None) -> list[list[str]]:
    """helm's schema errors about each of ``cases`` (values the chart must refuse): the lines located at one
    of a case's leaves, or above it naming the leaf's key. helm reports every violation of a values file,
    so the cases that set different keys share one render; a case the schema accepts gets no line."""
    groups: list[list[int]] = []
    for i, case in enumerate(cases):
        for group in groups:
            if not any(_overlap(_leaves(case), _leaves(cases[j])) for j in group):
                group.append(i)
                break
        else:
            groups.append([i])
    found: list[list[str]] = [[] for _ in cases]
    for group in groups:
        merged: dict[str, Any] = {}
        for i in group:
            merged = _merge(merged, cases[i])
        err = template_error(merged, helm)
        assert SCHEMA_REFUSED in err, err
        located = _LOCATED.findall(err)
        for i in group:
            for leaf in _leaves(cases[i]):
                key = leaf.rsplit("/", 1)[-1]
                found[i] += [
                    f"at '{at}': {message}"
                    for at, message in located
                    if at == leaf or (leaf.startswith(at + "/") and f"'{key}'" in message)
                ]
    return found


def template_error(values: dict[str, Any], helm: str | None = None) -> str:
    """helm's error output for ``values`` the chart refuses (fails the test when it accepts them)."""
    proc = _template(helm or require_helm(), _key(values))
    assert proc.returncode != 0, f"helm template accepted {values}"
    return proc.stderr


__all__ = [
    "CHART",
    "NAMESPACE",
    "RELEASE",
    "helm_binary",
    "helm_env",
    "helm_template",
    "render",
    "render_without_crds",
    "require_helm",
    "run_helm",
    "schema_refusals",
    "template_error",
]
