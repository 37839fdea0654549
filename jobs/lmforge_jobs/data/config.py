"""Corpus spec: what the data job (``python -m lmforge_jobs.data --manifest corpus.yaml``) reads.

Sources → HTML extraction → filters (in order) → normalisation → PII redaction → exact and MinHash
dedup → optional domain weights → BPE tokenizer → tokenised shards, with a held-out split.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, field_validator, model_validator

from lmforge_jobs.spec import (
    Cel,
    Image,
    PodTemplate,
    Progress,
    Resources,
    Scheduling,
    SecretRef,
    ShortStr,
    Spec,
    SpecError,
    StatusBase,
    Storage,
    Tracking,
    Uri,
    cel_exactly_one,
    exactly_one,
)

Fraction = Annotated[float, Field(ge=0, le=1)]
Paths = Annotated[list[Uri], Field(min_length=1, max_length=1000)]
Limit = Annotated[int, Field(ge=1)]


# ---------------------------------------------------------------------------------------------- sources
class WarcReaderKind(str, Enum):
    auto = "auto"
    fastwarc = "fastwarc"
    warcio = "warcio"


class WarcSource(Spec):
    """Web archive files (WARC, optionally gzipped), e.g. Common Crawl segments."""

    paths: Paths
    """Files or glob patterns (local, pvc://, s3://, gs://, hf://)."""
    limit: Limit | None = None
    """Read at most this many records in total (all ranks together)."""
    reader: WarcReaderKind = WarcReaderKind.auto
    """WARC parser: fastwarc (faster) or warcio, the same documents either way; auto: fastwarc if
    installed."""


class JsonlSource(Spec):
    """JSON Lines files (optionally .gz/.zst compressed), one document per line."""

    paths: Paths
    """Files or glob patterns."""
    text_key: ShortStr = "text"
    """Key holding the document text."""
    id_key: ShortStr = "id"
    """Key holding the document id (generated when absent)."""
    limit: Limit | None = None
    """Read at most this many documents."""


class ParquetSource(Spec):
    """Parquet files, one document per row."""

    paths: Paths
    """Files or glob patterns."""
    text_key: ShortStr = "text"
    """Column holding the document text."""
    id_key: ShortStr = "id"
    """Column holding the document id (generated when absent)."""
    limit: Limit | None = None
    """Read at most this many documents."""


class HuggingFaceSource(Spec):
    """A dataset on the Hugging Face hub (or a local dataset directory), read with the datasets library."""

    dataset: Annotated[str, StringConstraints(min_length=1, max_length=2048)]
    """Hub dataset id (HuggingFaceFW/fineweb-edu) or a local dataset directory."""
    config: ShortStr | None = None
    """Dataset configuration (subset) name."""
    split: ShortStr = "train"
    """Split to read."""
    text_key: ShortStr = "text"
    """Column holding the document text."""
    id_key: ShortStr | None = None
    """Column holding the document id (generated when absent)."""
    revision: ShortStr | None = None
    """Dataset revision (branch, tag or commit)."""
    streaming: bool = True
    """Stream the dataset instead of downloading it whole."""
    limit: Limit | None = None
    """Read at most this many documents."""
    token: SecretRef | None = None
    """Hub token for gated or private datasets, by Secret reference."""


SOURCE_KINDS = ("warc", "jsonl", "parquet", "huggingface")


class Source(Spec):
    """One input of the corpus; exactly one of warc, jsonl, parquet, huggingface."""

    __cel__ = (
        Cel(cel_exactly_one(SOURCE_KINDS), "exactly one of warc, jsonl, parquet, huggingface must be set"),
    )

    warc: WarcSource | None = None
    """Web archive files; HTML is extracted to text."""
    jsonl: JsonlSource | None = None
    """JSON Lines documents."""
    parquet: ParquetSource | None = None
    """Parquet documents."""
    huggingface: HuggingFaceSource | None = None
    """A Hugging Face dataset."""

    @model_validator(mode="after")
    def _one_kind(self) -> Source:
        exactly_one(self, SOURCE_KINDS)
        return self

    @property
    def kind(self) -> str:
        return next(k for k in SOURCE_KINDS if getattr(self, k) is not None)


# ------------------------------------------------------------------------------------------- extraction
class ExtractMethod(str, Enum):
    trafilatura = "trafilatura"
    inscriptis = "inscriptis"
    resiliparse = "resiliparse"


class Extract(Spec):
    """HTML to text extraction for web sources."""

    method: ExtractMethod = ExtractMethod.trafilatura
    """Extractor: trafilatura (main content, drops boilerplate), inscriptis (all visible text) or
    resiliparse (main content by fast rules, as DCLM extracted Common Crawl; several times faster)."""
    favour_precision: bool = True
    """trafilatura: prefer dropping doubtful text over keeping boilerplate."""
    main_content: bool = True
    """resiliparse: keep only main-content elements (false: all visible text)."""
    timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 1.0
    """Give up on a page after this many seconds."""


# ---------------------------------------------------------------------------------------------- filters
class UrlFilter(Spec):
    """Drop documents from blocklisted domains or with banned words in the URL (datatrove URLFilter)."""

    extra_blocklist: Annotated[list[ShortStr], Field(max_length=100000)] = []
    """Domains to drop in addition to the built-in adult-content list."""
    extra_banned_words: Annotated[list[ShortStr], Field(max_length=10000)] = []
    """Words that drop a document when found in its URL."""
    use_integrated_lists: bool = True
    """Also use datatrove's built-in blocklists."""


class LanguageFilter(Spec):
    """Keep documents in the listed languages (fastText language identification)."""

    languages: Annotated[
        list[Annotated[str, StringConstraints(pattern=r"^[a-z]{2,3}(_[A-Za-z]+)?$")]],
        Field(min_length=1, max_length=200),
    ] = ["en"]
    """ISO 639 codes to keep, e.g. [en, de]."""
    min_score: Fraction = 0.65
    """Minimum language-ID confidence to keep a document."""
    model_path: Uri
    """fastText language-ID model file (e.g. lid.176.bin); never downloaded implicitly."""


class GopherRepetitionFilter(Spec):
    """Drop documents with repeated lines, paragraphs or n-grams (Gopher, Rae et al. 2021)."""

    dup_line_frac: Fraction = 0.3
    """Maximum fraction of duplicated lines."""
    dup_para_frac: Fraction = 0.3
    """Maximum fraction of duplicated paragraphs."""
    dup_line_char_frac: Fraction = 0.2
    """Maximum fraction of characters in duplicated lines."""
    dup_para_char_frac: Fraction = 0.2
    """Maximum fraction of characters in duplicated paragraphs."""


class GopherQualityFilter(Spec):
    """Gopher quality heuristics: length, word length, symbols, bullets, ellipses, stop words."""

    __cel__ = (
        Cel(
            "self.minDocWords <= self.maxDocWords",
            "minDocWords must not exceed maxDocWords",
            field="minDocWords",
        ),
        Cel(
            "self.minAvgWordLength <= self.maxAvgWordLength",
            "minAvgWordLength must not exceed maxAvgWordLength",
            field="minAvgWordLength",
        ),
    )

    min_doc_words: Annotated[int, Field(ge=0)] = 50
    """Minimum number of words."""
    max_doc_words: Annotated[int, Field(ge=1)] = 100000
    """Maximum number of words."""
    min_avg_word_length: Annotated[float, Field(ge=0)] = 3
    """Minimum mean word length in characters."""
    max_avg_word_length: Annotated[float, Field(ge=0)] = 10
    """Maximum mean word length in characters."""
    max_symbol_word_ratio: Fraction = 0.1
    """Maximum ratio of # and … symbols to words."""
    max_bullet_lines_ratio: Fraction = 0.9
    """Maximum fraction of lines starting with a bullet."""
    max_ellipsis_lines_ratio: Fraction = 0.3
    """Maximum fraction of lines ending with an ellipsis."""
    max_non_alpha_words_ratio: Fraction = 0.8
    """Minimum fraction of words with an alphabetic character (named as in Gopher)."""
    min_stop_words: Annotated[int, Field(ge=0)] = 2
    """Minimum number of English stop words."""

    @model_validator(mode="after")
    def _ranges(self) -> GopherQualityFilter:
        if self.min_doc_words > self.max_doc_words:
            raise SpecError("minDocWords", "minDocWords must not exceed maxDocWords")
        if self.min_avg_word_length > self.max_avg_word_length:
            raise SpecError("minAvgWordLength", "minAvgWordLength must not exceed maxAvgWordLength")
        return self


class C4QualityFilter(Spec):
    """C4 heuristics (Raffel et al. 2020): terminal punctuation, short lines, javascript, policy text."""

    split_paragraph: bool = True
    """Apply line rules per paragraph (true) or per sentence (false)."""
    remove_citations: bool = True
    """Remove Wikipedia-style citation markers like [1]."""
    filter_no_terminal_punct: bool = True
    """Drop lines that do not end in terminal punctuation."""
    min_num_sentences: Annotated[int, Field(ge=0)] = 5
    """Minimum number of sentences."""
    min_words_per_line: Annotated[int, Field(ge=0)] = 3
    """Drop lines with fewer words."""
    max_word_length: Annotated[int, Field(ge=1)] = 1000
    """Drop lines with a longer word."""
    filter_lorem_ipsum: bool = True
    """Drop documents containing lorem ipsum."""
    filter_javascript: bool = True
    """Drop lines mentioning javascript."""
    filter_curly_bracket: bool = True
    """Drop documents containing curly brackets (code)."""
    filter_policy: bool = True
    """Drop lines with cookie or terms-of-use boilerplate."""


class FineWebQualityFilter(Spec):
    """FineWeb heuristics (Penedo et al. 2024): line punctuation, short lines, duplicated characters."""

    line_punct_threshold: Fraction = 0.12
    """Minimum fraction of lines ending in punctuation."""
    short_line_threshold: Fraction = 0.67
    """Maximum fraction of short lines."""
    short_line_length: Annotated[int, Field(ge=1)] = 30
    """A line shorter than this many characters is short."""
    char_duplicates_ratio: Fraction = 0.01
    """Maximum fraction of characters in duplicated lines."""
    new_line_ratio: Fraction = 0.3
    """Maximum ratio of newlines to words."""


class RegexAction(str, Enum):
    drop = "drop"
    keep = "keep"


class RegexFilter(Spec):
    """Drop (or keep only) documents matching a regular expression."""

    pattern: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    """Python regular expression searched in the text."""
    action: RegexAction = RegexAction.drop
    """drop: remove matching documents; keep: keep only matching documents."""
    ignore_case: bool = True
    """Match case-insensitively."""

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


FILTER_KINDS = (
    "url",
    "language",
    "gopher_repetition",
    "gopher_quality",
    "c4_quality",
    "fine_web_quality",
    "regex",
)
FILTER_KINDS_CAMEL = (
    "url",
    "language",
    "gopherRepetition",
    "gopherQuality",
    "c4Quality",
    "fineWebQuality",
    "regex",
)


class Filter(Spec):
    """One filter step; exactly one kind. Each reports how many documents it kept and removed."""

    __cel__ = (
        Cel(
            cel_exactly_one(FILTER_KINDS_CAMEL),
            "exactly one of " + ", ".join(FILTER_KINDS_CAMEL) + " must be set",
        ),
    )

    url: UrlFilter | None = None
    """URL and domain blocklist."""
    language: LanguageFilter | None = None
    """Language identification."""
    gopher_repetition: GopherRepetitionFilter | None = None
    """Gopher repetition heuristics."""
    gopher_quality: GopherQualityFilter | None = None
    """Gopher quality heuristics."""
    c4_quality: C4QualityFilter | None = None
    """C4 quality heuristics."""
    fine_web_quality: FineWebQualityFilter | None = None
    """FineWeb quality heuristics."""
    regex: RegexFilter | None = None
    """Regular expression match."""

    @model_validator(mode="after")
    def _one_kind(self) -> Filter:
        exactly_one(self, FILTER_KINDS)
        return self

    @property
    def kind(self) -> str:
        """camelCase name of the filter kind, used in statistics (``removedBy``)."""
        return next(
            c for p, c in zip(FILTER_KINDS, FILTER_KINDS_CAMEL, strict=True) if getattr(self, p) is not None
        )


# ------------------------------------------------------------------------------------ cleaning and dedup
class Normalize(Spec):
    """Text normalisation; everything but the unicode fix is off by default."""

    lowercase: bool = False
    """Lowercase all text (rarely wanted for generative models)."""
    remove_stop_words: bool = False
    """Remove English stop words (for classic IR-style corpora; off for language modelling)."""
    unicode: bool = True
    """Repair mojibake and normalise unicode (ftfy)."""


class Pii(Spec):
    """Redaction of personal data."""

    emails: bool = True
    """Replace e-mail addresses."""
    ip_addresses: bool = True
    """Replace public IP addresses."""
    email_replacement: ShortStr = "email@example.com"
    """Text that replaces an e-mail address."""
    ip_replacement: ShortStr = "0.0.0.0"
    """Text that replaces an IP address."""


class MinHash(Spec):
    """Near-duplicate removal with MinHash LSH (signatures → buckets → clusters → filter)."""

    enabled: bool = True
    """Run MinHash deduplication."""
    ngram: Annotated[int, Field(ge=1, le=64)] = 5
    """Word n-gram size of the shingles."""
    buckets: Annotated[int, Field(ge=1, le=256)] = 14
    """Number of LSH bands."""
    hashes_per_bucket: Annotated[int, Field(ge=1, le=256)] = 8
    """Rows per band; buckets × hashesPerBucket hashes per document."""


class Dedup(Spec):
    """Deduplication stages."""

    exact: bool = True
    """Remove documents whose normalised text is identical."""
    minhash: MinHash = MinHash()
    """Near-duplicate removal."""


class Domains(Spec):
    """Domain labels from a fastText classifier, and mixture weights applied by sampling."""

    classifier_path: Uri
    """fastText classifier whose labels are domains (__label__science …)."""
    weights: Annotated[dict[ShortStr, Annotated[float, Field(ge=0, le=100)]], Field(max_length=1000)] = {}
    """Sampling weight per domain: 0 drops, 0.5 keeps half, 2.0 repeats twice (upsampling)."""
    default_weight: Annotated[float, Field(ge=0, le=100)] = 1.0
    """Weight of domains not listed in weights."""


# -------------------------------------------------------------------------------------------- tokenizer
class TrainTokenizer(Spec):
    """Train a byte-level BPE tokenizer on a sample of the kept documents (Hugging Face tokenizers)."""

    type: Literal["bpe"] = "bpe"
    """Tokenizer model; byte-level BPE."""
    vocab_size: Annotated[int, Field(ge=256, le=1048576)] = 32000
    """Vocabulary size including special tokens (at least 256: the byte alphabet)."""
    sample_documents: Annotated[int, Field(ge=1)] = 200000
    """Train on at most this many documents."""
    min_frequency: Annotated[int, Field(ge=1)] = 2
    """Minimum pair frequency for a merge."""
    special_tokens: Annotated[list[ShortStr], Field(max_length=1000)] = ["<|endoftext|>"]
    """Special tokens; the first one ends every document."""


class PretrainedTokenizer(Spec):
    """Use an existing tokenizer."""

    path: Uri
    """A tokenizer.json file or a Hugging Face tokenizer directory."""


class Tokenizer(Spec):
    """The tokenizer: trained here or given; exactly one."""

    __cel__ = (
        Cel("has(self.train) != has(self.pretrained)", "exactly one of train, pretrained must be set"),
    )

    train: TrainTokenizer | None = None
    """Train a new BPE tokenizer."""
    pretrained: PretrainedTokenizer | None = None
    """Use an existing tokenizer."""

    @model_validator(mode="after")
    def _one(self) -> Tokenizer:
        exactly_one(self, ("train", "pretrained"))
        return self


class CorpusParallelism(Spec):
    """How the stages are split: datatrove ranks (tasks) and pods running at once (workers)."""

    __cel__ = (Cel("self.workers <= self.tasks", "workers must not exceed tasks", field="workers"),)

    tasks: Annotated[int, Field(ge=1, le=100000)] = 1
    """Number of datatrove ranks per stage (Indexed Job completions)."""
    workers: Annotated[int, Field(ge=1, le=10000)] = 1
    """Ranks running at the same time (Indexed Job parallelism; local processes)."""

    @model_validator(mode="after")
    def _workers(self) -> CorpusParallelism:
        if self.workers > self.tasks:
            raise SpecError("workers", "workers must not exceed tasks")
        return self


# Every stage a Corpus may run, by name (lmforge_jobs.data.stages orders the ones a spec enables; a test keeps
# the two equal). The names are the keys of spec.stages, the lmforge.io/stage label and the Jobs' suffixes.
STAGE_NAMES = (
    "extract",
    "exact-sigs",
    "exact-dups",
    "exact-filter",
    "minhash-sigs",
    "minhash-buckets",
    "minhash-clusters",
    "minhash-filter",
    "tokenizer",
    "tokenize",
    "stats",
)


class StageSettings(Spec):
    """Settings of one stage's pods, over the Corpus-wide ones."""

    template: PodTemplate | None = None
    """Pod template merged over spec.template for this stage's pods only (e.g. the extract stage on CPU spot
    nodes); the same merge and the same refusals."""
    resources: Resources | None = None
    """Resources of this stage's pods: each field set replaces spec.resources' (e.g. more memory for the
    tokenizer)."""


class CorpusSpec(Spec):
    """A text corpus: read, cleaned, deduplicated, tokenizer-trained and tokenised."""

    __cel__ = (
        Cel(
            "!has(self.stages) || self.stages.all(k, k in ["
            + ", ".join(f"'{n}'" for n in STAGE_NAMES)
            + "])",
            "stages: keys must be stage names (" + ", ".join(STAGE_NAMES) + ")",
            field="stages",
        ),
    )

    sources: Annotated[list[Source], Field(min_length=1, max_length=64)]
    """Inputs; at least one."""
    extract: Extract = Extract()
    """HTML extraction for web sources."""
    filters: Annotated[list[Filter], Field(max_length=64)] = []
    """Filters applied in order; each reports kept and removed documents."""
    normalize: Normalize = Normalize()
    """Text normalisation."""
    pii: Pii = Pii()
    """Personal data redaction."""
    dedup: Dedup = Dedup()
    """Exact and near-duplicate removal."""
    domains: Domains | None = None
    """Optional domain labels and mixture weights."""
    tokenizer: Tokenizer = Tokenizer(train=TrainTokenizer())
    """Tokenizer to train or use."""
    held_out_fraction: Annotated[float, Field(ge=0, le=0.5)] = 0.005
    """Fraction of kept documents set aside for perplexity evaluation."""
    output: Uri | None = None
    """Where outputs go; defaults to the local run directory or the operator's storage."""
    parallelism: CorpusParallelism = CorpusParallelism()
    """Ranks and concurrent workers."""
    resources: Resources = Resources()
    """Resources of each worker pod."""
    image: Image | None = None
    """Container image of the jobs; defaults to the operator's configured jobs image."""
    storage: Storage | None = None
    """Object storage endpoint, region and credentials (Secrets by name); unset: the operator's defaults."""
    template: PodTemplate | None = None
    """Pod template merged into the pods (placement, priority, registries, volumes, devices, env)."""
    scheduling: Scheduling | None = None
    """Gang scheduling of the pods (Volcano or coscheduling PodGroup); unset: none."""
    stages: Annotated[dict[str, StageSettings], Field(max_length=len(STAGE_NAMES))] | None = None
    """Per-stage pod settings by stage name (extract, exact-sigs, ..., tokenizer, tokenize, stats), e.g.
    {extract: {template: ...}, tokenizer: {resources: {memory: 64Gi}}}: applied to that stage's Jobs only."""
    tracking: Tracking | None = None
    """Experiment tracking: MLflow, TensorBoard; unset: MLflow whenever MLFLOW_TRACKING_URI is set."""

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, value: dict[str, StageSettings] | None) -> dict[str, StageSettings] | None:
        for name in value or {}:
            if name not in STAGE_NAMES:
                raise SpecError(name, f"no such stage; stages: {', '.join(STAGE_NAMES)}")
        return value


