"""The PretrainRun job on CPU: token shards, training, export round trip, exact resume, signals, bad input.

Models are 2 layers × 64 wide on a 320-token BPE vocabulary; data is generated text tokenised by
datatrove's DocumentTokenizer (lmforge_jobs.pretrain.testing), so everything runs offline.
"""

from __future__ import annotations

import itertools
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import job_env
from manifests import tiny_pretrain, write_manifest
from s3_fixtures import filled_bucket

from lmforge_jobs import shards
from lmforge_jobs.entry import ConfigError
from lmforge_jobs.pretrain import checkpoint as ckpt
from lmforge_jobs.pretrain import export as exp
from lmforge_jobs.pretrain.__main__ import main
from lmforge_jobs.pretrain.model import ModelArgs, Transformer
from lmforge_jobs.pretrain.testing import make_token_data
from lmforge_jobs.secrets import read_secret
from lmforge_jobs.spec import EXIT_CONFIG_ERROR, EXIT_STOPPED


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_token_data(
        tmp_path_factory.mktemp("tokens"), vocab_size=320, documents=300, max_tokens_per_file=9000
    )


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMFORGE_METRICS_PORT", "off")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LMFORGE_TERMINATION_LOG"):
        monkeypatch.delenv(key, raising=False)


def manifest(tmp: Path, data: dict[str, str], name: str = "run", **spec: object) -> Path:
    return write_manifest(tmp / f"{name}.yaml", "PretrainRun", name, tiny_pretrain(data, tmp / name, **spec))


