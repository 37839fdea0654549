"""What a PretrainRun trains on, checked before any model is built: the token shards (training and
held-out), the tokenizer and the model shape it decides, the Hugging Face checkpoint to continue from, and
the deterministic batches of this rank. Every problem is a ConfigError naming the spec field."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge_jobs import storage
from lmforge_jobs.entry import ConfigError
from lmforge_jobs.pretrain import export as exp
from lmforge_jobs.pretrain.config import PretrainRunSpec
from lmforge_jobs.pretrain.data import Objective, TokenBatches
from lmforge_jobs.pretrain.model import VOCAB_MULTIPLE, ModelArgs
from lmforge_jobs.secrets import read_secret
from lmforge_jobs.shards import ShardError, TokenStream


@dataclass
class Inputs:
    model_args: ModelArgs
    objective: Objective
    init_path: str | None
    """Local directory of the Hugging Face checkpoint to continue from (None: start from the seed)."""
    train_batches: TokenBatches
    held_out_batches: TokenBatches | None


def build_inputs(spec: PretrainRunSpec, rank: int, world_size: int, accumulation: int) -> Inputs:
    """Open and check everything the run reads, in the order a user would fix it: shards, tokenizer, model
    shape, token ids against the tokenizer, model.init, the hub-push secret, then this rank's batches."""
    assert spec.data is not None
    storage.check_bucket(str(spec.output), "output")  # before training, not at the first checkpoint
    train_stream = open_stream(spec.data.tokens, "data.tokens")
    held_out_stream = open_stream(spec.data.held_out, "data.heldOut") if spec.data.held_out else None
    tokenizer, tokenizer_file = load_tokenizer(spec.data.tokenizer)
    args, objective = model_args(spec, tokenizer, tokenizer_file)
    for field, stream in (("data.tokens", train_stream), ("data.heldOut", held_out_stream)):
        if stream is not None and stream.max_token() >= objective.tokenizer_vocab:
            raise ConfigError(
                field,
                f"token id {stream.max_token()} is outside the tokenizer's {objective.tokenizer_vocab} ids: "
                "the shards were made with a different tokenizer than data.tokenizer",
            )
    init_path = resolve_init(spec)
    if spec.export.push is not None:
        read_secret(spec.export.push.token, "export.push.token")
    micro_batch = spec.batch.micro_batch_size
    try:
        train_batches = TokenBatches(
            train_stream, objective, micro_batch, accumulation, rank, world_size, spec.seed
        )
    except ValueError as exc:
        raise ConfigError("data.tokens", str(exc)) from None
    held_out_batches = None
    if held_out_stream is not None:
        try:
            held_out_batches = TokenBatches(
                held_out_stream, objective, micro_batch, 1, rank, world_size, spec.seed, shuffle=False
            )
        except ValueError as exc:
            raise ConfigError("data.heldOut", str(exc)) from None
    return Inputs(args, objective, init_path, train_batches, held_out_batches)


def open_stream(uri: str, field: str) -> TokenStream:
    try:
        return TokenStream(uri)
    except ShardError as exc:
        raise ConfigError(field, str(exc)) from None


def load_tokenizer(uri: str) -> Any:
    from tokenizers import Tokenizer

    try:
        path = exp.tokenizer_json(uri)
    except OSError as exc:
        raise storage.config_error("data.tokenizer", exc, uri) from None
    if path is None:
        raise ConfigError("data.tokenizer", f"{uri}: no tokenizer.json file or directory containing one")
    try:
        return Tokenizer.from_file(str(path)), path
    except Exception as exc:
        raise ConfigError("data.tokenizer", f"{path}: cannot load the tokenizer: {exc}") from None


