"""Loading the models an Evaluation compares.

A resolved ModelRef is ``{path: DIR}`` (a Hugging Face model directory: local, or on object storage —
``s3://…`` through :mod:`lmforge_jobs.storage` — copied to a scratch directory first) or ``{huggingface:
ID, revision, token}``. Every failure a user can fix becomes a :class:`ConfigError` naming the spec field
that pointed at the model (for object storage: access denied, a missing bucket, a missing object).

A hub token (``{secretKeyRef: {name, key}}``) is read with :func:`lmforge_jobs.secrets.read_secret`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge_jobs import storage
from lmforge_jobs.entry import ConfigError
from lmforge_jobs.secrets import read_secret
from lmforge_jobs.spec import ModelRef, Precision


# ------------------------------------------------------------------------------------------------- models
def check_model_dir(uri: str, field: str) -> None:
    """Fail fast when a model directory (local or on object storage) is missing, unreadable or not in
    Hugging Face format."""
    fs, path = storage.filesystem(uri)
    try:
        is_dir = fs.isdir(path)
        has_config = is_dir and fs.isfile(f"{path}/config.json")
    except (OSError, ValueError) as exc:
        raise storage.config_error(field, exc, uri) from None
    if not is_dir:
        storage.require(uri, field)  # says whether access, the bucket or the object is missing
        raise ConfigError(field, f"no model directory at {uri}")
    if not has_config:
        raise ConfigError(field, f"{uri} is not a Hugging Face model directory (no config.json)")


def fetch_dir(uri: str, field: str) -> Path:
    """A local model directory: the path itself, or a copy of a directory on object storage."""
    check_model_dir(uri, field)
    try:
        return storage.local_copy(uri)
    except OSError as exc:
        raise storage.config_error(field, exc, uri) from None


@dataclass
class LoadedModel:
    """A causal LM ready for inference, its tokenizer, where it came from and a short display name."""

    model: Any
    tokenizer: Any
    source: str
    name: str

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device


def model_name(ref: ModelRef) -> str:
    """A short, human name for results: the hub id, or the run name in .../<run>/model, or the basename."""
    if ref.huggingface:
        return ref.huggingface
    path = (ref.path or "").rstrip("/")
    parts = [p for p in re.split(r"[/\\]", path) if p]
    if len(parts) >= 2 and parts[-1] == "model":
        return parts[-2]
    return parts[-1] if parts else "model"


def pick_device(gpus: int) -> str:
    import torch

    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


def torch_dtype(precision: Precision, device: str) -> Any:
    """bf16 on accelerators; CPU inference always runs in fp32 (bf16 matmuls on CPU are slow and lossy)."""
    import torch

    if precision == Precision.bf16 and device != "cpu":
        return torch.bfloat16
    return torch.float32


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Batched inference needs a pad token; reuse EOS (or UNK) when the tokenizer has none."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def _dtype_keyword() -> str:
    """transformers 4.56 renamed from_pretrained's ``torch_dtype`` to ``dtype``."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def load_model(
    ref: ModelRef | str,
    field: str,
    *,
    precision: Precision = Precision.fp32,
    gpus: int = 0,
    name: str | None = None,
) -> LoadedModel:
    """Load a resolved ModelRef (or a model directory) as a causal LM in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(ref, str):
        ref = ModelRef(path=ref)
    if ref.reference() is not None:
        raise ConfigError(field, "references by name must be resolved first (lmforge run or the operator)")
    kwargs: dict[str, Any] = {}
    if ref.huggingface:
        source, sub = ref.huggingface, f"{field}.huggingface"
        if ref.revision:
            kwargs["revision"] = ref.revision
        if ref.token is not None:
            kwargs["token"] = read_secret(ref.token, f"{field}.token")
    else:
        sub = f"{field}.path"
        source = str(fetch_dir(str(ref.path), sub))
    device = pick_device(gpus)
    dtype = torch_dtype(precision, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        load_kwargs: dict[str, Any] = {_dtype_keyword(): dtype, **kwargs}
        if device == "cuda" and gpus > 1:
            load_kwargs["device_map"] = "auto"  # one process spreads a large model over the node's GPUs
        model = AutoModelForCausalLM.from_pretrained(source, **load_kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(sub, f"cannot load a causal language model from {source}: {first}") from exc
    if "device_map" not in load_kwargs:
        model.to(device)
    model.eval()
    return LoadedModel(model, prepare_tokenizer(tokenizer), source, name or model_name(ref))


def free(loaded: LoadedModel | None) -> None:
    """Release a model's memory before the next one is loaded."""
    if loaded is None:
        return
    import gc

    import torch

    loaded.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


__all__ = [
    "LoadedModel",
    "check_model_dir",
    "free",
    "load_model",
    "model_name",
]
