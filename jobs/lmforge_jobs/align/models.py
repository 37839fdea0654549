"""Models of an AlignmentRun: loading a ModelRef, giving a tokenizer what training needs, PEFT, saving.

What ``spec.output`` holds when the job succeeds (``resolve.expected_outputs``):

* ``model/`` — always a directory ``transformers.AutoModelForCausalLM.from_pretrained`` loads, with the
  tokenizer and its chat template:
  - full fine-tuning: the trained weights;
  - LoRA with ``peft.merge: true``: the adapters merged into the weights (a plain model, nothing else needed);
  - LoRA without merge: the adapter in PEFT format whose ``adapter_config.json`` names the base model
    (transformers loads base + adapter through its PEFT integration);
  - prompt tuning: the adapter in PEFT format (the soft prompt cannot be merged into weights; load it with
    ``peft.AutoPeftModelForCausalLM`` or :func:`load_aligned`);
  - method reward: an ``AutoModelForSequenceClassification`` with one label (the scalar reward head).
* ``adapter/`` — with peft, the PEFT adapter alone (``PeftModel.from_pretrained(base, adapter)``).

:func:`load_aligned` loads any of these.

A ModelRef's ``path`` may be a local directory or an object-storage URI (copied once per process into
``$LMFORGE_CACHE``, default the temp dir, through :mod:`lmforge_jobs.storage`; an adapter whose
``adapter_config.json`` names a remote base gets that base the same way). Its ``token`` (a Secret reference)
is read with :func:`lmforge_jobs.secrets.read_secret` and passed to ``from_pretrained`` for hub models.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lmforge_jobs import storage
from lmforge_jobs.align.config import Peft
from lmforge_jobs.entry import ConfigError
from lmforge_jobs.secrets import read_secret
from lmforge_jobs.spec import ModelRef

MODEL_FILES = ("config.json", "adapter_config.json")  # a Hugging Face model or a PEFT adapter has one
_FETCHED: dict[str, str] = {}

# Given to a tokenizer without a chat template (a PretrainRun export): plain-text roles, the eos token after
# each assistant turn so generation learns to stop. Only tokens the tokenizer already has are needed.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ 'User: ' + message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def fetch_model(uri: str, field: str) -> str:
    """A local copy of the model directory at a remote ``uri`` (once per process): ConfigError(field) when
    its bucket, the directory or its config cannot be read."""
    if uri in _FETCHED and os.path.isdir(_FETCHED[uri]):
        return _FETCHED[uri]
    storage.check_bucket(uri, field)
    root = Path(os.environ.get("LMFORGE_CACHE") or tempfile.gettempdir()) / "lmforge-align-models"
    key = hashlib.sha1(uri.encode()).hexdigest()[:16]
    target = root / f"{key}-{os.environ.get('LOCAL_RANK', '0')}"
    try:
        fs, path = storage.filesystem(uri)
        if not any(fs.isfile(f"{path}/{name}") for name in MODEL_FILES):
            raise ConfigError(field, f"no Hugging Face model directory (config.json) at {uri}")
        shutil.rmtree(target, ignore_errors=True)
        storage.download_tree(uri, target)
    except OSError as exc:
        raise storage.config_error(field, exc, uri) from None
    _FETCHED[uri] = str(target)
    return str(target)


def model_source(ref: ModelRef, field: str) -> tuple[str, dict[str, Any]]:
    """(local path or hub id, from_pretrained kwargs) of a resolved ModelRef; a missing directory or Secret
    is a ConfigError naming the field."""
    kwargs: dict[str, Any] = {}
    if ref.token is not None:
        kwargs["token"] = read_secret(ref.token, f"{field}.token")
    if ref.path is not None:
        uri = str(ref.path)
        if storage.is_remote(uri):
            return fetch_model(uri, f"{field}.path"), kwargs
        path = storage.local_path(uri)
        if not path.is_dir() or not any((path / name).exists() for name in MODEL_FILES):
            raise ConfigError(f"{field}.path", f"no Hugging Face model directory (config.json) at {ref.path}")
        return os.path.abspath(path), kwargs
    if ref.huggingface is not None:
        if ref.revision:
            kwargs["revision"] = ref.revision
        return str(ref.huggingface), kwargs
    raise ConfigError(field, "references by name must be resolved to a path first")


def _remote_base(adapter_dir: str | Path, field: str) -> str | None:
    """The local copy of the base an adapter names when that base is a remote URI (None otherwise)."""
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    base = cfg.get("base_model_name_or_path")
    if base and storage.is_remote(base):
        return fetch_model(base, field)
    return None


def load_tokenizer(source: str, kwargs: dict[str, Any], field: str) -> Any:
    """The tokenizer with a pad token and a chat template (added when missing)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(field, f"cannot load a tokenizer from {source}: {exc}") from None
    if tok.eos_token is None:
        raise ConfigError(field, f"the tokenizer of {source} has no eos token")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # no new embedding rows; padding is masked out anyway
    if not getattr(tok, "chat_template", None):
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    tok.padding_side = "right"
    return tok


