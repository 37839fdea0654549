"""The Evaluation job on CPU: perplexity against transformers, lm-eval on the shipped tasks, results.json.

Models are tiny Llamas built offline (tests/support/tiny_models.py); the judge and arena have their own file
(test_evaluate_judge.py) and ``checkpoints: every`` too (test_evaluate_checkpoints.py).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import manifests
import pytest
import torch
import yaml
from prometheus_client import REGISTRY
from repo import ROOT
from tiny_models import tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge_jobs.entry import ConfigError
from lmforge_jobs.evaluate.__main__ import main
from lmforge_jobs.evaluate.benchmarks import prepare_task_file
from lmforge_jobs.evaluate.perplexity import evaluate_perplexity, perplexity_of_model, windows
from lmforge_jobs.pretrain.testing import make_token_data, synthetic_texts
from lmforge_jobs.spec import EXIT_CONFIG_ERROR

TASKS = ROOT / "examples" / "tasks"
TEXTS = synthetic_texts(60, seed=3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_llama(tmp_path_factory.mktemp("model") / "m", texts=TEXTS)


@pytest.fixture(scope="module")
def text_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "held.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:12]), encoding="utf-8")
    return path


def write_manifest(tmp: Path, spec: dict, name: str = "ev") -> Path:
    spec = {"precision": "fp32", "output": str(tmp / "out"), **spec}
    return manifests.write_manifest(tmp / f"{name}.yaml", "Evaluation", name, spec, sort_keys=False)


def results_of(tmp: Path) -> dict:
    return json.loads((tmp / "out" / "results.json").read_text())


def reference_nll(model, tokenizer, texts: list[str]) -> tuple[float, int, int]:
    """Total NLL, scored tokens and bytes, one full-context forward per document (transformers' own loss)."""
    total, tokens, nbytes = 0.0, 0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss
        total += float(loss) * (ids.shape[1] - 1)
        tokens += ids.shape[1] - 1
        nbytes += len(text.encode())
    return total, tokens, nbytes


# ------------------------------------------------------------------------------------------- perplexity
@pytest.mark.parametrize(
    "n,seq_len,stride",
    [(1, 8, 8), (5, 8, 8), (8, 8, 8), (9, 8, 8), (50, 8, 8), (50, 8, 3), (50, 16, 1), (17, 4, 100)],
)
def test_windows_score_every_token_once_with_context(n: int, seq_len: int, stride: int) -> None:
    scored: list[int] = []
    for start, end, first in windows(n, seq_len, stride):
        assert 0 <= start < first <= end <= n
        assert end - start <= seq_len
        scored += list(range(first, end))
    assert scored == list(range(1, n))


def test_perplexity_matches_transformers(model_dir: str, text_data: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = TEXTS[:12]
    total, tokens, nbytes = reference_nll(model, tok, texts)
    assert tokens > 200
    # windows long enough for every document: one full-context window each, padded into batches of 5
    out = evaluate_perplexity(model, tok, str(text_data), seq_len=512, batch_size=5)
    assert out.tokens == tokens and out.documents == len(texts)
    assert abs(out.perplexity - math.exp(total / tokens)) / math.exp(total / tokens) < 1e-3
    assert abs(out.bits_per_byte - total / math.log(2) / nbytes) < 1e-3 * out.bits_per_byte
    assert (
        abs(perplexity_of_model(model, model_dir, str(text_data), seq_len=512) - out.perplexity)
        < 1e-6 * out.perplexity
    )
    # maxTokens stops exactly at the budget
    assert evaluate_perplexity(model, tok, str(text_data), seq_len=512, max_tokens=100).tokens == 100


def test_sliding_window_with_stride_one_is_rolling_context(model_dir: str, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = " ".join(TEXTS[:2])
    ids = tok(text)["input_ids"][:60]
    text = tok.decode(ids)
    ids = tok(text)["input_ids"]
    (tmp_path / "doc.txt").write_text(text, encoding="utf-8")
    seq_len = 12
    total = 0.0
    for t in range(1, len(ids)):  # token t sees the seq_len - 1 tokens before it
        ctx = torch.tensor([ids[max(0, t - seq_len + 1) : t]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ctx).logits[0, -1].float(), -1)
        total -= float(logp[ids[t]])
    expected = math.exp(total / (len(ids) - 1))
    out = evaluate_perplexity(model, tok, str(tmp_path / "doc.txt"), seq_len=seq_len, stride=1, batch_size=7)
    assert out.tokens == len(ids) - 1
    assert abs(out.perplexity - expected) / expected < 1e-3
    full = evaluate_perplexity(model, tok, str(tmp_path / "doc.txt"), seq_len=128)
    assert full.perplexity != pytest.approx(out.perplexity, rel=1e-4)  # the window size matters here


def test_trained_model_scores_lower_than_its_initialisation(model_dir: str, text_data: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    before = perplexity_of_model(model.eval(), model_dir, str(text_data), seq_len=64)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    docs = [tok(t)["input_ids"][:64] for t in TEXTS[:12]]
    for step in range(25):
        batch = [docs[(step * 4 + i) % len(docs)] for i in range(4)]
        width = min(len(d) for d in batch)
        ids = torch.tensor([d[:width] for d in batch])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = perplexity_of_model(model.eval(), model_dir, str(text_data), seq_len=64)
    assert after < 0.7 * before, (before, after)


def test_perplexity_on_token_shards(tmp_path: Path) -> None:
    data = make_token_data(tmp_path / "data", vocab_size=320, documents=40, held_out=10)
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lmforge_jobs.shards import read_documents

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(f"{data['tokenizer']}/tokenizer.json"))
    tok.pad_token = tok.eos_token = "<|endoftext|>"
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    mdir = tmp_path / "model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    total, count = 0.0, 0
    for ids in read_documents(data["heldOut"]):
        x = torch.tensor([ids.tolist()])
        with torch.no_grad():
            total += float(model(input_ids=x, labels=x).loss) * (x.shape[1] - 1)
        count += x.shape[1] - 1
    expected = math.exp(total / count)
    got = perplexity_of_model(model, str(mdir), data["heldOut"], seq_len=256, batch_size=4)
    assert abs(got - expected) / expected < 1e-3
    small = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "vocab_size": 50})).eval()
    with pytest.raises(ConfigError) as err:
        perplexity_of_model(small, str(mdir), data["heldOut"])
    assert err.value.field == "perplexity.data" and "vocabulary" in err.value.message


