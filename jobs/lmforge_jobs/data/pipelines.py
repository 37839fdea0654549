"""Each stage of :mod:`lmforge_jobs.data.stages` as a datatrove pipeline, written as datatrove writes them:
a list literal of steps per stage, in :data:`PIPELINES`.

A pipeline is built for one rank (source limits are split across ranks). Steps whose documents the
stage's :class:`~lmforge_jobs.data.blocks.Counts` step tallies are written ``(key, step)``: ``"read"`` for
readers, else the ``removedBy`` key of what the step removes (see :func:`counted`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from datatrove.pipeline import filters as df
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import (
    ExactDedupFilter,
    ExactDedupSignature,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig, ExactFindDedups
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.pipeline.formatters import FTFYFormatter, PIIFormatter
from datatrove.pipeline.writers import JsonlWriter

from lmforge_jobs import storage
from lmforge_jobs.data import blocks
from lmforge_jobs.data.config import FILTER_KINDS, CorpusSpec
from lmforge_jobs.data.extractors import ResiliparseExtractor
from lmforge_jobs.data.layout import Layout, join
from lmforge_jobs.data.preflight import expand_paths
from lmforge_jobs.data.readers import warc_reader
from lmforge_jobs.secrets import read_secret

# A step, or (key, step) for a step the stage's Counts tallies.
Step = PipelineStep | tuple[str, PipelineStep]


@dataclass(frozen=True)
class Context:
    """What a stage's pipeline is built from: the spec, the stage, one rank of ``world``, the layout."""

    spec: CorpusSpec
    stage: str
    rank: int
    world: int
    layout: Layout

    def work(self, name: str) -> str:
        """``OUT/work/<name>``: a stage's intermediate output."""
        return join(self.layout.work, name)

    @property
    def source(self) -> str:
        """The documents this stage reads (those the last document-writing stage before it wrote)."""
        return self.layout.docs_after(self.spec, self.stage)


PIPELINES: dict[str, Callable[[Context], list[PipelineStep]]] = {
    "extract": lambda c: counted(
        c,
        *sources(c),
        *filters(c.spec),
        *formatters(c.spec),
        *domain_labeller(c.spec),
        writer(c.work("extract")),
    ),
    "exact-sigs": lambda c: [
        blocks.RankReader(c.source),
        ExactDedupSignature(c.work("exact-sigs"), exact_config()),
    ],
    "exact-dups": lambda c: [
        ExactFindDedups(c.work("exact-sigs"), c.work("exact-dups"), exact_config()),
    ],
    "exact-filter": lambda c: counted(
        c,
        ("read", blocks.RankReader(c.source)),
        ("duplicates", ExactDedupFilter(c.work("exact-dups"), exact_config())),
        writer(c.work("exact-filter")),
    ),
    "minhash-sigs": lambda c: [
        blocks.RankReader(c.source),
        MinhashDedupSignature(c.work("minhash-sigs"), minhash_config(c.spec), language=blocks.WORDS),
    ],
    "minhash-buckets": lambda c: [
        MinhashDedupBuckets(c.work("minhash-sigs"), c.work("minhash-buckets"), config=minhash_config(c.spec)),
    ],
    "minhash-clusters": lambda c: [
        MinhashDedupCluster(
            c.work("minhash-buckets"), c.work("minhash-clusters"), config=minhash_config(c.spec)
        ),
    ],
    "minhash-filter": lambda c: counted(
        c,
        ("read", blocks.RankReader(c.source)),
        ("nearDuplicates", MinhashDedupFilter(c.work("minhash-clusters"))),
        writer(c.work("minhash-filter")),
    ),
    "tokenize": lambda c: [
        *counted(
            c,
            ("read", blocks.RankReader(c.source)),
            *domain_weights(c.spec),
            blocks.HeldOutSplit(c.spec.held_out_fraction),
            writer(c.layout.documents, "${split}/${rank}.jsonl.gz"),
        ),
        split_tokenizer(c.spec, c.layout),
    ],
}


def build_pipeline(spec: CorpusSpec, stage: str, rank: int, world: int, layout: Layout) -> list[Any]:
    """The datatrove steps one rank of ``stage`` runs."""
    if stage not in PIPELINES:
        raise ValueError(f"stage {stage!r} has no datatrove pipeline")
    return PIPELINES[stage](Context(spec, stage, rank, world, layout))


