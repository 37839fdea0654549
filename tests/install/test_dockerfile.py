"""The Dockerfile's two targets against the package (console scripts, extras, job modules) and the chart
(image names, user, ports), and .dockerignore against what the Dockerfile copies. No Docker needed."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import yaml
from repo import ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

VALUES = yaml.safe_load((ROOT / "charts" / "lmforge" / "values.yaml").read_text())
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
JOB_MODULES = ("lmforge_jobs.data", "lmforge_jobs.pretrain", "lmforge_jobs.align", "lmforge_jobs.evaluate")


def parse_dockerfile(text: str) -> tuple[dict[str, str], dict[str, list[tuple[str, str]]], dict[str, str]]:
    """(global ARG defaults, {stage: [(INSTRUCTION, arguments)]}, {stage: base image}), continuations joined."""
    joined = re.sub(r"\\\n", " ", text)
    args: dict[str, str] = {}
    stages: dict[str, list[tuple[str, str]]] = {}
    bases: dict[str, str] = {}
    current: str | None = None
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest.strip(), re.I)
            assert match, f"every stage is named: {line}"
            current = match[2]
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], match[1])
            bases[current] = image
            stages[current] = []
        elif current is None:
            assert instruction == "ARG", line
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        else:
            stages[current].append((instruction, rest.strip()))
    return args, stages, bases


ARGS, STAGES, BASES = parse_dockerfile((ROOT / "Dockerfile").read_text())


def instr(stage: str, name: str) -> list[str]:
    return [rest for ins, rest in STAGES[stage] if ins == name]


def exec_form(stage: str, name: str) -> list[str]:
    (rest,) = instr(stage, name)[-1:]
    value = json.loads(rest)  # exec form only: a shell form would run under /bin/sh as PID 1
    assert isinstance(value, list)
    return value


def installed_extras(stage: str) -> set[str]:
    extras: set[str] = set()
    for run in instr(stage, "RUN"):
        for match in re.finditer(r"pip install [^&]*?\[([a-z,]+)\]", run):
            extras |= set(match[1].split(","))
    return extras


def test_targets_and_base_images() -> None:
    assert {"operator", "jobs"} <= set(STAGES)
    assert BASES["operator"].startswith("python:3.11")
    # The jobs image takes torch from its base; that version must satisfy the train extra.
    match = re.fullmatch(r"pytorch/pytorch:(\d+)\.(\d+)\.\d+-cuda[\d.]+-cudnn\d+-runtime", BASES["jobs"])
    assert match, BASES["jobs"]
    (torch_req,) = [
        r for r in PYPROJECT["project"]["optional-dependencies"]["train"] if re.match(r"torch\s*[<>=]", r)
    ]
    low = re.search(r">=(\d+)\.(\d+)", torch_req)
    assert low and (int(match[1]), int(match[2])) >= (int(low[1]), int(low[2]))


def test_operator_entrypoint_is_the_console_script() -> None:
    scripts = PYPROJECT["project"]["scripts"]
    entrypoint = exec_form("operator", "ENTRYPOINT")
    assert entrypoint == ["lmforge", "operator"]
    assert entrypoint[0] in scripts
    module, _, func = scripts[entrypoint[0]].partition(":")
    target = getattr(importlib.import_module(module), func)
    assert callable(target)
    from lmforge_operator.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert "operator" in sub.choices  # the subcommand the entrypoint names exists
    parser.parse_args(["operator", "--all-namespaces"])


def test_jobs_entrypoint_runs_the_job_modules() -> None:
    assert exec_form("jobs", "ENTRYPOINT") == ["python", "-m"]
    for module in JOB_MODULES:
        assert importlib.util.find_spec(f"{module}.__main__") is not None, (
            f"python -m {module} has no __main__"
        )
    cmd = instr("jobs", "CMD")
    if cmd:
        assert json.loads(cmd[-1])[0] in JOB_MODULES


def test_operator_commands_run_in_the_jobs_image() -> None:
    """Each command the operator gives a job pod starts with python or torchrun (both in the jobs image:
    the base's python, torch's console script) and runs one of the job modules with -m."""
    from lmforge_jobs.data.stages import stages
    from lmforge_jobs.manifest import load_resources
    from lmforge_operator import builders

    resources, problems = load_resources([ROOT / "examples" / "cluster"])
    assert problems == [] and resources
    seen = set()
    for resource in resources:
        # A Corpus runs one Job per stage; the others one Job.
        stage = stages(resource.spec)[0] if resource.kind == "Corpus" else None
        argv = builders.command(resource, builders.child_name(resource.metadata.name, "job"), stage)
        assert argv[0] in ("python", "torchrun"), argv
        module = argv[len(argv) - argv[::-1].index("-m")]  # the last -m: torchrun's launcher comes first
        assert module in JOB_MODULES, argv
        seen.add(module)
    assert seen == set(JOB_MODULES)


def test_extras_are_split_between_the_images() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    operator, jobs = installed_extras("operator"), installed_extras("jobs")
    assert operator == {"operator"}  # no torch, transformers or datatrove in the operator image
    # gcs: gs:// through fsspec in the cluster image; arena: the voting page the operator runs (arena.human);
    # tracking: MLflow client and TensorBoard for every job
    assert jobs == {"data", "train", "align", "eval", "arena", "gcs", "tracking"}
    assert (operator | jobs) <= set(extras)
    assert not any(re.match(r"(torch|transformers|datatrove)\b", r) for r in extras["operator"])


def test_images_match_the_chart() -> None:
    for stage, image in (("operator", VALUES["image"]), ("jobs", VALUES["jobs"]["image"])):
        labels = " ".join(instr(stage, "LABEL"))
        title = re.search(r'org\.opencontainers\.image\.title="([^"]+)"', labels)
        assert title and image["repository"].rsplit("/", 1)[1] == title[1]
        assert instr(stage, "USER")[-1] == "{runAsUser}:{runAsGroup}".format(**VALUES["podSecurityContext"])
    expose = {int(p) for e in instr("operator", "EXPOSE") for p in e.split()}
    assert {VALUES["operator"]["metricsPort"], VALUES["operator"]["livenessPort"]} <= expose
    from lmforge_jobs.telemetry import DEFAULT_PORT

    assert DEFAULT_PORT in {int(p) for e in instr("jobs", "EXPOSE") for p in e.split()}
    chart = yaml.safe_load((ROOT / "charts" / "lmforge" / "Chart.yaml").read_text())
    for stage in ("operator", "jobs"):
        (version,) = [r.split("=", 1)[1] for r in instr(stage, "ARG") if r.startswith("VERSION=")]
        assert version == chart["appVersion"] == PYPROJECT["project"]["version"]


# --------------------------------------------------------------------------------------- .dockerignore
def _pattern(p: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(p):
        if p.startswith("**", i):
            out, i = out + ".*", i + 2
        elif p[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif p[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(p[i]), i + 1
    return re.compile(out)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = _pattern(raw.lstrip("!").strip("/"))
        if any(pattern.fullmatch(c) for c in candidates):
            ignored = not negate
    return ignored


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def test_dockerignore_keeps_what_the_build_copies() -> None:
    patterns = _dockerignore()
    copied = [
        src
        for stage in STAGES
        for rest in instr(stage, "COPY")
        if "--from" not in rest
        for src in rest.split()[:-1]
    ]
    assert copied
    for src in copied:
        path = ROOT / src
        assert path.exists(), src
        files = [path] if path.is_file() else [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
        assert files
        for file in files:
            assert not dockerignored(file.relative_to(ROOT).as_posix(), patterns), file


@pytest.mark.parametrize(
    "path", [".venv/bin/python", ".git/HEAD", "tests/operator/test_chart.py", "lmforge-runs/x/progress.json",
             "operator/lmforge_operator/__pycache__/cli.cpython-311.pyc", ".ci/bin/helm", "charts/lmforge/Chart.yaml"],
)  # fmt: skip
def test_dockerignore_drops_the_rest(path: str) -> None:
    assert dockerignored(path, _dockerignore())
