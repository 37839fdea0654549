"""The AlignmentRun job on CPU with tiny Llamas built from configs (tests/support/tiny_models.py), offline.

Checks that sft lowers the loss on answer tokens (and gives a template-less tokenizer a chat
template), reward reaches held-out accuracy > 0.8, dpo raises the held-out margin and accuracy, ppo raises
the reward model's mean reward with a bounded KL, LoRA / prompt-tuning adapters reload and merge with
identical outputs, resume after an interruption, synthetic data, and bad input → one line + exit 64.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from manifests import write_manifest
from repo import ROOT
from tiny_models import tiny_llama

DATA = ROOT / "examples" / "data"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny Llama whose tokenizer has no chat template, like a PretrainRun export."""
    return tiny_llama(tmp_path_factory.mktemp("base"), chat_template=False)


def run_job(tmp: Path, name: str, spec: dict[str, Any]) -> tuple[int, Path]:
    """Run the job in-process (as ``python -m lmforge_jobs.align``); return (exit code, output dir)."""
    from lmforge_jobs.align.__main__ import main

    spec = {"precision": "fp32", "output": str(tmp / name), **spec}
    manifest = write_manifest(tmp / f"{name}.yaml", "AlignmentRun", name, spec)
    return main(["--manifest", str(manifest)]), Path(spec["output"])


def progress(out: Path) -> dict[str, Any]:
    return json.loads((out / "progress.json").read_text())


