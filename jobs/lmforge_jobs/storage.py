"""The one storage layer of the jobs: local paths and object storage URIs through fsspec.

Every input and output a job names may be a local path, ``file://…``, ``s3://bucket/key``, ``gs://…``,
``hf://…`` or ``memory://…`` (tests). ``filesystem(uri)`` gives the fsspec filesystem and the path on it;
``is_remote``, ``join``, ``exists``, ``list_files``, ``read_text``, ``read_json``, ``local_copy``,
``refresh`` (before polling), ``write_text_atomic``, ``upload_tree`` and ``download_tree`` cover what jobs
do with them.

Credentials come only from the environment, never from a spec: ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` (a Secret mounted as env), ``AWS_PROFILE``, the pod's IAM
role (botocore's default chain), ``GOOGLE_APPLICATION_CREDENTIALS`` for gs://, ``HF_TOKEN`` for hf://.
S3-compatible stores (MinIO, Ceph, R2) are reached through an endpoint override, the first of
``LMFORGE_S3_ENDPOINT``, ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL`` that is set. botocore honours the two
``AWS_*`` variables itself, but the override is also registered as the default of every s3fs filesystem in
this process (``fsspec.config.conf["s3"]``), so code that opens URIs through fsspec on its own —
torch.distributed.checkpoint's fsspec writer, datatrove's folders — reaches the same store.

Writes: a PUT to S3 (and GCS) is atomic per object — a reader sees the old object, or the whole new one,
never half — so ``write_text_atomic`` writes a temporary key and moves it into place; on a local disk the
move is an ``os.replace``. Completion markers are written this way, last.

Errors: ``config_error(field, exc, uri)`` turns a storage failure into the job's ConfigError naming the
spec field (exit 64): access denied, a missing bucket, a missing object. Messages name the URI, never a
credential.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

ENDPOINT_ENV = ("LMFORGE_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def is_remote(uri: str | os.PathLike[str]) -> bool:
    """True for a URI with a protocol other than ``file://``."""
    text = str(uri)
    return "://" in text and not text.startswith("file://")


def local_path(uri: str | os.PathLike[str]) -> Path:
    """A local path or ``file://`` URI as a Path."""
    return Path(str(uri).removeprefix("file://"))


def s3_endpoint() -> str | None:
    """The S3 endpoint override from the environment, or None for AWS itself."""
    for name in ENDPOINT_ENV:
        if os.environ.get(name):
            return os.environ[name]
    return None


def s3_options() -> dict[str, Any]:
    """s3fs options from the environment: the endpoint override and the static credentials, if set.

    Passing the credentials (rather than letting botocore find the same variables) keys fsspec's instance
    cache on them, so a process whose environment changes does not reuse a client with stale ones."""
    options: dict[str, Any] = {}
    endpoint = s3_endpoint()
    if endpoint:
        options["endpoint_url"] = endpoint
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        options["key"] = os.environ["AWS_ACCESS_KEY_ID"]
        options["secret"] = os.environ["AWS_SECRET_ACCESS_KEY"]
        if os.environ.get("AWS_SESSION_TOKEN"):
            options["token"] = os.environ["AWS_SESSION_TOKEN"]
    elif os.environ.get("AWS_PROFILE"):
        options["profile"] = os.environ["AWS_PROFILE"]
    return options


def configure() -> None:
    """Register the environment's S3 options as the default of every s3fs filesystem in this process."""
    import fsspec.config

    options = s3_options()
    if options:
        fsspec.config.conf["s3"] = options
    else:
        fsspec.config.conf.pop("s3", None)


def filesystem(uri: str | os.PathLike[str]) -> tuple[Any, str]:
    """(fsspec filesystem, path on it) of a local path or URI; the path has no trailing slash."""
    import fsspec

    if is_remote(uri):
        configure()
        fs, path = fsspec.core.url_to_fs(str(uri))
    else:
        fs, path = fsspec.core.url_to_fs(os.path.abspath(local_path(uri)))
    return fs, path.rstrip("/") or path


