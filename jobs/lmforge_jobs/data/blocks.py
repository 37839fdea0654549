"""datatrove pipeline steps the Corpus job adds to datatrove's own (readers, filters, dedup, tokenizer).

Each is a small :class:`~datatrove.pipeline.base.PipelineStep` (or a thin subclass of a datatrove block)
doing one thing datatrove leaves open:

* :class:`ShardedMixin` readers (``WarcSourceReader``, ``JsonlSourceReader``, ``ParquetSourceReader``)
  read an explicit file list; with fewer files than ranks every rank reads all files and keeps every
  ``world``-th document, so one big WARC is still split across ranks.
* :class:`HubDatasetReader` is datatrove's HuggingFaceDatasetReader with a hub token that never reaches
  ``logs/<stage>/executor.json`` (datatrove writes every block's attributes there) or any log line.
* :class:`WarcSourceReader` keeps HTML records whose WARC header has no ``WARC-Identified-Payload-Type``:
  the HTTP ``Content-Type`` decides, else the first bytes are sniffed.
* :class:`OfflineURLFilter` and :class:`PathLanguageFilter` never touch the network (tldextract's bundled
  suffix list; a fastText model from a path).
* :class:`DomainLabeller`, :class:`DomainWeights`, :class:`HeldOutSplit` label, sample/repeat and split.
* :class:`RankReader` reads back exactly one rank's intermediate file.
* :class:`Counts` writes the per-rank document counts that ``stats.json`` adds up.
* :class:`TrafilaturaExtractor` and :class:`InscriptisExtractor` (a :class:`GuardedExtractor`) count
  timeouts apart from failures, and end the stage when the extractor cannot run at all.
* :func:`workers_die_with_parent`: every process the job starts dies with the one that started it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import re
import signal
import sys
import time
import zlib
from multiprocessing import Pipe, Process
from typing import Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.extractors import Trafilatura
from datatrove.pipeline.extractors.base import BaseExtractor
from datatrove.pipeline.extractors.base import ExtractorSandbox as _DatatroveSandbox
from datatrove.pipeline.filters import LanguageFilter, URLFilter
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.formatters.base import BaseFormatter
from datatrove.pipeline.readers import HuggingFaceDatasetReader, JsonlReader, ParquetReader, WarcReader
from datatrove.utils.lid import FastTextLID
from datatrove.utils.logging import logger
from datatrove.utils.typeshelper import StatHints
from datatrove.utils.word_tokenizers import WordTokenizer

from lmforge_jobs import storage

HTML_TYPES = ("text/html", "application/xhtml+xml")


def stable_fraction(key: str, salt: str = "") -> float:
    """A number in [0, 1) that depends only on ``key`` (same on every machine and run)."""
    digest = hashlib.blake2b(f"{salt}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


# ---------------------------------------------------------------------------------------------- readers
class ShardedMixin:
    """Reads ``files`` (paths relative to ``data_folder``) split across ranks; see the module docstring."""

    files: list[str]

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        if len(self.files) >= world_size:
            shard, self._stride = self.files[rank::world_size], (1, 0)
        else:  # fewer files than ranks: split by document instead
            shard, self._stride = list(self.files), (world_size, rank)
        self._seen = 0
        for doc in self.read_files_shard(shard):  # type: ignore[attr-defined]
            self.update_doc_stats(doc)  # type: ignore[attr-defined]
            yield doc

    def read_file(self, filepath: str) -> DocumentsPipeline:
        step, offset = self._stride
        for doc in self._read_all(filepath):
            index, self._seen = self._seen, self._seen + 1
            if index % step == offset:
                yield doc

    def _read_all(self, filepath: str) -> DocumentsPipeline:
        return super().read_file(filepath)  # type: ignore[misc]


def _sniff_html(head: bytes) -> bool:
    text = head[:2048].lstrip().lower()
    return text.startswith((b"<!doctype html", b"<html")) or b"<html" in text or b"<body" in text


def warc_record_to_dict(record: Any) -> dict[str, Any] | None:
    """The HTML of a WARC response (or WET conversion) record with its id, url and date; else None.

    The media type comes from ``WARC-Identified-Payload-Type``, else the HTTP ``Content-Type`` header, else
    the payload's first bytes — records without a payload-type header are not silently dropped."""
    if record.rec_type not in ("response", "conversion"):
        return None
    headers = record.rec_headers
    mime = headers.get_header("WARC-Identified-Payload-Type")
    charset = None
    if mime is None and record.http_headers is not None:
        ctype = record.http_headers.get_header("Content-Type") or ""
        mime = ctype.split(";")[0].strip().lower() or None
        found = re.search(r"charset=([\w.-]+)", ctype, re.I)
        charset = found.group(1) if found else None
    payload = record.content_stream().read()
    if record.rec_type == "conversion":
        ok = mime in (None, "text/plain", *HTML_TYPES)
    elif mime is None or mime in ("application/octet-stream", "text/plain"):
        ok = _sniff_html(payload)
    else:
        ok = mime.lower() in HTML_TYPES
    if not ok:
        return None
    text = None
    for encoding in (charset, "utf-8"):
        if encoding:
            try:
                text = payload.decode(encoding)
                break
            except (UnicodeDecodeError, LookupError):
                continue
    if text is None:
        import cchardet

        detected = cchardet.detect(payload).get("encoding")
        try:
            text = payload.decode(detected or "latin-1")
        except (UnicodeDecodeError, LookupError):
            return None
    url = headers.get_header("WARC-Target-URI") or headers.get_header("uri")
    date = headers.get_header("WARC-Date") or headers.get_header("archive-date")
    kind = "text" if record.rec_type == "conversion" else "html"
    return {
        "text": text,
        "id": headers.get_header("WARC-Record-ID"),
        "url": url,
        "date": date,
        "format": kind,
    }


