"""The fast extraction path of the Corpus job: WARCs parsed by fastwarc give exactly the documents warcio
gives (the repository's WARC, and a WARC with truncated, non-HTML, chunked and compressed records), and
``extract.method: resiliparse`` keeps a page's main content and drops its navigation and footer."""

from __future__ import annotations

import gzip
import io
import zlib
from pathlib import Path
from typing import Any

import pytest
from data_fixtures import WARC, read_jsonl_gz, run_job, write_manifest

from lmforge_jobs.data.blocks import UnreadableInput, WarcSourceReader
from lmforge_jobs.data.config import CorpusSpec
from lmforge_jobs.data.extractors import ResiliparseExtractor
from lmforge_jobs.data.layout import Layout
from lmforge_jobs.data.pipelines import build_pipeline
from lmforge_jobs.data.readers import FastWarcSourceReader

WORDS = "The quick brown fox jumps over the lazy dog while the river keeps running to the sea."


def _read(reader_class: type, path: Path, rank: int = 0, world: int = 1) -> list[tuple[Any, ...]]:
    reader = reader_class(str(path.parent), [path.name])
    return [
        (d.id, d.text, d.media, sorted(d.metadata.items())) for d in reader.run(rank=rank, world_size=world)
    ]


def _both(path: Path, rank: int = 0, world: int = 1) -> tuple[list, list]:
    return _read(WarcSourceReader, path, rank, world), _read(FastWarcSourceReader, path, rank, world)


def test_fastwarc_reads_the_repository_warc_as_warcio_does() -> None:
    slow, fast = _both(WARC)
    assert len(slow) > 100 and fast == slow
    assert {m["format"] for *_, meta in fast for m in [dict(meta)]} == {"html"}
    # a big file split by document across ranks: the same shares
    for rank in range(3):
        slow, fast = _both(WARC, rank, 3)
        assert fast == slow


def _page(title: str) -> bytes:
    return (
        f"<html><head><title>{title}</title></head><body><nav><a href='/'>Home</a> <a href='/a'>About</a></nav>"
        f"<main><h1>{title}</h1><p>{WORDS}</p><p>{WORDS}</p></main><footer>Copyright 2024 Site</footer>"
        "</body></html>"
    ).encode()