def to_uri(fs: Any, path: str) -> str:
    """A path on ``fs`` as callers see it: a plain path locally, protocol://path elsewhere."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    return path if "file" in protocols or "local" in protocols else fs.unstrip_protocol(path)


def join(uri: str | os.PathLike[str], *parts: str) -> str:
    """``uri/part/…`` for a URI or a local path (no duplicated slashes)."""
    text = str(uri).rstrip("/")
    for part in parts:
        text = f"{text}/{part.strip('/')}"
    return text


def exists(uri: str | os.PathLike[str]) -> bool:
    fs, path = filesystem(uri)
    return bool(fs.exists(path))


def read_text(uri: str | os.PathLike[str]) -> str:
    """A small text object or file, whole (UTF-8); storage errors propagate as OSError."""
    fs, path = filesystem(uri)
    return bytes(fs.cat_file(path)).decode("utf-8")


def local_copy(uri: str | os.PathLike[str], dest: str | os.PathLike[str] | None = None) -> Path:
    """A local path for ``uri``: the path itself when it is local, else a copy of the remote object, or of
    everything under the remote directory (prefix), in ``dest`` (a new temporary directory by default).
    Returns the copied file (``dest/<name>``) or ``dest`` for a directory; FileNotFoundError when nothing is
    there, other storage errors as OSError."""
    if not is_remote(uri):
        return local_path(uri)
    import tempfile

    fs, path = filesystem(uri)
    target = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="lmforge-copy-"))
    target.mkdir(parents=True, exist_ok=True)
    if fs.isfile(path):
        local = target / path.rsplit("/", 1)[-1]
        fs.get_file(path, str(local))
        return local
    if not fs.isdir(path):
        raise FileNotFoundError(2, "No such file or directory", str(uri))
    fs.get(f"{path}/", f"{target}/", recursive=True)
    return target


def require(uri: str | os.PathLike[str], field: str) -> None:
    """Before reading ``uri``: it exists (a file, or a directory/prefix holding some). Otherwise the job's
    ConfigError naming ``spec.<field>`` says which of access denied, a missing bucket or a missing object
    it is."""
    fs, path = filesystem(uri)
    try:
        if fs.exists(path):
            return
    except (OSError, ValueError) as exc:
        raise config_error(field, exc, uri) from None
    check_bucket(uri, field)
    raise config_error(field, FileNotFoundError(2, "No such file or directory"), uri)


def refresh(uri: str | os.PathLike[str]) -> None:
    """Forget the directory listings this process cached for ``uri``, the directories above it and below it
    (s3fs and gcsfs keep them per filesystem instance, without expiry), so that a poll sees the objects
    another process wrote since. Local paths have no cache."""
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)
    cache = getattr(fs, "dircache", None)
    if cache:
        for key in [k for k in list(cache) if k.startswith(f"{path}/")]:
            cache.pop(key, None)


def list_files(uri: str | os.PathLike[str], pattern: str = "*") -> list[str]:
    """URIs of the files directly in folder ``uri`` whose names match ``pattern``, sorted; [] when the
    folder does not exist. Hidden names (``.x``: a :func:`write_text_atomic` in progress) are left out.
    Listed afresh (:func:`refresh`): other processes may have just written them."""
    refresh(uri)
    fs, path = filesystem(uri)
    try:
        found = fs.glob(f"{path}/{pattern}", detail=True)
    except FileNotFoundError:
        return []
    return sorted(
        to_uri(fs, p)
        for p, info in found.items()
        if info.get("type") == "file" and not p.rsplit("/", 1)[-1].startswith(".")
    )


def write_text_atomic(uri: str | os.PathLike[str], text: str) -> None:
    """Write a small text object so that it is read either whole or not at all: a temporary key beside it,
    then a move (a single PUT of the final key on object stores, ``os.replace`` on a local disk)."""
    fs, path = filesystem(uri)
    parent, _, name = path.rpartition("/")
    tmp = f"{parent}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
    if not is_remote(uri):
        os.makedirs(parent or "/", exist_ok=True)
        Path(tmp).write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        return
    try:
        fs.pipe_file(tmp, text.encode("utf-8"))
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def read_json(uri: str | os.PathLike[str]) -> Any:
    """The JSON document at ``uri`` (a local path or URI), or None when it is absent, unreadable or not
    JSON (a half-written file). For bookkeeping reads that must not fail a run; jobs reading their inputs
    use :func:`filesystem` and :func:`config_error` to name the field instead."""
    import json

    try:
        fs, path = filesystem(uri)
        with fs.open(path, "rb") as fh:
            return json.loads(fh.read().decode("utf-8"))
    except Exception:  # any failure to read (botocore's connection errors are not OSErrors) is "absent"
        return None


def bucket_of(uri: str | os.PathLike[str]) -> str | None:
    """``s3://bucket`` (the protocol and bucket) of an object-store URI, None for other URIs."""
    text = str(uri)
    protocol, sep, rest = text.partition("://")
    if not sep or protocol not in ("s3", "s3a", "gs", "gcs"):
        return None
    return f"{protocol}://{rest.split('/', 1)[0]}"