def load_causal_lm(source: str, kwargs: dict[str, Any], field: str, dtype: Any = None) -> Any:
    """A causal LM; an unmerged LoRA output of another AlignmentRun is merged into its base first."""
    from transformers import AutoModelForCausalLM

    adapter_cfg = Path(source) / "adapter_config.json"
    if adapter_cfg.exists() and not (Path(source) / "config.json").exists():
        if json.loads(adapter_cfg.read_text(encoding="utf-8")).get("peft_type") != "LORA":
            raise ConfigError(
                f"{field}.path",
                f"{source} is a prompt-tuning adapter, which cannot be merged into a base model",
            )
        from peft import AutoPeftModelForCausalLM, PeftModel

        try:
            base = _remote_base(source, f"{field}.path")
            if base is not None:
                merged = PeftModel.from_pretrained(
                    AutoModelForCausalLM.from_pretrained(base, dtype=dtype), source
                )
                return merged.merge_and_unload()
            return AutoPeftModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs).merge_and_unload()
        except (OSError, ValueError) as exc:
            raise ConfigError(field, f"cannot load the LoRA model at {source}: {exc}") from None
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(field, f"cannot load a causal language model from {source}: {exc}") from None


def load_reward_model(source: str, kwargs: dict[str, Any], field: str, pad_token_id: int | None) -> Any:
    """A sequence classifier with one output (the reward); the head is new when ``source`` is a causal LM."""
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(field, f"cannot load a reward model from {source}: {exc}") from None
    if pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return model


def peft_config(
    peft: Peft | None, task_type: str, tokenizer_name: str | None = None, token: str | None = None
) -> Any:
    """The PEFT config of ``spec.peft`` (None for full fine-tuning); ``token`` reaches the tokenizer that
    prompt tuning's init text needs."""
    if peft is None:
        return None
    from peft import LoraConfig, PromptTuningConfig, PromptTuningInit

    if peft.lora is not None:
        lora = peft.lora
        targets: Any = lora.target_modules
        if targets == ["all-linear"]:
            targets = "all-linear"
        return LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=targets,
            task_type=task_type,
            modules_to_save=["score"] if task_type == "SEQ_CLS" else None,
        )
    if peft.prompt_tuning is not None:
        pt = peft.prompt_tuning
        kwargs: dict[str, Any] = {"num_virtual_tokens": pt.virtual_tokens, "task_type": task_type}
        if pt.init_text:
            kwargs.update(
                prompt_tuning_init=PromptTuningInit.TEXT,
                prompt_tuning_init_text=pt.init_text,
                tokenizer_name_or_path=tokenizer_name,
            )
            if token:
                kwargs["tokenizer_kwargs"] = {"token": token}
        return PromptTuningConfig(**kwargs)
    return None


def check_lora_targets(model: Any, peft: Peft | None) -> None:
    """Every LoRA target module name must exist in the model."""
    if peft is None or peft.lora is None or peft.lora.target_modules == ["all-linear"]:
        return
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in peft.lora.target_modules if m not in names]
    if missing:
        raise ConfigError(
            "peft.lora.targetModules",
            f"no module named {', '.join(missing)} in the model (it has e.g. "
            f"{', '.join(sorted(n for n in names if 'proj' in n)[:8])})",
        )


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def save_outputs(
    model: Any, tokenizer: Any, output: str, peft: Peft | None, base_source: str
) -> dict[str, str]:
    """Write model/ (and adapter/) as described in the module docstring; return their paths."""
    out = Path(output.removeprefix("file://"))
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    is_peft = hasattr(model, "peft_config")
    if is_peft:
        model.peft_config["default"].base_model_name_or_path = base_source
        tmp = out / ".adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, out / "adapter")
        written["adapter"] = str(out / "adapter")
    tmp = out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if is_peft and peft is not None and peft.merge:
        merged = model.merge_and_unload()
        merged.save_pretrained(tmp)
    else:
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _replace_dir(tmp, out / "model")
    written["model"] = str(out / "model")
    return written


def load_aligned(path: str, **kwargs: Any) -> Any:
    """Load an AlignmentRun's model/ or adapter/ directory whatever its form (see the module docstring)."""
    adapter_cfg = Path(path) / "adapter_config.json"
    if adapter_cfg.exists():
        cfg = json.loads(adapter_cfg.read_text(encoding="utf-8"))
        seq_cls = cfg.get("task_type") == "SEQ_CLS"
        if seq_cls:
            kwargs = {"num_labels": 1, **kwargs}  # the reward head is one scalar
        base = _remote_base(path, "rewardModel.path")
        if base is not None:  # the adapter names its base by URI: load that base, then the adapter
            from peft import PeftModel
            from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

            base_cls = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
            return PeftModel.from_pretrained(base_cls.from_pretrained(base, **kwargs), path)
        if cfg.get("peft_type") != "LORA" or seq_cls:
            from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

            cls = AutoPeftModelForSequenceClassification if seq_cls else AutoPeftModelForCausalLM
            return cls.from_pretrained(path, **kwargs)
    config = (
        json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        if not adapter_cfg.exists()
        else {}
    )
    if any(a.endswith("ForSequenceClassification") for a in config.get("architectures", [])):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "MODEL_FILES",
    "check_lora_targets",
    "fetch_model",
    "load_aligned",
    "load_causal_lm",
    "load_reward_model",
    "load_tokenizer",
    "model_source",
    "peft_config",
    "save_outputs",
]
