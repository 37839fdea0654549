"""The AlignmentRun job, top to bottom: check the data, load the models, (generate), train, save, report.

    python -m lmforge_jobs.align --manifest run.yaml          # one process
    torchrun --nproc-per-node 8 -m lmforge_jobs.align --manifest run.yaml

sft, reward and dpo run TRL's trainers (:mod:`.trainers`); ppo is this project's own loop (:mod:`.ppo`).
Outputs are described in :mod:`.models`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from lmforge_jobs.align.config import AlignmentRunSpec, DatasetFormat, Method
from lmforge_jobs.align.data import Split, convert, load_split, read_records, split_records, write_jsonl
from lmforge_jobs.align.models import (
    check_lora_targets,
    load_aligned,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    model_source,
    peft_config,
    save_outputs,
)
from lmforge_jobs.align.storage import is_remote, staging_dir, upload
from lmforge_jobs.entry import ConfigError
from lmforge_jobs.manifest import Resource
from lmforge_jobs.resolve import expected_outputs
from lmforge_jobs.telemetry import Telemetry


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def check_inputs(spec: AlignmentRunSpec) -> Split | None:
    """Everything the user can get wrong, before any model is loaded: data shape, model directories."""
    model_source(spec.base, "base")
    if spec.method == Method.ppo:
        if spec.reward_model is None:
            raise ConfigError(
                "rewardModel", "method ppo needs a rewardModel (the output of a reward AlignmentRun)"
            )
        model_source(spec.reward_model, "rewardModel")
    if spec.synthetic is not None:
        model_source(spec.synthetic.teacher, "synthetic.teacher")
        from lmforge_jobs.align.config import Dataset

        prompts = Dataset(path=spec.synthetic.prompts, format=DatasetFormat.prompts)
        for name, line, rec in read_records(prompts, "synthetic.prompts"):
            convert(DatasetFormat.prompts, rec, f"{name} line {line}", "synthetic.prompts")
    if spec.dataset is not None:
        return load_split(spec.dataset, seed=spec.hyperparameters.seed)
    return None


def generate_synthetic(spec: AlignmentRunSpec, output: str, tel: Telemetry) -> Split:
    """Teacher completions for every prompt (samplesPerPrompt each), kept in output/synthetic.jsonl.

    Every process generates the same data (same seed); rank 0 writes the file, which a rerun reuses."""
    import torch

    from lmforge_jobs.align.config import Dataset

    syn = spec.synthetic
    assert syn is not None
    path = Path(output) / "synthetic.jsonl"
    eval_fraction = spec.dataset.eval_fraction if spec.dataset is not None else 0.05
    if path.exists():
        data = Dataset(path=str(path), format=DatasetFormat.messages, eval_fraction=eval_fraction)
        return load_split(data, seed=spec.hyperparameters.seed)
    source, kwargs = model_source(syn.teacher, "synthetic.teacher")
    tok = load_tokenizer(source, kwargs, "synthetic.teacher")
    teacher = load_causal_lm(source, kwargs, "synthetic.teacher").eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher.to(device)
    prompts = Dataset(path=syn.prompts, format=DatasetFormat.prompts)
    records = [
        convert(DatasetFormat.prompts, r, f"{n} line {i}", "synthetic.prompts")
        for n, i, r in read_records(prompts, "synthetic.prompts")
    ]
    rows: list[dict[str, Any]] = []
    tok.padding_side = "left"
    torch.manual_seed(spec.hyperparameters.seed)
    for k, rec in enumerate(records):
        text = tok.apply_chat_template(rec["prompt"], tokenize=False, add_generation_prompt=True)
        enc = tok([text] * syn.samples_per_prompt, return_tensors="pt", add_special_tokens=False).to(device)
        with torch.no_grad():
            out = teacher.generate(
                **enc,
                max_new_tokens=syn.max_new_tokens,
                do_sample=syn.temperature > 0,
                temperature=syn.temperature if syn.temperature > 0 else None,
                top_p=None,
                top_k=None,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        for seq in out[:, enc["input_ids"].shape[1] :]:
            answer = tok.decode(seq, skip_special_tokens=True).strip()
            rows.append({"messages": [*rec["prompt"], {"role": "assistant", "content": answer or "."}]})
        tel.update(stage="generate", metrics={"syntheticExamples": len(rows)}, force=k == len(records) - 1)
    del teacher
    if _rank() == 0:
        write_jsonl(path, rows)
    converted = [
        convert(DatasetFormat.messages, row, f"synthetic record {i}") for i, row in enumerate(rows, 1)
    ]
    return split_records(converted, eval_fraction, spec.hyperparameters.seed)


def run(resource: Resource[Any, Any], args: argparse.Namespace) -> int:
    spec: AlignmentRunSpec = resource.spec
    output_uri = str(spec.output)
    remote = is_remote(output_uri)
    # object storage: work in a local staging directory, upload at the end (see .storage)
    output = str(staging_dir(output_uri)) if remote else output_uri.removeprefix("file://")
    split = check_inputs(spec)
    tel = Telemetry("AlignmentRun", output, enabled=_rank() == 0)
    tel.update(stage="load", force=True)

    import datasets
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # pod logs: one line per training log step, no progress bars
    datasets.disable_progress_bars()
    torch.manual_seed(spec.hyperparameters.seed)
    if spec.synthetic is not None:
        synthetic = generate_synthetic(spec, output, tel)
        if split is None:
            split = synthetic
        else:  # both: train on the given data and the generated data
            split = Split(train=split.train + synthetic.train, eval=split.eval + synthetic.eval)
    assert split is not None
    base_source, base_kwargs = model_source(spec.base, "base")
    tokenizer = load_tokenizer(base_source, base_kwargs, "base")

    if spec.method == Method.ppo:
        from lmforge_jobs.align.ppo import train_ppo

        assert spec.reward_model is not None
        reward_source, _ = model_source(spec.reward_model, "rewardModel")
        reward_model = load_aligned(reward_source)
        reward_tokenizer = load_tokenizer(reward_source, {}, "rewardModel")
        policy = load_causal_lm(base_source, base_kwargs, "base")
        check_lora_targets(policy, spec.peft)
        model = train_ppo(spec, policy, tokenizer, reward_model, reward_tokenizer, split, output, tel)
    else:
        from lmforge_jobs.align.trainers import run_trl

        if spec.method == Method.reward:
            model = load_reward_model(base_source, base_kwargs, "base", tokenizer.pad_token_id)
            task = "SEQ_CLS"
        else:
            model = load_causal_lm(base_source, base_kwargs, "base")
            task = "CAUSAL_LM"
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        check_lora_targets(model, spec.peft)
        cfg = peft_config(spec.peft, task, base_source)
        model = run_trl(spec, model, tokenizer, split, output, tel, peft_cfg=cfg)

    outputs = expected_outputs("AlignmentRun", output_uri, spec)
    if _rank() == 0:
        tel.update(stage="save", force=True)
        model = getattr(model, "module", model)
        # what an adapter names as its base: the hub id, the local path, or the original remote URI
        base_name = str(spec.base.path) if spec.base.path and is_remote(str(spec.base.path)) else base_source
        written = save_outputs(model, tokenizer, output, spec.peft, base_name)
        if remote:
            for key, local in written.items():
                upload(Path(local), outputs[key])
            if (Path(output) / "synthetic.jsonl").exists():
                upload(Path(output) / "synthetic.jsonl", f"{output_uri.rstrip('/')}/synthetic.jsonl")
    tel.finish(outputs)
    if remote and _rank() == 0:
        for name in ("metrics.jsonl", "progress.json", "outputs.json"):  # outputs.json last: the marker
            if (Path(output) / name).exists():
                upload(Path(output) / name, f"{output_uri.rstrip('/')}/{name}")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


__all__ = ["check_inputs", "generate_synthetic", "run"]