class WarcSourceReader(ShardedMixin, WarcReader):
    """datatrove's WarcReader with an explicit file list and a payload-type fallback."""

    def __init__(self, data_folder: str, files: list[str], **kwargs: Any) -> None:
        super().__init__(data_folder, **kwargs)
        self.files = files

    def _read_all(self, filepath: str) -> DocumentsPipeline:
        from warcio.archiveiterator import ArchiveIterator
        from warcio.exceptions import ArchiveLoadFailed

        with self.data_folder.open(filepath, "rb", compression=self.compression) as f:
            try:
                for index, record in enumerate(ArchiveIterator(f)):
                    with self.track_time():
                        found = warc_record_to_dict(record)
                        document = found and self.get_document_from_dict(found, filepath, index)
                    if document:
                        yield document
            except (ArchiveLoadFailed, EOFError, OSError, zlib.error) as exc:  # broken or truncated
                raise UnreadableInput(filepath, str(exc) or type(exc).__name__) from None


class JsonlSourceReader(ShardedMixin, JsonlReader):
    """datatrove's JsonlReader with an explicit file list."""

    def __init__(self, data_folder: str, files: list[str], **kwargs: Any) -> None:
        super().__init__(data_folder, **kwargs)
        self.files = files


class ParquetSourceReader(ShardedMixin, ParquetReader):
    """datatrove's ParquetReader with an explicit file list."""

    def __init__(self, data_folder: str, files: list[str], **kwargs: Any) -> None:
        super().__init__(data_folder, **kwargs)
        self.files = files


class Hidden:
    """A value that ``str``, ``repr`` and datatrove's executor.json encoder never show."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "<redacted>"

    __str__ = __repr__


class HubDatasetReader(HuggingFaceDatasetReader):
    """datatrove's HuggingFaceDatasetReader; ``token`` goes to ``datasets.load_dataset(token=...)`` only
    while the reader runs, and is otherwise held as :class:`Hidden`."""

    def __init__(self, dataset: str, *, token: str | None = None, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.token = Hidden(token) if token else None

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if self.token is None:
            yield from super().run(data, rank, world_size)
            return
        options = self.dataset_options
        self.dataset_options = {**options, "token": self.token.value}
        try:
            yield from super().run(data, rank, world_size)
        finally:
            self.dataset_options = options


class NoDocuments(PipelineStep):
    """The source of a rank whose share of every source is empty (``limit`` below the rank count): the
    steps after it see no documents instead of ``None``."""

    name = "∅ No documents"
    type = "📖 - READER"

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data


class UnreadableInput(Exception):
    """An input file that is not what its source kind says (a broken WARC, say)."""

    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)  # both in args, so it survives pickling across worker processes
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class RankReader(JsonlReader):
    """Reads the ``NNNNN.jsonl.gz`` files of an intermediate folder whose number ≡ rank (mod world): with
    the same number of ranks as the stage that wrote them, exactly the file this rank wrote there."""

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        try:
            listed = self.data_folder.list_files(glob_pattern="*.jsonl.gz", recursive=False)
        except FileNotFoundError:  # no rank of the previous stage kept anything
            listed = []
        names = [
            name
            for name in sorted(listed)
            if re.fullmatch(r"\d+\.jsonl\.gz", name) and int(name.split(".")[0]) % world_size == rank
        ]
        for doc in self.read_files_shard(names):
            self.update_doc_stats(doc)
            yield doc


# --------------------------------------------------------------------------------------------- filters
class OfflineURLFilter(URLFilter):
    """datatrove's URLFilter with tldextract's bundled suffix list (never fetched), keeping url-less docs."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        from tldextract import TLDExtract

        self.tldextractor = TLDExtract(suffix_list_urls=(), cache_dir=None)

    def filter(self, document: Document) -> bool | tuple[bool, str]:
        if not document.metadata.get("url"):
            return True
        return super().filter(document)


