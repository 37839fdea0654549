"""The compute planner: exact parameter counts, Chinchilla optima, memory accounting and ``lmforge plan``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lmforge_jobs.plan import (
    GiB,
    chinchilla_optimal,
    count_parameters,
    explain,
    nearest_shape,
    plan_pretrain,
    resolve_vocab,
)
from lmforge_jobs.pretrain.config import ModelShape, PretrainRunSpec
from lmforge_operator.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cluster" / "02-pretrain.yaml"


def _spec(**overrides):
    base = {
        "data": {"tokens": "/data/tokens", "tokenizer": "/data/tokenizer.json"},
        "model": {"layers": 16, "hidden": 2048, "heads": 32, "kvHeads": 8, "ffnHidden": 8192, "seqLen": 2048},
        "batch": {"globalTokens": 1048576, "microBatchSize": 4},
        "parallelism": {"nodes": 1, "gpusPerNode": 8, "strategy": "fsdp"},
    }
    base.update(overrides)
    return PretrainRunSpec.model_validate(base)


@pytest.mark.parametrize(
    "kw",
    [
        {"layers": 2, "hidden": 64, "heads": 4, "vocab_size": 320},
        {"layers": 3, "hidden": 128, "heads": 8, "kv_heads": 2, "ffn_hidden": 352, "vocab_size": 512},
        {"layers": 2, "hidden": 96, "heads": 6, "kv_heads": 3, "vocab_size": 256, "tie_embeddings": True},
    ],
)
def test_count_matches_transformers_llama(kw):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    shape = ModelShape(**kw)
    config = transformers.LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.ffn_size,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.n_kv_heads,
        tie_word_embeddings=shape.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    expected = sum(p.numel() for p in model.parameters())
    assert count_parameters(shape).total == expected


def test_llama3_8b():
    shape = ModelShape(layers=32, hidden=4096, heads=32, kv_heads=8, ffn_hidden=14336, vocab_size=128256)
    count = count_parameters(shape)
    assert count.total == 8_030_261_248
    assert count.total == pytest.approx(8.03e9, rel=0.01)
    assert count.embedding == 2 * 128256 * 4096
    assert count.total == count.embedding + count.non_embedding


def test_llama32_1b_tied():
    shape = ModelShape(
        layers=16, hidden=2048, heads=32, kv_heads=8, ffn_hidden=8192, vocab_size=128256, tie_embeddings=True
    )
    count = count_parameters(shape)
    assert count.total == 1_235_814_400
    assert count.total == pytest.approx(1.236e9, rel=0.01)


def test_gpt2_small_like():
    # GPT-2 small's shape with a Llama block: SwiGLU's 3 matrices of 768×3072 make it larger than 124M.
    shape = ModelShape(
        layers=12, hidden=768, heads=12, ffn_hidden=3072, vocab_size=50257, tie_embeddings=True
    )
    count = count_parameters(shape)
    assert count.total == 151_862_784
    assert 100e6 < count.total < 200e6
    # With the default SwiGLU width (8/3·h rounded up to 256 = 2048) it is close to GPT-2's 124M.
    default = ModelShape(layers=12, hidden=768, heads=12, vocab_size=50257, tie_embeddings=True)
    assert count_parameters(default).total == pytest.approx(124e6, rel=0.05)


def test_vocab_auto():
    shape = ModelShape(layers=2, hidden=64, heads=4)
    assert resolve_vocab(shape) == 32000
    assert resolve_vocab(shape, 50257) == 50304  # rounded up to a multiple of 64
    assert resolve_vocab(ModelShape(layers=2, hidden=64, heads=4, vocab_size=50257)) == 50257


def test_chinchilla_hoffmann_pinned():
    opt = chinchilla_optimal(5.76e23, "hoffmann")
    # Hoffmann et al.'s published approach-3 constants give ~32B, below the 70B Chinchilla was trained at.
    assert opt.parameters == pytest.approx(32_189_859_151.368, rel=1e-6)
    assert opt.tokens == pytest.approx(2_982_305_686_662.8, rel=1e-6)
    assert 20e9 < opt.parameters < 40e9
    assert 6 * opt.parameters * opt.tokens == pytest.approx(5.76e23, rel=1e-9)


def test_chinchilla_epoch_pinned():
    opt = chinchilla_optimal(5.76e23, "epoch")
    assert opt.parameters == pytest.approx(72_248_702_500.38, rel=1e-6)
    assert opt.tokens == pytest.approx(1_328_743_585_388.15, rel=1e-6)
    assert 40e9 < opt.parameters < 100e9
    assert opt.tokens == pytest.approx(1.4e12, rel=0.1)


def test_chinchilla_optimum_is_a_minimum():
    from lmforge_jobs.plan import SCALING_LAWS

    c = 1e22
    for method in ("hoffmann", "epoch"):
        opt = chinchilla_optimal(c, method)
        law = SCALING_LAWS[method]
        for f in (0.8, 1.25):
            n = opt.parameters * f
            assert law.loss(n, c / (6 * n)) > opt.loss


def test_nearest_shape():
    shape = nearest_shape(1.1e9)
    assert shape.hidden % 128 == 0 and shape.head_dim == 128
    assert 64 <= shape.hidden / shape.layers <= 128
    assert count_parameters(shape).total == pytest.approx(1.1e9, rel=0.05)


def test_memory_fsdp_shards_ddp_does_not():
    f8 = plan_pretrain(_spec())
    f1 = plan_pretrain(_spec(parallelism={"nodes": 1, "gpusPerNode": 1, "strategy": "fsdp"}), gpu="h200")
    d8 = plan_pretrain(_spec(parallelism={"nodes": 1, "gpusPerNode": 8, "strategy": "ddp"}))
    d1 = plan_pretrain(_spec(parallelism={"nodes": 1, "gpusPerNode": 1, "strategy": "ddp"}))
    assert f8.memory.states == pytest.approx(f1.memory.states / 8)
    assert d8.memory.states == pytest.approx(d1.memory.states)
    assert d8.memory.states == pytest.approx(f1.memory.states)
    assert f8.memory.activations == d8.memory.activations


def test_bf16_adamw_is_16_bytes_per_param():
    p = plan_pretrain(_spec(parallelism={"nodes": 1, "gpusPerNode": 1}))
    assert p.memory.states == 16 * p.parameters
    assert p.memory.weights == 2 * p.parameters
    assert p.memory.master_weights == 4 * p.parameters
    fp32 = plan_pretrain(_spec(precision="fp32", parallelism={"nodes": 1, "gpusPerNode": 1}))
    assert fp32.memory.states == 16 * fp32.parameters and fp32.memory.master_weights == 0


def test_activation_checkpointing_saves_memory():
    off = plan_pretrain(_spec())
    on = plan_pretrain(_spec(parallelism={"nodes": 1, "gpusPerNode": 8, "activationCheckpointing": True}))
    assert on.memory.activations < off.memory.activations
    assert on.memory.activations_checkpointing == off.memory.activations_checkpointing


def test_plan_budget_flops_hours_cost():
    p = plan_pretrain(_spec(budget={"tokensPerParameter": 20}), vocab_size=32000, price_per_gpu_hour=2.0)
    assert p.tokens == round(20 * p.parameters)
    assert p.steps == -(-p.tokens // 1048576)
    assert p.flops > 6 * p.parameters * p.tokens * 0.9
    assert p.gpu_hours == pytest.approx(p.flops / (989e12 * 0.4) / 3600)
    assert p.wall_clock_hours == pytest.approx(p.gpu_hours / 8)
    assert p.cost == pytest.approx(2.0 * p.gpu_hours)
    assert p.fits
    steps = plan_pretrain(_spec(budget={"steps": 100}))
    assert steps.tokens == 100 * 1048576 and steps.steps == 100
    assert "16 bytes per parameter" in explain(p)
    status = p.to_status()
    assert status.parameters == p.parameters


def test_plan_does_not_fit():
    big = _spec(
        model={"layers": 32, "hidden": 4096, "heads": 32, "kvHeads": 8, "ffnHidden": 14336, "seqLen": 2048},
        parallelism={"nodes": 1, "gpusPerNode": 8, "strategy": "ddp"},
    )
    p = plan_pretrain(big, gpu="l40s")
    assert not p.fits
    assert "fsdp" in p.reason


def test_plan_module_does_not_import_torch():
    import subprocess

    code = "import sys, lmforge_jobs.plan, lmforge_operator.cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_plan_json(capsys):
    assert main(["plan", str(EXAMPLE), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    (plan,) = out.values()
    assert plan["parameters"] > 1e9
    assert plan["memoryPerGpuGiB"] == pytest.approx(plan["memory"]["total"])
    assert plan["memory"]["total"] < 80
    assert plan["memory"]["weights"] * GiB == pytest.approx(2 * plan["parameters"] / 32)


def test_cli_plan_text(capsys):
    assert main(["plan", str(EXAMPLE), "--vocab", "50257", "--price", "2"]) == 0
    out = capsys.readouterr().out
    assert "PretrainRun/llama-1b" in out and "cost" in out and "vocab 50,304" in out


def test_cli_plan_gpu_hours(capsys):
    assert main(["plan", "--gpu-hours", "100000", "--gpu", "h100", "--method", "epoch", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["flops"] == pytest.approx(100000 * 3600 * 989e12 * 0.4)
    assert out["parameters"] == pytest.approx(chinchilla_optimal(out["flops"], "epoch").parameters)
    assert out["shapeParameters"] == pytest.approx(out["parameters"], rel=0.05)
    assert main(["plan", "--gpu-hours", "1000"]) == 0
    assert "parameters" in capsys.readouterr().out


def test_cli_plan_usage_errors(capsys):
    assert main(["plan"]) == 2
    assert main(["plan", str(EXAMPLE), "--gpu-hours", "10"]) == 2
