"""Corpus job throughput: stage 1 (extract → filter → normalise → PII) as lmforge runs it versus the same
datatrove steps written as a plain datatrove script, in one process each, in the same run; and
DocumentTokenizer throughput with a BPE trained on the extracted text.

    python bench/data.py                      # the repository's WARC, 3 rounds
    python bench/data.py --warc FILE --rounds 5 --limit 50

Prints one JSON object: documents/s per core for both, their ratio (lmforge overhead = 1 − ratio), and
tokenization MB/s per core (the kept documents repeated to about 2 MB). Rates are per CPU second (this
process and its children), the best of the rounds, so they hold on a shared machine;
``TOKENIZERS_PARALLELISM`` / ``RAYON_NUM_THREADS`` are set to one thread.
Both variants use the same word tokenizer (lmforge's regex one; datatrove's default for English is
spaCy's, which would dominate the timing).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "jobs"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LMFORGE_METRICS_PORT", "off")
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the extractor's sandbox process): per-core
    throughput stays meaningful on a machine other jobs share."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def spec_dict(warc: Path, output: Path, limit: int | None) -> dict:
    source: dict = {"paths": [str(warc)]}
    if limit:
        source["limit"] = limit
    return {
        "sources": [{"warc": source}],
        "extract": {"method": "trafilatura", "timeoutSeconds": 60},
        "filters": [
            {"url": {"extraBlocklist": ["example-spam.com"], "useIntegratedLists": False}},
            {"gopherRepetition": {}},
            {"gopherQuality": {"minDocWords": 20}},
            {
                "c4Quality": {
                    "filterNoTerminalPunct": False,
                    "filterCurlyBracket": False,
                    "minNumSentences": 1,
                }
            },
            {"fineWebQuality": {}},
        ],
        "pii": {"emails": True, "ipAddresses": True},
        "tokenizer": {"train": {"vocabSize": 2048}},
        "output": str(output),
        "parallelism": {"tasks": 1, "workers": 1},
    }


def run_lmforge(spec_data: dict) -> tuple[float, int]:
    from lmforge_jobs.data.config import CorpusSpec
    from lmforge_jobs.data.run import run_stage

    spec = CorpusSpec.model_validate(spec_data)
    started = cpu_seconds()
    result = run_stage(spec, "extract", rank=None, workers=1)
    return cpu_seconds() - started, int(result["documents"])


def run_plain(warc: Path, output: Path, limit: int | None) -> tuple[float, int]:
    """The same steps as stock datatrove blocks and executor, no lmforge code but the word tokenizer."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.pipeline.formatters import FTFYFormatter, PIIFormatter
    from datatrove.pipeline.readers import WarcReader
    from datatrove.pipeline.writers import JsonlWriter

    from lmforge_jobs.data.blocks import WORDS, OfflineURLFilter

    reader = WarcReader(str(warc.parent), glob_pattern=warc.name, limit=limit or -1)
    pipeline = [
        reader,
        Trafilatura(favour_precision=True, timeout=60),
        OfflineURLFilter(extra_domains=["example-spam.com"], use_integrated_lists=False),
        GopherRepetitionFilter(language=WORDS),
        GopherQualityFilter(min_doc_words=20, language=WORDS),
        C4QualityFilter(
            filter_no_terminal_punct=False, filter_curly_bracket=False, min_num_sentences=1, language=WORDS
        ),
        FineWebQualityFilter(language=WORDS),
        FTFYFormatter(),
        PIIFormatter(email_replacement="email@example.com", ip_replacement="0.0.0.0"),
        JsonlWriter(str(output / "docs")),
    ]
    started = cpu_seconds()
    LocalPipelineExecutor(pipeline, tasks=1, workers=1, logging_dir=str(output / "logs")).run()
    seconds = cpu_seconds() - started
    stats = json.loads((output / "logs" / "stats" / "00000.json").read_text())
    docs = int(stats[0]["stats"]["documents"]["total"])
    return seconds, docs


def tokenization(docs_dir: Path, work: Path, rounds: int) -> dict:
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    from lmforge_jobs.data.tokenizer import save_tokenizer_dir, train_bpe

    reader = JsonlReader(str(docs_dir))
    kept = [d for name in sorted(reader.data_folder.list_files()) for d in reader.read_file(name)]
    docs = kept * max(1, -(-2_000_000 // max(1, sum(len(d.text) for d in kept))))  # about 2 MB of text
    text_bytes = sum(len(d.text.encode()) for d in docs)
    tok = train_bpe((d.text for d in docs), 2048, ["<|endoftext|>"], 2)
    save_tokenizer_dir(tok, work / "tokenizer", "<|endoftext|>")
    times = []
    for r in range(rounds):
        step = DocumentTokenizer(
            str(work / f"tokens{r}"),
            str(work / "tokenizer" / "tokenizer.json"),
            eos_token="<|endoftext|>",
            shuffle_documents=False,
        )
        started = cpu_seconds()
        step.write_unshuffled(iter(docs), "00000_unshuffled.ds")
        times.append(cpu_seconds() - started)
    best = min(times)
    return {
        "tokenizeDocuments": len(docs),
        "tokenizeMB": round(text_bytes / 1e6, 3),
        "tokenizeMBPerSecondPerCore": round(text_bytes / 1e6 / best, 2),
        "tokenizeCpuSecondsMedian": round(statistics.median(times), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warc", type=Path, default=ROOT / "examples" / "data" / "python-docs.warc.gz")
    parser.add_argument(
        "--rounds", type=int, default=3, help="measured rounds of each variant (after a warm-up)"
    )
    parser.add_argument("--limit", type=int, default=None, help="read at most this many records")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Path(tempfile.mkdtemp(prefix="lmforge-bench-"))
    try:
        lm, plain = [], []
        docs = 0
        plain_docs = 0
        # a warm-up of each (imports, caches), then rounds that alternate which goes first
        run_lmforge(spec_dict(args.warc, work / "warm-lm", args.limit))
        run_plain(args.warc, work / "warm-plain", args.limit)
        for r in range(args.rounds):
            order = ("lm", "plain") if r % 2 == 0 else ("plain", "lm")
            for variant in order:
                if variant == "lm":
                    seconds, docs = run_lmforge(spec_dict(args.warc, work / f"lm{r}", args.limit))
                    lm.append(seconds)
                else:
                    seconds, plain_docs = run_plain(args.warc, work / f"plain{r}", args.limit)
                    plain.append(seconds)
            assert plain_docs == docs, f"the variants read different documents: {plain_docs} != {docs}"
        lm_rate = docs / min(lm)
        plain_rate = docs / min(plain)
        result = {
            "documents": docs,
            "rounds": args.rounds,
            "stage1DocumentsPerSecondPerCore": round(lm_rate, 2),
            "plainDatatroveDocumentsPerSecondPerCore": round(plain_rate, 2),
            "ratio": round(lm_rate / plain_rate, 4),
            "overheadPercent": round(100 * (1 - lm_rate / plain_rate), 2),
            "stage1CpuSecondsBest": round(min(lm), 3),
            "plainCpuSecondsBest": round(min(plain), 3),
        }
        result.update(tokenization(work / "lm0" / "work" / "extract", work, args.rounds))
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