class PathFastTextLID(FastTextLID):
    """fastText language ID from a model file; never downloaded."""

    def __init__(self, model_path: str, languages: list[str] | None = None) -> None:
        super().__init__(languages)
        self.model_path = model_path

    @property
    def model(self) -> Any:
        if self._model is None:
            from fasttext.FastText import _FastText

            self._model = _FastText(local_copy(self.model_path))
        return self._model


class PathLanguageFilter(LanguageFilter):
    """datatrove's LanguageFilter with the fastText model named in the spec."""

    def __init__(self, model_path: str, languages: list[str], language_threshold: float) -> None:
        super().__init__(languages=languages, language_threshold=language_threshold)
        self.model = PathFastTextLID(model_path, languages)


def local_copy(uri: str) -> str:
    """A local path for ``uri``: remote files (s3://, gs://, hf://…) are copied to datatrove's cache once
    (on disk, shared by the stage's worker processes)."""
    if not storage.is_remote(uri):
        return str(storage.local_path(uri))
    from datatrove.io import cached_asset_path_or_download

    storage.configure()  # the store's endpoint and credentials for datatrove's fsspec download
    return cached_asset_path_or_download(uri, namespace="lmforge", subfolder="models", desc=uri)


# --------------------------------------------------------------------------------------------- domains
class DomainLabeller(PipelineStep):
    """Puts the top label of a fastText classifier into ``metadata["domain"]``."""

    name = "🏷 Domain labeller"
    type = "🏷 - LABELLER"

    def __init__(self, model_path: str) -> None:
        super().__init__()
        self.model_path = model_path
        self._model: Any = None

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from fasttext.FastText import _FastText

        if self._model is None:
            self._model = _FastText(local_copy(self.model_path))
        for doc in data:
            with self.track_time():
                labels, _ = self._model.predict(doc.text.replace("\n", " "), k=1)
                label = labels[0].removeprefix("__label__") if labels else "unknown"
                doc.metadata["domain"] = label
                self.stat_update(f"domain_{label}")
            yield doc


class DomainWeights(PipelineStep):
    """Mixture weights by domain: weight w keeps a document ``floor(w)`` times plus once more with
    probability ``w - floor(w)`` (decided by a hash of its id, so reruns agree). Weight 0 drops it;
    ``metadata["repeats"]`` says how often the training shards contain it."""

    name = "⚖ Domain weights"
    type = "⚖ - SAMPLER"

    def __init__(self, weights: dict[str, float], default: float) -> None:
        super().__init__()
        self.weights = dict(weights)
        self.default = default

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            self.stat_update("total")
            weight = self.weights.get(str(doc.metadata.get("domain", "")), self.default)
            whole = math.floor(weight)
            repeats = whole + (1 if stable_fraction(str(doc.id), "domain") < weight - whole else 0)
            if repeats <= 0:
                self.stat_update("dropped")
                continue
            self.stat_update("forwarded")
            if repeats > 1:
                self.stat_update("repeated", value=repeats - 1)
            doc.metadata["repeats"] = repeats
            yield doc