def history(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def answer_loss(model_dir: str, tokenizer_dir: str, rows: list[dict[str, Any]]) -> float:
    """Mean cross-entropy on the assistant answer tokens only, with the tokenizer's chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    for row in rows:
        prompt = tok.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(row["messages"], tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False).input_ids
        ids = torch.tensor([tok(full, add_special_tokens=False).input_ids])
        labels = ids.clone()
        labels[:, : len(p_ids)] = -100
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        total, count = total + loss.item() * n, count + n
    return total / count


# ------------------------------------------------------------------------------------------- bad input
def _error(capsys: pytest.CaptureFixture[str], tmp: Path, name: str, spec: dict[str, Any]) -> str:
    code, _ = run_job(tmp, name, spec)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 64, err
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == err[-1] and " spec." in f" {err[-1][7:]}", err
    assert "Traceback" not in "\n".join(err)
    return errors[0]


def test_bad_input_names_the_field(tmp_path: Path, base: str, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n', encoding="utf-8"
    )
    prefs = {"path": str(bad), "format": "preference"}
    line = _error(
        capsys, tmp_path, "missing-key", {"base": {"path": base}, "method": "dpo", "dataset": prefs}
    )
    assert "spec.dataset.path" in line and '"rejected"' in line and "preference" in line and "line 2" in line
    assert progress(tmp_path / "missing-key")["state"] == "Invalid"

    sft = {"path": str(DATA / "preferences.jsonl"), "format": "messages"}
    line = _error(capsys, tmp_path, "wrong-shape", {"base": {"path": base}, "method": "sft", "dataset": sft})
    assert 'missing key "messages"' in line and "line 1" in line

    wrong = {"path": str(DATA / "sft.jsonl"), "format": "messages"}
    line = _error(capsys, tmp_path, "fmt", {"base": {"path": base}, "method": "dpo", "dataset": wrong})
    assert "spec.dataset.format: method dpo needs dataset.format preference" in line, line

    prompts = {"path": str(DATA / "prompts.jsonl"), "format": "prompts"}
    line = _error(capsys, tmp_path, "no-rm", {"base": {"path": base}, "method": "ppo", "dataset": prompts})
    assert "spec.rewardModel:" in line, line

    missing = {"path": str(tmp_path / "nowhere")}
    line = _error(
        capsys,
        tmp_path,
        "no-base",
        {"base": missing, "method": "sft", "dataset": {**sft, **{"path": str(DATA / "sft.jsonl")}}},
    )
    assert line.startswith("error: spec.base.path:") and "nowhere" in line, line

    lora = {"lora": {"targetModules": ["not_a_module"]}}
    good = {"path": str(DATA / "sft.jsonl"), "format": "messages"}
    line = _error(
        capsys, tmp_path, "lora", {"base": {"path": base}, "method": "sft", "dataset": good, "peft": lora}
    )
    assert line.startswith("error: spec.peft.lora.targetModules:") and "not_a_module" in line, line


# ------------------------------------------------------------------------------------------------- sft
@pytest.mark.slow
def test_sft_lowers_answer_loss_and_adds_chat_template(tmp_path: Path, base: str) -> None:
    from lmforge_jobs.resolve import expected_outputs

    rows = [json.loads(line) for line in (DATA / "sft.jsonl").read_text().splitlines()]
    spec = {
        "base": {"path": base},
        "method": "sft",
        "dataset": {"path": str(DATA / "sft.jsonl"), "format": "messages", "evalFraction": 0.1},
        "hyperparameters": {"lr": 2.0e-3, "epochs": 3, "batchSize": 8, "microBatchSize": 8, "maxLength": 64},
    }
    code, out = run_job(tmp_path, "sft", spec)
    assert code == 0
    model_dir = out / "model"
    assert json.loads((out / "outputs.json").read_text()) == expected_outputs("AlignmentRun", str(out))
    before = answer_loss(base, str(model_dir), rows)  # the base with the chat template the job gave it
    after = answer_loss(str(model_dir), str(model_dir), rows)
    assert after < before - 0.5, (before, after)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(model_dir).chat_template  # the base had none
    p = progress(out)
    assert p["state"] == "Succeeded" and p["step"] == p["totalSteps"] > 0
    assert p["metrics"]["evalLoss"] > 0 and p["metrics"]["tokensPerSecond"] > 0
    losses = [r["loss"] for r in history(out) if "loss" in r]
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_sft_resumes_after_interruption(tmp_path: Path, base: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import lmforge_jobs.align.trainers as trainers

    spec = {
        "base": {"path": base},
        "method": "sft",
        "dataset": {"path": str(DATA / "sft.jsonl"), "format": "promptCompletion", "evalFraction": 0},
        "hyperparameters": {
            "lr": 1.0e-3,
            "maxSteps": 6,
            "batchSize": 4,
            "microBatchSize": 4,
            "maxLength": 48,
        },
        "checkpoint": {"everySteps": 2, "keep": 2},
    }
    # promptCompletion records: made from the chat data
    rows = [json.loads(line)["messages"] for line in (DATA / "sft.jsonl").read_text().splitlines()]
    pc = tmp_path / "pc.jsonl"
    pc.write_text(
        "".join(json.dumps({"prompt": m[0]["content"], "completion": m[1]["content"]}) + "\n" for m in rows)
    )
    spec["dataset"]["path"] = str(pc)

    real = trainers.make_callback

    def interrupting(tel: Any, ws: int) -> Any:
        callback = real(tel, ws)

        def on_step_end(args: Any, state: Any, control: Any, **kw: Any) -> Any:
            if state.global_step == 5:  # after checkpoint-4, before checkpoint-6
                raise KeyboardInterrupt
            return control

        callback.on_step_end = on_step_end
        return callback

    monkeypatch.setattr(trainers, "make_callback", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run_job(tmp_path, "resume", spec)
    out = tmp_path / "resume"
    assert not (out / "outputs.json").exists()
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    first = [r["step"] for r in history(out) if "loss" in r]
    assert first == [1, 2, 3, 4]  # interrupted at the end of step 5, before it was logged

    monkeypatch.setattr(trainers, "make_callback", real)
    code, _ = run_job(tmp_path, "resume", spec)
    assert code == 0
    steps = [r["step"] for r in history(out) if "loss" in r]
    second = steps[len(first) :]
    assert second == [5, 6], steps  # continued from checkpoint-4, did not start over
    assert (out / "model" / "model.safetensors").exists()


@pytest.mark.slow
def test_sft_packing_and_prompt_tuning(tmp_path: Path, base: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lmforge_jobs.align.models import load_aligned

    spec = {
        "base": {"path": base},
        "method": "sft",
        "dataset": {"path": str(DATA / "sft.jsonl"), "format": "messages", "evalFraction": 0.1},
        "peft": {"promptTuning": {"virtualTokens": 4, "initText": "Answer the question"}},
        "hyperparameters": {
            "lr": 3.0e-2,
            "epochs": 2,
            "batchSize": 4,
            "microBatchSize": 4,
            "maxLength": 128,
            "packing": True,
        },
    }
    code, out = run_job(tmp_path, "pt", spec)
    assert code == 0
    assert json.loads((out / "outputs.json").read_text()) == {
        "model": str(out / "model"),
        "adapter": str(out / "adapter"),
    }
    losses = [r["loss"] for r in history(out) if "loss" in r]
    assert min(losses[-3:]) < losses[0]
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        reference = plain(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(plain, str(out / "adapter")).eval()
        a = tuned(input_ids=ids).logits
        b = load_aligned(str(out / "model")).eval()(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert a.shape[1] == 4 + ids.shape[1]  # the virtual tokens come first
    assert (a[:, -ids.shape[1] :] - reference).abs().max() > 1e-3  # the soft prompt changes the outputs


# ---------------------------------------------------------------------------------------------- reward
def _reward_run(tmp: Path, base: str, epochs: int) -> Path:
    spec = {
        "base": {"path": base},
        "method": "reward",
        "dataset": {"path": str(DATA / "pairs.jsonl"), "format": "preference", "evalFraction": 0.2},
        "hyperparameters": {
            "lr": 3.0e-3,
            "epochs": epochs,
            "batchSize": 8,
            "microBatchSize": 8,
            "maxLength": 64,
        },
    }
    with pytest.MonkeyPatch.context() as mp:  # module scope: the autouse fixture has not run yet
        mp.setenv("LMFORGE_METRICS_PORT", "off")
        mp.setenv("HF_HUB_OFFLINE", "1")
        code, out = run_job(tmp, "rm", spec)
    assert code == 0
    return out


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory: pytest.TempPathFactory, base: str) -> Path:
    """A reward model trained until it ranks held-out pairs well (for the tests of what PPO learns)."""
    return _reward_run(tmp_path_factory.mktemp("reward"), base, epochs=6)


@pytest.fixture(scope="module")
def rough_reward_run(tmp_path_factory: pytest.TempPathFactory, base: str) -> Path:
    """A reward model after one epoch: a reward AlignmentRun's output like any other, for the tests of
    PPO's mechanics (the reference, resume, the ratio), which do not need it to rank well."""
    return _reward_run(tmp_path_factory.mktemp("rough-reward"), base, epochs=1)


def ppo_spec(base: str, reward_run: Path, eval_fraction: float = 0, **changes: Any) -> dict[str, Any]:
    """A PPO run of the tiny base against the module's reward model, on the shipped prompts."""
    dataset = {"path": str(DATA / "prompts.jsonl"), "format": "prompts", "evalFraction": eval_fraction}
    spec = {"base": {"path": base}, "method": "ppo", "rewardModel": {"path": str(reward_run / "model")}}
    return {**spec, "dataset": dataset, **changes}


@pytest.mark.slow
def test_reward_model_held_out_accuracy(reward_run: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    metrics = progress(reward_run)["metrics"]
    assert metrics["rewardAccuracy"] > 0.8, metrics
    assert metrics["rewardMargin"] > 0
    model = AutoModelForSequenceClassification.from_pretrained(reward_run / "model")
    assert model.config.num_labels == 1


# ------------------------------------------------------------------------------------------------- dpo
@pytest.mark.slow
def test_dpo_lora_raises_margin_and_merges(tmp_path: Path, base: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = {
        "base": {"path": base},
        "method": "dpo",
        "dataset": {
            "path": str(DATA / "pairs.jsonl"),
            "format": "preference",
            "evalFraction": 0.1,
            "limit": 160,
        },
        "peft": {
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["q_proj", "v_proj", "o_proj"]},
            "merge": True,
        },
        "hyperparameters": {
            "lr": 5.0e-3,
            "epochs": 2,
            "batchSize": 8,
            "microBatchSize": 8,
            "maxLength": 64,
            "beta": 0.5,
        },
    }
    code, out = run_job(tmp_path, "dpo", spec)
    assert code == 0
    rows = history(out)
    first = next(r for r in rows if "trainRewardMargin" in r)
    final = progress(out)["metrics"]
    # the implicit reference is the base: margins start at 0 and must grow on held-out pairs
    assert abs(first["trainRewardMargin"]) < 1e-3
    assert final["rewardMargin"] > 0.05, final
    assert final["rewardAccuracy"] >= 0.75, final
    # merged model/ == base + adapter/, and both differ from the base
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out / "model").eval()(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base).eval()
        ref = plain(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(plain, str(out / "adapter")).eval()(input_ids=ids).logits
    assert not (out / "model" / "adapter_config.json").exists()
    assert torch.allclose(merged, adapted, atol=1e-4)
    assert (merged - ref).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------- ppo
@pytest.mark.slow
def test_ppo_raises_reward_with_bounded_kl(tmp_path: Path, base: str, reward_run: Path) -> None:
    spec = ppo_spec(
        base,
        reward_run,
        hyperparameters={
            "lr": 3.0e-3,
            "maxSteps": 24,
            "batchSize": 16,
            "microBatchSize": 16,
            "warmupRatio": 0,
            "ppo": {"rolloutBatchSize": 16, "maxNewTokens": 12, "ppoEpochs": 2, "klCoef": 0.05},
        },
    )
    code, out = run_job(tmp_path, "ppo", spec)
    assert code == 0
    rows = [r for r in history(out) if "meanReward" in r]
    assert len(rows) == 24
    rewards = [r["meanReward"] for r in rows]
    early, late = sum(rewards[:6]) / 6, sum(rewards[-6:]) / 6
    assert late > early + 0.3, rewards
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # policy == reference before the first update
    assert max(r["kl"] for r in rows) < 10, [r["kl"] for r in rows]
    assert all(0 <= r["clipFraction"] <= 1 and r["entropy"] > 0 for r in rows)
    metrics = progress(out)["metrics"]
    assert {"meanReward", "kl", "entropy", "clipFraction", "loss"} <= set(metrics)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "model")


@pytest.mark.slow
def test_ppo_lora_reference_is_the_disabled_adapter(
    tmp_path: Path, base: str, rough_reward_run: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    spec = ppo_spec(
        base,
        rough_reward_run,
        eval_fraction=0.2,
        peft={"lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        hyperparameters={
            "lr": 5.0e-3,
            "maxSteps": 3,
            "batchSize": 8,
            "microBatchSize": 8,
            "ppo": {"rolloutBatchSize": 8, "maxNewTokens": 8, "ppoEpochs": 2},
        },
        checkpoint={"everySteps": 1, "keep": 1},
    )
    code, out = run_job(tmp_path, "ppo-lora", spec)
    assert code == 0
    rows = [r for r in history(out) if "kl" in r]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4) and rows[-1]["kl"] != 0
    assert [p.name for p in (out / "checkpoints").glob("ppo-*")] == ["ppo-2"]
    metrics = progress(out)["metrics"]  # held-out prompts scored before and after training
    assert {"initialEvalMeanReward", "evalMeanReward"} <= set(metrics)
    # an unmerged LoRA output as the base of a next run is merged into its base model first
    from lmforge_jobs.align.models import load_causal_lm

    merged = load_causal_lm(str(out / "model"), {}, "base")
    assert not hasattr(merged, "peft_config") or not merged.peft_config
    # model/ without merge is the adapter in PEFT format; transformers loads base + adapter from it
    assert (out / "model" / "adapter_config.json").exists()
    ids = torch.tensor([[5, 17, 42]])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(out / "model").eval()(input_ids=ids).logits
        b = AutoModelForCausalLM.from_pretrained(base).eval()(input_ids=ids).logits
        c = merged.eval()(input_ids=ids).logits
    assert (a - b).abs().max() > 1e-4
    assert torch.allclose(a, c, atol=1e-5)


@pytest.mark.slow
def test_ppo_resume_continues(
    tmp_path: Path, base: str, rough_reward_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lmforge_jobs.align.ppo as ppo

    spec = ppo_spec(
        base,
        rough_reward_run,
        hyperparameters={
            "maxSteps": 4,
            "batchSize": 4,
            "microBatchSize": 4,
            "ppo": {"rolloutBatchSize": 4, "maxNewTokens": 4, "ppoEpochs": 1},
        },
        checkpoint={"everySteps": 2},
    )
    real = ppo.save_checkpoint

    def save_then_stop(output: str, iteration: int, *a: Any) -> None:
        real(output, iteration, *a)
        raise KeyboardInterrupt

    monkeypatch.setattr(ppo, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_job(tmp_path, "ppo-resume", spec)
    monkeypatch.setattr(ppo, "save_checkpoint", real)
    code, out = run_job(tmp_path, "ppo-resume", spec)
    assert code == 0
    steps = [r["step"] for r in history(out) if "meanReward" in r]
    assert steps == [1, 2, 3, 4], steps


# ------------------------------------------------------------------------------------------- synthetic
@pytest.mark.slow
def test_synthetic_sft_from_teacher(tmp_path: Path, base: str) -> None:
    teacher = tiny_llama(tmp_path / "teacher", seed=3)
    spec = {
        "base": {"path": base},
        "method": "sft",
        "synthetic": {
            "teacher": {"path": teacher},
            "prompts": str(DATA / "prompts.jsonl"),
            "samplesPerPrompt": 2,
            "maxNewTokens": 8,
            "temperature": 1.0,
        },
        "hyperparameters": {
            "lr": 1.0e-3,
            "maxSteps": 3,
            "batchSize": 8,
            "microBatchSize": 8,
            "maxLength": 64,
        },
    }
    code, out = run_job(tmp_path, "syn", spec)
    assert code == 0
    rows = [json.loads(line) for line in (out / "synthetic.jsonl").read_text().splitlines()]
    assert len(rows) == 40  # 20 prompts × 2 samples
    prompts = {json.loads(line)["prompt"] for line in (DATA / "prompts.jsonl").read_text().splitlines()}
    assert {r["messages"][0]["content"] for r in rows} == prompts
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows)
    assert progress(out)["metrics"]["syntheticExamples"] == 40
    assert (out / "model" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------------ data
def test_data_formats_parquet_and_split(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmforge_jobs.align.config import Dataset
    from lmforge_jobs.align.data import load_split
    from lmforge_jobs.entry import ConfigError

    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": f"a{i}"},
                {"role": "user", "content": f"again {i}"},
                {"role": "assistant", "content": f"b{i}"},
            ]
        }
        for i in range(10)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    split = load_split(
        Dataset(path=str(tmp_path / "chat.parquet"), format="messages", evalFraction=0.2), seed=1
    )
    assert len(split.train) == 8 and len(split.eval) == 2
    rec = split.train[0]
    # loss goes on the last assistant turn; earlier turns are the prompt
    assert [t["role"] for t in rec["prompt"]] == ["system", "user", "assistant", "user"]
    assert rec["completion"][0]["content"].startswith("b")
    assert {r["completion"][0]["content"] for r in split.train + split.eval} == {f"b{i}" for i in range(10)}

    (tmp_path / "pc.jsonl").write_text('{"prompt": "p", "completion": "c"}\n\n{"prompt": "p2"}\n')
    with pytest.raises(ConfigError) as err:
        load_split(Dataset(path=str(tmp_path / "pc.jsonl"), format="promptCompletion"))
    assert err.value.field == "dataset.path"
    assert (
        'pc.jsonl line 3: missing key "completion" (format promptCompletion needs prompt, completion)'
        in str(err.value)
    )
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "only a question"}]}\n')
    with pytest.raises(ConfigError, match="line 1: messages needs an assistant turn"):
        load_split(Dataset(path=str(tmp_path / "bad.jsonl"), format="messages"))
    (tmp_path / "broken.jsonl").write_text('{"prompt": \n')
    with pytest.raises(ConfigError, match=r"broken\.jsonl line 1: not valid JSON"):
        load_split(Dataset(path=str(tmp_path / "broken.jsonl"), format="prompts"))


