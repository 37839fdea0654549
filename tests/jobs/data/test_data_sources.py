"""The Corpus job's other inputs and options: JSONL, Parquet and a Hugging Face dataset directory;
domain labels and mixture weights; normalisation; a pretrained tokenizer; the offline and WARC details."""

from __future__ import annotations

import gzip
import io
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from data_fixtures import read_jsonl_gz, read_shards, run_job_here, write_manifest

COOKING = [
    "Slice the onions thinly and fry them in butter until they turn golden brown and sweet.",
    "Whisk the eggs with sugar, fold in the flour and bake the sponge for twenty minutes.",
    "Simmer the tomato sauce with garlic and basil, then season it with salt and pepper.",
    "Knead the bread dough for ten minutes and let it rise in a warm place for an hour.",
    "Roast the potatoes with rosemary and olive oil until the edges are crisp and brown.",
    "Marinate the chicken in yoghurt and spices overnight before grilling it over charcoal.",
]
CODE = [
    "Define a function that takes a list of integers and returns the sum of the even numbers.",
    "The compiler reports a type error when a string is passed where an integer is expected.",
    "Use a dictionary to count how often each word occurs in the input file, then sort the keys.",
    "The test suite runs every module in a fresh interpreter and reports failures with a traceback.",
    "A generator yields values lazily, so the loop never holds the whole sequence in memory.",
    "Refactor the class so that the parser and the formatter live in separate modules.",
]


def _domain_model(path: Path) -> Path:
    import fasttext

    lines = [f"__label__cooking {t}" for t in COOKING] * 10 + [f"__label__code {t}" for t in CODE] * 10
    data = path.with_suffix(".txt")
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    model = fasttext.train_supervised(
        str(data), epoch=30, lr=0.5, dim=8, minn=2, maxn=4, thread=1, seed=1, verbose=0
    )
    model.save_model(str(path))
    return path


def _pretrained_tokenizer(path: Path) -> Path:
    from lmforge_jobs.data.tokenizer import train_bpe

    tok = train_bpe(COOKING + CODE, 320, ["<|endoftext|>"], 1)
    tok.save(str(path))
    return path


def _long(text: str, n: int) -> str:
    return f"Document {n}. " + " ".join([text] * 3)