def describe(exc: BaseException, uri: str | os.PathLike[str]) -> str:
    """One line saying what went wrong with ``uri`` (no credentials: botocore messages carry none)."""
    text = str(exc)
    lower = text.lower()
    if isinstance(exc, PermissionError) or "access denied" in lower or "forbidden" in lower:
        hint = "GOOGLE_APPLICATION_CREDENTIALS" if str(uri).startswith("gs") else "AWS_* credentials"
        return f"access denied to {uri} (check the Secret/{hint})"
    if isinstance(exc, FileNotFoundError):
        bucket = bucket_of(uri)
        if bucket and ("bucket" in lower or not text):
            return f"bucket {bucket} does not exist (in {uri})"
        return f"{uri} does not exist"
    endpoint = s3_endpoint()
    where = f" (endpoint {endpoint})" if endpoint and str(uri).startswith("s3") else ""
    return f"cannot reach {uri}{where}: {type(exc).__name__}: {text}"


def config_error(field: str, exc: BaseException, uri: str | os.PathLike[str]) -> Exception:
    """The job's ConfigError (exit 64) for a storage failure on ``uri`` named by ``spec.<field>``."""
    from lmforge_jobs.entry import ConfigError

    return ConfigError(field, describe(exc, uri))


def check_bucket(uri: str | os.PathLike[str], field: str) -> None:
    """Before writing under ``uri``: its bucket exists and the credentials may list it (a ConfigError
    otherwise). s3fs would otherwise create a missing bucket when asked to make a directory in it."""
    bucket = bucket_of(uri)
    if bucket is None:
        return
    fs, path = filesystem(bucket)
    try:
        fs.ls(path, detail=False)
    except (OSError, ValueError) as exc:
        raise config_error(field, exc, uri) from None


def upload_tree(local: str | os.PathLike[str], uri: str | os.PathLike[str]) -> None:
    """Copy a local file, or a directory and everything under it, to ``uri``, replacing what is there.

    Not atomic: a reader that must see the whole tree waits for a completion marker written after it
    (``write_text_atomic``)."""
    src = Path(local)
    fs, path = filesystem(uri)
    if not src.is_dir():
        fs.makedirs(path.rpartition("/")[0] or "/", exist_ok=True)
        fs.put_file(str(src), path)
        return
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.makedirs(path, exist_ok=True)
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = f.relative_to(src).as_posix()
        if "/" in rel:
            fs.makedirs(f"{path}/{rel.rpartition('/')[0]}", exist_ok=True)
        fs.put_file(str(f), f"{path}/{rel}")


def download_tree(uri: str | os.PathLike[str], local: str | os.PathLike[str]) -> Path:
    """Copy the file or directory tree at ``uri`` into the local directory ``local`` (created; a file
    lands inside it under its own name). Returns the local copy: the file, or ``local`` for a directory.
    FileNotFoundError when nothing is at ``uri``; other storage errors propagate (see ``config_error``)."""
    fs, path = filesystem(uri)
    dest = Path(local)
    dest.mkdir(parents=True, exist_ok=True)
    if fs.isfile(path):
        target = dest / path.rsplit("/", 1)[-1]
        fs.get_file(path, str(target))
        return target
    if not fs.isdir(path):
        raise FileNotFoundError(str(uri))
    for remote in sorted(fs.find(path)):
        target = dest / remote[len(path) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote, str(target))
    return dest


__all__ = [
    "ENDPOINT_ENV",
    "bucket_of",
    "check_bucket",
    "config_error",
    "configure",
    "describe",
    "download_tree",
    "exists",
    "filesystem",
    "is_remote",
    "join",
    "list_files",
    "local_copy",
    "local_path",
    "read_json",
    "read_text",
    "refresh",
    "require",
    "s3_endpoint",
    "s3_options",
    "to_uri",
    "upload_tree",
    "write_text_atomic",
]