def _chunked(body: bytes) -> bytes:
    half = len(body) // 2
    parts = [body[:half], body[half:]]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def _odd_warc(gz: bool) -> bytes:
    """A WARC of every kind of record a reader meets: HTML with and without payload-type headers, chunked
    and gzip-encoded HTML, a latin-1 page, CSS, an image, a request, metadata, a WET conversion, a
    non-HTTP resource; the last record is a page."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=gz)

    def response(
        url: str, body: bytes, headers: list[tuple[str, str]], payload_type: str | None = None
    ) -> None:
        http = StatusAndHeaders("200 OK", headers, protocol="HTTP/1.1")
        warc = {"WARC-Identified-Payload-Type": payload_type} if payload_type else None
        record = writer.create_warc_record(
            url, "response", payload=io.BytesIO(body), http_headers=http, warc_headers_dict=warc
        )
        writer.write_record(record)

    html = [("Content-Type", "text/html; charset=utf-8")]
    response("https://a.test/typed", _page("Typed"), html, "text/html")
    response("https://a.test/untyped", _page("Untyped"), html)
    response("https://a.test/sniffed", _page("Sniffed"), [("Content-Type", "application/octet-stream")])
    response("https://a.test/chunked", _chunked(_page("Chunked")), [*html, ("Transfer-Encoding", "chunked")])
    response("https://a.test/gzipped", gzip.compress(_page("Gzipped")), [*html, ("Content-Encoding", "gzip")])
    deflated = zlib.compress(_page("Deflated"))
    response("https://a.test/deflated", deflated, [*html, ("Content-Encoding", "deflate")])
    latin = _page("Café crème à la française").decode().encode("latin-1")
    response("https://a.test/latin", latin, [("Content-Type", "text/html; charset=iso-8859-1")])
    response("https://a.test/style.css", b"body { color: red }", [("Content-Type", "text/css")])
    response("https://a.test/logo.png", b"\x89PNG\r\n\x1a\n" + bytes(64), [("Content-Type", "image/png")])
    request = StatusAndHeaders("GET /typed HTTP/1.1", [("Host", "a.test")], is_http_request=True)
    writer.write_record(writer.create_warc_record("https://a.test/typed", "request", http_headers=request))
    meta = b"fetchTimeMs: 12\n"
    writer.write_record(
        writer.create_warc_record("https://a.test/typed", "metadata", payload=io.BytesIO(meta))
    )
    wet = ("Converted text. " + WORDS).encode()
    conversion = writer.create_warc_record(
        "https://a.test/converted", "conversion", payload=io.BytesIO(wet), warc_content_type="text/plain"
    )
    writer.write_record(conversion)
    resource = writer.create_warc_record(
        "https://a.test/resource",
        "resource",
        payload=io.BytesIO(_page("Resource")),
        warc_content_type="text/html",
    )
    writer.write_record(resource)
    response("https://a.test/last", _page("Last"), html)
    return buf.getvalue()


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_fastwarc_reads_odd_records_as_warcio_does(gz: bool, tmp_path: Path) -> None:
    path = tmp_path / ("odd.warc.gz" if gz else "odd.warc")
    path.write_bytes(_odd_warc(gz))
    slow, fast = _both(path)
    assert fast == slow
    urls = [dict(meta)["url"] for *_, meta in fast]
    assert urls == [
        *(f"https://a.test/{p}" for p in ("typed", "untyped", "sniffed", "chunked", "gzipped", "deflated")),
        "https://a.test/latin",
        "https://a.test/converted",
        "https://a.test/last",
    ]
    texts = dict(zip(urls, (text for _, text, *_ in fast), strict=True))
    assert "<h1>Chunked</h1>" in texts["https://a.test/chunked"]  # decoded, not raw chunks
    assert "<h1>Gzipped</h1>" in texts["https://a.test/gzipped"]
    assert "Café crème" in texts["https://a.test/latin"]


def _outcome(reader_class: type, path: Path) -> tuple[list[tuple[Any, ...]], bool]:
    """The documents read before the reader stopped, and whether it reported the file unreadable."""
    reader = reader_class(str(path.parent), [path.name])
    docs: list[tuple[Any, ...]] = []
    try:
        for d in reader.run():
            docs.append((d.id, d.text, d.media, sorted(d.metadata.items())))
    except UnreadableInput:
        return docs, True
    return docs, False


@pytest.mark.parametrize("keep", [0.99, 0.7, 0.3])
def test_fastwarc_on_a_plain_warc_cut_mid_record_reads_as_warcio_does(keep: float, tmp_path: Path) -> None:
    whole = _odd_warc(gz=False)
    path = tmp_path / "cut.warc"
    path.write_bytes(whole[: int(len(whole) * keep)])
    slow, fast = _outcome(WarcSourceReader, path), _outcome(FastWarcSourceReader, path)
    assert fast == slow  # the same records (the last as far as it goes), the same failure if any


@pytest.mark.parametrize("keep", [0.01, 0.3, 0.999])
def test_fastwarc_on_a_cut_gzip_warc_is_unreadable_as_with_warcio(keep: float, tmp_path: Path) -> None:
    """A gzipped WARC that ends mid-member is an unreadable input either way (the stage fails), after the
    same documents. warcio alone, when the cut falls in its first read buffer, ends silently with no
    documents: fastwarc reports that file too."""
    whole = WARC.read_bytes()
    path = tmp_path / "cut.warc.gz"
    path.write_bytes(whole[: int(len(whole) * keep)])
    (slow, slow_failed), (fast, fast_failed) = (
        _outcome(WarcSourceReader, path),
        _outcome(FastWarcSourceReader, path),
    )
    assert fast_failed
    assert slow_failed or slow == []
    # the documents before the failure: warcio may hand on one more, cut short, which the failed stage
    # throws away with the rest
    assert fast == slow[: len(fast)] and len(slow) - len(fast) <= 1


def test_the_spec_chooses_the_reader_and_the_extractor(tmp_path: Path) -> None:
    def steps(**warc: Any) -> list[Any]:
        spec = CorpusSpec.model_validate(
            {
                "sources": [{"warc": {"paths": [str(WARC)], **warc}}],
                "extract": {"method": "resiliparse", "mainContent": False},
                "tokenizer": {"train": {"vocabSize": 300}},
                "output": str(tmp_path),
            }
        )
        return build_pipeline(spec, "extract", 0, 1, Layout(str(tmp_path)))

    auto, fast, slow = steps(), steps(reader="fastwarc"), steps(reader="warcio")
    assert type(auto[0]) is FastWarcSourceReader and type(fast[0]) is FastWarcSourceReader
    assert type(slow[0]) is WarcSourceReader
    assert isinstance(auto[1], ResiliparseExtractor) and auto[1].main_content is False


def test_resiliparse_keeps_the_main_content_in_its_sandbox() -> None:
    from datatrove.data import Document

    html = _page("Main Title").decode()
    docs = [Document(text=html, id=str(i), metadata={}) for i in range(3)]
    kept = list(ResiliparseExtractor(timeout=30).run(iter(docs)))
    assert len(kept) == 3
    text = kept[0].text
    assert "Main Title" in text and WORDS in text
    assert "Home" not in text and "Copyright" not in text  # navigation and footer dropped
    everything = ResiliparseExtractor(main_content=False).extract(html)
    assert "Home" in everything and "Copyright" in everything


@pytest.mark.slow
def test_a_corpus_with_resiliparse_and_fastwarc(tmp_path: Path) -> None:
    spec = {
        "sources": [{"warc": {"paths": [str(WARC)], "reader": "fastwarc"}}],
        "extract": {"method": "resiliparse", "timeoutSeconds": 60},
        "filters": [{"gopherQuality": {"minDocWords": 20}}],
        "dedup": {"exact": True, "minhash": {"enabled": False}},
        "tokenizer": {"train": {"vocabSize": 300}},
        "parallelism": {"tasks": 2, "workers": 2},
    }
    out = tmp_path / "out"
    proc = run_job(write_manifest(tmp_path / "c.yaml", out, spec))
    assert proc.returncode == 0, proc.stderr[-3000:]
    docs = read_jsonl_gz(out / "documents" / "train") + read_jsonl_gz(out / "documents" / "held-out")
    assert len(docs) > 20
    assert all("<html" not in d["text"] for d in docs)


@pytest.mark.slow
def test_the_data_benchmark_runs(tmp_path: Path) -> None:
    """bench/data.py on a tiny shape: every extractor × reader, the plain script, MinHash, tokenization."""
    import json
    import subprocess
    import sys

    from data_fixtures import ROOT, job_env

    args = ["--limit", "6", "--rounds", "1", "--minhash-docs", "200", "--skip-quality"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "data.py"), *args],
        capture_output=True,
        text=True,
        env=job_env(),
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert set(result["stage1"]) == {
        "trafilatura+warcio",
        "trafilatura+fastwarc",
        "resiliparse+warcio",
        "resiliparse+fastwarc",
    }
    assert all(v["documentsPerSecondPerCore"] > 0 for v in result["stage1"].values())
    assert result["minhashSignaturesPerSecondPerCore"] > 0
