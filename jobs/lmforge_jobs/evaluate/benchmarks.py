"""lm-evaluation-harness benchmarks: registered task names and task YAML files (``spec.benchmarks``).

Each entry runs through ``lm_eval.simple_evaluate`` on the already loaded model (``HFLM(pretrained=model)``),
one call per entry so that ``numFewshot`` and ``limit`` apply to that entry alone and the results of the
entries before a failing one are kept.

A task file (``taskPath``) is copied with the other YAML/Python files of its directory (``include:`` and
``!function`` keep working) into a scratch directory, and the copy's relative data paths — ``dataset_kwargs``
``data_files``/``data_dir`` and a ``dataset_path`` that names a local file or directory — are rewritten to
absolute paths next to the original file: lm-eval itself would resolve them against the working
directory. Task files on object storage (s3://, gs:// through :mod:`lmforge_jobs.storage`) are fetched the
same way, with their relative data files copied into the scratch directory.

Results are ``{task: {metric: value}}``, one entry per task lm-eval reports (a group reports itself and its
subtasks); a metric computed after a filter other than ``none`` is named ``<metric>_<filter>``, standard
errors ``<metric>_stderr``.
"""

from __future__ import annotations

import difflib
import logging
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from lmforge_jobs import storage
from lmforge_jobs.entry import ConfigError
from lmforge_jobs.evaluate.config import Benchmark

SIDE_FILES = ("*.yaml", "*.yml", "*.py", "_*")


# ------------------------------------------------------------------------------------------- YAML I/O
class _TaskLoader(yaml.SafeLoader):
    """Reads lm-eval task YAML, keeping ``!function`` tags as they are."""


class FunctionTag(str):
    """The value of a ``!function module.name`` tag."""


def _function(loader: yaml.SafeLoader, node: yaml.Node) -> FunctionTag:
    return FunctionTag(loader.construct_scalar(node))  # type: ignore[arg-type]


_TaskLoader.add_constructor("!function", _function)


class _TaskDumper(yaml.SafeDumper):
    pass


_TaskDumper.add_representer(FunctionTag, lambda d, v: d.represent_scalar("!function", str(v)))


