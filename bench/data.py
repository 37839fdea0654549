"""Corpus job throughput: stage 1 (extract → filter → normalise → PII) as lmforge runs it, for each
extractor × WARC reader, versus the same datatrove steps written as a plain datatrove + trafilatura
(+ warcio) script, in one process each, in the same run; what each extractor keeps of the repository's
pages; MinHash dedup throughput on synthetic documents; and DocumentTokenizer throughput with a BPE
trained on the extracted text.

    python bench/data.py                      # the repository's WARC, 2 rounds, 5,000 MinHash documents
    python bench/data.py --warc FILE --rounds 5 --limit 50
    python bench/data.py --minhash-docs 100000   # the MinHash figure at scale (a few minutes)

Prints one JSON object: documents/s per core for each variant and its ratio to the plain script (the
lmforge overhead is 1 − the ratio of trafilatura × warcio, the plain script's own extractor and reader),
extraction quality per extractor (see :func:`quality`), MinHash signatures/s per core and bucket-stage
signatures/s per core, and tokenization MB/s per core (the kept documents repeated to about 2 MB). Rates are per CPU second (this
process and its children), the best of the rounds, so they hold on a shared machine;
``TOKENIZERS_PARALLELISM`` / ``RAYON_NUM_THREADS`` are set to one thread.
Both variants use the same word tokenizer (lmforge's regex one; datatrove's default for English is
spaCy's, which would dominate the timing).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import resource
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

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


# (extractor, WARC reader) of each lmforge variant; trafilatura × warcio is the plain script's pair
VARIANTS = [
    ("trafilatura", "warcio"),
    ("trafilatura", "fastwarc"),
    ("resiliparse", "warcio"),
    ("resiliparse", "fastwarc"),
]


def spec_dict(
    warc: Path, output: Path, limit: int | None, method: str = "trafilatura", reader: str = "warcio"
) -> dict:
    source: dict = {"paths": [str(warc)], "reader": reader}
    if limit:
        source["limit"] = limit
    return {
        "sources": [{"warc": source}],
        "extract": {"method": method, "timeoutSeconds": 60},
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


def pages_read(warc: Path, limit: int | None) -> int:
    """The HTML pages stage 1 reads: rates are per page read, whatever each extractor then keeps."""
    from lmforge_jobs.data.blocks import WarcSourceReader

    return len(list(WarcSourceReader(str(warc.parent), [warc.name], limit=limit or -1).run()))


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


# A site template around every page, for pages (like the repository's) whose own navigation was stripped:
# what an extractor keeps of it is boilerplate by construction.
CHROME_TOP = """<header><div class="logo">Python Docs Mirror</div><nav><ul>
<li><a href="/">Home</a></li><li><a href="/downloads/">Downloads</a></li><li><a href="/community/">Community</a></li>
<li><a href="/about/">About this mirror</a></li></ul></nav></header>
<div class="sidebar"><h3>Navigation</h3><ul><li><a href="/index.html">Index</a></li>
<li><a href="/modules.html">Module index</a></li><li><a href="/search.html">Search this site</a></li>
<li><a href="/glossary.html">Glossary</a></li></ul><h3>This page</h3><ul><li><a href="#">Report a bug</a></li>
<li><a href="#">Show source</a></li></ul></div>"""
CHROME_BOTTOM = """<footer><p>© Copyright 2001-2024, Python Software Foundation. All rights reserved.</p>
<p>This page is licensed under the Python Software Foundation License Version 2.</p>
<p><a href="/privacy/">Privacy policy</a> | <a href="/terms/">Terms of use</a> | <a href="/contact/">Contact us</a></p>
<p>Last updated on Mar 01, 2024. Found a bug?</p></footer>"""


def with_chrome(html: str) -> str:
    head, sep, rest = html.partition("<body>")
    if not sep:
        return html
    body, sep2, tail = rest.rpartition("</body>")
    return f"{head}<body>{CHROME_TOP}{body}{CHROME_BOTTOM}{sep2}{tail}" if sep2 else html


def quality(warc: Path) -> dict:
    """What each extractor keeps of the WARC's HTML pages (run in-process, no filters), as they are
    (``asIs``) and with one site template of header, navigation, sidebar and footer put around every page
    (``withSiteTemplate``; the repository's pages had theirs stripped to keep the file small):

    * ``characters``: total length of the text kept;
    * ``boilerplateLineFraction``: a measurable proxy for navigation and footers — the fraction of kept
      non-empty lines that recur on ≥ 30 % of the pages of the same host (hosts with ≥ 5 pages);
    * ``jaccardWithTrafilatura`` (mean per page of the word-set Jaccard index with trafilatura's text
      of the page as it is) and ``recallOfTrafilatura`` (mean share of that word set the extractor kept).
    """
    from datatrove.pipeline.extractors import Trafilatura

    from lmforge_jobs.data.blocks import InscriptisExtractor, WarcSourceReader
    from lmforge_jobs.data.extractors import ResiliparseExtractor

    pages = list(WarcSourceReader(str(warc.parent), [warc.name]).run())
    extractors = {
        "trafilatura": Trafilatura(favour_precision=True),
        "resiliparse": ResiliparseExtractor(),
        "inscriptis": InscriptisExtractor(),
    }
    hosts = [urlparse(p.metadata.get("url") or "").netloc for p in pages]
    pages_of = collections.Counter(hosts)
    reference = [set(_words(extractors["trafilatura"].extract(p.text) or "")) for p in pages]
    result: dict = {"pages": len(pages)}
    for variant, wrap in (("asIs", lambda h: h), ("withSiteTemplate", with_chrome)):
        result[variant] = {}
        for name, ex in extractors.items():
            outs = [ex.extract(wrap(p.text)) or "" for p in pages]
            per_host: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
            for host, text in zip(hosts, outs, strict=True):
                per_host[host].update({line.strip() for line in text.splitlines() if line.strip()})
            lines = boiler = 0
            for host, text in zip(hosts, outs, strict=True):
                for line in (x.strip() for x in text.splitlines()):
                    if not line:
                        continue
                    lines += 1
                    if pages_of[host] >= 5 and per_host[host][line] >= 0.3 * pages_of[host]:
                        boiler += 1
            jac, rec = [], []
            for ref, text in zip(reference, outs, strict=True):
                mine = set(_words(text))
                if ref:
                    jac.append(len(ref & mine) / len(ref | mine))
                    rec.append(len(ref & mine) / len(ref))
            result[variant][name] = {
                "nonEmpty": sum(1 for t in outs if t.strip()),
                "characters": sum(len(t) for t in outs),
                "boilerplateLineFraction": round(boiler / max(1, lines), 4),
                "jaccardWithTrafilatura": round(statistics.mean(jac), 4),
                "recallOfTrafilatura": round(statistics.mean(rec), 4),
            }
    return result


def synthetic_documents(n: int, seed: int = 0) -> list:
    """``n`` documents of 300–700 words from a 20,000-word vocabulary (Zipf-like), 10 % of them near
    copies (a few words changed) of an earlier one: text shaped like web pages for MinHash's cost."""
    import random

    from datatrove.data import Document

    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(20_000)]
    weights = [1 / (i + 1) for i in range(len(vocab))]
    docs: list = []
    for i in range(n):
        if docs and rng.random() < 0.1:
            words = docs[rng.randrange(len(docs))].text.split()
            for _ in range(5):
                words[rng.randrange(len(words))] = rng.choice(vocab)
        else:
            words = rng.choices(vocab, weights, k=rng.randint(300, 700))
        docs.append(Document(text=" ".join(words), id=str(i), metadata={}))
    return docs


