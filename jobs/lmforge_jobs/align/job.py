"""The AlignmentRun job, top to bottom: check the data, load the models, (generate), train, save, report.

    python -m lmforge_jobs.align --manifest run.yaml          # one process
    torchrun --nproc-per-node 8 -m lmforge_jobs.align --manifest run.yaml

sft, reward and dpo run TRL's trainers (:mod:`.trainers`); ppo is this project's own loop (:mod:`.ppo`).
Outputs are described in :mod:`.models`.

Every input (``base``, ``rewardModel``, ``synthetic.teacher``, ``dataset.path``, ``synthetic.prompts``) and
``spec.output`` may be a local path or an object-storage URI (``s3://``, ``gs://`` … through
:mod:`lmforge_jobs.storage`: endpoint and credentials from the environment). The job works in
:func:`work_dir`; with a remote output, checkpoints are published to ``output/checkpoints`` as they are
saved (:mod:`.checkpoints`) and ``model/``, ``adapter/`` and the run's records are uploaded at the end,
``outputs.json`` last (the completion marker). SIGTERM saves a checkpoint and exits 143 (``EXIT_STOPPED``);
running the job again resumes from it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from lmforge_jobs import storage
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
from lmforge_jobs.align.trainers import Stopped
from lmforge_jobs.entry import ConfigError
from lmforge_jobs.launch import record_exit
from lmforge_jobs.manifest import Resource
from lmforge_jobs.resolve import expected_outputs
from lmforge_jobs.spec import EXIT_STOPPED
from lmforge_jobs.telemetry import Telemetry

SYNTHETIC = "synthetic.jsonl"
RECORDS = ("metrics.jsonl", "progress.json")  # uploaded after model/ and adapter/, before outputs.json


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def work_dir(output: str) -> str:
    """Where the job writes while it runs: ``spec.output`` itself when it is local; for object storage a
    local scratch directory (``$LMFORGE_SCRATCH``, default the temp dir, keyed by the output URI)."""
    if not storage.is_remote(output):
        return str(storage.local_path(output))
    root = Path(os.environ.get("LMFORGE_SCRATCH") or tempfile.gettempdir()) / "lmforge-align-runs"
    return str(root / hashlib.sha1(output.encode()).hexdigest()[:16])


def check_inputs(spec: AlignmentRunSpec) -> Split | None:
    """Everything the user can get wrong, before any model is loaded: the output's bucket, data shape,
    model directories, Secrets."""
    storage.check_bucket(str(spec.output), "output")
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
    """Teacher completions for every prompt (samplesPerPrompt each), kept in synthetic.jsonl of the working
    directory ``output`` and of spec.output.

    Every process generates the same data (same seed); rank 0 writes the file, which a rerun reuses."""
    import torch

    from lmforge_jobs.align.config import Dataset

    syn = spec.synthetic
    assert syn is not None
    path = Path(output) / SYNTHETIC
    published = storage.join(str(spec.output), SYNTHETIC)
    eval_fraction = spec.dataset.eval_fraction if spec.dataset is not None else 0.05
    if storage.is_remote(published) and not path.exists() and storage.exists(published):
        storage.download_tree(published, output)
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
        if storage.is_remote(published):  # a replaced pod reuses it
            storage.upload_tree(path, published)
    converted = [
        convert(DatasetFormat.messages, row, f"synthetic record {i}") for i, row in enumerate(rows, 1)
    ]
    return split_records(converted, eval_fraction, spec.hyperparameters.seed)


def run(resource: Resource[Any, Any], args: argparse.Namespace) -> int:
    spec: AlignmentRunSpec = resource.spec
    output_uri = str(spec.output)
    output = work_dir(output_uri)
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
    try:
        model, tokenizer, base_source = train(spec, split, output, tel)
    except Stopped as stop:
        return stopped(spec, output, tel, stop)

    outputs = expected_outputs("AlignmentRun", output_uri, spec)
    if _rank() == 0:
        tel.update(stage="save", force=True)
        model = getattr(model, "module", model)
        # what an adapter names as its base: the hub id, the local path, or the original remote URI
        base_path = str(spec.base.path) if spec.base.path else None
        base_name = base_path if base_path and storage.is_remote(base_path) else base_source
        written = save_outputs(model, tokenizer, output, spec.peft, base_name)
        if storage.is_remote(output_uri):
            for key, local in written.items():
                storage.upload_tree(local, outputs[key])
    tel.finish(outputs)
    if storage.is_remote(output_uri) and _rank() == 0:
        upload_records(output, output_uri)
        # outputs.json last: the completion marker
        marker = (Path(output) / "outputs.json").read_text(encoding="utf-8")
        storage.write_text_atomic(storage.join(output_uri, "outputs.json"), marker)
    _end_distributed()
    return 0


def train(spec: AlignmentRunSpec, split: Split, output: str, tel: Telemetry) -> tuple[Any, Any, str]:
    """Load the models and train with spec.method; (trained model, tokenizer, local base source)."""
    base_source, base_kwargs = model_source(spec.base, "base")
    tokenizer = load_tokenizer(base_source, base_kwargs, "base")

    if spec.method == Method.ppo:
        from lmforge_jobs.align.ppo import train_ppo

        assert spec.reward_model is not None
        reward_source, reward_kwargs = model_source(spec.reward_model, "rewardModel")
        reward_model = load_aligned(reward_source, **reward_kwargs)
        reward_tokenizer = load_tokenizer(reward_source, reward_kwargs, "rewardModel")
        policy = load_causal_lm(base_source, base_kwargs, "base")
        check_lora_targets(policy, spec.peft)
        model = train_ppo(spec, policy, tokenizer, reward_model, reward_tokenizer, split, output, tel)
        return model, tokenizer, base_source

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
    cfg = peft_config(spec.peft, task, base_source, base_kwargs.get("token"))
    return run_trl(spec, model, tokenizer, split, output, tel, peft_cfg=cfg), tokenizer, base_source


def stopped(spec: AlignmentRunSpec, output: str, tel: Telemetry, stop: Stopped) -> int:
    """A signal stopped training after its checkpoint was published: report it and exit 143."""
    tel.update(step=stop.step, stage="Stopped", force=True)
    if _rank() == 0:
        if storage.is_remote(str(spec.output)):
            upload_records(output, str(spec.output))
        print(
            f"stopped by signal after step {stop.step}; checkpoint saved, resume by running again", flush=True
        )
    record_exit(EXIT_STOPPED)  # under torchrun, the launcher keeps it as the pod's exit code
    _end_distributed()
    return EXIT_STOPPED


def upload_records(output: str, output_uri: str) -> None:
    """The run's records (metrics history, progress) from the working directory to a remote output."""
    for name in RECORDS:
        if (Path(output) / name).exists():
            storage.upload_tree(Path(output) / name, storage.join(output_uri, name))


def _end_distributed() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


__all__ = ["check_inputs", "generate_synthetic", "run", "stopped", "train", "work_dir"]
