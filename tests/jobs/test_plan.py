"""The compute planner: exact parameter counts, Chinchilla optima, memory accounting and ``lmforge plan``."""

from __future__ import annotations

import json
import sys

import pytest
from repo import ROOT

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
    # Chinchilla's own budget lands near the 70B / 1.4T run the paper trained.
    opt = chinchilla_optimal(5.76e23, "hoffmann")
    assert opt.parameters == pytest.approx(69_282_032_302.76, rel=1e-9)  # sqrt(5.76e23 / 120)
    assert opt.tokens == pytest.approx(1_385_640_646_055.1, rel=1e-9)
    assert opt.parameters == pytest.approx(70e9, rel=0.02)
    assert opt.tokens == pytest.approx(1.4e12, rel=0.02)
    assert opt.tokens_per_parameter == pytest.approx(20.0)
    assert 6 * opt.parameters * opt.tokens == pytest.approx(5.76e23, rel=1e-9)


def test_chinchilla_hoffmann_approach3_pinned():
    opt = chinchilla_optimal(5.76e23, "hoffmann-approach3")
    # Hoffmann et al.'s published approach-3 constants give ~32B, below the 70B Chinchilla was trained at.
    assert opt.parameters == pytest.approx(32_189_859_151.368, rel=1e-6)
    assert opt.tokens == pytest.approx(2_982_305_686_662.8, rel=1e-6)
    assert 20e9 < opt.parameters < 40e9
    assert 6 * opt.parameters * opt.tokens == pytest.approx(5.76e23, rel=1e-9)


def test_chinchilla_unknown_method():
    with pytest.raises(ValueError, match="hoffmann-approach3"):
        chinchilla_optimal(1e21, "kaplan")


def test_chinchilla_epoch_pinned():
    opt = chinchilla_optimal(5.76e23, "epoch")
    assert opt.parameters == pytest.approx(72_248_702_500.38, rel=1e-6)
    assert opt.tokens == pytest.approx(1_328_743_585_388.15, rel=1e-6)
    assert 40e9 < opt.parameters < 100e9
    assert opt.tokens == pytest.approx(1.4e12, rel=0.1)


def test_chinchilla_optimum_is_a_minimum():
    from lmforge_jobs.plan import SCALING_LAWS

    c = 1e22
    for method in ("hoffmann-approach3", "epoch"):
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


# ------------------------------------------------------------------ the planner against the native model
@pytest.mark.parametrize(
    "kw",
    [
        {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn_hidden": 192, "vocab_size": 320},
        {"layers": 3, "hidden": 96, "heads": 6, "kv_heads": 3, "vocab_size": 448, "tie_embeddings": True},
        {"layers": 1, "hidden": 128, "heads": 2, "vocab_size": 1000},
    ],
)
def test_count_matches_native_model(kw):
    pytest.importorskip("torch")
    from lmforge_jobs.pretrain.model import ModelArgs, Transformer
    from lmforge_jobs.pretrain.model import count_parameters as native_count

    shape = ModelShape(**kw)
    model = Transformer(ModelArgs.from_shape(shape, shape.vocab_size))
    count = count_parameters(shape)
    assert count.total == native_count(model)
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" in n or "lm_head" in n)
    assert count.embedding == embedding


# Measures the peak memory of training steps of the native model in a fresh process: the growth of the
# peak resident set size (VmHWM in /proc/self/status, reset to the current size through clear_refs) over
# the resident size after torch's kernels and allocator have warmed up on a throwaway model. glibc is told to serve every allocation of 64 KiB or more with
# mmap (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set at once and the peak is the live
# bytes of weights, gradients, AdamW state, activations and logits, not allocator caching. The loop is
# the job's: fused AdamW, loss from model(input_ids, labels), fp32 on CPU.
_MEASURE = r"""
import json, sys
import torch
from lmforge_jobs.pretrain.model import ModelArgs, Transformer
torch.set_num_threads(1)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
def steps(args, batch, n):
    m = Transformer(args); m.init_weights(0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, args.vocab_size, (batch, args.seq_len)); y = torch.randint(0, args.vocab_size, x.shape)
    for _ in range(n):
        m(x, y).backward(); opt.step(); opt.zero_grad(set_to_none=True)
steps(ModelArgs("decoder", 64, 1, 32, 2, 2, 64, 16), 2, 2)
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident size
    base = status("VmRSS")
except OSError:
    base = status("VmHWM")
shape = json.loads(sys.argv[1])
steps(ModelArgs("decoder", shape["vocab_size"], shape["layers"], shape["hidden"], shape["heads"], shape["kv_heads"],
                shape["ffn_hidden"], shape["seq_len"]), shape["batch"], 3)
print(status("VmHWM") - base)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape",
    [
        # states dominate (a small model with a big vocabulary, short sequences)
        {
            "layers": 2,
            "hidden": 512,
            "heads": 8,
            "kv_heads": 8,
            "ffn_hidden": 1536,
            "vocab_size": 8192,
            "seq_len": 32,
            "batch": 1,
        },
        # activations and logits a third of the total
        {
            "layers": 4,
            "hidden": 256,
            "heads": 4,
            "kv_heads": 2,
            "ffn_hidden": 768,
            "vocab_size": 8192,
            "seq_len": 128,
            "batch": 4,
        },
    ],
)
def test_memory_estimate_within_15_percent_of_measured_cpu_peak(shape):
    pytest.importorskip("torch")
    import os
    import subprocess

    if not sys.platform.startswith("linux"):
        pytest.skip("the measurement relies on glibc's MALLOC_MMAP_THRESHOLD_ and /proc/self/status")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, json.dumps(shape)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    measured = int(out.stdout.split()[-1])
    model = {k: v for k, v in shape.items() if k != "batch"}
    spec = _spec(
        model={
            "layers": model["layers"],
            "hidden": model["hidden"],
            "heads": model["heads"],
            "kvHeads": model["kv_heads"],
            "ffnHidden": model["ffn_hidden"],
            "seqLen": model["seq_len"],
            "vocabSize": model["vocab_size"],
        },
        batch={"globalTokens": model["seq_len"] * shape["batch"], "microBatchSize": shape["batch"]},
        precision="fp32",
        parallelism={"nodes": 1, "gpusPerNode": 1, "strategy": "ddp"},
    )
    estimate = plan_pretrain(spec).memory.total
    assert abs(estimate - measured) / measured < 0.15, (estimate, measured)
