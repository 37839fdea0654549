"""Every input check that needs no processing, run before any stage starts: the output's bucket exists,
sources exist, WARCs parse, model files exist, the vocabulary can hold the byte alphabet. Each failure is a
ConfigError naming the spec field (exit 64). Local paths and object-store URIs alike, through
:mod:`lmforge_jobs.storage`."""

from __future__ import annotations

import os
import re

from lmforge_jobs import storage
from lmforge_jobs.data.config import CorpusSpec, Source
from lmforge_jobs.entry import ConfigError
from lmforge_jobs.secrets import read_secret

GLOB_CHARS = re.compile(r"[*?\[]")
EXTENSIONS = {
    "warc": (".warc", ".warc.gz", ".arc", ".arc.gz"),
    "jsonl": (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz"),
    "parquet": (".parquet",),
}


def expand_paths(source: Source, index: int) -> tuple[str, list[str]]:
    """(folder, files relative to it) of a file source; ConfigError naming the path when nothing matches,
    or when its store refuses (access denied, a missing bucket)."""
    kind = source.kind
    cfg = getattr(source, kind)
    found: list[str] = []
    fs = None
    for j, path in enumerate(cfg.paths):
        field = f"sources[{index}].{kind}.paths[{j}]"
        try:
            fs, stripped = storage.filesystem(path)
            if GLOB_CHARS.search(stripped):
                matches = sorted(fs.glob(stripped))
            elif fs.isdir(stripped):
                matches = sorted(p for p in fs.find(stripped) if p.endswith(EXTENSIONS[kind]))
            elif fs.isfile(stripped):
                matches = [stripped]
            else:
                matches = []
        except (OSError, ValueError) as exc:
            raise storage.config_error(field, exc, path) from None
        if not matches:
            # a store answers "nothing here" for a missing bucket or refused credentials too: say which
            storage.check_bucket(path, field)
            raise ConfigError(field, f"no such file or directory (or nothing matches): {path}")
        found += [m for m in matches if m not in found]
    assert fs is not None
    common = (
        os.path.commonpath([os.path.dirname(p) or "/" for p in found])
        if len(found) > 1
        else (os.path.dirname(found[0]))
    )
    rel = [os.path.relpath(p, common) if common else p for p in found]
    return storage.to_uri(fs, common or "/"), rel


def check_warc(folder: str, files: list[str], field: str) -> None:
    """The first records of each WARC must parse: an unreadable file fails before anything runs."""
    from warcio.archiveiterator import ArchiveIterator
    from warcio.exceptions import ArchiveLoadFailed

    fs, root = storage.filesystem(folder)
    for rel in files:
        path = f"{root}/{rel}"
        where = storage.to_uri(fs, path)
        try:
            with fs.open(path, "rb") as fh:
                records = 0
                for record in ArchiveIterator(fh):  # the first two records, payloads included
                    record.content_stream().read()
                    records += 1
                    if records == 2:
                        break
            if records == 0:
                raise ValueError("no WARC records")
        except (PermissionError, FileNotFoundError, ConnectionError) as exc:  # the store, not the file
            raise storage.config_error(field, exc, where) from None
        except (ArchiveLoadFailed, OSError, EOFError, ValueError) as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            message = " ".join(lines[:2]) if lines else type(exc).__name__
            raise ConfigError(field, f"{where} is not a readable WARC file: {message}") from None


def check_model_file(uri: str, field: str) -> None:
    """A model file the spec names exists (models are never downloaded implicitly); a local one must also
    be big enough to be a fastText model."""
    try:
        fs, path = storage.filesystem(uri)
        missing = not fs.isfile(path)
        size = None if missing or storage.is_remote(uri) else fs.size(path)
    except (OSError, ValueError) as exc:
        raise storage.config_error(field, exc, uri) from None
    if missing:
        storage.check_bucket(uri, field)
        raise ConfigError(field, f"no such file: {uri} (models are never downloaded implicitly)")
    if size is not None and size < 16:
        raise ConfigError(field, f"{uri} is not a fastText model")


# A page every extractor must get through: running it imports everything the extractor needs.
TEST_PAGE = "<html><body><h1>Title</h1><p>A first paragraph of a test page.</p></body></html>"


def check_extractor(spec: CorpusSpec) -> None:
    """The configured HTML extractor runs here, in the job process, before any worker starts: a library
    that cannot be imported (a missing optional dependency, say) is a ConfigError naming it, instead of
    every document timing out in the extraction worker."""
    from lmforge_jobs.data.pipelines import extractor

    method = spec.extract.method.value
    try:
        extractor(spec).extract(TEST_PAGE)
    except ImportError as exc:
        raise ConfigError("extract.method", f"{method} could not be imported: {one_line(exc)}") from None
    except Exception as exc:  # whatever it is, no document would get through either
        raise ConfigError(
            "extract.method", f"{method} failed on a test page: {type(exc).__name__}: {one_line(exc)}"
        ) from None


def check_warc_reader(reader: str, field: str) -> None:
    """An explicitly chosen fastwarc must import (``auto`` falls back to warcio)."""
    from lmforge_jobs.data.readers import fastwarc_available

    if reader == "fastwarc" and not fastwarc_available():
        raise ConfigError(field, "fastwarc could not be imported: install it, or set reader: warcio")


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def preflight(spec: CorpusSpec, stage: str | None = None) -> None:
    """Every input check that needs no processing — sources exist, WARCs parse, model files exist, the
    vocabulary can hold the byte alphabet — for one stage (``None``: all). Raises ConfigError."""
    from lmforge_jobs.data.tokenizer import check_pretrained, check_special_tokens, check_vocab_size

    assert spec.output is not None
    storage.check_bucket(spec.output, "output")
    if stage in (None, "tokenizer"):
        check_vocab_size(spec)
        check_special_tokens(spec)
        check_pretrained(spec)
    if stage not in (None, "extract"):
        return
    for i, source in enumerate(spec.sources):
        if source.kind == "huggingface":
            hf = source.huggingface
            assert hf is not None
            if hf.dataset.startswith((".", "/", "file://")) and not storage.local_path(hf.dataset).exists():
                raise ConfigError(f"sources[{i}].huggingface.dataset", f"no such directory: {hf.dataset}")
            if hf.token is not None:
                read_secret(hf.token, f"sources[{i}].huggingface.token")
            continue
        folder, files = expand_paths(source, i)
        if source.kind == "warc":
            check_warc(folder, files, f"sources[{i}].warc.paths")
            check_warc_reader(source.warc.reader.value, f"sources[{i}].warc.reader")
    if any(source.kind == "warc" for source in spec.sources):
        check_extractor(spec)
    for i, flt in enumerate(spec.filters):
        if flt.language is not None:
            check_model_file(flt.language.model_path, f"filters[{i}].language.modelPath")
    if spec.domains is not None:
        check_model_file(spec.domains.classifier_path, "domains.classifierPath")


__all__ = ["check_extractor", "check_model_file", "check_warc", "expand_paths", "preflight"]