@pytest.fixture(scope="module")
def domain_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cooking/code classifier, trained once for the module (tests only read it)."""
    return _domain_model(tmp_path_factory.mktemp("domains") / "domains.bin")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, domain_model: Path) -> tuple[Path, dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = tmp_path_factory.mktemp("sources")
    (tmp / "jsonl").mkdir()
    with gzip.open(tmp / "jsonl" / "a.jsonl.gz", "wt", encoding="utf-8") as fh:
        for i, text in enumerate(COOKING[:3] + CODE[:3]):
            fh.write(
                json.dumps({"doc": f"j{i}", "body": _long(text, i), "url": f"https://ok.test/{i}"}) + "\n"
            )
        fh.write(
            json.dumps(
                {"doc": "blocked", "body": _long(CODE[0], 99), "url": "https://www.blocked-site.com/x"}
            )
            + "\n"
        )
    texts = COOKING[3:] + CODE[3:]
    pq.write_table(
        pa.table(
            {
                "id": [f"p{i}" for i in range(len(texts) + 1)],
                "text": [_long(t, 10 + i) for i, t in enumerate(texts)] + [_long(CODE[0], 3)],
            }
        ),
        tmp / "docs.parquet",
    )
    hf = tmp / "hf-dataset"
    hf.mkdir()
    (hf / "train.jsonl").write_text(
        "\n".join(json.dumps({"text": _long(t, 20 + i)}) for i, t in enumerate(CODE[:4])) + "\n",
        encoding="utf-8",
    )
    spec = {
        "sources": [
            {"jsonl": {"paths": [str(tmp / "jsonl" / "*.jsonl.gz")], "textKey": "body", "idKey": "doc"}},
            {"parquet": {"paths": [str(tmp / "docs.parquet")]}},
            {"huggingface": {"dataset": str(hf), "split": "train", "streaming": False}},
        ],
        "filters": [{"url": {"extraBlocklist": ["blocked-site.com"], "useIntegratedLists": False}}],
        "normalize": {"lowercase": True, "removeStopWords": True, "unicode": True},
        "pii": {"emails": True, "ipAddresses": True},
        "dedup": {"exact": True, "minhash": {"enabled": False}},
        "domains": {
            "classifierPath": str(domain_model),
            "weights": {"cooking": 0, "code": 2.0},
        },
        "tokenizer": {"pretrained": {"path": str(_pretrained_tokenizer(tmp / "tok.json"))}},
        "heldOutFraction": 0.25,
        "parallelism": {"tasks": 2, "workers": 1},
    }
    out = tmp / "out"
    proc = run_job_here(write_manifest(tmp / "c.yaml", out, spec))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, spec


def test_every_source_kind_is_read(corpus: tuple[Path, dict[str, Any]]) -> None:
    out, _ = corpus
    stats = json.loads((out / "stats.json").read_text())
    assert stats["read"] == 7 + 7 + 4  # jsonl, parquet, huggingface
    assert stats["removedBy"]["url"] == 1  # blocked-site.com; documents without a url are kept
    assert stats["removedBy"]["duplicates"] == 1  # the parquet copy of j3's text (same words, other prefix)
    assert stats["read"] == stats["kept"] + sum(stats["removedBy"].values())
    sources = {d["metadata"]["source"] for d in read_jsonl_gz(out / "work" / "extract")}
    assert sources == {"jsonl[0]", "parquet[1]", "huggingface[2]"}


def test_domain_weights_drop_and_repeat(corpus: tuple[Path, dict[str, Any]]) -> None:
    out, _ = corpus
    stats = json.loads((out / "stats.json").read_text())
    labelled = read_jsonl_gz(out / "work" / "exact-filter")
    cooking = [d for d in labelled if d["metadata"]["domain"] == "cooking"]
    assert len(cooking) == len(COOKING)
    assert stats["removedBy"]["domains"] == len(cooking)
    train = read_jsonl_gz(out / "documents" / "train")
    held = read_jsonl_gz(out / "documents" / "held-out")
    assert {d["metadata"]["domain"] for d in train + held} == {"code"}
    assert all(d["metadata"]["repeats"] == 2 for d in train)
    assert stats["repeated"] == len(train)
    assert len(read_shards(out / "tokens" / "train")) == 2 * len(train)
    assert len(read_shards(out / "tokens" / "held-out")) == len(held)


def test_normalisation_and_pretrained_tokenizer(corpus: tuple[Path, dict[str, Any]]) -> None:
    from tokenizers import Tokenizer

    out, spec = corpus
    docs = read_jsonl_gz(out / "documents" / "train") + read_jsonl_gz(out / "documents" / "held-out")
    assert docs
    for doc in docs:
        assert doc["text"] == doc["text"].lower()
        assert not {"the", "a", "and", "of"} & set(doc["text"].split())
    mine = json.loads((out / "tokenizer" / "tokenizer.json").read_text())
    given = json.loads(Path(spec["tokenizer"]["pretrained"]["path"]).read_text())
    assert mine["model"]["vocab"] == given["model"]["vocab"]
    assert (
        json.loads((out / "tokenizer" / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
    )
    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    train = read_jsonl_gz(out / "documents" / "train")
    shards = read_shards(out / "tokens" / "train")
    assert [tok.decode(ids[:-1]) for ids in shards[::2]] == [d["text"] for d in train]
    assert all(ids[-1] == eos for ids in shards)


# ------------------------------------------------------------------------------------------ unit level
def _record(payload: bytes, content_type: str | None, payload_type: str | None) -> Any:
    from warcio.archiveiterator import ArchiveIterator
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=False)
    headers = [("Content-Type", content_type)] if content_type else []
    warc_headers = {"WARC-Identified-Payload-Type": payload_type} if payload_type else {}
    writer.write_record(
        writer.create_warc_record(
            "https://x.test/",
            "response",
            payload=io.BytesIO(payload),
            http_headers=StatusAndHeaders("200 OK", headers, protocol="HTTP/1.1"),
            warc_headers_dict=warc_headers,
            length=len(payload),
        )
    )
    buf.seek(0)
    return next(iter(ArchiveIterator(buf)))


@pytest.mark.parametrize(
    ("content_type", "payload_type", "payload", "html"),
    [
        ("text/html; charset=utf-8", None, "<html><body>Grüße</body></html>", True),
        (None, None, "<!DOCTYPE html><html><body>x</body></html>", True),
        ("text/html", "text/html", "<p>x</p>", True),
        ("text/css", None, "body { color: red }", False),
        (None, None, "just some text, no markup", False),
        ("text/html", "image/png", "<html></html>", False),
    ],
)
def test_warc_records_without_payload_type_keep_html(
    content_type: str | None, payload_type: str | None, payload: str, html: bool
) -> None:
    from lmforge_jobs.data.blocks import warc_record_to_dict

    found = warc_record_to_dict(_record(payload.encode("utf-8"), content_type, payload_type))
    assert (found is not None) == html
    if found:
        assert found["text"] == payload and found["url"] == "https://x.test/"


def test_url_filter_never_uses_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    from datatrove.data import Document

    from lmforge_jobs.data.blocks import OfflineURLFilter

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("network access")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    flt = OfflineURLFilter(extra_domains=["bad-example.co.uk"], use_integrated_lists=False)
    # co.uk is a public suffix: the registered domain of www.bad-example.co.uk is bad-example.co.uk
    assert (
        flt.filter(Document(text="t", id="1", metadata={"url": "https://www.bad-example.co.uk/a"}))
        is not True
    )
    assert flt.filter(Document(text="t", id="2", metadata={"url": "https://good-example.co.uk/a"})) is True
    assert flt.filter(Document(text="t", id="3", metadata={})) is True


def test_word_tokenizer_splits_words_and_sentences() -> None:
    from lmforge_jobs.data.blocks import WORDS

    assert WORDS.word_tokenize("Don't panic: it's 3.14, e-mail me!") == [
        "Don't",
        "panic",
        ":",
        "it's",
        "3.14",
        ",",
        "e-mail",
        "me",
        "!",
    ]
    assert WORDS.sent_tokenize("One sentence. Another one! A third?\n\nA paragraph") == [
        "One sentence.",
        "Another one!",
        "A third?",
        "A paragraph",
    ]


def test_every_filter_kind_maps_to_its_datatrove_block(tmp_path: Path) -> None:
    from datatrove.pipeline import filters as df

    from lmforge_jobs.data import blocks
    from lmforge_jobs.data.config import CorpusSpec
    from lmforge_jobs.data.layout import Layout
    from lmforge_jobs.data.pipelines import build_pipeline, filter_keys

    docs = tmp_path / "d.jsonl"
    docs.write_text('{"text": "x"}\n')
    spec = CorpusSpec.model_validate(
        {
            "sources": [{"jsonl": {"paths": [str(docs)]}}],
            "filters": [
                {"url": {"extraBlocklist": ["spam.com"], "useIntegratedLists": False}},
                {"language": {"languages": ["en", "de"], "minScore": 0.7, "modelPath": "/m/lid.bin"}},
                {"gopherRepetition": {"dupLineFrac": 0.4}},
                {"gopherQuality": {"minDocWords": 7, "maxNonAlphaWordsRatio": 0.6}},
                {"c4Quality": {"filterCurlyBracket": False, "minNumSentences": 2}},
                {"fineWebQuality": {"linePunctThreshold": 0.2}},
                {"regex": {"pattern": "casino", "action": "keep"}},
                {"regex": {"pattern": "lorem"}},
            ],
            "output": str(tmp_path / "out"),
        }
    )
    steps = build_pipeline(spec, "extract", 0, 1, Layout(spec.output))
    kinds = [type(s) for s in steps]
    expected = [
        blocks.OfflineURLFilter,
        blocks.PathLanguageFilter,
        df.GopherRepetitionFilter,
        df.GopherQualityFilter,
        df.C4QualityFilter,
        df.FineWebQualityFilter,
        blocks.SpecRegexFilter,
        blocks.SpecRegexFilter,
    ]
    start = kinds.index(blocks.OfflineURLFilter)
    assert kinds[start : start + len(expected)] == expected
    url, lang, rep, quality, c4, fineweb, keep, drop = steps[start : start + len(expected)]
    assert "spam.com" in url.block_listed_domains
    assert lang.languages == ["en", "de"] and lang.language_threshold == 0.7
    assert lang.model.model_path == "/m/lid.bin"
    assert (
        rep.dup_line_frac == 0.4 and quality.min_doc_words == 7 and quality.max_non_alpha_words_ratio == 0.6
    )
    assert c4.filter_curly_bracket is False and c4.min_num_sentences == 2 and fineweb.line_punct_thr == 0.2
    assert rep.language is blocks.WORDS and c4.language is blocks.WORDS
    assert keep.keep and not drop.keep
    assert filter_keys(spec) == [
        "url",
        "language",
        "gopherRepetition",
        "gopherQuality",
        "c4Quality",
        "fineWebQuality",
        "regex[6]",
        "regex[7]",
    ]
    from datatrove.data import Document

    assert keep.filter(Document(text="Casino night", id="a")) and not keep.filter(Document(text="x", id="b"))
    assert drop.filter(Document(text="plain", id="c")) and not drop.filter(
        Document(text="Lorem ipsum", id="d")
    )


def test_inscriptis_extracts_all_visible_text() -> None:
    from lmforge_jobs.data.blocks import InscriptisExtractor

    html = (
        "<html><body><nav>Menu</nav><h1>Title</h1><p>First paragraph.</p><script>x()</script></body></html>"
    )
    text = InscriptisExtractor().extract(html)
    assert "Menu" in text and "Title" in text and "First paragraph." in text and "x()" not in text


def test_prometheus_reports_documents_per_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import REGISTRY

    from lmforge_jobs.data.__main__ import main

    docs = tmp_path / "d.jsonl"
    docs.write_text("".join(json.dumps({"text": _long(t, i)}) + "\n" for i, t in enumerate(COOKING + CODE)))
    manifest = write_manifest(
        tmp_path / "c.yaml",
        tmp_path / "out",
        {
            "sources": [{"jsonl": {"paths": [str(docs)]}}],
            "dedup": {"exact": True, "minhash": {"enabled": False}},
            "tokenizer": {"train": {"vocabSize": 300}},
            "heldOutFraction": 0.2,
        },
    )
    monkeypatch.setenv("LMFORGE_METRICS_PORT", "0")
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    assert main(["--manifest", str(manifest)]) == 0
    per_stage = {
        s.labels["stage"]: s.value
        for metric in REGISTRY.collect()
        if metric.name == "lmforge_data_stage_documents"
        for s in metric.samples
    }
    assert per_stage["extract"] == per_stage["exact-filter"] == per_stage["tokenize"] == len(COOKING + CODE)
    assert REGISTRY.get_sample_value("lmforge_data_documents_per_second") > 0
    rate = REGISTRY.get_sample_value("lmforge_data_stage_documents_per_second", {"stage": "extract"})
    assert rate is not None and rate > 0


HUB_TOKEN_REF = {"secretKeyRef": {"name": "hf", "key": "token"}}


def test_hub_token_reaches_load_dataset_and_is_never_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import datasets

    from lmforge_jobs.data.__main__ import main

    hf = tmp_path / "hf-dataset"
    hf.mkdir()
    (hf / "train.jsonl").write_text(
        "".join(json.dumps({"text": _long(t, i)}) + "\n" for i, t in enumerate(COOKING + CODE)),
        encoding="utf-8",
    )
    token = "hf_not_a_real_token_4f2a9c"
    monkeypatch.setenv("LMFORGE_SECRET_HF_TOKEN", token)
    monkeypatch.setenv("LMFORGE_METRICS_PORT", "off")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    real, calls = datasets.load_dataset, []

    def load_dataset(path: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("token"))
        kwargs.pop("token", None)  # a local directory: nothing to authenticate
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    out = tmp_path / "out"
    manifest = write_manifest(
        tmp_path / "c.yaml",
        out,
        {
            "sources": [
                {
                    "huggingface": {
                        "dataset": str(hf),
                        "split": "train",
                        "streaming": False,
                        "token": HUB_TOKEN_REF,
                    }
                }
            ],
            "dedup": {"exact": True, "minhash": {"enabled": False}},
            "tokenizer": {"train": {"vocabSize": 300}},
        },
    )
    assert main(["--manifest", str(manifest)]) == 0
    assert calls == [token]  # datatrove's HuggingFaceDatasetReader -> datasets.load_dataset(token=...)
    assert json.loads((out / "stats.json").read_text())["read"] == len(COOKING + CODE)
    captured = capsys.readouterr()
    assert token not in captured.out and token not in captured.err
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "executor.json" for p in written)  # datatrove dumps every block's attributes there
    for path in written:
        assert token.encode() not in path.read_bytes(), path


def test_missing_hub_token_secret_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lmforge_jobs.data.__main__ import main

    monkeypatch.delenv("LMFORGE_SECRET_HF_TOKEN", raising=False)
    monkeypatch.setenv("LMFORGE_SECRETS_DIR", str(tmp_path / "no-secrets"))
    monkeypatch.setenv("LMFORGE_METRICS_PORT", "off")
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    out = tmp_path / "out"
    manifest = write_manifest(
        tmp_path / "c.yaml",
        out,
        {"sources": [{"huggingface": {"dataset": "org/private-corpus", "token": HUB_TOKEN_REF}}]},
    )
    assert main(["--manifest", str(manifest)]) == 64
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: spec.sources[0].huggingface.token:"), errors
    assert "LMFORGE_SECRET_HF_TOKEN" in errors[0]
    assert not (out / "logs" / "extract").exists()


def test_a_limit_below_the_rank_count_leaves_ranks_empty_not_crashed(tmp_path: Path) -> None:
    """limit 1 with 2 ranks: rank 1's share of the only source is empty; it must still run (no reader)."""
    from lmforge_jobs.data.config import CorpusSpec
    from lmforge_jobs.data.layout import Layout, read_counts
    from lmforge_jobs.data.run import run_stage

    src = tmp_path / "a.jsonl"
    src.write_text(
        "".join(json.dumps({"text": _long(t, i), "id": f"d{i}"}) + "\n" for i, t in enumerate(CODE)),
        encoding="utf-8",
    )
    spec = CorpusSpec.model_validate(
        {
            "sources": [{"jsonl": {"paths": [str(src)], "limit": 1}}],
            "dedup": {"exact": False, "minhash": {"enabled": False}},
            "tokenizer": {"train": {"vocabSize": 300}},
            "parallelism": {"tasks": 2, "workers": 1},
            "output": str(tmp_path / "out"),
        }
    )
    run_stage(spec, "extract", rank=None)
    counts = read_counts(Layout(str(tmp_path / "out")), "extract")
    assert sorted(c["in"] for c in counts) == [0, 1]
    assert sum(c["kept"] for c in counts) == 1


def test_weights_that_drop_every_document_name_the_domains_field(tmp_path: Path, domain_model: Path) -> None:
    src = tmp_path / "a.jsonl"
    src.write_text(
        "".join(json.dumps({"text": _long(t, i), "id": f"d{i}"}) + "\n" for i, t in enumerate(CODE)),
        encoding="utf-8",
    )
    spec = {
        "sources": [{"jsonl": {"paths": [str(src)]}}],
        "dedup": {"exact": False, "minhash": {"enabled": False}},
        "domains": {"classifierPath": str(domain_model), "defaultWeight": 0},
        "tokenizer": {"train": {"vocabSize": 300}},
        "parallelism": {"tasks": 1, "workers": 1},
    }
    out = tmp_path / "out"
    proc = run_job_here(write_manifest(tmp_path / "c.yaml", out, spec))
    assert proc.returncode == 64, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: spec.domains.weights:"), errors
    assert not (out / "outputs.json").exists() and not (out / "stats.json").exists()
