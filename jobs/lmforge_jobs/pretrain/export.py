"""Export to Hugging Face format, int8 weight-only quantisation, hub upload, HF checkpoint import.

``export_checkpoint(checkpoint_dir, out_dir)`` turns one complete DCP checkpoint into a model directory
that ``AutoModelForCausalLM.from_pretrained`` loads (``AutoModelForMaskedLM`` / ``AutoModelForSeq2SeqLM``
for the encoder and encoder-decoder architectures): ``config.json``, ``model.safetensors`` (fp32) and the
tokenizer files. It runs in one CPU process without a process group (the Evaluation job calls it for
``checkpoints: every``).

The hub token is read by reference with :func:`lmforge_jobs.secrets.read_secret`.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge_jobs import storage
from lmforge_jobs.pretrain.model import ModelArgs, build_model, hf_config
from lmforge_jobs.secrets import read_secret

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "added_tokens.json",
    "chat_template.jinja",
)
INT8_DIR = "model-int8"


def local_source(uri: str | os.PathLike[str]) -> Path:
    """A local directory for ``uri``: the path itself, or a download of a remote file or directory."""
    if not storage.is_remote(uri):
        return storage.local_path(uri)
    return _download(str(uri).rstrip("/"))


_downloads: dict[str, Path] = {}


def _download(uri: str) -> Path:
    """A remote tokenizer or model (a file, or a directory's files) copied once into a temporary directory;
    storage errors (access denied, missing bucket or object) propagate as OSError."""
    if uri in _downloads and _downloads[uri].exists():
        return _downloads[uri]
    import tempfile

    fs, path = storage.filesystem(uri)
    dest = Path(tempfile.mkdtemp(prefix="lmforge-download-"))
    if fs.isfile(path):
        local = dest / path.rsplit("/", 1)[-1]
        fs.get_file(path, str(local))
    else:
        if not fs.isdir(path):
            raise FileNotFoundError(uri)
        fs.get(f"{path}/", f"{dest}/", recursive=True)
        local = dest
    _downloads[uri] = local
    return local


# -------------------------------------------------------------------------------------------- tokenizer
def tokenizer_files(source: str | os.PathLike[str]) -> list[Path]:
    """The tokenizer files of a tokenizer.json file or a tokenizer directory."""
    path = local_source(source)
    if path.is_file():
        return [path]
    return [path / name for name in TOKENIZER_FILES if (path / name).is_file()]


def tokenizer_json(source: str | os.PathLike[str]) -> Path | None:
    path = local_source(source)
    if path.is_file():
        return path
    return path / "tokenizer.json" if (path / "tokenizer.json").is_file() else None


def save_tokenizer(
    source: str | os.PathLike[str], out_dir: Path, special: dict[str, str] | None = None
) -> None:
    """Write tokenizer files that ``AutoTokenizer.from_pretrained(out_dir)`` loads.

    A directory with a tokenizer_config.json is copied as is; a bare tokenizer.json gets a
    tokenizer_config.json for PreTrainedTokenizerFast naming its special tokens (eos, bos, pad, mask, unk).
    Written without importing transformers (the job's export stays light).
    """
    files = tokenizer_files(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in files:
        if f.resolve() != (out_dir / f.name).resolve():
            shutil.copy2(f, out_dir / f.name)
    if any(f.name == "tokenizer_config.json" for f in files):
        return
    if not (out_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {source}")
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
    }
    config.update({f"{k}_token": v for k, v in (special or {}).items() if v is not None})
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({f"{k}_token": v for k, v in (special or {}).items()}, indent=2), encoding="utf-8"
    )


def special_tokens(tokenizer_file: Path) -> dict[str, str]:
    """Guess eos/bos/pad/mask/unk strings from a tokenizer.json's added tokens."""
    data = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    names = [t["content"] for t in data.get("added_tokens", []) if t.get("special")]
    found: dict[str, str] = {}
    patterns = {
        "eos": ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]"),
        "bos": ("<|begin_of_text|>", "<s>", "<bos>", "[CLS]"),
        "pad": ("<pad>", "[PAD]", "<|pad|>"),
        "mask": ("<mask>", "[MASK]"),
        "unk": ("<unk>", "[UNK]"),
    }
    for role, candidates in patterns.items():
        for c in candidates:
            if c in names:
                found[role] = c
                break
    if "eos" not in found and names:
        found["eos"] = names[0]
    return found


# ----------------------------------------------------------------------------------------------- export
def _hf_model(args: ModelArgs) -> nn.Module:
    import transformers

    config = hf_config(args)
    classes = {
        "decoder": transformers.LlamaForCausalLM,
        "encoder": transformers.BertForMaskedLM,
        "encoder-decoder": transformers.T5ForConditionalGeneration,
    }
    with torch.device("meta"):
        model = classes[args.architecture](config)
    return model


def to_hf_state_dict(args: ModelArgs, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict → the transformers model's (identity for the decoder; drops the wrapper prefix)."""
    if args.architecture == "decoder":
        return dict(state)
    return {k.removeprefix("model."): v for k, v in state.items()}


def llama_config(args: ModelArgs, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json of the exported decoder (LlamaForCausalLM), written without transformers."""
    special = args.special_ids or {}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden,
        "intermediate_size": args.ffn_hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.seq_len,
        "rms_norm_eps": args.norm_eps,
        # transformers 4 reads rope_theta, 5 reads rope_parameters
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_theta": args.rope_theta, "rope_type": "default"},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": args.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": special.get("bos", special.get("eos")),
        "eos_token_id": special.get("eos"),
        "pad_token_id": special.get("pad"),
        "torch_dtype": str(dtype).removeprefix("torch."),
        "dtype": str(dtype).removeprefix("torch."),
    }


def write_hf(
    args: ModelArgs,
    state: dict[str, torch.Tensor],
    tokenizer_source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
) -> Path:
    """config.json + model.safetensors + tokenizer files in ``out_dir`` (written beside, then renamed)."""
    out = storage.local_path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if args.architecture == "decoder":
        from safetensors.torch import save_file

        tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
        if args.tie_embeddings:
            tensors.pop("lm_head.weight", None)  # shared with the embedding: transformers re-ties it
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(llama_config(args, dtype), indent=2), encoding="utf-8")
        eos = (args.special_ids or {}).get("eos")
        generation = {
            "bos_token_id": eos,
            "eos_token_id": eos,
            "pad_token_id": (args.special_ids or {}).get("pad"),
        }
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    else:
        model = _hf_model(args)
        hf_state = {k: v.detach().to("cpu", dtype) for k, v in to_hf_state_dict(args, state).items()}
        model.load_state_dict(hf_state, strict=False, assign=True)
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise ValueError(f"checkpoint lacks weights for {missing[:5]}")
        model.tie_weights()
        model.save_pretrained(str(tmp), safe_serialization=True)
    tok_file = tokenizer_json(tokenizer_source)
    save_tokenizer(tokenizer_source, tmp, special_tokens(tok_file) if tok_file else None)
    (tmp / "lmforge.json").write_text(json.dumps({"modelArgs": args.to_dict()}, indent=2), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def load_checkpoint_state(
    checkpoint_dir: str | os.PathLike[str],
) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """The model args and full model state dict (CPU, fp32) of one complete checkpoint, without a process
    group."""
    import torch.distributed.checkpoint as dcp

    from lmforge_jobs.pretrain.checkpoint import MARKER, read_meta

    fs, path = storage.filesystem(checkpoint_dir)
    if not fs.isfile(f"{path}/{MARKER}"):
        raise FileNotFoundError(f"{checkpoint_dir} is not a complete checkpoint (no {MARKER} marker)")
    args = ModelArgs.from_dict(read_meta(checkpoint_dir)["modelArgs"])
    model = build_model(args)
    state = {k: v for k, v in model.state_dict().items()}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load({"model": state}, checkpoint_id=storage.to_uri(fs, path))
    except Exception as exc:
        if not fs.isfile(f"{path}/{MARKER}"):  # pruned by the run's retention while being read
            raise FileNotFoundError(f"{checkpoint_dir} was removed while it was read") from exc
        raise
    return args, state


def export_checkpoint(checkpoint_dir: str, out_dir: str) -> None:
    """Write a Hugging Face model directory from one complete checkpoint (single CPU process).

    ``checkpoint_dir`` may be a URI (fsspec); ``out_dir`` is a local directory."""
    from lmforge_jobs.pretrain.checkpoint import tokenizer_dir

    args, state = load_checkpoint_state(checkpoint_dir)
    write_hf(args, state, tokenizer_dir(checkpoint_dir), out_dir)


def upload(local_dir: str | os.PathLike[str], uri: str) -> None:
    """Copy a local directory to a storage URI (fsspec), replacing what is there."""
    fs, path = storage.filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.makedirs(path, exist_ok=True)
    for f in sorted(Path(local_dir).iterdir()):
        if f.is_file():
            fs.put_file(str(f), f"{path}/{f.name}")


# ----------------------------------------------------------------------------------------- int8 export
def quantize_int8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Symmetric per-output-channel int8 for every 2-D weight; other tensors stay fp32.

    ``W ≈ q · scale`` with ``scale = max|W_row| / 127``; stored as ``<name>`` (int8) and
    ``<name>.scale`` (fp32, one per row).
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        t = t.detach().float().cpu()
        if t.ndim == 2 and name.endswith("weight"):
            scale = (t.abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(1e-12)
            out[name] = torch.round(t / scale).clamp(-127, 127).to(torch.int8).contiguous()
            out[f"{name}.scale"] = scale.squeeze(1).contiguous()
        else:
            out[name] = t.contiguous()
    return out


def dequantize_int8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in state.items():
        if name.endswith(".scale"):
            continue
        out[name] = t.float() * state[f"{name}.scale"].unsqueeze(1) if t.dtype == torch.int8 else t
    return out


def write_int8(model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """An int8 weight-only copy of an exported model: quantised safetensors + config + tokenizer."""
    from safetensors.torch import load_file, save_file

    src, out = local_source(model_dir), storage.local_path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = load_file(str(src / "model.safetensors"))
    save_file(quantize_int8(state), str(out / "model.int8.safetensors"), metadata={"format": "lmforge-int8"})
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    config["lmforge_quantization"] = {"method": "int8-weight-only", "granularity": "per-output-channel"}
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    for f in src.iterdir():
        if f.name in TOKENIZER_FILES:
            shutil.copy2(f, out / f.name)
    return out


def load_int8(model_dir: str | os.PathLike[str]) -> nn.Module:
    """The transformers model of an int8 export, dequantised to fp32."""
    import transformers
    from safetensors.torch import load_file

    path = storage.local_path(model_dir)
    config = transformers.AutoConfig.from_pretrained(str(path))
    auto = (
        transformers.AutoModelForCausalLM
        if config.model_type == "llama"
        else transformers.AutoModelForMaskedLM
        if config.model_type == "bert"
        else transformers.AutoModelForSeq2SeqLM
    )
    model = auto.from_config(config)
    model.load_state_dict(dequantize_int8(load_file(str(path / "model.int8.safetensors"))), strict=False)
    model.tie_weights()
    return model


# ------------------------------------------------------------------------------------------------- hub
def push_to_hub(model_dir: str | os.PathLike[str], push: Any, api: Any = None) -> str:
    """Create the repository (private by default) and upload the export; returns the commit URL."""
    token = read_secret(push.token, "export.push.token")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id=push.repo, private=push.private, exist_ok=True, token=token)
    if push.revision:
        api.create_branch(repo_id=push.repo, branch=push.revision, exist_ok=True, token=token)
    info = api.upload_folder(
        repo_id=push.repo,
        folder_path=str(storage.local_path(model_dir)),
        revision=push.revision,
        commit_message="lmforge: pretrained model export",
        token=token,
    )
    return str(getattr(info, "commit_url", info))


# ------------------------------------------------------------------------------- continued pre-training
def load_hf_into(model: nn.Module, args: ModelArgs, path: str | os.PathLike[str]) -> None:
    """Copy a Hugging Face Llama-family checkpoint (directory with config.json + safetensors) into the
    native decoder; shapes must match ``args``."""
    from safetensors.torch import load_file

    src = local_source(path)
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {src}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    if args.tie_embeddings:
        state.pop("lm_head.weight", None)
    elif "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if wrong:
        k = wrong[0]
        raise ValueError(f"{k}: checkpoint shape {tuple(state[k].shape)} != model {tuple(own[k].shape)}")
    missing = sorted(set(own) - set(state) - ({"lm_head.weight"} if args.tie_embeddings else set()))
    if missing:
        raise ValueError(f"checkpoint lacks {missing[:5]}")
    # weights the native decoder has no place for (e.g. Qwen2's q/k/v biases) would be dropped silently
    extra = sorted(k for k in set(state) - set(own) if not k.endswith("rotary_emb.inv_freq"))
    if extra:
        raise ValueError(f"checkpoint has weights the Llama decoder lacks: {extra[:5]}")
    with torch.no_grad():
        for k, v in state.items():
            if k in own:
                own[k].copy_(v.to(own[k].dtype))


def hf_shape(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The model shape a Hugging Face Llama config.json describes, in spec.model's camelCase terms."""
    config = json.loads((local_source(path) / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") not in ("llama", "mistral", "qwen2", None):
        raise ValueError(f"model_type {config.get('model_type')!r} is not a Llama-family decoder")
    heads = config["num_attention_heads"]
    return {
        "layers": config["num_hidden_layers"],
        "hidden": config["hidden_size"],
        "heads": heads,
        "kvHeads": config.get("num_key_value_heads") or heads,
        "ffnHidden": config["intermediate_size"],
        "vocabSize": config["vocab_size"],
        "tieEmbeddings": bool(config.get("tie_word_embeddings", False)),
        "ropeTheta": float(
            config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        ),
        "normEps": float(config.get("rms_norm_eps", 1e-5)),
    }


__all__ = [
    "INT8_DIR",
    "dequantize_int8",
    "export_checkpoint",
    "hf_shape",
    "llama_config",
    "load_checkpoint_state",
    "load_hf_into",
    "load_int8",
    "push_to_hub",
    "quantize_int8",
    "save_tokenizer",
    "tokenizer_files",
    "upload",
    "write_hf",
    "write_int8",
]