# ----------------------------------------------------------------------------------------- benchmarks
def test_task_file_data_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = tmp_path / "tasks"
    shutil.copytree(TASKS, tasks)
    monkeypatch.chdir(tmp_path)  # not the task's directory: lm-eval alone would look for ./tiny_mcq.jsonl
    path, name = prepare_task_file("tasks/tiny_mcq.yaml", "benchmarks[0].taskPath", tmp_path / "scratch")
    assert name == "tiny_mcq"
    doc = yaml.safe_load(Path(path).read_text())
    assert doc["dataset_kwargs"]["data_files"]["test"] == str((tasks / "tiny_mcq.jsonl").resolve())
    (tasks / "tiny_gen.jsonl").unlink()
    with pytest.raises(ConfigError) as err:
        prepare_task_file(str(tasks / "tiny_gen.yaml"), "benchmarks[1].taskPath", tmp_path / "scratch2")
    assert err.value.field == "benchmarks[1].taskPath" and "tiny_gen.jsonl" in err.value.message


def test_job_perplexity_and_local_tasks(
    tmp_path: Path, model_dir: str, text_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = {
        "model": {"path": model_dir},
        "perplexity": {"data": str(text_data), "seqLen": 64, "stride": 32, "batchSize": 4},
        "benchmarks": [
            {"taskPath": str(TASKS / "tiny_mcq.yaml")},
            {
                "taskPath": str(TASKS / "tiny_gen.yaml"),
                "limit": 4,
                "numFewshot": 1,
                "applyChatTemplate": True,
            },
        ],
    }
    assert main(["--manifest", str(write_manifest(tmp_path, spec))]) == 0
    res = results_of(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    direct = evaluate_perplexity(model, tok, str(text_data), seq_len=64, stride=32, batch_size=4)
    assert res["perplexity"] == pytest.approx(direct.perplexity, rel=1e-6)
    assert res["nll"] == pytest.approx(math.log(res["perplexity"]))
    assert res["bitsPerByte"] > 0
    mcq = res["benchmarks"]["tiny_mcq"]
    assert 0 <= mcq["acc"] <= 1 and 0 <= mcq["acc_norm"] <= 1
    assert mcq["acc"] * 20 == pytest.approx(round(mcq["acc"] * 20))  # 20 items, all scored
    gen = res["benchmarks"]["tiny_gen"]
    assert 0 <= gen["exact_match_first-identifier"] <= 1
    outputs = json.loads((tmp_path / "out" / "outputs.json").read_text())
    assert outputs == {"results": str(tmp_path / "out" / "results.json")}
    progress = json.loads((tmp_path / "out" / "progress.json").read_text())
    assert progress["state"] == "Succeeded" and progress["results"]["benchmarks"]["tiny_mcq"] == mcq
    assert REGISTRY.get_sample_value("lmforge_eval_perplexity") == pytest.approx(res["perplexity"])
    assert (
        REGISTRY.get_sample_value("lmforge_eval_benchmark", {"task": "tiny_mcq", "metric": "acc"})
        == mcq["acc"]
    )


# ---------------------------------------------------------------------------------------------- errors
def test_bad_input_names_the_field(
    tmp_path: Path, model_dir: str, text_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [
        (
            {"model": {"path": str(tmp_path / "nope")}, "perplexity": {"data": str(text_data)}},
            "spec.model.path",
        ),
        (
            {"model": {"path": model_dir}, "benchmarks": [{"taskPath": str(tmp_path / "missing.yaml")}]},
            "spec.benchmarks[0].taskPath",
        ),
        (
            {"model": {"path": model_dir}, "perplexity": {"data": str(tmp_path / "none.jsonl")}},
            "spec.perplexity.data",
        ),
        (
            {
                "model": {"path": model_dir},
                "perplexity": {"data": str(text_data), "seqLen": 16, "stride": 17},
            },
            "spec.perplexity.stride",
        ),
        ({"model": {"pretrainRun": "gpt"}, "perplexity": {"data": str(text_data)}}, "spec.model"),
    ]
    for i, (spec, field) in enumerate(cases):
        sub = tmp_path / f"case{i}"
        sub.mkdir()
        assert main(["--manifest", str(write_manifest(sub, spec))]) == EXIT_CONFIG_ERROR, field
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and lines[0].startswith(f"error: {field}:"), (field, err)
        assert "Traceback" not in err


def test_results_so_far_are_kept_when_a_later_part_fails(
    tmp_path: Path, model_dir: str, text_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    shutil.copy(TASKS / "tiny_mcq.yaml", tasks / "broken.yaml")  # its data file is not there
    spec = {
        "model": {"path": model_dir},
        "perplexity": {"data": str(text_data), "seqLen": 64},
        "benchmarks": [
            {"taskPath": str(TASKS / "tiny_mcq.yaml"), "limit": 4},
            {"taskPath": str(tasks / "broken.yaml")},
        ],
    }
    assert main(["--manifest", str(write_manifest(tmp_path, spec))]) == EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert "error: spec.benchmarks[1].taskPath: data file tiny_mcq.jsonl" in err
    res = results_of(tmp_path)
    assert res["perplexity"] > 1 and "tiny_mcq" in res["benchmarks"]
    assert not (tmp_path / "out" / "outputs.json").exists()
    progress = json.loads((tmp_path / "out" / "progress.json").read_text())
    assert progress["state"] == "Invalid" and progress["field"] == "spec.benchmarks[1].taskPath"


def test_unknown_task_name_suggests_close_ones(model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge_jobs.evaluate import benchmarks
    from lmforge_jobs.evaluate.config import Benchmark

    class Registry:  # stands in for lm-eval's full index (tens of seconds to build)
        all_tasks = ["hellaswag", "arc_easy", "arc_challenge", "mmlu"]

    monkeypatch.setattr(benchmarks, "_DEFAULT_MANAGER", [Registry()])

    class LM:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)

    with pytest.raises(ConfigError) as err:
        benchmarks.run_benchmark(Benchmark(task="helaswag"), 2, LM(), Path("/nonexistent"))
    assert err.value.field == "benchmarks[2].task" and "did you mean hellaswag" in err.value.message
    LM.tokenizer.chat_template = None
    with pytest.raises(ConfigError) as err:
        benchmarks.run_benchmark(
            Benchmark(task="mmlu", applyChatTemplate=True), 0, LM(), Path("/nonexistent")
        )
    assert err.value.field == "benchmarks[0].applyChatTemplate"


def test_text_formats_directory_glob_and_compression(model_dir: str, tmp_path: Path) -> None:
    import gzip

    from lmforge_jobs.evaluate.perplexity import load_documents

    tok = AutoTokenizer.from_pretrained(model_dir)
    (tmp_path / "a.txt").write_text(TEXTS[0], encoding="utf-8")  # a whole file is one document
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"text": TEXTS[1]}) + "\n\n" + json.dumps(TEXTS[2]) + "\n")
    (tmp_path / "notes.csv").write_text("ignored", encoding="utf-8")
    docs = list(load_documents(str(tmp_path), tok))
    assert [d.ids for d in docs] == [tok(t)["input_ids"] for t in TEXTS[:3]]
    assert [d.n_bytes for d in docs] == [len(t.encode()) for t in TEXTS[:3]]
    assert len(list(load_documents(str(tmp_path / "*.txt"), tok))) == 1
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        list(load_documents(str(tmp_path / "bad.jsonl"), tok))
    assert err.value.field == "perplexity.data" and "bad.jsonl:1: no text field" in err.value.message
