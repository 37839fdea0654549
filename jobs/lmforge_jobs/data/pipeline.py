"""A Corpus spec as datatrove pipelines: one per stage of :mod:`lmforge_jobs.data.stages`.

Layout under ``spec.output`` (``OUT``)::

    OUT/documents/{train,held-out}/NNNNN.jsonl.gz   kept documents (outputs.documents)
    OUT/tokens/{train,held-out}/NNNNN_unshuffled.ds* token shards (see lmforge_jobs.data.tokenize)
    OUT/tokenizer/                                 tokenizer.json + config (outputs.tokenizer)
    OUT/stats.json                                 counts (outputs.stats); OUT/outputs.json marks completion
    OUT/work/<stage>/…                             intermediate documents, signatures, duplicates
    OUT/logs/<stage>/{completions,stats,logs}/     datatrove's per-rank markers, stats and logs
    OUT/logs/<stage>/counts/NNNNN.json             per-rank document counts (added up in stats.json)

:func:`run_stage` runs one rank (or all ranks, ``rank=None``) of one stage with datatrove's
LocalPipelineExecutor, which skips ranks whose completion marker exists.
"""

from __future__ import annotations

import glob as _glob
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge_jobs.data import stages as st
from lmforge_jobs.data.config import CorpusSpec, Source
from lmforge_jobs.entry import ConfigError
from lmforge_jobs.secrets import read_secret