class HeldOutSplit(PipelineStep):
    """``metadata["split"]`` = ``held-out`` for a ``fraction`` of documents (by a hash of the id), else
    ``train``: deterministic, independent of ranks and order."""

    name = "✂ Held-out split"
    type = "✂ - SPLITTER"

    def __init__(self, fraction: float) -> None:
        super().__init__()
        self.fraction = fraction

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            held = stable_fraction(str(doc.id), "held-out") < self.fraction
            doc.metadata["split"] = "held-out" if held else "train"
            self.stat_update("held_out" if held else "train")
            yield doc


# ---------------------------------------------------------------------------------------------- counts
class Counts(PipelineStep):
    """Last step of a stage: counts what reaches it and, with the other steps' datatrove stats, writes
    ``<folder>/{rank:05d}.json`` = ``{"in": n, "removed": {key: n}, "kept": n, "bytes": n, ...}``.

    ``roles`` maps a step object to a statistics key: ``("read", step)`` adds the reader's documents to
    ``in``; ``(key, step)`` adds the documents the step removed (total − forwarded) to ``removed[key]``.
    The ``extract`` step's documents that timed out and those it failed on are also counted apart
    (``extraction: {timeouts, failures}``).
    """

    name = "🧮 Counts"
    type = "🧮 - COUNTS"

    def __init__(self, folder: str, roles: list[tuple[str, PipelineStep]], extra: bool = False) -> None:
        super().__init__()
        self.folder = folder
        self.roles = roles
        self.extra = extra

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        kept = size = 0
        splits: dict[str, dict[str, int]] = {}
        for doc in data:
            kept += 1
            n = len(doc.text.encode("utf-8"))
            size += n
            split = doc.metadata.get("split")
            if split:
                entry = splits.setdefault(split, {"documents": 0, "bytes": 0, "repeats": 0})
                entry["documents"] += 1
                entry["bytes"] += n
                entry["repeats"] += int(doc.metadata.get("repeats", 1)) - 1
            yield doc
        result: dict[str, Any] = {"in": 0, "removed": {}, "kept": kept, "bytes": size}
        for key, step in self.roles:
            stats = step.stats
            if key == "read":
                result["in"] += int(stats["documents"].total) if "documents" in stats.stats else 0
                continue
            total = stats["total"].total if "total" in stats.stats else 0
            forwarded = stats["forwarded"].total if "forwarded" in stats.stats else 0
            result["removed"][key] = result["removed"].get(key, 0) + int(total - forwarded)
            if key == "extract":  # what the extractor removed for want of a result, not for being empty
                result["extraction"] = {
                    name: int(stats[stat].total) if stat in stats.stats else 0
                    for name, stat in (("timeouts", "timeout"), ("failures", "failed"))
                }
        if splits:
            result["splits"] = splits
        with get_datafolder(self.folder).open(f"{rank:05d}.json", "wt") as fh:
            json.dump(result, fh)


__all__ = [
    "Counts",
    "DomainLabeller",
    "DomainWeights",
    "ExtractorBroken",
    "HeldOutSplit",
    "Hidden",
    "HubDatasetReader",
    "JsonlSourceReader",
    "NoDocuments",
    "OfflineURLFilter",
    "ParquetSourceReader",
    "PathLanguageFilter",
    "RankReader",
    "TrafilaturaExtractor",
    "UnreadableInput",
    "WarcSourceReader",
    "die_with_parent",
    "stable_fraction",
    "warc_record_to_dict",
    "workers_die_with_parent",
]


# ------------------------------------------------------------------------------ extraction, normalising
class ExtractorBroken(Exception):
    """The extractor cannot run at all (its library does not import, its worker dies while starting, or it
    failed on every one of the first documents): a configuration error, not something to skip past."""

    def __init__(self, reason: str):
        super().__init__(reason)  # in args, so it survives pickling across worker processes
        self.reason = reason


class ExtractionFailed(Exception):
    """The extractor raised on one document (the worker stays up)."""


class Failure:
    """What the sandbox worker sends back instead of a result: the exception, as one line of text."""

    def __init__(self, exc: BaseException) -> None:
        self.import_error = isinstance(exc, ImportError)
        self.text = " ".join(str(exc).split()) or type(exc).__name__

    def describe(self, library: str) -> str:
        if self.import_error:
            return f"{library} could not be imported: {self.text}"
        return f"{library} failed: {self.text}"


