"""AlignmentRun data: read JSONL / Parquet / hub records, check their shape up front, split off a held-out part.

Every record is checked before any model is loaded: a record that lacks a key of its format fails the job
with one line naming the key, the format, the file and the line (``spec.dataset.path: sft.jsonl line 7:
missing key "messages" (format messages needs messages)``), exit code 64.

Records are turned into the conversational shapes TRL understands, so the model's chat template is applied
consistently by every method (a model trained by sft is prompted the same way by dpo and ppo):

=================  =========================================================================================
format             TRL record
=================  =========================================================================================
messages           ``{prompt: [turns before the last assistant turn], completion: [last assistant turn]}``
promptCompletion   ``{prompt: [{user: prompt}], completion: [{assistant: completion}]}``
preference         ``{prompt: [{user: prompt}], chosen: [{assistant: …}], rejected: [{assistant: …}]}``
prompts            ``{prompt: [{user: prompt}]}``
=================  =========================================================================================

String fields may also be given already as lists of ``{role, content}`` turns.

``dataset.path`` (and ``synthetic.prompts``) is a file, a directory of them or a glob, local or on object
storage (through :mod:`lmforge_jobs.storage`; ``.gz`` files are decompressed); access denied, a missing
bucket or no files there are a ConfigError naming the field.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge_jobs import storage
from lmforge_jobs.align.config import Dataset, DatasetFormat
from lmforge_jobs.entry import ConfigError

REQUIRED_KEYS: dict[DatasetFormat, tuple[str, ...]] = {
    DatasetFormat.messages: ("messages",),
    DatasetFormat.prompt_completion: ("prompt", "completion"),
    DatasetFormat.preference: ("prompt", "chosen", "rejected"),
    DatasetFormat.prompts: ("prompt",),
}
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Split:
    """Training and held-out records in TRL's conversational shape."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]


DATA_EXTENSIONS = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")


def _files(path: str, field: str) -> list[str]:
    """The data files at a local path or URI: a file, a directory of them, or a glob."""
    storage.check_bucket(path, field)
    try:
        fs, root = storage.filesystem(path)
        if any(ch in root for ch in "*?["):
            names = fs.glob(root)
        elif fs.isdir(root):
            names = [n for n in fs.ls(root, detail=False) if n.endswith(DATA_EXTENSIONS)]
        else:
            names = [root] if fs.exists(root) else []
    except (OSError, ValueError, ImportError) as exc:
        raise storage.config_error(field, exc, path) from None
    found = sorted(storage.to_uri(fs, n) for n in names)
    if not found:
        raise ConfigError(field, f"no JSONL or Parquet files at {path}")
    return found


def _open(path: str, mode: str) -> Any:
    """A data file opened through the storage layer (``.gz`` decompressed)."""
    text = {"encoding": "utf-8"} if "t" in mode else {}
    fs, p = storage.filesystem(path)
    return fs.open(p, mode, compression="infer", **text)


def _read_file(path: str, field: str) -> Iterator[tuple[str, int, Any]]:
    """(file name, 1-based line or row number, record) of one data file."""
    try:
        yield from _records(path, field)
    except OSError as exc:
        raise storage.config_error(field, exc, path) from None


def _records(path: str, field: str) -> Iterator[tuple[str, int, Any]]:
    name = os.path.basename(path)
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        with _open(path, "rb") as fh:
            table = pq.read_table(fh)
        for i, row in enumerate(table.to_pylist(), start=1):
            yield name, i, row
        return
    with _open(path, "rt") as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield name, i, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(field, f"{name} line {i}: not valid JSON ({exc.msg})") from None


def _read_hub(path: str, split: str, field: str) -> Iterator[tuple[str, int, Any]]:
    import datasets

    repo = path.removeprefix("hf://datasets/").removeprefix("hf://")
    try:
        ds = datasets.load_dataset(repo, split=split)
    except Exception as exc:  # offline, missing or private: the user fixes the spec
        raise ConfigError(field, f"cannot load hub dataset {repo} split {split}: {exc}") from None
    for i, row in enumerate(ds, start=1):
        yield repo, i, row