def test_object_storage_inputs_and_outputs(
    tmp_path: Path, base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Model, data and output on fsspec storage (the in-memory filesystem stands in for s3:// or gs://)."""
    import fsspec

    from lmforge_jobs.resolve import expected_outputs

    monkeypatch.chdir(tmp_path)  # entry.job_main records a failure under spec.output as a local path
    monkeypatch.setenv("LMFORGE_SCRATCH", str(tmp_path / "scratch"))
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    for path in Path(base).iterdir():
        fs.pipe(f"/lmforge-test/models/base/{path.name}", path.read_bytes())
    fs.pipe("/lmforge-test/data/chat.jsonl", (DATA / "sft.jsonl").read_bytes())
    output = "memory://lmforge-test/runs/remote"
    spec = {
        "base": {"path": "memory://lmforge-test/models/base"},
        "method": "sft",
        "dataset": {"path": "memory://lmforge-test/data/", "format": "messages", "evalFraction": 0.1},
        "peft": {"lora": {"r": 4, "alpha": 8}},
        "hyperparameters": {
            "lr": 1.0e-3,
            "maxSteps": 2,
            "batchSize": 4,
            "microBatchSize": 4,
            "maxLength": 48,
        },
        "output": output,
    }
    try:
        code, _ = run_job(tmp_path, "remote", spec)
        assert code == 0
        expected = expected_outputs("AlignmentRun", output, _spec_of(tmp_path / "remote.yaml"))
        assert json.loads(fs.cat("/lmforge-test/runs/remote/outputs.json")) == expected
        assert expected == {"model": f"{output}/model", "adapter": f"{output}/adapter"}
        assert fs.exists("/lmforge-test/runs/remote/adapter/adapter_model.safetensors")
        assert fs.exists("/lmforge-test/runs/remote/model/tokenizer.json")
        assert json.loads(fs.cat("/lmforge-test/runs/remote/progress.json"))["state"] == "Succeeded"
        # a missing remote file is a configuration error naming the field
        spec["dataset"]["path"] = "memory://lmforge-test/data/nothing.jsonl"
        code, _ = run_job(tmp_path, "remote-missing", spec)
        assert code == 64
    finally:
        fs.rm("/lmforge-test", recursive=True)


def _spec_of(manifest: Path) -> Any:
    from lmforge_jobs.manifest import load_spec

    return load_spec(str(manifest), "AlignmentRun").spec


def test_ppo_gae_masks_padding_and_matches_hand_computation() -> None:
    """GAE runs over the real response tokens only: padding after the last token adds nothing and
    bootstraps nothing; a hand-computed two-sequence example with γ, λ ≠ 1."""
    import torch

    from lmforge_jobs.align.ppo import gae, response_mask, whiten

    gamma, lam = 0.9, 0.8
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    values = torch.tensor([[0.5, -0.2, 0.3, 9.0], [0.1, 0.2, 0.3, 0.4]]) * mask
    rewards = torch.tensor([[0.1, -0.1, 1.0, 0.0], [0.0, 0.2, -0.3, 2.0]])
    adv, ret = gae(rewards, values, mask, gamma, lam)
    expected = torch.zeros_like(rewards)
    for b in range(2):
        n = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(n)):
            next_v = float(values[b, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[b, t]) + gamma * next_v - float(values[b, t])
            last = delta + gamma * lam * last
            expected[b, t] = last
    assert torch.allclose(adv, expected, atol=1e-6)
    assert torch.allclose(ret, (expected + values) * mask, atol=1e-6)
    assert adv[0, 3] == 0 and ret[0, 3] == 0

    white = whiten(adv, mask)
    real = white[mask.bool()]
    assert abs(float(real.mean())) < 1e-5 and white[0, 3] == 0

    # everything after the first eos (id 2) is masked; the eos itself is a response token; pad (0) too
    responses = torch.tensor([[5, 2, 7, 2], [5, 6, 0, 0], [2, 3, 4, 5]])
    assert response_mask(responses, eos_id=2, pad_id=0).tolist() == [
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [1, 0, 0, 0],
    ]
    # pad == eos: the first eos stays, the padding after it goes
    assert response_mask(torch.tensor([[5, 2, 2, 2]]), eos_id=2, pad_id=2).tolist() == [[1, 1, 0, 0]]


@pytest.mark.slow
def test_ppo_ratio_is_one_before_the_update_even_with_dropout(
    tmp_path: Path, base: str, rough_reward_run: Path
) -> None:
    """Old log-probs are taken without dropout; the update must see the same network, so with one PPO
    epoch and one minibatch ρ = π/π_old is exactly 1 and nothing is clipped, whatever the LoRA dropout."""
    spec = ppo_spec(
        base,
        rough_reward_run,
        peft={"lora": {"r": 4, "alpha": 8, "dropout": 0.9}},
        hyperparameters={
            "lr": 2.0e-2,
            "maxSteps": 3,
            "batchSize": 8,
            "microBatchSize": 8,
            "warmupRatio": 0,
            "ppo": {"rolloutBatchSize": 8, "maxNewTokens": 6, "ppoEpochs": 1},
        },
    )
    code, out = run_job(tmp_path, "ppo-dropout", spec)
    assert code == 0
    rows = [r for r in history(out) if "clipFraction" in r]
    assert len(rows) == 3
    assert rows[-1]["kl"] != 0  # the adapter did change the policy (so dropout had something to drop)
    assert all(r["clipFraction"] == 0 for r in rows), [r["clipFraction"] for r in rows]
