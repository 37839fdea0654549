"""Remote storage for the align job: model directories and data read through fsspec, outputs staged locally.

Local paths, ``file://`` and mounted volumes are used in place. For object storage (``s3://``, ``gs://`` …,
any fsspec protocol with its package installed):

* a model directory (``spec.base``, ``spec.rewardModel``, ``spec.synthetic.teacher``) is copied once per
  process into ``$LMFORGE_CACHE`` (default: the temp dir) and loaded from there;
* data files are streamed (see :mod:`.data`);
* ``spec.output`` is a local staging directory while the job runs (``$LMFORGE_SCRATCH``, default the temp
  dir, keyed by the output URI, so a restarted pod on the same node resumes from its checkpoints); at the
  end ``model/``, ``adapter/`` and the run's records are uploaded, ``outputs.json`` last (the completion marker).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from lmforge_jobs.entry import ConfigError

_FETCHED: dict[str, str] = {}


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def _key(uri: str) -> str:
    return hashlib.sha1(uri.encode()).hexdigest()[:16]


def fetch_dir(uri: str, field: str) -> str:
    """A local copy of a remote directory (once per process); ConfigError(field) when it cannot be read."""
    if uri in _FETCHED:
        return _FETCHED[uri]
    import fsspec

    root_dir = Path(os.environ.get("LMFORGE_CACHE") or tempfile.gettempdir()) / "lmforge-align-models"
    target = root_dir / f"{_key(uri)}-{os.environ.get('LOCAL_RANK', '0')}"
    try:
        fs, root = fsspec.core.url_to_fs(uri)
        if not fs.isdir(root):
            raise ConfigError(field, f"no model directory at {uri}")
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for remote in fs.find(root):
            rel = remote[len(root.rstrip("/")) + 1 :]
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(target / rel))
    except (OSError, ValueError, ImportError) as exc:
        raise ConfigError(field, f"cannot copy the model from {uri}: {exc}") from None
    _FETCHED[uri] = str(target)
    return str(target)


def staging_dir(output: str) -> Path:
    """Where a job whose spec.output is remote writes while it runs."""
    root = Path(os.environ.get("LMFORGE_SCRATCH") or tempfile.gettempdir()) / "lmforge-align-runs"
    return root / _key(output)


def upload(local: Path, uri: str) -> None:
    """Copy a local file or directory tree to ``uri`` (which it replaces)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    if local.is_dir():
        if fs.exists(root):
            fs.rm(root, recursive=True)
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            fs.makedirs(os.path.dirname(f"{root}/{path.relative_to(local).as_posix()}"), exist_ok=True)
            fs.put_file(str(path), f"{root}/{path.relative_to(local).as_posix()}")
    else:
        fs.makedirs(os.path.dirname(root), exist_ok=True)
        fs.put_file(str(local), root)


__all__ = ["fetch_dir", "is_remote", "local_path", "staging_dir", "upload"]