def model_args(spec: PretrainRunSpec, tokenizer: Any, tokenizer_file: Path) -> tuple[ModelArgs, Objective]:
    """Model shape with the vocabulary decided, and the objective with the special token ids it needs."""
    shape = spec.model
    arch = shape.architecture.value
    tok_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    names = exp.special_tokens(tokenizer_file)
    eos = tokenizer.token_to_id(names["eos"]) if "eos" in names else None
    eos = eos if eos is not None else 0
    pad = tokenizer.token_to_id(names["pad"]) if "pad" in names else None
    pad = pad if pad is not None else eos
    extra, special = 0, {"eos": eos, "pad": pad}
    objective = Objective(
        arch, shape.seq_len, tok_vocab, eos, pad, None, None, shape.mask_probability, shape.mean_span_length
    )
    if arch == "encoder":
        mask = tokenizer.token_to_id(names["mask"]) if "mask" in names else None
        if mask is None:
            mask, extra = tok_vocab, 1  # a new [MASK] id after the tokenizer's
        special["mask"] = mask
        objective = Objective(**{**objective.__dict__, "mask": mask})
    elif arch == "encoder-decoder":
        if shape.seq_len - objective.noise_tokens < objective.spans:
            # every noise span needs a kept run before it: the batches could not be cut
            raise ConfigError(
                "model.maskProbability",
                f"{shape.mask_probability} leaves {shape.seq_len - objective.noise_tokens} of {shape.seq_len} "
                f"tokens unmasked, fewer than the {objective.spans} noise spans of mean length "
                f"{shape.mean_span_length}; lower maskProbability or raise meanSpanLength",
            )
        extra = objective.spans  # sentinels <extra_id_k> = tok_vocab + k
        special["sentinel0"] = tok_vocab
        objective = Objective(**{**objective.__dict__, "sentinel0": tok_vocab})
    needed = tok_vocab + extra
    if shape.vocab_size == "auto":
        vocab = VOCAB_MULTIPLE * -(-needed // VOCAB_MULTIPLE)
    else:
        vocab = int(shape.vocab_size)
        if vocab < needed:
            what = f"{tok_vocab} tokens" + (
                f" plus {extra} special ids for the {arch} objective" if extra else ""
            )
            raise ConfigError(
                "model.vocabSize",
                f"the tokenizer has {what} ({needed}), more than model.vocabSize {vocab}; use vocabSize: auto",
            )
    return ModelArgs.from_shape(shape, vocab, tokenizer_vocab=tok_vocab, special_ids=special), objective


def resolve_init(spec: PretrainRunSpec) -> str | None:
    """Local directory of the Hugging Face checkpoint to continue from, checked against spec.model."""
    init = spec.model.init
    if init is None:
        return None
    if spec.model.architecture.value != "decoder":
        raise ConfigError("model.init", "continued pre-training supports architecture decoder (Llama family)")
    if init.path is not None:
        try:  # a model in object storage is downloaded once (weights and config)
            path = str(exp.local_source(init.path))
        except OSError as exc:
            raise storage.config_error("model.init.path", exc, init.path) from None
    else:
        from huggingface_hub import snapshot_download

        token = read_secret(init.token, "model.init.token") if init.token is not None else None
        try:
            path = snapshot_download(
                init.huggingface,
                revision=init.revision,
                token=token,
                allow_patterns=["*.json", "*.safetensors"],
            )
        except Exception as exc:
            raise ConfigError(
                "model.init.huggingface", f"cannot download {init.huggingface}: {exc}"
            ) from None
    try:
        theirs = exp.hf_shape(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError("model.init", f"{path}: not a Llama-family Hugging Face model: {exc}") from None
    shape = spec.model
    ours = {
        "layers": shape.layers,
        "hidden": shape.hidden,
        "heads": shape.heads,
        "kvHeads": shape.n_kv_heads,
        "ffnHidden": shape.ffn_size,
        # not shapes, but loading weights trained with another RoPE base, norm epsilon or a separate
        # lm_head (dropped when ours is tied) would silently change the model
        "ropeTheta": float(shape.rope_theta),
        "normEps": float(shape.norm_eps),
        "tieEmbeddings": bool(shape.tie_embeddings),
    }
    for key, value in ours.items():
        if theirs[key] != value:
            raise ConfigError(f"model.{key}", f"is {value} but the model.init checkpoint has {theirs[key]}")
    return path


__all__ = ["Inputs", "build_inputs", "load_tokenizer", "model_args", "resolve_init"]