GLOB_CHARS = re.compile(r"[*?\[]")
EXTENSIONS = {
    "warc": (".warc", ".warc.gz", ".arc", ".arc.gz"),
    "jsonl": (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz"),
    "parquet": (".parquet",),
}
# Stages whose Counts files feed stats.json, with the key of what they remove.
COUNTED = ("extract", "exact-filter", "minhash-filter", "tokenize")
# Filter stages and the signature stage whose per-rank document indexes they apply.
SIGNATURES = {"exact-filter": "exact-sigs", "minhash-filter": "minhash-sigs"}


# ------------------------------------------------------------------------------------------------ paths
def join(base: str, *parts: str) -> str:
    """``base/part/…`` for local paths and URIs alike."""
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local(uri: str) -> str:
    return uri.removeprefix("file://")


class Layout:
    """Where everything of one Corpus lives (see the module docstring)."""

    def __init__(self, output: str):
        self.out = output
        self.documents = join(output, "documents")
        self.tokens_train = join(output, "tokens", "train")
        self.tokens_held_out = join(output, "tokens", "held-out")
        self.tokenizer = join(output, "tokenizer")
        self.stats = join(output, "stats.json")
        self.work = join(output, "work")

    def logs(self, stage: str) -> str:
        return join(self.out, "logs", stage)

    def counts(self, stage: str) -> str:
        return join(self.logs(stage), "counts")

    def docs_after(self, spec: CorpusSpec, stage: str) -> str:
        """Folder of the documents a stage reads: those the last document-writing stage before it wrote."""
        names = st.stage_names(spec)
        folder = join(self.work, "extract")
        for name in names[: names.index(stage)]:
            if name in ("exact-filter", "minhash-filter"):
                folder = join(self.work, name)
        return folder


# -------------------------------------------------------------------------------------------- preflight
def expand_paths(source: Source, index: int) -> tuple[str, list[str]]:
    """(folder, files relative to it) of a file source; ConfigError naming the path when nothing matches."""
    import fsspec

    kind = source.kind
    cfg = getattr(source, kind)
    found: list[str] = []
    fs = None
    for j, path in enumerate(cfg.paths):
        field = f"sources[{index}].{kind}.paths[{j}]"
        fs, stripped = fsspec.core.url_to_fs(path)
        try:
            if GLOB_CHARS.search(stripped):
                matches = sorted(fs.glob(stripped))
            elif fs.isdir(stripped):
                matches = sorted(p for p in fs.find(stripped) if p.endswith(EXTENSIONS[kind]))
            elif fs.isfile(stripped):
                matches = [stripped]
            else:
                matches = []
        except (OSError, ValueError) as exc:
            raise ConfigError(field, f"cannot list {path}: {exc}") from None
        if not matches:
            raise ConfigError(field, f"no such file or directory (or nothing matches): {path}")
        found += [m for m in matches if m not in found]
    assert fs is not None
    common = (
        os.path.commonpath([os.path.dirname(p) or "/" for p in found])
        if len(found) > 1
        else (os.path.dirname(found[0]))
    )
    rel = [os.path.relpath(p, common) if common else p for p in found]
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    folder = common if protocol in ("file", "local") else f"{protocol}://{common}"
    return folder or "/", rel


def check_warc(folder: str, files: list[str], field: str) -> None:
    """The first record of each local WARC must parse: an unreadable file fails before anything runs."""
    from warcio.archiveiterator import ArchiveIterator
    from warcio.exceptions import ArchiveLoadFailed

    if not is_local(folder):
        return
    for rel in files:
        path = os.path.join(local(folder), rel)
        try:
            with open(path, "rb") as fh:
                records = 0
                for record in ArchiveIterator(fh):  # the first two records, payloads included
                    record.content_stream().read()
                    records += 1
                    if records == 2:
                        break
            if records == 0:
                raise ValueError("no WARC records")
        except (ArchiveLoadFailed, OSError, EOFError, ValueError) as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            message = " ".join(lines[:2]) if lines else type(exc).__name__
            raise ConfigError(field, f"{path} is not a readable WARC file: {message}") from None


def check_model_file(uri: str, field: str) -> None:
    if not is_local(uri):
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(uri)
            missing = not fs.exists(path)
        except Exception:  # no credentials here, say: the stage that loads it will tell
            return
        if missing:
            raise ConfigError(field, f"no such file: {uri} (models are never downloaded implicitly)")
        return
    if is_local(uri):
        path = Path(local(uri))
        if not path.is_file():
            raise ConfigError(field, f"no such file: {uri} (models are never downloaded implicitly)")
        if path.stat().st_size < 16:
            raise ConfigError(field, f"{uri} is not a fastText model")


def preflight(spec: CorpusSpec, stage: str | None = None) -> None:
    """Every input check that needs no processing — sources exist, WARCs parse, model files exist, the
    vocabulary can hold the byte alphabet — for one stage (``None``: all). Raises ConfigError."""
    from lmforge_jobs.data.tokenizer import check_pretrained, check_vocab_size

    if stage in (None, "tokenizer"):
        check_vocab_size(spec)
        check_pretrained(spec)
    if stage not in (None, "extract"):
        return
    for i, source in enumerate(spec.sources):
        if source.kind == "huggingface":
            hf = source.huggingface
            assert hf is not None
            if hf.dataset.startswith((".", "/", "file://")) and not Path(local(hf.dataset)).exists():
                raise ConfigError(f"sources[{i}].huggingface.dataset", f"no such directory: {hf.dataset}")
            if hf.token is not None:
                read_secret(hf.token, f"sources[{i}].huggingface.token")
            continue
        folder, files = expand_paths(source, i)
        if source.kind == "warc":
            check_warc(folder, files, f"sources[{i}].warc.paths")
    for i, flt in enumerate(spec.filters):
        if flt.language is not None:
            check_model_file(flt.language.model_path, f"filters[{i}].language.modelPath")
    if spec.domains is not None:
        check_model_file(spec.domains.classifier_path, "domains.classifierPath")


def filter_keys(spec: CorpusSpec) -> list[str]:
    """The removedBy key of each filter: its kind, with ``[position]`` when the kind appears twice."""
    kinds = [f.kind for f in spec.filters]
    return [k if kinds.count(k) == 1 else f"{k}[{i}]" for i, k in enumerate(kinds)]


# --------------------------------------------------------------------------------------------- builders
def _content(doc: Any) -> str:
    """What exact dedup compares: the text with whitespace runs collapsed and case folded."""
    return " ".join(doc.text.split()).casefold()


def _share(limit: int | None, rank: int, world: int) -> int:
    if limit is None:
        return -1
    return max(0, limit // world + (1 if rank < limit % world else 0)) or 0


def _source_readers(spec: CorpusSpec, rank: int, world: int) -> list[tuple[str, Any]]:
    """(kind, reader) per source; limits are split across ranks so they hold for the whole corpus."""
    from lmforge_jobs.data import blocks

    readers = []
    for i, source in enumerate(spec.sources):
        kind = source.kind
        cfg = getattr(source, kind)
        limit = _share(cfg.limit, rank, world)
        if limit == 0:
            continue
        meta = {"source": f"{kind}[{i}]"}
        if kind == "huggingface":
            options: dict[str, Any] = {"split": cfg.split}
            if cfg.config:
                options["name"] = cfg.config
            if cfg.revision:
                options["revision"] = cfg.revision
            is_dir = Path(local(cfg.dataset)).is_dir()
            token = read_secret(cfg.token, f"sources[{i}].huggingface.token") if cfg.token else None
            reader = blocks.HubDatasetReader(
                local(cfg.dataset) if is_dir else cfg.dataset,
                token=token,
                dataset_options=options,
                streaming=cfg.streaming and not is_dir,
                limit=limit,
                text_key=cfg.text_key,
                id_key=cfg.id_key or "id",
                default_metadata=meta,
            )
        else:
            folder, files = expand_paths(source, i)
            cls = {
                "warc": blocks.WarcSourceReader,
                "jsonl": blocks.JsonlSourceReader,
                "parquet": blocks.ParquetSourceReader,
            }[kind]
            extra = {} if kind == "warc" else {"text_key": cfg.text_key, "id_key": cfg.id_key}
            reader = cls(folder, files, limit=limit, default_metadata=meta, **extra)
        readers.append((kind, reader))
    return readers


def _extractor(spec: CorpusSpec) -> Any:
    from lmforge_jobs.data import blocks

    if spec.extract.method.value == "inscriptis":
        return blocks.InscriptisExtractor(timeout=spec.extract.timeout_seconds)
    from datatrove.pipeline.extractors import Trafilatura

    return Trafilatura(favour_precision=spec.extract.favour_precision, timeout=spec.extract.timeout_seconds)


def _filter(spec: CorpusSpec, index: int) -> Any:
    from datatrove.pipeline import filters as df

    from lmforge_jobs.data import blocks

    flt = spec.filters[index]
    if (c := flt.url) is not None:
        return blocks.OfflineURLFilter(
            extra_domains=c.extra_blocklist or None,
            banned_words=c.extra_banned_words or None,
            use_integrated_lists=c.use_integrated_lists,
        )
    if (c := flt.language) is not None:
        return blocks.PathLanguageFilter(local(c.model_path), c.languages, c.min_score)
    if (c := flt.gopher_repetition) is not None:
        return df.GopherRepetitionFilter(
            dup_line_frac=c.dup_line_frac,
            dup_para_frac=c.dup_para_frac,
            dup_line_char_frac=c.dup_line_char_frac,
            dup_para_char_frac=c.dup_para_char_frac,
            language=blocks.WORDS,
        )
    if (c := flt.gopher_quality) is not None:
        return df.GopherQualityFilter(
            min_doc_words=c.min_doc_words,
            max_doc_words=c.max_doc_words,
            min_avg_word_length=c.min_avg_word_length,
            max_avg_word_length=c.max_avg_word_length,
            max_symbol_word_ratio=c.max_symbol_word_ratio,
            max_bullet_lines_ratio=c.max_bullet_lines_ratio,
            max_ellipsis_lines_ratio=c.max_ellipsis_lines_ratio,
            max_non_alpha_words_ratio=c.max_non_alpha_words_ratio,
            min_stop_words=c.min_stop_words,
            language=blocks.WORDS,
        )
    if (c := flt.c4_quality) is not None:
        return df.C4QualityFilter(
            split_paragraph=c.split_paragraph,
            remove_citations=c.remove_citations,
            filter_no_terminal_punct=c.filter_no_terminal_punct,
            min_num_sentences=c.min_num_sentences,
            min_words_per_line=c.min_words_per_line,
            max_word_length=c.max_word_length,
            filter_lorem_ipsum=c.filter_lorem_ipsum,
            filter_javascript=c.filter_javascript,
            filter_curly_bracket=c.filter_curly_bracket,
            filter_policy=c.filter_policy,
            language=blocks.WORDS,
        )
    if (c := flt.fine_web_quality) is not None:
        return df.FineWebQualityFilter(
            line_punct_thr=c.line_punct_threshold,
            short_line_thr=c.short_line_threshold,
            short_line_length=c.short_line_length,
            char_duplicates_ratio=c.char_duplicates_ratio,
            new_line_ratio=c.new_line_ratio,
            language=blocks.WORDS,
        )
    c = flt.regex
    assert c is not None
    return blocks.SpecRegexFilter(c.pattern, keep=c.action.value == "keep", ignore_case=c.ignore_case)


def _exact_config() -> Any:
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig

    return ExactDedupConfig(content_getter=_content)


def _minhash_config(spec: CorpusSpec) -> Any:
    from datatrove.pipeline.dedup.minhash import MinhashConfig

    m = spec.dedup.minhash
    return MinhashConfig(n_grams=m.ngram, num_buckets=m.buckets, hashes_per_bucket=m.hashes_per_bucket)


def _writer(folder: str, filename: str = "${rank}.jsonl.gz") -> Any:
    from datatrove.pipeline.writers import JsonlWriter

    return JsonlWriter(folder, output_filename=filename)


def build_pipeline(spec: CorpusSpec, stage: str, rank: int, world: int, layout: Layout) -> list[Any]:
    """The datatrove steps one rank of ``stage`` runs."""
    from lmforge_jobs.data import blocks

    work = layout.work
    if stage == "extract":
        steps: list[Any] = []
        roles: list[tuple[str, Any]] = []
        readers = _source_readers(spec, rank, world)
        if not readers:  # every source's limit leaves this rank nothing to read
            steps.append(blocks.NoDocuments())
        html = [r for kind, r in readers if kind == "warc"]
        other = [r for kind, r in readers if kind != "warc"]
        steps += html
        roles += [("read", r) for r in html]
        if html:
            extractor = _extractor(spec)
            steps.append(extractor)
            roles.append(("extract", extractor))
        steps += other
        roles += [("read", r) for r in other]
        for i, key in enumerate(filter_keys(spec)):
            flt = _filter(spec, i)
            steps.append(flt)
            roles.append((key, flt))
        steps += _formatters(spec)
        if spec.domains is not None:
            steps.append(blocks.DomainLabeller(local(spec.domains.classifier_path)))
        steps.append(_writer(join(work, "extract")))
        steps.append(blocks.Counts(layout.counts(stage), roles))
        return steps
    source = layout.docs_after(spec, stage)
    if stage == "exact-sigs":
        from datatrove.pipeline.dedup import ExactDedupSignature

        return [blocks.RankReader(source), ExactDedupSignature(join(work, "exact-sigs"), _exact_config())]
    if stage == "exact-dups":
        from datatrove.pipeline.dedup.exact_dedup import ExactFindDedups

        return [ExactFindDedups(join(work, "exact-sigs"), join(work, "exact-dups"), _exact_config())]
    if stage == "exact-filter":
        from datatrove.pipeline.dedup import ExactDedupFilter

        reader = blocks.RankReader(source)
        flt = ExactDedupFilter(join(work, "exact-dups"), _exact_config())
        roles = [("read", reader), ("duplicates", flt)]
        return [reader, flt, _writer(join(work, stage)), blocks.Counts(layout.counts(stage), roles)]
    if stage == "minhash-sigs":
        from datatrove.pipeline.dedup import MinhashDedupSignature

        return [
            blocks.RankReader(source),
            MinhashDedupSignature(join(work, stage), _minhash_config(spec), language=blocks.WORDS),
        ]
    if stage == "minhash-buckets":
        from datatrove.pipeline.dedup import MinhashDedupBuckets

        return [
            MinhashDedupBuckets(join(work, "minhash-sigs"), join(work, stage), config=_minhash_config(spec))
        ]
    if stage == "minhash-clusters":
        from datatrove.pipeline.dedup import MinhashDedupCluster

        return [
            MinhashDedupCluster(
                join(work, "minhash-buckets"), join(work, stage), config=_minhash_config(spec)
            )
        ]
    if stage == "minhash-filter":
        from datatrove.pipeline.dedup import MinhashDedupFilter

        reader = blocks.RankReader(source)
        flt = MinhashDedupFilter(join(work, "minhash-clusters"))
        roles = [("read", reader), ("nearDuplicates", flt)]
        return [reader, flt, _writer(join(work, stage)), blocks.Counts(layout.counts(stage), roles)]
    if stage == "tokenize":
        from lmforge_jobs.data.tokenize import SplitTokenizer
        from lmforge_jobs.data.tokenizer import eos_of

        reader = blocks.RankReader(source)
        steps = [reader]
        roles = [("read", reader)]
        if spec.domains is not None:
            weights = blocks.DomainWeights(spec.domains.weights, spec.domains.default_weight)
            steps.append(weights)
            roles.append(("domains", weights))
        eos = eos_of(Path(local(layout.tokenizer))) if is_local(layout.tokenizer) else "<|endoftext|>"
        steps += [
            blocks.HeldOutSplit(spec.held_out_fraction),
            _writer(layout.documents, "${split}/${rank}.jsonl.gz"),
            blocks.Counts(layout.counts(stage), roles),
            SplitTokenizer(
                join(local(layout.tokenizer), "tokenizer.json"),
                eos,
                layout.tokens_train,
                layout.tokens_held_out,
                join(layout.documents, "held-out"),
            ),
        ]
        return steps
    raise ValueError(f"stage {stage!r} has no datatrove pipeline")


def _formatters(spec: CorpusSpec) -> list[Any]:
    from lmforge_jobs.data import blocks

    out: list[Any] = []
    if spec.normalize.unicode:
        from datatrove.pipeline.formatters import FTFYFormatter

        out.append(FTFYFormatter())
    if spec.normalize.lowercase or spec.normalize.remove_stop_words:
        out.append(blocks.TextNormalizer(spec.normalize.lowercase, spec.normalize.remove_stop_words))
    if spec.pii.emails or spec.pii.ip_addresses:
        from datatrove.pipeline.formatters import PIIFormatter

        out.append(
            PIIFormatter(
                remove_emails=spec.pii.emails,
                remove_ips=spec.pii.ip_addresses,
                email_replacement=spec.pii.email_replacement,
                ip_replacement=spec.pii.ip_replacement,
            )
        )
    return out


# ------------------------------------------------------------------------------------------------ counts
def read_counts(layout: Layout, stage: str) -> list[dict[str, Any]]:
    """The Counts files of a stage's completed ranks."""
    folder = layout.counts(stage)
    if not is_local(folder):
        from datatrove.io import get_datafolder

        df = get_datafolder(folder)
        return (
            [json.loads(df.open(f).read()) for f in df.list_files(glob_pattern="*.json")]
            if df.exists("")
            else []
        )
    return [
        json.loads(Path(p).read_text()) for p in sorted(_glob.glob(os.path.join(local(folder), "*.json")))
    ]


def completed_ranks(layout: Layout, stage: str) -> int:
    folder = join(layout.logs(stage), "completions")
    if is_local(folder):
        return len(_glob.glob(os.path.join(local(folder), "*")))
    from datatrove.io import get_datafolder

    return len(get_datafolder(folder).list_files())


def check_not_empty(spec: CorpusSpec, layout: Layout, stage: str) -> None:
    """After a document-writing stage completed all ranks: ConfigError if no document is left."""
    names = st.stage_names(spec)
    before = [n for n in names[: names.index(stage)] if n in COUNTED]
    if not before:
        return
    last = before[-1]
    if completed_ranks(layout, last) < st.get_stage(spec, last).tasks:
        return
    counts = read_counts(layout, last)
    if counts and sum(int(c.get("kept", 0)) for c in counts) == 0:
        read = sum(int(c.get("in", 0)) for c in read_counts(layout, "extract"))
        field = "filters" if last == "extract" and read else ("sources" if not read else "dedup")
        raise ConfigError(
            field,
            f"no documents left after the {last} stage ({read} read): the corpus would be empty; "
            "loosen the filters or add sources",
        )


# ------------------------------------------------------------------------------------------------ runner
class StageNotReady(Exception):
    """A stage was started before every rank of the one before it completed (an orchestration error,
    worth a retry; exit code 75)."""


def check_previous_complete(spec: CorpusSpec, layout: Layout, stage: str) -> None:
    names = st.stage_names(spec)
    index = names.index(stage)
    if index == 0:
        return
    previous = st.get_stage(spec, names[index - 1])
    if previous.name == st.FINAL_STAGE:
        return
    done = completed_ranks(layout, previous.name)
    if done < previous.tasks:
        raise StageNotReady(
            f"stage {stage} needs every rank of {previous.name}: {done}/{previous.tasks} completed"
        )


def run_stage(
    spec: CorpusSpec,
    stage: str,
    *,
    rank: int | None,
    world: int | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Run ``stage`` for one rank or all of them; returns ``{documents, seconds, documentsPerSecond}``."""
    from lmforge_jobs.data import blocks

    assert spec.output is not None
    layout = Layout(spec.output)
    info = st.get_stage(spec, stage)
    world = world or info.tasks
    if info.tasks == 1 and world != 1:
        raise ConfigError("parallelism.tasks", f"stage {stage} runs as one rank; --world must be 1")
    if stage == "minhash-buckets" and world % spec.dedup.minhash.buckets:
        raise ConfigError("dedup.minhash.buckets", f"--world {world} must be a multiple of the bucket count")
    if rank is not None and not 0 <= rank < world:
        raise ConfigError("parallelism.tasks", f"rank {rank} is outside 0..{world - 1} for stage {stage}")
    check_previous_complete(spec, layout, stage)
    signed = SIGNATURES.get(stage)
    if signed is not None and completed_ranks(layout, signed) not in (0, world):
        # duplicate indexes are positions within one rank's documents: other ranks would drop others
        raise ConfigError(
            "parallelism.tasks",
            f"--world {world} of stage {stage} must equal that of {signed} "
            f"({completed_ranks(layout, signed)} ranks)",
        )
    check_not_empty(spec, layout, stage)
    started = time.monotonic()
    if stage == "tokenizer":
        _run_tokenizer(spec, layout, rank or 0)
    elif stage == st.FINAL_STAGE:
        pass  # the caller writes stats.json and outputs.json
    else:
        ranks = list(range(world)) if rank is None else [rank]
        try:
            _run_ranks(spec, stage, layout, ranks, world, workers)
        except blocks.UnreadableInput as exc:
            raise ConfigError(
                _field_of(spec, exc.path), f"{exc.path}: not a readable input: {exc.reason}"
            ) from None
    seconds = max(time.monotonic() - started, 1e-9)
    docs = _stage_documents(layout, stage)
    return {"documents": docs, "seconds": seconds, "documentsPerSecond": docs / seconds if docs else 0.0}


def _field_of(spec: CorpusSpec, path: str) -> str:
    """The spec field of the source an unreadable file belongs to."""
    for i, source in enumerate(spec.sources):
        if source.kind == "huggingface":
            continue
        _, files = expand_paths(source, i)
        if any(path == rel or path.endswith("/" + rel) for rel in files):
            return f"sources[{i}].{source.kind}.paths"
    return "sources"


def _stage_documents(layout: Layout, stage: str) -> int:
    if stage in COUNTED:
        return sum(int(c.get("in", 0)) for c in read_counts(layout, stage))
    return 0


def _run_ranks(
    spec: CorpusSpec, stage: str, layout: Layout, ranks: list[int], world: int, workers: int
) -> None:
    """Ranks differ only in their source limits; each gets its own executor when limits are set."""
    from datatrove.executor import LocalPipelineExecutor

    limited = stage == "extract" and any(getattr(s, s.kind).limit for s in spec.sources)
    groups = [[r] for r in ranks] if limited else [ranks]
    for group in groups:
        ex = LocalPipelineExecutor(
            pipeline=build_pipeline(spec, stage, group[0], world, layout),
            tasks=world,
            workers=max(1, min(workers, len(group))),
            logging_dir=layout.logs(stage),
            local_tasks=len(group),
            local_rank_offset=group[0],
            start_method="fork" if os.name == "posix" else "spawn",
        )
        if len(group) > 1 and group != list(range(group[0], group[0] + len(group))):
            raise AssertionError("rank groups are contiguous")
        ex.run()


def _run_tokenizer(spec: CorpusSpec, layout: Layout, rank: int) -> None:
    """The tokenizer stage: one rank; its completion marker is written like datatrove's."""
    from datatrove.io import get_datafolder

    from lmforge_jobs.data import tokenizer

    logs = get_datafolder(layout.logs("tokenizer"))
    if logs.isfile(f"completions/{rank:05d}"):
        return
    source = layout.docs_after(spec, "tokenizer")
    train = spec.tokenizer.train
    limit = train.sample_documents if train is not None else 0

    def texts() -> Iterator[str]:
        from datatrove.pipeline.readers import JsonlReader

        reader = JsonlReader(source)
        n = 0
        for name in sorted(reader.data_folder.list_files(glob_pattern="*.jsonl.gz")):
            for doc in reader.read_file(name):
                if n >= limit:
                    return
                n += 1
                yield doc.text

    if is_local(layout.tokenizer):
        tokenizer.build(spec, texts(), Path(local(layout.tokenizer)))
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.build(spec, texts(), Path(tmp))
            out = get_datafolder(layout.tokenizer)
            for item in Path(tmp).iterdir():
                with out.open(item.name, "wb") as fh:
                    fh.write(item.read_bytes())
    logs.open(f"completions/{rank:05d}", "w").close()


# ------------------------------------------------------------------------------------------------- stats
def token_counts(folder: str) -> int:
    """Tokens in a shard folder, from the ``.ds.metadata`` files."""
    from datatrove.io import get_datafolder

    df = get_datafolder(folder)
    if not df.exists(""):
        return 0
    total = 0
    for name in df.list_files(glob_pattern="*.ds.metadata"):
        with df.open(name, "rt") as fh:
            lines = fh.read().splitlines()
        total += int(lines[1]) if len(lines) > 1 else 0
    return total


def build_stats(spec: CorpusSpec) -> dict[str, Any]:
    """stats.json: read = kept + Σ removedBy, per-filter kept/removed in order, bytes and tokens per split."""
    assert spec.output is not None
    layout = Layout(spec.output)
    names = st.stage_names(spec)
    extract = read_counts(layout, "extract")
    read = sum(int(c["in"]) for c in extract)
    removed: dict[str, int] = {}
    for stage in COUNTED:
        if stage not in names:
            continue
        for c in read_counts(layout, stage):
            for key, n in c.get("removed", {}).items():
                removed[key] = removed.get(key, 0) + int(n)
    filters = []
    remaining = read - removed.get("extract", 0)
    for i, (flt, key) in enumerate(zip(spec.filters, filter_keys(spec), strict=True)):
        gone = removed.get(key, 0)
        remaining -= gone
        filters.append({"name": key, "kind": flt.kind, "position": i, "kept": remaining, "removed": gone})
    splits: dict[str, dict[str, int]] = {}
    for c in read_counts(layout, "tokenize"):
        for split, entry in c.get("splits", {}).items():
            agg = splits.setdefault(split, {"documents": 0, "bytes": 0, "repeats": 0})
            for k in agg:
                agg[k] += int(entry.get(k, 0))
    train, held = splits.get("train", {}), splits.get("held-out", {})
    kept = int(train.get("documents", 0)) + int(held.get("documents", 0))
    stats = {
        "read": read,
        "kept": kept,
        "removedBy": removed,
        "filters": filters,
        "documents": {"train": int(train.get("documents", 0)), "heldOut": int(held.get("documents", 0))},
        "repeated": int(train.get("repeats", 0)),
        "bytes": {
            "afterFilters": sum(int(c.get("bytes", 0)) for c in extract),
            "kept": int(train.get("bytes", 0)) + int(held.get("bytes", 0)),
            "train": int(train.get("bytes", 0)),
            "heldOut": int(held.get("bytes", 0)),
        },
        "tokens": {
            "train": token_counts(layout.tokens_train),
            "heldOut": token_counts(layout.tokens_held_out),
        },
        "consistent": read == kept + sum(removed.values()),
    }
    return stats


__all__ = ["Layout", "build_pipeline", "build_stats", "filter_keys", "preflight", "run_stage"]