def losses(output: Path, key: str = "loss") -> dict[int, float]:
    """step → the last reported value (a resumed run reports the redone steps again)."""
    found: dict[int, float] = {}
    for line in (output / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if key in row:
            found[row["step"]] = row[key]
    return found


# ------------------------------------------------------------------------------------------------ shards
def test_shards_read_what_datatrove_wrote(data: dict[str, str]) -> None:
    from tokenizers import Tokenizer

    found = shards.find_shards(data["tokens"])
    assert len(found) > 1 and all(s.token_size == 2 for s in found)  # split by max_tokens_per_file
    docs = list(shards.read_documents(data["tokens"]))
    assert len(docs) == 300
    assert sum(len(d) for d in docs) == shards.token_count(data["tokens"])
    tok = Tokenizer.from_file(str(Path(data["tokenizer"]) / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    assert all(d[-1] == eos and eos not in d[:-1] for d in docs)  # one document each, in full
    assert "." in tok.decode(docs[0].tolist())
    stream = shards.TokenStream(data["tokens"])
    assert len(stream) == shards.token_count(data["tokens"])
    flat = np.concatenate(docs)
    edge = found[0].tokens - 5  # a window across two shard files
    assert np.array_equal(stream.window(edge, 10), flat[edge : edge + 10])
    assert list(shards.read_documents(data["tokens"]))[3].tolist() == docs[3].tolist()  # deterministic


def test_shards_uint32_and_errors(tmp_path: Path) -> None:
    d = tmp_path / "big"
    d.mkdir()
    tokens = np.array([70000, 1, 2, 99999, 5], dtype="<u4")
    tokens.tofile(d / "a.ds")
    np.array([3, 5], dtype="<u8").tofile(d / "a.ds.index")
    (d / "a.ds.metadata").write_text("big-tokenizer|4\n5\n5T")
    assert [x.tolist() for x in shards.read_documents(d)] == [[70000, 1, 2], [99999, 5]]
    assert shards.TokenStream(d).max_token() == 99999
    with pytest.raises(shards.ShardError, match="does not exist"):
        shards.token_count(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(shards.ShardError, match=r"no \*\.ds token shards"):
        shards.TokenStream(tmp_path / "empty")
    np.array([2, 9], dtype="<u8").tofile(d / "a.ds.index")
    with pytest.raises(shards.ShardError, match="offsets do not match"):
        list(shards.read_documents(d))


# ------------------------------------------------------------------------------- train, export, resume
def test_train_export_round_trip_and_continue(tmp_path: Path, data: dict[str, str]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["--manifest", str(manifest(tmp_path, data, budget={"steps": 12}))]) == 0
    out = tmp_path / "run"
    outputs = json.loads((out / "outputs.json").read_text())
    assert outputs == {
        "checkpoint": str(out / "checkpoints"),
        "model": str(out / "model"),
        "tokenizer": str(out / "model"),
    }
    progress = json.loads((out / "progress.json").read_text())
    assert progress["state"] == "Succeeded" and progress["step"] == 12
    for key in ("loss", "evalLoss", "perplexity", "tokensPerSecond"):
        assert progress["metrics"][key] > 0
    assert progress["metrics"]["perplexity"] == pytest.approx(math.exp(progress["metrics"]["evalLoss"]))
    train = losses(out)
    assert train[12] < train[1] - 0.5  # it learns
    evals = losses(out, "evalLoss")
    assert evals[12] < evals[4]

    # keep 2: the step-4 checkpoint was pruned
    assert [s for s, _ in ckpt.list_complete(str(out / "checkpoints"))] == [8, 12]

    # the export loads in transformers and gives the native model's logits
    hf = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    args = ModelArgs.from_dict(json.loads((out / "model" / "lmforge.json").read_text())["modelArgs"])
    native = Transformer(args)
    _, state = exp.load_checkpoint_state(ckpt.list_complete(str(out / "checkpoints"))[-1][1])
    native.load_state_dict(state)
    tokens = torch.from_numpy(shards.TokenStream(data["heldOut"]).window(0, 64)).view(2, 32)
    with torch.no_grad():
        diff = (hf(tokens).logits - native.eval()(tokens)).abs().max().item()
    assert diff < 1e-4
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert tok.eos_token == "<|endoftext|>" and len(tok) == 320

    # export_checkpoint (the Evaluation job's path) writes the same weights, without a process group
    exp.export_checkpoint(ckpt.list_complete(str(out / "checkpoints"))[-1][1], str(tmp_path / "exported"))
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, hf(tokens).logits)

    # continued pre-training from the export starts where the run ended: same held-out loss
    cont = manifest(
        tmp_path,
        data,
        name="cont",
        model={"init": {"path": str(out / "model")}},
        budget={"steps": 1},
        optimizer={"lr": 1e-9, "warmupSteps": 0},
        checkpoint={"everySteps": 1, "keep": 1},
        eval={"everySteps": 1, "batches": 2},
    )
    assert main(["--manifest", str(cont)]) == 0
    assert losses(tmp_path / "cont", "evalLoss")[1] == pytest.approx(evals[12], abs=1e-5)


def test_bf16_activation_checkpointing_tied_mfu(
    tmp_path: Path, data: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 autocast, activation checkpointing and tied embeddings train, export, and report MFU."""
    from transformers import AutoModelForCausalLM

    from lmforge_jobs.plan import flops_per_token
    from lmforge_jobs.pretrain.config import ModelShape

    monkeypatch.setenv("LMFORGE_PEAK_TFLOPS", "0.5")
    model = {"tieEmbeddings": True}
    path = manifest(
        tmp_path,
        data,
        model=model,
        precision="bf16",
        parallelism={"activationCheckpointing": True},
        budget={"steps": 4},
        optimizer={"schedule": "wsd"},
        eval={"everySteps": 4},
        export={"quantize": "int8"},
    )
    monkeypatch.setenv("LMFORGE_METRICS_PORT", "0")  # a free port
    assert main(["--manifest", str(path)]) == 0
    out = tmp_path / "run"

    # the Prometheus endpoint of this (rank 0) process serves the documented series
    from urllib.request import urlopen

    from lmforge_jobs.telemetry import _REGISTRY

    text = urlopen(f"http://127.0.0.1:{_REGISTRY.port}/metrics", timeout=10).read().decode()
    for name in (
        "lmforge_train_step",
        "lmforge_train_tokens_total",
        "lmforge_train_loss",
        "lmforge_eval_loss",
        "lmforge_train_tokens_per_second",
        "lmforge_train_mfu_ratio",
        "lmforge_train_progress_ratio",
        "lmforge_train_eta_seconds",
    ):
        assert f"\n{name} " in text, name
    assert "\nlmforge_train_step 4.0" in text
    train = losses(out)
    assert train[4] < train[1]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    row = next(r for r in rows if r.get("step") == 4 and "mfu" in r)
    shape = ModelShape(
        layers=2,
        hidden=64,
        heads=4,
        kv_heads=2,
        ffn_hidden=192,
        seq_len=32,
        vocab_size=320,
        tie_embeddings=True,
    )
    assert row["mfu"] == pytest.approx(flops_per_token(shape) * row["tokensPerSecond"] / 0.5e12, rel=1e-6)
    hf = AutoModelForCausalLM.from_pretrained(out / "model")
    assert (
        hf.config.tie_word_embeddings
        and hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    )
    from lmforge_jobs.plan import count_parameters

    assert sum(p.numel() for p in hf.parameters()) == count_parameters(shape).total
    quantized = exp.load_int8(out / exp.INT8_DIR).eval()
    x = torch.randint(0, 320, (1, 32))
    with torch.no_grad():
        ref = hf.eval()(x).logits
        assert (quantized(x).logits - ref).abs().max() < 0.05 * ref.abs().max()
    assert set(json.loads((out / "outputs.json").read_text())) == {"checkpoint", "model", "tokenizer"}


def test_throughput_window_excludes_eval_and_its_steps(
    tmp_path: Path, data: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """tokensPerSecond counts only the steps timed since the last log, eval or save (log every 4 steps,
    eval every 2): a clock that ticks 1 s per reading gives exactly 2 steps per second."""
    import types

    from lmforge_jobs.pretrain import metrics

    ticks = itertools.count()
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    monkeypatch.setenv("LMFORGE_LOG_EVERY", "4")
    path = manifest(tmp_path, data, budget={"steps": 8}, eval={"everySteps": 2}, checkpoint={"everySteps": 8})
    assert main(["--manifest", str(path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    tps = {r["step"]: r["tokensPerSecond"] for r in rows if "tokensPerSecond" in r}
    assert tps == {4: 2 * 1024.0, 8: 2 * 1024.0}


def test_budget_rules() -> None:
    from lmforge_jobs.pretrain.config import PretrainRunSpec
    from lmforge_jobs.pretrain.train import total_steps

    def spec(budget: dict) -> PretrainRunSpec:
        return PretrainRunSpec.model_validate(
            {
                "data": {"tokens": "/t", "tokenizer": "/k"},
                "budget": budget,
                "batch": {"globalTokens": 8192, "microBatchSize": 8},
                "model": {"seqLen": 1024},
                "optimizer": {"warmupSteps": 2},
            }
        )

    assert total_steps(spec({"steps": 7}), 10**6) == 7
    assert total_steps(spec({"tokens": 81920}), 10**6) == 10
    assert total_steps(spec({"tokens": 81921}), 10**6) == 11  # rounded up to whole steps
    assert total_steps(spec({"tokensPerParameter": 20}), 4096) == 10  # Chinchilla: 20 × 4096 / 8192
    assert (
        total_steps(PretrainRunSpec.model_validate({"data": {"tokens": "/t", "tokenizer": "/k"}}), 10**6)
        == 39
    )


def test_remote_output_through_fsspec(tmp_path: Path, data: dict[str, str], capsys) -> None:
    """spec.output as a URI: DCP checkpoints, marker, retention, export and resume go through fsspec
    (the in-memory filesystem here, s3:// or gs:// in a cluster)."""
    import fsspec
    from transformers import AutoModelForCausalLM

    uri = "memory://lmforge-test/run"
    spec = {"budget": {"steps": 2}, "checkpoint": {"everySteps": 1, "keep": 1}, "output": uri}
    assert main(["--manifest", str(manifest(tmp_path, data, eval={"everySteps": 100}, **spec))]) == 0
    complete = ckpt.list_complete(f"{uri}/checkpoints")
    assert [s for s, _ in complete] == [2]  # step 1's was pruned
    assert complete[0][1].startswith("memory://") and complete[0][1].endswith(
        "/run/checkpoints/step-00000002"
    )
    fs = fsspec.filesystem("memory")
    assert fs.isfile("/lmforge-test/run/model/model.safetensors")
    assert fs.isfile("/lmforge-test/run/checkpoints/tokenizer/tokenizer.json")
    exp.export_checkpoint(complete[0][1], str(tmp_path / "from-remote"))
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "from-remote").config.vocab_size == 320
    capsys.readouterr()
    spec["budget"] = {"steps": 3}
    assert main(["--manifest", str(manifest(tmp_path, data, eval={"everySteps": 100}, **spec))]) == 0
    assert f"resumed from {complete[0][1]} at step 2" in capsys.readouterr().out
    assert [s for s, _ in ckpt.list_complete(f"{uri}/checkpoints")] == [3]


def test_init_from_hub_id_offline_up_to_the_download(
    tmp_path: Path, data: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """model.init.huggingface downloads with the token from its secret, then loads the weights."""
    import huggingface_hub

    args = ModelArgs("decoder", 320, 2, 64, 4, 2, 192, 32, special_ids={"eos": 0, "pad": 0})
    source = Transformer(args)
    source.init_weights(123)
    exp.write_hf(args, source.state_dict(), data["tokenizer"], tmp_path / "hub-model")
    calls = []

    def fake_download(repo_id: str, **kw: object) -> str:
        calls.append((repo_id, kw))
        return str(tmp_path / "hub-model")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.setenv("LMFORGE_SECRET_HF_TOKEN", "hf_secret")
    init = {
        "huggingface": "org/tiny-llama",
        "revision": "v1",
        "token": {"secretKeyRef": {"name": "hf", "key": "token"}},
    }
    path = manifest(
        tmp_path, data, model={"init": init}, budget={"steps": 1}, optimizer={"lr": 1e-9, "warmupSteps": 0}
    )
    assert main(["--manifest", str(path)]) == 0
    assert (
        calls[0][0] == "org/tiny-llama"
        and calls[0][1]["revision"] == "v1"
        and calls[0][1]["token"] == "hf_secret"
    )
    _, state = exp.load_checkpoint_state(ckpt.list_complete(str(tmp_path / "run" / "checkpoints"))[-1][1])
    for name, tensor in source.state_dict().items():
        assert torch.allclose(state[name], tensor, atol=1e-6), name  # lr 1e-9: still the hub weights


def test_init_must_match_rope_norm_and_tying(tmp_path: Path, data: dict[str, str]) -> None:
    """model.init from weights with another RoPE base, norm epsilon, lm_head tying or extra weights is a
    ConfigError, not a silently different model."""
    from safetensors.torch import load_file, save_file

    from lmforge_jobs.pretrain.config import PretrainRunSpec
    from lmforge_jobs.pretrain.inputs import resolve_init

    args = ModelArgs("decoder", 320, 2, 64, 4, 2, 192, 32, special_ids={"eos": 0, "pad": 0})
    source = Transformer(args)
    source.init_weights(1)
    hf_dir = exp.write_hf(args, source.state_dict(), data["tokenizer"], tmp_path / "hf")
    shape = {"layers": 2, "hidden": 64, "heads": 4, "kvHeads": 2, "ffnHidden": 192, "seqLen": 32}

    def spec(**model: object) -> PretrainRunSpec:
        return PretrainRunSpec.model_validate(
            {"data": data, "model": {**shape, **model, "init": {"path": str(hf_dir)}}}
        )

    assert resolve_init(spec()) == str(hf_dir)
    for change, field in (
        ({"ropeTheta": 500000.0}, "model.ropeTheta"),
        ({"normEps": 1e-6}, "model.normEps"),
        ({"tieEmbeddings": True}, "model.tieEmbeddings"),  # would drop the checkpoint's lm_head
    ):
        with pytest.raises(ConfigError) as err:
            resolve_init(spec(**change))
        assert err.value.field == field

    # a Qwen2-style q_proj bias has no place in the native decoder: refused, not dropped
    weights = load_file(str(hf_dir / "model.safetensors"))
    weights["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(weights, str(hf_dir / "model.safetensors"))
    with pytest.raises(ValueError, match=r"q_proj\.bias"):
        exp.load_hf_into(Transformer(args), args, hf_dir)


def _run(path: Path, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "lmforge_jobs.pretrain", "--manifest", str(path)],
        env=job_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,  # type: ignore[call-overload]
    )


def _wait_for(predicate, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"job ended early ({proc.returncode}): {proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


@pytest.mark.slow  # a job process killed and resumed: several seconds
def test_resume_after_sigkill_is_exact(tmp_path: Path, data: dict[str, str]) -> None:
    k = 4
    spec = {
        "budget": {"steps": 2 * k},
        "checkpoint": {"everySteps": k, "keep": 3},
        "eval": {"everySteps": 100},
    }
    assert main(["--manifest", str(manifest(tmp_path, data, name="straight", **spec))]) == 0
    path = manifest(tmp_path, data, name="killed", **spec)
    proc = _run(path)
    first = ckpt.step_dir(tmp_path / "killed" / "checkpoints", k) / ckpt.MARKER
    _wait_for(first.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    # a save cut short leaves a directory without its marker: it does not count and is replaced
    broken = ckpt.step_dir(tmp_path / "killed" / "checkpoints", 2 * k)
    broken.mkdir(exist_ok=True)
    (broken / "junk").write_text("half a checkpoint")
    assert ckpt.latest(str(tmp_path / "killed" / "checkpoints"))[0] == k
    assert main(["--manifest", str(path)]) == 0
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "killed")
    assert sorted(resumed) == list(range(1, 2 * k + 1))
    assert [resumed[s] for s in sorted(resumed)] == [straight[s] for s in sorted(straight)]  # bit-identical
    assert (broken / ckpt.MARKER).exists() and not (broken / "junk").exists()
    # the same output with a different model is refused, not half-loaded
    other = manifest(tmp_path, data, name="killed", model={"hidden": 128}, **spec)
    assert main(["--manifest", str(other)]) == EXIT_CONFIG_ERROR


@pytest.mark.slow  # a job process stopped mid-run: several seconds
def test_sigterm_saves_and_exits_stopped(tmp_path: Path, data: dict[str, str]) -> None:
    """A stopped run is not a finished one: exit 143, so a Job never counts the pod as complete."""
    path = manifest(
        tmp_path, data, budget={"steps": 10000}, checkpoint={"everySteps": 5000}, eval={"everySteps": 5000}
    )
    proc = _run(path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(losses(tmp_path / "run")) >= 2, proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == EXIT_STOPPED, proc.stdout.read()
    assert time.monotonic() - sent < 10
    steps = [s for s, _ in ckpt.list_complete(str(tmp_path / "run" / "checkpoints"))]
    assert len(steps) == 1 and steps[0] == max(losses(tmp_path / "run"))  # at most the step in flight is lost
    assert not (tmp_path / "run" / "outputs.json").exists()


def test_list_complete_skips_unmarked(tmp_path: Path) -> None:
    for step, marked in ((5, True), (10, False), (3, True)):
        d = ckpt.step_dir(tmp_path, step)
        d.mkdir(parents=True)
        if marked:
            (d / ckpt.MARKER).write_text("{}")
    (tmp_path / "tokenizer").mkdir()
    assert ckpt.list_complete(str(tmp_path)) == [
        (3, str(ckpt.step_dir(tmp_path, 3))),
        (5, str(ckpt.step_dir(tmp_path, 5))),
    ]
    assert ckpt.list_complete(str(tmp_path / "nothing")) == []


# ---------------------------------------------------------------------------------- other architectures
@pytest.mark.parametrize(
    ("arch", "auto"),
    [("encoder", "AutoModelForMaskedLM"), ("encoder-decoder", "AutoModelForSeq2SeqLM")],
)
def test_encoder_objectives_train_and_export(
    tmp_path: Path, data: dict[str, str], arch: str, auto: str
) -> None:
    import transformers

    model = {"architecture": arch, "kvHeads": 4, "layers": 2}
    path = manifest(
        tmp_path, data, model=model, budget={"steps": 4}, optimizer={"lr": 5e-3}, eval={"everySteps": 2}
    )
    assert main(["--manifest", str(path)]) == 0
    train = losses(tmp_path / "run")
    assert train[4] < train[1] - 0.3
    loaded = getattr(transformers, auto).from_pretrained(tmp_path / "run" / "model")
    args = json.loads((tmp_path / "run" / "model" / "lmforge.json").read_text())["modelArgs"]
    assert loaded.config.vocab_size == args["vocab_size"] >= 321  # room for the mask id / sentinels
    assert args["special_ids"].get("mask" if arch == "encoder" else "sentinel0") == 320


def test_objective_batches() -> None:
    from lmforge_jobs.pretrain.data import IGNORE, Objective, TokenBatches

    class Stream:
        uri = "mem"

        def __len__(self) -> int:
            return 4096

        def window(self, start: int, length: int) -> np.ndarray:
            return (np.arange(start, start + length) % 300).astype(np.int64)

    dec = TokenBatches(Stream(), Objective("decoder", 16, 320, 0, 0), 4, 2, rank=1, world=2, seed=3)  # type: ignore[arg-type]
    b = dec.train(5, 1)
    assert torch.equal(b["labels"][:, :-1], b["input_ids"][:, 1:])
    assert dec.sequence_ids(5, 1) == [5 * 16 + 8 + 4 + j for j in range(4)]
    again = TokenBatches(Stream(), Objective("decoder", 16, 320, 0, 0), 4, 2, rank=1, world=2, seed=3)  # type: ignore[arg-type]
    assert torch.equal(again.train(5, 1)["input_ids"], b["input_ids"])
    # the ranks and micro-batches of a step read disjoint sequences that tile the step's global batch,
    # and consecutive steps continue where the last one ended (the loader's position is the step)
    for step in (0, 5):
        ids = [
            g
            for micro in range(2)
            for rank in range(2)
            for g in TokenBatches(
                Stream(), Objective("decoder", 16, 320, 0, 0), 4, 2, rank, 2, 3
            ).sequence_ids(  # type: ignore[arg-type]
                step, micro
            )
        ]
        assert sorted(ids) == list(range(step * 16, (step + 1) * 16))

    class Positions(Stream):
        def window(self, start: int, length: int) -> np.ndarray:
            return np.arange(start, start + length, dtype=np.int64)  # a token names its position

    held = [
        TokenBatches(Positions(), Objective("decoder", 16, 320, 0, 0), 4, 1, r, 2, shuffle=False)  # type: ignore[arg-type]
        for r in range(2)
    ]
    n = held[0].held_out_batches(100)
    starts = [t for h in held for k in range(n) for t in h.held_out(k)["input_ids"][:, 0].tolist()]
    assert n == (4096 - 1) // 16 // 8  # all the held-out windows the two ranks can share out
    assert len(starts) == len(set(starts)) == n * 2 * 4  # each held-out window evaluated at most once
    # every window once per epoch
    one = TokenBatches(Stream(), Objective("decoder", 16, 320, 0, 0), 1, 1, seed=3)  # type: ignore[arg-type]
    assert sorted(one._window_of(g) for g in range(one.windows)) == list(range(one.windows))

    mlm = TokenBatches(Stream(), Objective("encoder", 64, 320, 0, 0, mask=320), 8, 1)  # type: ignore[arg-type]
    b = mlm.train(0, 0)
    picked = b["labels"] != IGNORE
    assert picked.sum(1).tolist() == [round(64 * 0.15)] * 8
    assert (b["input_ids"][picked] == 320).float().mean() > 0.6
    original = torch.from_numpy(
        np.stack([Stream().window(mlm._window_of(g) * 64, 64) for g in mlm.sequence_ids(0, 0)])
    )
    assert torch.equal(b["input_ids"][~picked], original[~picked])
    assert torch.equal(b["labels"][picked], original[picked])

    t5 = TokenBatches(Stream(), Objective("encoder-decoder", 64, 320, 7, 0, sentinel0=320), 2, 1)  # type: ignore[arg-type]
    b = t5.train(0, 0)
    for row in range(2):
        src = b["input_ids"][row][b["attention_mask"][row] == 1].tolist()
        tgt = [t for t in b["labels"][row].tolist() if t != IGNORE]
        assert tgt[-1] == 7
        # re-inserting each target span at its sentinel rebuilds the original window
        spans, cur = {}, None
        for t in tgt[:-1]:
            if t >= 320:
                cur = t
                spans[cur] = []
            else:
                spans[cur].append(t)
        rebuilt = [x for t in src for x in (spans[t] if t >= 320 else [t])]
        window = t5._window_of(t5.sequence_ids(0, 0)[row]) * 64
        assert rebuilt == Stream().window(window, 64).tolist()


# ------------------------------------------------------------------------------------- loop components
def test_schedules_and_nonfinite_guard() -> None:
    from lmforge_jobs.pretrain.config import Optimizer
    from lmforge_jobs.pretrain.train import NonFiniteGuard, lr_multiplier

    cos = Optimizer(warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(0, 100, cos) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, cos) == 1.0
    assert lr_multiplier(99, 100, cos) == pytest.approx(0.1)
    mids = [lr_multiplier(s, 100, cos) for s in range(10, 100)]
    assert all(a >= b for a, b in itertools.pairwise(mids))
    wsd = Optimizer(warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert [lr_multiplier(s, 100, wsd) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert lr_multiplier(89, 100, wsd) == pytest.approx(0.5)
    assert lr_multiplier(99, 100, wsd) == 0.0
    # decayFraction 0 is warmup-stable without a decay, not a one-step drop to minLrRatio at the end
    stable = Optimizer(warmup_steps=10, schedule="wsd", decay_fraction=0.0, min_lr_ratio=0.0)
    assert [lr_multiplier(s, 100, stable) for s in (10, 98, 99)] == [1.0, 1.0, 1.0]

    guard = NonFiniteGuard(limit=3)
    assert guard.check(1.0, 2.0)
    assert not guard.check(float("nan"), 1.0)
    assert not guard.check(1.0, float("inf"))
    assert guard.check(1.0, 1.0) and guard.skipped == 2  # the count in a row resets
    assert not guard.check(float("nan"))
    assert not guard.check(float("nan"))
    with pytest.raises(FloatingPointError, match="3 steps in a row"):
        guard.check(float("nan"))


def test_int8_export(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    from lmforge_jobs.pretrain.model import hf_config

    args = ModelArgs("decoder", 320, 2, 64, 4, 2, 192, 32)
    native = Transformer(args)
    native.init_weights(0)
    hf = LlamaForCausalLM(hf_config(args))
    hf.load_state_dict(native.state_dict())
    hf.save_pretrained(tmp_path / "m")
    exp.write_int8(tmp_path / "m", tmp_path / "q")
    size = (tmp_path / "q" / "model.int8.safetensors").stat().st_size
    assert size < 0.4 * (tmp_path / "m" / "model.safetensors").stat().st_size
    q = exp.load_int8(tmp_path / "q").eval()
    x = torch.randint(0, 320, (2, 32))
    with torch.no_grad():
        ref, got = hf.eval()(x).logits, q(x).logits
    assert 0 < (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_push_reads_secret_and_calls_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge_jobs.pretrain.config import Push

    push = Push.model_validate(
        {"repo": "org/tiny", "token": {"secretKeyRef": {"name": "hf-token", "key": "token"}}}
    )
    monkeypatch.setenv("LMFORGE_SECRETS_DIR", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="LMFORGE_SECRET_HF_TOKEN_TOKEN"):
        read_secret(push.token, "export.push.token")
    secrets = tmp_path / "secrets" / "hf-token"
    secrets.mkdir(parents=True)
    (secrets / "token").write_text("hf_file\n")
    monkeypatch.setenv("LMFORGE_SECRETS_DIR", str(tmp_path / "secrets"))
    assert read_secret(push.token, "export.push.token") == "hf_file"
    monkeypatch.setenv("LMFORGE_SECRET_HF_TOKEN_TOKEN", "hf_env")
    calls = []

    class Api:
        def create_repo(self, **kw: object) -> None:
            calls.append(("create_repo", kw))

        def upload_folder(self, **kw: object) -> str:
            calls.append(("upload_folder", kw))
            return "https://hub/commit/1"

    assert exp.push_to_hub(tmp_path, push, api=Api()) == "https://hub/commit/1"
    assert calls[0] == (
        "create_repo",
        {"repo_id": "org/tiny", "private": True, "exist_ok": True, "token": "hf_env"},
    )
    assert calls[1][1]["folder_path"] == str(tmp_path) and calls[1][1]["token"] == "hf_env"


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("change", "env", "field"),
    [
        ({"data": {"tokens": "/nonexistent/shards"}}, {}, "spec.data.tokens: "),
        ({"model": {"vocabSize": 256}}, {}, "spec.model.vocabSize: "),
        ({}, {"WORLD_SIZE": "3", "RANK": "0"}, "spec.batch.globalTokens: "),
        (
            {"export": {"push": {"repo": "o/r", "token": {"secretKeyRef": {"name": "nope", "key": "k"}}}}},
            {},
            "spec.export.push.token: ",
        ),
        ({"model": {"layers": 3, "init": {"path": "MODEL"}}}, {}, "spec.model.layers: "),
        # span corruption with too few unmasked tokens to separate the noise spans
        (
            {"model": {"architecture": "encoder-decoder", "maskProbability": 0.9, "meanSpanLength": 1.0}},
            {},
            "spec.model.maskProbability: ",
        ),
    ],
)
def test_bad_input_is_one_line_exit_64(
    tmp_path: Path, data: dict[str, str], capsys, monkeypatch, change, env, field
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if "init" in change.get("model", {}):
        model_dir = tmp_path / "hf"
        model_dir.mkdir()
        (model_dir / "config.json").write_text(
            json.dumps(
                {
                    "model_type": "llama",
                    "num_hidden_layers": 2,
                    "hidden_size": 64,
                    "num_attention_heads": 4,
                    "num_key_value_heads": 2,
                    "intermediate_size": 192,
                    "vocab_size": 320,
                }
            )
        )
        change = {"model": {"layers": 3, "init": {"path": str(model_dir)}}}
    spec = dict(change)
    merged = {**data, **spec.pop("data", {})}
    assert main(["--manifest", str(manifest(tmp_path, merged, **spec))]) == EXIT_CONFIG_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {field}"), err
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert progress["state"] == "Invalid" and progress["field"] == field.rstrip(": ")


# ------------------------------------------------------------------------------------ object storage (S3)
@pytest.fixture(scope="module")
def s3_data(data: dict[str, str], s3_server: str) -> dict[str, str]:
    """The corpus uploaded once to a bucket of this module's own on the loopback S3 server: spec.data with
    s3:// URIs. The tests only read it (each still gets its own empty bucket and S3 environment from ``s3``)."""
    bucket = filled_bucket(
        s3_server, "t-pretrain-corpus", {f"corpus/{key}": local for key, local in data.items()}
    )
    return {key: f"{bucket}/corpus/{key}" for key in data}


S3_SPEC = {"budget": {"steps": 8}, "checkpoint": {"everySteps": 4, "keep": 3}, "eval": {"everySteps": 4}}


def test_s3_corpus_trains_to_the_same_losses(
    tmp_path: Path, data: dict[str, str], s3_data: dict[str, str], s3, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Shards read from S3 through a cache far smaller than the corpus (blocks evicted and read again,
    windows across blocks) give the bit-identical losses, training and held-out, of the local shards."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LMFORGE_CACHE_BLOCK_BYTES", "4096")
    monkeypatch.setenv("LMFORGE_CACHE_BYTES", "16384")
    # 4 steps of 8 windows each, at random places in the corpus, read more than the cache holds
    spec = {
        "budget": {"steps": 4},
        "batch": {"globalTokens": 256},
        "checkpoint": {"everySteps": 4, "keep": 1},
        "eval": {"everySteps": 2},
    }
    assert main(["--manifest", str(manifest(tmp_path, data, name="local", **spec))]) == 0
    assert main(["--manifest", str(manifest(tmp_path, s3_data, name="s3", **spec))]) == 0
    for key in ("loss", "evalLoss"):
        local, from_s3 = losses(tmp_path / "local", key), losses(tmp_path / "s3", key)
        assert local and from_s3 == local, key
    corpus = sum(f.stat().st_size for f in Path(data["tokens"]).glob("*.ds"))
    assert corpus > 16384  # the cache was bounded below the corpus size


@pytest.mark.slow  # a job process killed and resumed: several seconds
def test_s3_run_checkpoints_exports_and_resumes_after_sigkill(
    tmp_path: Path, data: dict[str, str], s3_data: dict[str, str], s3
) -> None:  # type: ignore[no-untyped-def]
    """Data and output on S3: DCP checkpoints with their marker and the Hugging Face export land in the
    bucket; a run killed after its first checkpoint resumes from S3 and ends with the weights of an
    uninterrupted local run."""
    from safetensors.torch import load_file

    from lmforge_jobs import storage

    assert main(["--manifest", str(manifest(tmp_path, data, name="straight", **S3_SPEC))]) == 0
    out = f"{s3.uri}/runs/killed"
    path = manifest(tmp_path, s3_data, name="killed", output=out, **S3_SPEC)
    proc = _run(path)
    _wait_for(lambda: "runs/killed/checkpoints/step-00000004/COMPLETE" in s3.keys("runs/"), proc, 120)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert ckpt.latest(f"{out}/checkpoints")[0] == 4
    assert not any(k.startswith("runs/killed/model/") for k in s3.keys("runs/"))
    assert main(["--manifest", str(path)]) == 0
    keys = s3.keys("runs/killed/")
    assert "runs/killed/model/model.safetensors" in keys and "runs/killed/model/tokenizer.json" in keys
    assert [s for s, _ in ckpt.list_complete(f"{out}/checkpoints")] == [4, 8]
    assert not [k for k in keys if k.endswith(".tmp")]
    fs, model = storage.filesystem(f"{out}/model/model.safetensors")
    fs.get_file(model, str(tmp_path / "from-s3.safetensors"))
    straight = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "from-s3.safetensors"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)  # bit-identical after the resume

    # continued pre-training from the model in the bucket starts where the run ended
    cont = manifest(
        tmp_path,
        data,
        name="cont",
        model={"init": {"path": f"{out}/model"}},
        budget={"steps": 1},
        optimizer={"lr": 1e-9, "warmupSteps": 0},
        checkpoint={"everySteps": 1, "keep": 1},
        eval={"everySteps": 1, "batches": 2},
    )
    assert main(["--manifest", str(cont)]) == 0
    end = losses(tmp_path / "straight", "evalLoss")[8]
    assert losses(tmp_path / "cont", "evalLoss")[1] == pytest.approx(end, abs=1e-5)


@pytest.mark.parametrize(
    "problem", ["missing-object", "missing-bucket", "wrong-credentials", "missing-model"]
)
def test_s3_problems_are_one_line_exit_64(
    tmp_path: Path,
    s3_data: dict[str, str],
    s3,
    capsys,
    monkeypatch: pytest.MonkeyPatch,
    problem: str,
) -> None:  # type: ignore[no-untyped-def]
    remote = dict(s3_data)
    spec: dict[str, object] = {}
    if problem == "missing-object":
        remote["heldOut"] = f"{s3.uri}/corpus/no-such-split"
        field, message = "spec.data.heldOut", f"{s3.uri}/corpus/no-such-split does not exist"
    elif problem == "missing-model":
        spec["model"] = {"init": {"path": f"{s3.uri}/models/none"}}
        field, message = "spec.model.init.path", f"{s3.uri}/models/none does not exist"
    elif problem == "missing-bucket":
        spec["output"] = "s3://no-such-bucket/run"
        field, message = "spec.output", "bucket s3://no-such-bucket does not exist"
    else:
        s3.enforce_auth()
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "zq9-secret-value")
        field, message = "spec.data.tokens", f"access denied to {s3_data['tokens']}"
    assert main(["--manifest", str(manifest(tmp_path, remote, **spec))]) == EXIT_CONFIG_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {field}: {message}"), err
    assert "AKIAWRONG" not in err[0] and "zq9-secret" not in err[0]
    if problem != "missing-bucket":
        progress = json.loads((tmp_path / "run" / "progress.json").read_text())
        assert progress["state"] == "Invalid" and progress["field"] == field