def read_records(dataset: Dataset, field: str = "dataset.path") -> list[tuple[str, int, Any]]:
    """Every record (with its file and line) of the dataset, up to dataset.limit."""
    path = str(dataset.path)
    if path.startswith("hf://datasets/") and path.count("/") <= 4:  # hf://datasets/ORG/NAME: a hub dataset
        rows: Iterator[tuple[str, int, Any]] = _read_hub(path, dataset.split, field)
    else:
        rows = (row for f in _files(path, field) for row in _read_file(f, field))
    out = []
    for row in rows:
        out.append(row)
        if dataset.limit is not None and len(out) >= dataset.limit:
            break
    if not out:
        raise ConfigError(field, f"{path} holds no records")
    return out


def _turns(value: Any, role: str, where: str, key: str, field: str) -> list[dict[str, str]]:
    """A string (one turn of ``role``) or a list of {role, content} turns, checked."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value:
        turns = []
        for j, turn in enumerate(value):
            if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
                raise ConfigError(field, f"{where}: {key}[{j}] must be an object with role and content")
            if turn["role"] not in ROLES or not isinstance(turn["content"], str):
                raise ConfigError(
                    field, f"{where}: {key}[{j}] needs role in {', '.join(ROLES)} and a string content"
                )
            turns.append({"role": turn["role"], "content": turn["content"]})
        return turns
    raise ConfigError(
        field, f"{where}: {key} must be a string or a non-empty list of {{role, content}} turns"
    )


def convert(fmt: DatasetFormat, record: Any, where: str, field: str = "dataset.path") -> dict[str, Any]:
    """Check one record of ``fmt`` and return it in TRL's conversational shape."""
    if not isinstance(record, dict):
        raise ConfigError(field, f"{where}: a record must be a JSON object (format {fmt.value})")
    for key in REQUIRED_KEYS[fmt]:
        if key not in record or record[key] is None:
            needs = ", ".join(REQUIRED_KEYS[fmt])
            raise ConfigError(field, f'{where}: missing key "{key}" (format {fmt.value} needs {needs})')
    if fmt == DatasetFormat.messages:
        turns = _turns(record["messages"], "user", where, "messages", field)
        last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=-1)
        if last <= 0:
            raise ConfigError(
                field,
                f"{where}: messages needs an assistant turn after at least one other turn (format messages)",
            )
        return {"prompt": turns[:last], "completion": [turns[last]]}
    prompt = _turns(record["prompt"], "user", where, "prompt", field)
    if fmt == DatasetFormat.prompt_completion:
        return {
            "prompt": prompt,
            "completion": _turns(record["completion"], "assistant", where, "completion", field),
        }
    if fmt == DatasetFormat.preference:
        return {
            "prompt": prompt,
            "chosen": _turns(record["chosen"], "assistant", where, "chosen", field),
            "rejected": _turns(record["rejected"], "assistant", where, "rejected", field),
        }
    return {"prompt": prompt}


def split_records(records: list[dict[str, Any]], eval_fraction: float, seed: int = 0) -> Split:
    """Hold out ``eval_fraction`` of the records (at least one when it is above 0), shuffled by ``seed``."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = round(len(records) * eval_fraction)
    if eval_fraction > 0:
        n_eval = max(1, n_eval)
    if len(records) - n_eval < 1:
        raise ConfigError("dataset.evalFraction", f"leaves no training records out of {len(records)}")
    held = set(order[:n_eval])
    return Split(train=[records[i] for i in order if i not in held], eval=[records[i] for i in sorted(held)])


def load_split(dataset: Dataset, seed: int = 0, field: str = "dataset.path") -> Split:
    """Read, check and convert every record, then hold out ``dataset.evalFraction`` of them (shuffled)."""
    records = [
        convert(dataset.format, rec, f"{name} line {line}", field)
        for name, line, rec in read_records(dataset, field)
    ]
    return split_records(records, dataset.eval_fraction, seed)


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """One JSON object per line (the synthetic SFT data)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, p)


__all__ = [
    "DATA_EXTENSIONS",
    "REQUIRED_KEYS",
    "Split",
    "convert",
    "load_split",
    "read_records",
    "split_records",
    "write_jsonl",
]
