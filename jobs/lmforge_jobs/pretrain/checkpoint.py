"""Checkpoints with torch.distributed.checkpoint (DCP): named state, a completion marker, retention.

Layout under ``<spec.output>/checkpoints``::

    tokenizer/                the run's tokenizer files (copied once, for export)
    step-00000050/
        .metadata, __0_0.distcp …   DCP: model, optimizer, train state (step, tokens, scheduler, NaN count)
        rng-<rank>.pt               each process's torch / numpy / python RNG states
        lmforge.json                model args and architecture: enough to rebuild and export the model
        COMPLETE                    completion marker, written last by rank 0 after every rank finished

``checkpoints`` may be a local path or a URI (s3://, gs://, through :mod:`lmforge_jobs.storage`, whose
endpoint override and credentials DCP's fsspec writer uses too): the marker is written last either way. A directory without ``COMPLETE`` is not a
checkpoint (a save cut short by preemption): ``list_complete``
ignores it and the next save removes it. Only the newest ``keep`` complete checkpoints are kept.
Sharded (FSDP) and replicated (DDP) state save the same logical tensors, so a run may resume with a
different number of processes.
"""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any

from lmforge_jobs import storage

MARKER = "COMPLETE"
META = "lmforge.json"
TOKENIZER_DIR = "tokenizer"
_STEP_DIR = re.compile(r"^step-(\d+)$")


is_remote = storage.is_remote  # the jobs' one definition, re-exported


def step_dir(root: str | os.PathLike[str], step: int) -> Path:
    """The directory of ``step`` under a local ``root``."""
    return storage.local_path(root) / f"step-{step:08d}"


def _step_dirs(fs: Any, root: str) -> list[tuple[int, str]]:
    if not fs.isdir(root):
        return []
    found = []
    for entry in fs.ls(root, detail=True):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        m = _STEP_DIR.match(name)
        if m and entry.get("type") == "directory":
            found.append((int(m.group(1)), f"{root}/{name}"))
    return sorted(found)


def list_complete(root: str) -> list[tuple[int, str]]:
    """(step, directory) of every complete checkpoint under ``root``, oldest first (a local path or URI)."""
    fs, path = storage.filesystem(root)
    return [(s, storage.to_uri(fs, p)) for s, p in _step_dirs(fs, path) if fs.isfile(f"{p}/{MARKER}")]


def latest(root: str) -> tuple[int, str] | None:
    complete = list_complete(root)
    return complete[-1] if complete else None


def read_meta(checkpoint_dir: str | os.PathLike[str]) -> dict[str, Any]:
    fs, path = storage.filesystem(checkpoint_dir)
    with fs.open(f"{path}/{META}", "r", encoding="utf-8") as fh:
        return json.load(fh)


def tokenizer_dir(checkpoint_dir: str | os.PathLike[str]) -> Path:
    """The tokenizer directory beside a checkpoint (``../tokenizer``; downloaded to a temporary directory
    when the checkpoints are remote), or the one its metadata names."""
    if is_remote(checkpoint_dir):
        import tempfile

        fs, path = storage.filesystem(checkpoint_dir)
        local = Path(tempfile.mkdtemp(prefix="lmforge-tokenizer-"))
        for f in fs.ls(f"{path.rsplit('/', 1)[0]}/{TOKENIZER_DIR}", detail=False):
            fs.get_file(f, str(local / f.rsplit("/", 1)[-1]))
        return local
    path = storage.local_path(checkpoint_dir)
    beside = path.parent / TOKENIZER_DIR
    if beside.is_dir():
        return beside
    return Path(read_meta(path)["tokenizer"])


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    """Saves and restores the training state; every rank calls ``save``/``load`` (collectives inside).

    ``root`` is a local path or an fsspec URI (DCP writes remote checkpoints through fsspec).
    """

    def __init__(self, root: str, keep: int, rank: int = 0, distributed: bool = False):
        self.root = str(root)
        self.fs, self.path = storage.filesystem(root)
        self.keep = keep
        self.rank = rank
        self.distributed = distributed

    def _barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def prepare(self, tokenizer_files: list[Path]) -> None:
        """Copy the tokenizer beside the checkpoints (rank 0), once."""
        if self.rank == 0:
            dest = f"{self.path}/{TOKENIZER_DIR}"
            self.fs.makedirs(dest, exist_ok=True)
            for f in tokenizer_files:
                self.fs.put_file(str(f), f"{dest}/{f.name}")
        self._barrier()

    def _write(self, path: str, text: str) -> None:
        storage.write_text_atomic(storage.to_uri(self.fs, path), text)

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> str:
        import torch
        import torch.distributed.checkpoint as dcp

        path = f"{self.path}/step-{step:08d}"
        if self.rank == 0 and self.fs.exists(path):
            self.fs.rm(path, recursive=True)  # an incomplete save of the same step
        self._barrier()
        with warnings.catch_warnings():  # one process without a process group is intended
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save(state, checkpoint_id=storage.to_uri(self.fs, path))
        with self.fs.open(f"{path}/rng-{self.rank}.pt", "wb") as fh:
            torch.save(rng_state(), fh)
        self._barrier()
        if self.rank == 0:
            self._write(f"{path}/{META}", json.dumps({**meta, "step": step}, indent=2))
            # written beside, then moved: the marker appears whole (a single PUT on object stores)
            self._write(f"{path}/{MARKER}", json.dumps({"step": step}))
            self.prune()
        self._barrier()
        return storage.to_uri(self.fs, path)

    def prune(self) -> None:
        """Keep the newest ``keep`` complete checkpoints; remove incomplete ones older than the newest."""
        dirs = _step_dirs(self.fs, self.path)
        complete = [(s, p) for s, p in dirs if self.fs.isfile(f"{p}/{MARKER}")]
        for _, p in complete[: -self.keep]:
            self.fs.rm(p, recursive=True)
        if complete:
            newest = complete[-1][0]
            for s, p in dirs:
                if s < newest and (s, p) not in complete:
                    self.fs.rm(p, recursive=True)

    def load(self, path: str, state: dict[str, Any]) -> None:
        """Load ``state`` in place from a complete checkpoint, and this rank's RNG states."""
        import torch
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(state, checkpoint_id=path)
        fs, p = storage.filesystem(path)
        rng = f"{p}/rng-{self.rank}.pt"
        if fs.exists(rng):
            with fs.open(rng, "rb") as fh:
                set_rng_state(torch.load(fh, weights_only=False))


__all__ = [
    "MARKER",
    "META",
    "Checkpointer",
    "is_remote",
    "latest",
    "list_complete",
    "read_meta",
    "step_dir",
    "tokenizer_dir",
]