def minhash(n: int, work: Path) -> dict:
    """MinHash signatures/s per core (datatrove's MinhashDedupSignature, the Corpus default config) and
    the bucket stage's signatures/s per core (every bucket, one after the other)."""
    from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashConfig

    from lmforge_jobs.data.blocks import WORDS

    docs = synthetic_documents(n)
    config = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
    started = cpu_seconds()
    sigs = MinhashDedupSignature(str(work / "sigs"), config, language=WORDS)
    sigs.run(iter(docs), rank=0, world_size=1)  # writes the signatures, yields nothing
    sig_seconds = cpu_seconds() - started
    started = cpu_seconds()
    for bucket in range(config.num_buckets):
        MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=config).run(
            rank=bucket, world_size=config.num_buckets
        )
    bucket_seconds = cpu_seconds() - started
    sig_bytes = sum(f.stat().st_size for f in (work / "sigs").rglob("*") if f.is_file())
    return {
        "minhashDocuments": n,
        "minhashWordsPerDocument": round(statistics.mean(len(d.text.split()) for d in docs)),
        "minhashSignaturesPerSecondPerCore": round(n / sig_seconds, 1),
        "minhashBucketSignaturesPerSecondPerCore": round(n / bucket_seconds, 1),
        "minhashSignatureBytesPerDocument": round(sig_bytes / n, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warc", type=Path, default=ROOT / "examples" / "data" / "python-docs.warc.gz")
    parser.add_argument(
        "--rounds", type=int, default=2, help="measured rounds of each variant (after a warm-up)"
    )
    parser.add_argument("--limit", type=int, default=None, help="read at most this many records")
    parser.add_argument("--minhash-docs", type=int, default=5000, help="synthetic documents for MinHash")
    parser.add_argument("--skip-quality", action="store_true", help="leave out the extraction quality")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Path(tempfile.mkdtemp(prefix="lmforge-bench-"))
    try:
        times: dict[str, list[float]] = {f"{m}+{r}": [] for m, r in VARIANTS}
        plain: list[float] = []
        docs: dict[str, int] = {}
        plain_docs = 0
        # a warm-up of each library (imports, caches), then rounds that rotate which variant goes first
        run_lmforge(spec_dict(args.warc, work / "warm-lm", args.limit, "resiliparse", "fastwarc"))
        run_plain(args.warc, work / "warm-plain", args.limit)
        names = [*times, "plain"]
        for r in range(args.rounds):
            for variant in names[r % len(names) :] + names[: r % len(names)]:
                if variant == "plain":
                    seconds, plain_docs = run_plain(args.warc, work / f"plain{r}", args.limit)
                    plain.append(seconds)
                    continue
                method, reader = variant.split("+")
                out = work / f"{variant}{r}"
                seconds, docs[variant] = run_lmforge(spec_dict(args.warc, out, args.limit, method, reader))
                times[variant].append(seconds)
        # the same extractor and reader as the plain script: the same documents come out
        assert docs["trafilatura+warcio"] == plain_docs, f"{docs} != plain {plain_docs}"
        read = pages_read(args.warc, args.limit)
        result: dict = {
            "documentsRead": read,
            "rounds": args.rounds,
            "plainDatatroveTrafilaturaDocumentsPerSecondPerCore": round(read / min(plain), 2),
            "stage1": {},
        }
        for variant, seconds in times.items():
            rate = read / min(seconds)
            result["stage1"][variant] = {
                "documentsPerSecondPerCore": round(rate, 2),
                "ratioToPlain": round(rate / (read / min(plain)), 3),
                "documentsOut": docs[variant],
                "cpuSecondsBest": round(min(seconds), 3),
            }
        result["overheadPercent"] = round(
            100 * (1 - result["stage1"]["trafilatura+warcio"]["ratioToPlain"]), 2
        )
        if not args.skip_quality:
            result["quality"] = quality(args.warc)
        result.update(minhash(args.minhash_docs, work / "minhash"))
        result.update(tokenization(work / "trafilatura+warcio0" / "work" / "extract", work, args.rounds))
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