def counted(c: Context, *steps: Step) -> list[PipelineStep]:
    """The steps, then the Counts step that writes what the ``(key, step)`` ones read and removed."""
    roles = [step for step in steps if isinstance(step, tuple)]
    plain = [step[1] if isinstance(step, tuple) else step for step in steps]
    return [*plain, blocks.Counts(c.layout.counts(c.stage), roles)]


def filter_keys(spec: CorpusSpec) -> list[str]:
    """The removedBy key of each filter: its kind, with ``[position]`` when the kind appears twice."""
    kinds = [f.kind for f in spec.filters]
    return [k if kinds.count(k) == 1 else f"{k}[{i}]" for i, k in enumerate(kinds)]


# ------------------------------------------------------------------------------------------------ sources
def _share(limit: int | None, rank: int, world: int) -> int:
    if limit is None:
        return -1
    return max(0, limit // world + (1 if rank < limit % world else 0)) or 0


def sources(c: Context) -> list[Step]:
    """The readers of every source (limits split across ranks so they hold for the whole corpus); HTML
    readers come first, followed by the extractor."""
    readers = []
    for i, source in enumerate(c.spec.sources):
        if (reader := source_reader(c, i)) is not None:
            readers.append((source.kind, reader))
    if not readers:  # every source's limit leaves this rank nothing to read
        return [blocks.NoDocuments()]
    html: list[Step] = [("read", r) for kind, r in readers if kind == "warc"]
    other: list[Step] = [("read", r) for kind, r in readers if kind != "warc"]
    return [*html, ("extract", extractor(c.spec)), *other] if html else other


def source_reader(c: Context, index: int) -> PipelineStep | None:
    """The reader of source ``index`` for this rank; None when its limit leaves this rank nothing."""
    source = c.spec.sources[index]
    kind = source.kind
    cfg = getattr(source, kind)
    limit = _share(cfg.limit, c.rank, c.world)
    if limit == 0:
        return None
    meta = {"source": f"{kind}[{index}]"}
    if kind == "huggingface":
        options: dict[str, Any] = {"split": cfg.split}
        if cfg.config:
            options["name"] = cfg.config
        if cfg.revision:
            options["revision"] = cfg.revision
        local_dir = storage.local_path(cfg.dataset)
        is_dir = not storage.is_remote(cfg.dataset) and local_dir.is_dir()
        token = read_secret(cfg.token, f"sources[{index}].huggingface.token") if cfg.token else None
        return blocks.HubDatasetReader(
            str(local_dir) if is_dir else cfg.dataset,
            token=token,
            dataset_options=options,
            streaming=cfg.streaming and not is_dir,
            limit=limit,
            text_key=cfg.text_key,
            id_key=cfg.id_key or "id",
            default_metadata=meta,
        )
    folder, files = expand_paths(source, index)
    if kind == "warc":
        return warc_reader(cfg.reader)(folder, files, limit=limit, default_metadata=meta)
    reader = {"jsonl": blocks.JsonlSourceReader, "parquet": blocks.ParquetSourceReader}[kind]
    return reader(folder, files, limit=limit, default_metadata=meta, text_key=cfg.text_key, id_key=cfg.id_key)


EXTRACTORS: dict[str, Callable[[CorpusSpec], PipelineStep]] = {
    "trafilatura": lambda spec: blocks.TrafilaturaExtractor(
        favour_precision=spec.extract.favour_precision, timeout=spec.extract.timeout_seconds
    ),
    "inscriptis": lambda spec: blocks.InscriptisExtractor(timeout=spec.extract.timeout_seconds),
    "resiliparse": lambda spec: ResiliparseExtractor(
        main_content=spec.extract.main_content, timeout=spec.extract.timeout_seconds
    ),
}


def extractor(spec: CorpusSpec) -> PipelineStep:
    return EXTRACTORS[spec.extract.method.value](spec)


# ------------------------------------------------------------------------------------------------ filters
# One datatrove filter per kind of spec.filters[i], built from that kind's settings.
FILTERS: dict[str, Callable[[Any], PipelineStep]] = {
    "url": lambda c: blocks.OfflineURLFilter(
        extra_domains=c.extra_blocklist or None,
        banned_words=c.extra_banned_words or None,
        use_integrated_lists=c.use_integrated_lists,
    ),
    "language": lambda c: blocks.PathLanguageFilter(c.model_path, c.languages, c.min_score),
    "gopher_repetition": lambda c: df.GopherRepetitionFilter(
        dup_line_frac=c.dup_line_frac,
        dup_para_frac=c.dup_para_frac,
        dup_line_char_frac=c.dup_line_char_frac,
        dup_para_char_frac=c.dup_para_char_frac,
        language=blocks.WORDS,
    ),
    "gopher_quality": lambda c: df.GopherQualityFilter(
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
    ),
    "c4_quality": lambda c: df.C4QualityFilter(
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
    ),
    "fine_web_quality": lambda c: df.FineWebQualityFilter(
        line_punct_thr=c.line_punct_threshold,
        short_line_thr=c.short_line_threshold,
        short_line_length=c.short_line_length,
        char_duplicates_ratio=c.char_duplicates_ratio,
        new_line_ratio=c.new_line_ratio,
        language=blocks.WORDS,
    ),
    "regex": lambda c: blocks.SpecRegexFilter(
        c.pattern, keep=c.action.value == "keep", ignore_case=c.ignore_case
    ),
}


def filters(spec: CorpusSpec) -> list[Step]:
    """spec.filters in order, each as ``(its removedBy key, datatrove filter)``."""
    steps: list[Step] = []
    for flt, key in zip(spec.filters, filter_keys(spec), strict=True):
        kind = next(k for k in FILTER_KINDS if getattr(flt, k) is not None)
        steps.append((key, FILTERS[kind](getattr(flt, kind))))
    return steps


def formatters(spec: CorpusSpec) -> list[PipelineStep]:
    out: list[PipelineStep] = []
    if spec.normalize.unicode:
        out.append(FTFYFormatter())
    if spec.normalize.lowercase or spec.normalize.remove_stop_words:
        out.append(blocks.TextNormalizer(spec.normalize.lowercase, spec.normalize.remove_stop_words))
    if spec.pii.emails or spec.pii.ip_addresses:
        out.append(
            PIIFormatter(
                remove_emails=spec.pii.emails,
                remove_ips=spec.pii.ip_addresses,
                email_replacement=spec.pii.email_replacement,
                ip_replacement=spec.pii.ip_replacement,
            )
        )
    return out


# ---------------------------------------------------------------------------------------- domains, dedup
def domain_labeller(spec: CorpusSpec) -> list[PipelineStep]:
    return [] if spec.domains is None else [blocks.DomainLabeller(spec.domains.classifier_path)]


def domain_weights(spec: CorpusSpec) -> list[Step]:
    if spec.domains is None:
        return []
    return [("domains", blocks.DomainWeights(spec.domains.weights, spec.domains.default_weight))]


def _content(doc: Any) -> str:
    """What exact dedup compares: the text with whitespace runs collapsed and case folded."""
    return " ".join(doc.text.split()).casefold()


def exact_config() -> ExactDedupConfig:
    return ExactDedupConfig(content_getter=_content)


def minhash_config(spec: CorpusSpec) -> MinhashConfig:
    m = spec.dedup.minhash
    return MinhashConfig(n_grams=m.ngram, num_buckets=m.buckets, hashes_per_bucket=m.hashes_per_bucket)


# ------------------------------------------------------------------------------------------------ output
def writer(folder: str, filename: str = "${rank}.jsonl.gz") -> PipelineStep:
    return JsonlWriter(folder, output_filename=filename)


def split_tokenizer(spec: CorpusSpec, layout: Layout) -> PipelineStep:
    from lmforge_jobs.data.tokenize import SplitTokenizer
    from lmforge_jobs.data.tokenizer import eos_of

    return SplitTokenizer(
        join(layout.tokenizer, "tokenizer.json"),
        eos_of(spec, layout.tokenizer),
        layout.tokens_train,
        layout.tokens_held_out,
        join(layout.documents, "held-out"),
    )


__all__ = ["EXTRACTORS", "FILTERS", "PIPELINES", "Context", "build_pipeline", "filter_keys"]