def read_task_yaml(path: Path, field: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(field, f"cannot read the task file {path}: {exc}") from exc
    return parse_task_yaml(text, str(path), field)


def parse_task_yaml(text: str, where: str, field: str) -> dict[str, Any]:
    try:
        doc = yaml.load(text, Loader=_TaskLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(field, f"cannot read the task file {where}: {exc}") from exc
    if not isinstance(doc, dict) or not (doc.get("task") or doc.get("group")):
        raise ConfigError(field, f"{where} is not an lm-eval task file (no task or group key)")
    return doc


def task_name(doc: Mapping[str, Any]) -> str:
    """The name lm-eval registers for a task file: its task, else its group."""
    name = doc.get("task") or doc.get("group")
    if isinstance(name, list):  # a file listing several tasks
        name = name[0]
    if isinstance(name, dict):
        name = name.get("task") or name.get("group")
    return str(name)


# ------------------------------------------------------------------------------------- data path rewrite
def _looks_relative(value: str) -> bool:
    return not (value.startswith(("/", "~")) or "://" in value)


def _resolve_data(value: str, base: str, scratch: Path, field: str) -> str:
    """Absolute location of a data path written relative to the task file's directory ``base``: the local
    file itself, or a copy in ``scratch`` of one on object storage."""
    if not _looks_relative(value):
        return value
    if not storage.is_remote(base):
        path = (Path(base) / value).resolve()
        if not glob_exists(path):
            raise ConfigError(field, f"data file {value} of the task (looked for {path}) does not exist")
        return str(path)
    remote = storage.join(base, value)
    target = scratch / "data" / value
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fs, path = storage.filesystem(remote)
        fs.get(path, str(target), recursive=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(field, f"data file {value} of the task: {storage.describe(exc, remote)}") from None
    return str(target)


def glob_exists(path: Path) -> bool:
    import glob

    return bool(glob.glob(str(path))) if glob.has_magic(str(path)) else path.exists()


def rewrite_data_paths(doc: dict[str, Any], base: str, scratch: Path, field: str) -> dict[str, Any]:
    """``doc`` with relative data paths made absolute (relative to ``base``, the task file's directory)."""
    kwargs = doc.get("dataset_kwargs")
    if isinstance(kwargs, dict):
        files = kwargs.get("data_files")
        if isinstance(files, str):
            kwargs["data_files"] = _resolve_data(files, base, scratch, field)
        elif isinstance(files, list):
            kwargs["data_files"] = [_resolve_data(str(f), base, scratch, field) for f in files]
        elif isinstance(files, dict):
            kwargs["data_files"] = {
                split: (
                    [_resolve_data(str(f), base, scratch, field) for f in value]
                    if isinstance(value, list)
                    else _resolve_data(str(value), base, scratch, field)
                )
                for split, value in files.items()
            }
        if isinstance(kwargs.get("data_dir"), str):
            kwargs["data_dir"] = _resolve_data(kwargs["data_dir"], base, scratch, field)
    dataset_path = doc.get("dataset_path")
    if isinstance(dataset_path, str) and dataset_path.startswith(("./", "../")):
        doc["dataset_path"] = _resolve_data(dataset_path, base, scratch, field)
    return doc


def _task_file(uri: str, field: str) -> tuple[Any, str]:
    """(filesystem, path) of an existing task file; a ConfigError naming ``field`` otherwise."""
    fs, path = storage.filesystem(uri)
    try:
        found = fs.isfile(path)
    except (OSError, ValueError) as exc:
        raise storage.config_error(field, exc, uri) from None
    if not found:
        storage.require(uri, field)  # access denied, a missing bucket or a missing object
        raise ConfigError(field, f"task file {storage.to_uri(fs, path)} is not a file")
    return fs, path


def prepare_task_file(uri: str, field: str, scratch: Path) -> tuple[str, str]:
    """Copy a task file (and its sibling YAML/Python files) to ``scratch`` with absolute data paths.

    Returns (path of the copied task file, task name)."""
    scratch.mkdir(parents=True, exist_ok=True)
    fs, path = _task_file(uri, field)
    parent, _, name = path.rpartition("/")
    base = storage.to_uri(fs, parent)
    copied = scratch / name
    try:
        for pattern in SIDE_FILES:
            for sibling in fs.glob(f"{parent}/{pattern}"):
                if fs.isfile(sibling):
                    fs.get_file(sibling, str(scratch / sibling.rsplit("/", 1)[-1]))
        fs.get_file(path, str(copied))
    except (OSError, ValueError) as exc:
        raise storage.config_error(field, exc, uri) from None
    # every YAML file in the directory may be included by the task: rewrite them all
    for path_ in sorted(scratch.glob("*.y*ml")):
        try:
            doc = yaml.load(path_.read_text(encoding="utf-8"), Loader=_TaskLoader)
        except yaml.YAMLError:
            if path_ == copied:
                raise
            continue
        if isinstance(doc, dict):
            doc = rewrite_data_paths(doc, base, scratch, field)
            path_.write_text(yaml.dump(doc, Dumper=_TaskDumper, sort_keys=False), encoding="utf-8")
    doc = read_task_yaml(copied, field)
    return str(copied), task_name(doc)


def check_task_path(uri: str, field: str) -> None:
    """Fail fast when a task file (local or on object storage) is missing or not an lm-eval task."""
    fs, path = _task_file(uri, field)
    try:
        text = bytes(fs.cat_file(path)).decode("utf-8")
    except (OSError, ValueError) as exc:
        raise storage.config_error(field, exc, uri) from None
    parse_task_yaml(text, uri, field)


# ------------------------------------------------------------------------------------------------- run
def flatten_results(results: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """lm-eval's ``{task: {"acc,none": 0.3, "acc_stderr,none": 0.1, ...}}`` as ``{task: {acc: 0.3, ...}}``."""
    out: dict[str, dict[str, float]] = {}
    for task, values in results.items():
        metrics: dict[str, float] = {}
        for key, value in values.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("none", "") else f"{metric}_{re.sub(r'[^A-Za-z0-9_.-]', '_', filt)}"
            if value == value:  # NaN is not a result
                metrics[name] = float(value)
        if metrics:
            out[str(task)] = dict(list(metrics.items())[:64])
    return out


_DATA_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, ConnectionError)


def _data_errors() -> tuple[type[BaseException], ...]:
    errors = list(_DATA_ERRORS)
    try:
        from datasets.exceptions import DatasetNotFoundError

        errors.append(DatasetNotFoundError)
    except ImportError:  # pragma: no cover - datasets always comes with lm-eval
        pass
    return tuple(errors)


_DEFAULT_MANAGER: list[Any] = []


def default_task_manager() -> Any:
    """lm-eval's registry of built-in tasks, indexed once per process (it reads thousands of YAML files)."""
    from lm_eval.tasks import TaskManager

    if not _DEFAULT_MANAGER:
        _DEFAULT_MANAGER.append(TaskManager())
    return _DEFAULT_MANAGER[0]


def run_benchmark(
    bench: Benchmark,
    index: int,
    lm: Any,
    scratch: Path,
    *,
    bootstrap_iters: int = 1000,
) -> dict[str, dict[str, float]]:
    """Run one ``spec.benchmarks[index]`` entry on the HFLM ``lm``; ``{task: {metric: value}}``."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    tokenizer = getattr(lm, "tokenizer", None)
    if bench.apply_chat_template and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"benchmarks[{index}].applyChatTemplate", "the model's tokenizer has no chat template"
        )
    if bench.task_path is not None:
        field = f"benchmarks[{index}].taskPath"
        spec, _ = prepare_task_file(bench.task_path, field, scratch / f"task-{index}")
        manager = TaskManager(include_path=str(Path(spec).parent), include_defaults=False)
    else:
        field = f"benchmarks[{index}].task"
        spec = str(bench.task)
        manager = default_task_manager()
        if spec not in manager.all_tasks:
            close = difflib.get_close_matches(spec, manager.all_tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(field, f"lm-eval has no task or group named {spec!r}{hint}")
    try:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=[spec],
            num_fewshot=bench.num_fewshot,
            limit=bench.limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=bootstrap_iters,
            apply_chat_template=bench.apply_chat_template,
            fewshot_as_multiturn=bench.apply_chat_template,
        )
    except BaseException as exc:
        print(file=sys.stderr, flush=True)  # end lm-eval's progress bar line before the error line
        if isinstance(exc, _data_errors()):
            raise ConfigError(
                field, f"cannot load the task or its data: {type(exc).__name__}: {exc}"
            ) from exc
        if isinstance(exc, AssertionError):  # lm-eval asserts that every scored continuation fits the context
            raise ConfigError(
                field,
                f"lm-eval refused the task for this model ({str(exc) or 'a failed assertion'}): typically an "
                f"answer longer than the model's context of {getattr(lm, 'max_length', '?')} tokens",
            ) from exc
        raise
    if not out or not out.get("results"):
        raise ConfigError(field, "lm-eval returned no results for this task")
    return flatten_results(out["results"])


def make_lm(model: Any, tokenizer: Any, batch_size: int) -> Any:
    """The lm-eval wrapper of an already loaded Hugging Face causal LM."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


__all__ = [
    "check_task_path",
    "flatten_results",
    "make_lm",
    "prepare_task_file",
    "read_task_yaml",
    "rewrite_data_paths",
    "run_benchmark",
]
