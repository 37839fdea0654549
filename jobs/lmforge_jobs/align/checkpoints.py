"""Checkpoints of an AlignmentRun under ``spec.output/checkpoints``, wherever the output lives.

The trainer (TRL's ``checkpoint-<step>``, the ppo loop's ``ppo-<iteration>``) writes each checkpoint to the
job's local working directory (:func:`lmforge_jobs.align.job.work_dir`). :func:`publish` makes it part of
the output: for a local output the working directory *is* the output; for object storage the directory
is uploaded to ``<output>/checkpoints/<name>``. Either way a ``COMPLETE`` marker is written last
(``storage.write_text_atomic``): a directory without it is not a checkpoint (a save cut short by a
preemption); it is ignored, and removed once a newer complete one exists. The newest ``keep`` remain.

:func:`restore` gives the local path of the newest complete checkpoint — in place, or downloaded into the
working directory — for ``trainer.train(resume_from_checkpoint=…)``: the pod that replaces a preempted
one continues where the old one stopped.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from lmforge_jobs import storage

MARKER = "COMPLETE"
DIR = "checkpoints"


def _scan(output: str, prefix: str) -> tuple[Any, list[tuple[int, str, bool]]]:
    """(filesystem, [(step, path, complete)] oldest first) of the ``<prefix>-<step>`` directories."""
    uri = storage.join(output, DIR)
    try:
        fs, root = storage.filesystem(uri)
        if not fs.isdir(root):
            return fs, []
        found = []
        for entry in fs.ls(root, detail=True):
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            head, _, step = name.rpartition("-")
            if head == prefix and step.isdigit() and entry.get("type") == "directory":
                path = f"{root}/{name}"
                found.append((int(step), path, bool(fs.isfile(f"{path}/{MARKER}"))))
    except OSError as exc:
        raise storage.config_error("output", exc, uri) from None
    return fs, sorted(found)


def complete(output: str, prefix: str) -> list[str]:
    """URIs (plain paths for a local output) of the complete ``<prefix>-<step>`` checkpoints, oldest first."""
    fs, found = _scan(output, prefix)
    return [storage.to_uri(fs, path) for _, path, done in found if done]


def publish(local_dir: str | os.PathLike[str], output: str, keep: int) -> str:
    """Make the checkpoint just written to ``local_dir`` (``<work>/checkpoints/<name>``) part of the output:
    upload it when the output is remote, then the marker, then drop old ones. Returns its URI."""
    local = Path(local_dir)
    target = storage.join(output, DIR, local.name)
    if storage.is_remote(output):
        storage.upload_tree(local, target)
    storage.write_text_atomic(storage.join(target, MARKER), json.dumps({"checkpoint": local.name}))
    prune(output, local.name.rpartition("-")[0], keep)
    return target


def prune(output: str, prefix: str, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; remove incomplete ones older than the newest."""
    fs, found = _scan(output, prefix)
    done = [path for _, path, ok in found if ok]
    stale = done[:-keep] if keep > 0 else []
    if done:
        newest = max(step for step, _, ok in found if ok)
        stale += [path for step, path, ok in found if not ok and step < newest]
    for path in stale:
        fs.rm(path, recursive=True)


def restore(output: str, work: str | os.PathLike[str], prefix: str) -> str | None:
    """Local path of the newest complete ``<prefix>-*`` checkpoint of ``output`` (None when there is none).

    A remote one is downloaded into ``<work>/checkpoints`` (emptied first: what a previous pod left there
    may be newer but incomplete) by the first process of each node; the others wait for it."""
    found = complete(output, prefix)
    if not storage.is_remote(output):
        return str(storage.local_path(found[-1])) if found else None
    local_root = Path(work) / DIR
    target = local_root / found[-1].rstrip("/").rsplit("/", 1)[-1] if found else None
    if os.environ.get("LOCAL_RANK", "0") == "0":
        shutil.rmtree(local_root, ignore_errors=True)
        if target is not None:
            try:
                storage.download_tree(found[-1], target)
            except OSError as exc:
                raise storage.config_error("output", exc, found[-1]) from None
    _barrier()
    return str(target) if target is not None else None


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


__all__ = ["DIR", "MARKER", "complete", "prune", "publish", "restore"]