class ExtractorSandbox(_DatatroveSandbox):
    """datatrove's extraction sandbox (one worker process, killed after ``timeout`` seconds on a document)
    whose worker says why it failed instead of dying silently: a failure while starting (the warm-up
    imports the library) raises :class:`ExtractorBroken` at once — rather than a warm-up timeout on every
    document — and a document the extractor raised on raises :class:`ExtractionFailed`."""

    def __init__(self, timeout: float, library: str) -> None:
        super().__init__(timeout=timeout, warmup_text="")
        self.library = library
        self.parent_pid = os.getpid()

    def _worker(self, conn: Any, extract_fn: Any) -> None:
        try:
            die_with_parent(self.parent_pid)
            if platform.system() == "Linux":
                self.set_oom_score_adj(1000)  # the first process the kernel kills when memory runs out
            extract_fn(self.warmup_text)  # imports the library
        except BaseException as exc:  # reported to the parent, whatever it is
            conn.send(Failure(exc))
            return
        conn.send(None)  # ready
        while True:
            try:
                text = conn.recv()
            except EOFError:
                break
            try:
                result = extract_fn(text)
            except Exception as exc:  # one document's failure, reported to the parent
                result = Failure(exc)
            conn.send(result)

    def _ensure_process(self, extract_fn: Any) -> None:
        if self.process is not None and self.process.is_alive():
            return
        self._cleanup_process()
        self.parent_conn, self.child_conn = Pipe()
        self.process = Process(target=self._worker, args=(self.child_conn, extract_fn), daemon=True)
        self.process.start()
        self.all_processes.append(self.process)
        deadline = time.monotonic() + self.timeout
        while not self.parent_conn.poll(0.05):
            if not self.process.is_alive() and not self.parent_conn.poll(0):
                code = self.process.exitcode
                self._cleanup_process()
                raise ExtractorBroken(f"{self.library}: the extraction worker exited ({code}) while starting")
            if time.monotonic() >= deadline:
                self._cleanup_process()
                raise TimeoutError(f"the extraction worker did not start within {self.timeout} seconds")
        ready = self.parent_conn.recv()
        if isinstance(ready, Failure):
            self._cleanup_process()
            raise ExtractorBroken(ready.describe(self.library))

    def process_document(self, text: str, extract_fn: Any) -> str:
        result = super().process_document(text, extract_fn)
        if isinstance(result, Failure):
            raise ExtractionFailed(result.text)
        return result


class GuardedExtractor(BaseExtractor):
    """datatrove's extractor loop with failures told apart from timeouts (stats ``timeout`` and
    ``failed``), and an extractor that cannot run stopped early: if the worker fails to start, or the
    first ``GUARD`` documents (or all of them, when there are fewer) all failed, :class:`ExtractorBroken`
    ends the stage instead of every document being dropped."""

    library = "the extractor"
    GUARD = 5

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        seen = failed = 0
        first = ""
        with ExtractorSandbox(self.timeout, self.library) as sandbox:
            for doc in data:
                self.stat_update(StatHints.total)
                seen += 1
                with self.track_time():
                    try:
                        doc.text = sandbox.process_document(doc.text, self.extract)
                        self.stat_update("extracted")
                    except TimeoutError:
                        self.stat_update("timeout")
                        logger.warning("⏰ Timeout while extracting a document's text. Skipping it.")
                        continue
                    except (ExtractionFailed, EOFError) as exc:  # EOFError: the worker died on it
                        self.stat_update("failed")
                        failed += 1
                        first = first or (str(exc) or type(exc).__name__)
                        if failed == seen == self.GUARD:
                            raise ExtractorBroken(
                                f"{self.library} failed on each of the first {seen} documents: {first}"
                            ) from None
                        continue
                if doc.text:
                    self.stat_update(StatHints.forwarded)
                    self.update_doc_stats(doc)
                    yield doc
                else:
                    self.stat_update(StatHints.dropped)
        if failed and failed == seen:
            raise ExtractorBroken(f"{self.library} failed on each of the {seen} documents: {first}")


class TrafilaturaExtractor(GuardedExtractor, Trafilatura):
    """datatrove's Trafilatura extractor, guarded (see :class:`GuardedExtractor`)."""

    library = "trafilatura"


class InscriptisExtractor(GuardedExtractor):
    """All visible text of an HTML page (inscriptis), for ``extract.method: inscriptis``."""

    name = "⛏ Inscriptis"
    library = "inscriptis"
    _requires_dependencies = ["inscriptis"]

    def __init__(self, timeout: float = 1) -> None:
        super().__init__(timeout)

    def extract(self, text: str) -> str:
        from inscriptis import get_text

        return re.sub(r"\n{3,}", "\n\n", get_text(text)).strip()