# ------------------------------------------------------------------------------------------------ status
class CorpusStage(str, Enum):
    pending = "Pending"
    extracting = "Extracting"
    deduplicating = "Deduplicating"
    training_tokenizer = "TrainingTokenizer"
    tokenizing = "Tokenizing"
    done = "Done"


class DocumentCounts(Spec):
    """Documents through the pipeline: read = kept + Σ removedBy."""

    read: Annotated[int, Field(ge=0)] = 0
    """Documents read from the sources."""
    kept: Annotated[int, Field(ge=0)] = 0
    """Documents in the final corpus (train + held out)."""
    removed_by: Annotated[dict[ShortStr, Annotated[int, Field(ge=0)]], Field(max_length=128)] = {}
    """Removed documents per step (filter kind with its position, duplicates, minhash, domains)."""


class CorpusOutputs(Spec):
    """Where the Corpus's results are."""

    documents: Uri | None = None
    """Filtered, deduplicated documents (JSONL)."""
    tokens: Uri | None = None
    """Tokenised training shards."""
    held_out: Uri | None = None
    """Tokenised held-out shards."""
    tokenizer: Uri | None = None
    """Tokenizer directory (tokenizer.json inside)."""
    stats: Uri | None = None
    """stats.json with per-filter counts."""


class CorpusMetrics(Spec):
    """Throughput of the running stage."""

    documents_per_second: Annotated[float, Field(ge=0)] | None = None
    """Documents processed per second across workers."""


class CorpusStatus(StatusBase):
    """Observed state of a Corpus."""

    stage: CorpusStage | None = None
    """Stage now running."""
    completed_stages: Annotated[list[ShortStr], Field(max_length=16)] = []
    """Stages finished so far."""
    documents: DocumentCounts | None = None
    """Document counts per filter."""
    tokens: Annotated[int, Field(ge=0)] | None = None
    """Tokens in the training shards."""
    held_out_tokens: Annotated[int, Field(ge=0)] | None = None
    """Tokens in the held-out shards."""
    metrics: CorpusMetrics | None = None
    """Throughput."""
    outputs: CorpusOutputs | None = None
    """Results."""


__all__ = ["CorpusSpec", "CorpusStatus", "Progress"]
