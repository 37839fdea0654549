"""The ``tokenizer`` stage: a byte-level BPE trained with Hugging Face ``tokenizers``, or a pretrained one.

Writes ``OUT/tokenizer/`` with ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``
so that ``transformers.AutoTokenizer.from_pretrained(OUT/tokenizer)`` loads it offline (as a
PreTrainedTokenizerFast). The end-of-text token — the first of ``specialTokens`` — is also bos, unk and pad
(GPT-2 convention); the training sample is the first ``sampleDocuments`` kept documents in corpus order.
A pretrained tokenizer may live on object storage (``s3://…``): it is fetched through
:mod:`lmforge_jobs.storage` first. The stage builds into a local directory; the job uploads it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lmforge_jobs import storage
from lmforge_jobs.data.config import CorpusSpec
from lmforge_jobs.entry import ConfigError

# No inherent limit for a byte-level BPE; the PretrainRun's seqLen is the real one.
MODEL_MAX_LENGTH = 1 << 20
BYTE_ALPHABET = 256


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str], min_frequency: int) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer_dir(tok: Any, folder: Path, eos: str) -> None:
    """tokenizer.json + the two small files AutoTokenizer needs to treat ``eos`` as bos/eos/unk/pad."""
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    specials = {"bos_token": eos, "eos_token": eos, "unk_token": eos, "pad_token": eos}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        **specials,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")


def check_vocab_size(spec: CorpusSpec) -> None:
    train = spec.tokenizer.train
    if train is None:
        return
    needed = BYTE_ALPHABET + len(set(train.special_tokens))
    if train.vocab_size < needed:
        raise ConfigError(
            "tokenizer.train.vocabSize",
            f"{train.vocab_size} is too small: a byte-level BPE needs at least {needed} "
            f"(256 bytes + {needed - BYTE_ALPHABET} special tokens)",
        )


def check_special_tokens(spec: CorpusSpec) -> None:
    """A trained tokenizer needs its end-of-text token: the first of ``specialTokens``."""
    train = spec.tokenizer.train
    if train is not None and not train.special_tokens:
        raise ConfigError(
            "tokenizer.train.specialTokens",
            "is empty: the first special token ends every document (e.g. <|endoftext|>)",
        )


def check_pretrained(spec: CorpusSpec) -> None:
    """``tokenizer.pretrained.path`` must exist — a tokenizer.json file or a directory holding one — before
    any stage runs (not only when the tokenizer stage reaches it, after extraction and dedup)."""
    pretrained = spec.tokenizer.pretrained
    if pretrained is None:
        return
    uri, field = pretrained.path, "tokenizer.pretrained.path"
    try:
        fs, path = storage.filesystem(uri)
        is_file = fs.isfile(path)
        is_dir = not is_file and fs.isdir(path)
        has_json = is_dir and fs.isfile(f"{path}/tokenizer.json")
    except (OSError, ValueError) as exc:
        raise storage.config_error(field, exc, uri) from None
    shown = uri if storage.is_remote(uri) else str(storage.local_path(uri))
    if not (is_file or is_dir):
        storage.check_bucket(uri, field)
        raise ConfigError(field, f"no such file or directory: {shown}")
    if is_dir and not has_json:
        raise ConfigError(field, f"{shown} has no tokenizer.json (a fast tokenizer is required)")


def build(spec: CorpusSpec, texts: Iterator[str], folder: Path) -> str:
    """Train (or install) the tokenizer into the local ``folder``; returns the end-of-text token."""
    train = spec.tokenizer.train
    if train is not None:
        check_vocab_size(spec)
        check_special_tokens(spec)
        eos = train.special_tokens[0]
        # a small corpus may support fewer merges than asked: the vocabulary is what the data allows
        tok = train_bpe(texts, train.vocab_size, list(train.special_tokens), train.min_frequency)
        save_tokenizer_dir(tok, folder, eos)
        return eos
    assert spec.tokenizer.pretrained is not None
    uri = spec.tokenizer.pretrained.path
    with tempfile.TemporaryDirectory(prefix="lmforge-tokenizer-") as tmp:
        try:
            src = storage.local_copy(uri, tmp)
        except (OSError, ValueError) as exc:
            raise storage.config_error("tokenizer.pretrained.path", exc, uri) from None
        return install_pretrained(src, uri if storage.is_remote(uri) else str(src), folder)


def install_pretrained(src: Path, source: str, folder: Path) -> str:
    """Copy a local pretrained tokenizer (a tokenizer.json file or a directory; ``source`` is what the spec
    named) into ``folder``; returns its end-of-text token, which ``tokenizer_config.json`` then names."""
    from tokenizers import Tokenizer

    field = "tokenizer.pretrained.path"
    if src.is_dir():
        if not (src / "tokenizer.json").is_file():
            raise ConfigError(field, f"{source} has no tokenizer.json (a fast tokenizer is required)")
        folder.mkdir(parents=True, exist_ok=True)
        for item in src.iterdir():
            if item.is_file():
                shutil.copy2(item, folder / item.name)
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = _read_json(folder / "tokenizer_config.json")
        eos = _token(config.get("eos_token")) or _guess_eos(tok)
        if eos is None:
            raise ConfigError(
                field, "cannot tell the end-of-text token: set eos_token in tokenizer_config.json"
            )
        if not (folder / "tokenizer_config.json").exists():
            save_tokenizer_dir(tok, folder, eos)
        elif _token(config.get("eos_token")) is None:  # the tokenize stage reads it from there
            config["eos_token"] = eos
            (folder / "tokenizer_config.json").write_text(
                json.dumps(config, indent=2) + "\n", encoding="utf-8"
            )
        return eos
    if not src.is_file():
        raise ConfigError(field, f"no such file or directory: {source}")
    try:
        tok = Tokenizer.from_file(str(src))
    except Exception as exc:
        raise ConfigError(field, f"not a tokenizers JSON file: {exc}") from None
    eos = _guess_eos(tok)
    if eos is None:
        raise ConfigError(
            field, "the tokenizer has no end-of-text special token (<|endoftext|>, </s>, <eos>)"
        )
    save_tokenizer_dir(tok, folder, eos)
    return eos


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _token(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _guess_eos(tok: Any) -> str | None:
    vocab = tok.get_vocab()
    for cand in ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>"):
        if cand in vocab:
            return cand
    return None


def eos_of(spec: CorpusSpec, folder: str) -> str:
    """The end-of-text token of the tokenizer directory (a local path or URI) the tokenizer stage wrote:
    its ``eos_token``, else the spec's (the first special token to train); ConfigError naming the spec
    field when neither says."""
    try:
        config = json.loads(storage.read_text(storage.join(folder, "tokenizer_config.json")))
    except (OSError, ValueError):
        config = {}
    eos = _token(config.get("eos_token"))
    if eos is None and spec.tokenizer.train is not None and spec.tokenizer.train.special_tokens:
        eos = spec.tokenizer.train.special_tokens[0]
    if eos is None:
        field = "tokenizer.train.specialTokens" if spec.tokenizer.train else "tokenizer.pretrained.path"
        raise ConfigError(field, f"cannot tell the end-of-text token: {folder} names no eos_token")
    return eos


__all__ = [
    "MODEL_MAX_LENGTH",
    "build",
    "check_pretrained",
    "check_special_tokens",
    "check_vocab_size",
    "eos_of",
    "install_pretrained",
    "save_tokenizer_dir",
    "train_bpe",
]