class SpecRegexFilter(BaseFilter):
    """Drops documents matching ``pattern`` (or, with ``keep``, those not matching)."""

    name = "🕵 Regex"

    def __init__(self, pattern: str, keep: bool = False, ignore_case: bool = True) -> None:
        super().__init__()
        self.pattern = pattern
        self.keep = keep
        self.ignore_case = ignore_case
        self._regex = re.compile(pattern, re.IGNORECASE if ignore_case else 0)

    def filter(self, doc: Document) -> bool:
        return bool(self._regex.search(doc.text)) == self.keep


class TextNormalizer(BaseFormatter):
    """Lowercasing and English stop-word removal (spaCy's list), for IR-style corpora."""

    name = "🔡 Normalizer"

    def __init__(self, lowercase: bool, remove_stop_words: bool) -> None:
        super().__init__()
        self.lowercase = lowercase
        self.remove_stop_words = remove_stop_words
        self._stop: frozenset[str] | None = None

    def format(self, text: str) -> str:
        if self.lowercase:
            text = text.lower()
        if self.remove_stop_words:
            if self._stop is None:
                from spacy.lang.en.stop_words import STOP_WORDS

                self._stop = frozenset(STOP_WORDS)
            stop = self._stop
            text = "\n".join(
                re.sub(
                    r"[ \t]{2,}",
                    " ",
                    re.sub(r"\b[\w']+\b", lambda m: "" if m.group(0).lower() in stop else m.group(0), line),
                ).strip()
                for line in text.split("\n")
            )
        return text


# -------------------------------------------------------------------------------------------- words
_WORD = re.compile(r"\w+(?:['’.\-]\w+)*|[^\w\s]", re.UNICODE)
_SENTENCE_END = re.compile(r"[.!?…。！？]+[\"'”’)\]]*(?=\s)|\n\s*\n")


class RegexWordTokenizer(WordTokenizer):
    """Words and sentences by Unicode regular expressions, for the quality filters and MinHash shingles.

    datatrove's default for English is spaCy's tokenizer: about 10 s to load in every worker and ~100 kB/s
    on documentation pages. This one splits words, numbers and punctuation marks the same way for
    space-separated scripts at tens of MB/s; it is not meant for Chinese, Japanese or Thai text."""

    def __init__(self) -> None:
        super().__init__("en")

    def word_tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text)

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans, start = [], 0
        for match in _SENTENCE_END.finditer(text):
            end = match.end()
            if text[start:end].strip():
                spans.append((start, end))
            start = end
        if text[start:].strip():
            spans.append((start, len(text)))
        return spans

    def sent_tokenize(self, text: str) -> list[str]:
        return [text[a:b].strip() for a, b in self.span_tokenize(text)]


WORDS = RegexWordTokenizer()


# ------------------------------------------------------------------------------------------- processes
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int | None = None) -> None:
    """Linux: this process gets SIGKILL when the process that started it (``parent``, its pid) exits,
    however it exits — a killed job leaves no worker behind. Called first thing in every process the
    data job starts."""
    if sys.platform != "linux":
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent is not None and os.getppid() != parent:  # it died before the call: no signal will come
        os._exit(1)


class _Anchor:
    """What the after-fork hooks hang on (multiprocessing keeps them while it lives)."""


_ANCHOR = _Anchor()
_HOOKED: list[bool] = []


def workers_die_with_parent() -> None:
    """From now on every process forked with multiprocessing or multiprocess — datatrove's worker pool and
    its Manager, the extraction sandbox, and their children — calls :func:`die_with_parent` first and
    takes SIGTERM's default action (no handler inherited from its parent): a killed data job takes its
    workers with it. Idempotent."""
    if _HOOKED:
        return
    import multiprocessing.util

    import multiprocess
    import multiprocess.util

    for mp in (multiprocessing, multiprocess):
        mp.util.register_after_fork(_ANCHOR, functools.partial(_after_fork, mp))
    _HOOKED.append(True)


def _after_fork(mp: Any, _anchor: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    parent = mp.parent_process()
    die_with_parent(parent.pid if parent is not None else None)
