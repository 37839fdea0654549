"""Perplexity on held-out data: exp(token-weighted mean negative log-likelihood), plus bits per byte.

Data (``spec.perplexity.data``) is either a Corpus's held-out split — a directory of datatrove token
shards (``*.ds``), read with :func:`lmforge_jobs.shards.read_documents` — or text: ``.txt``/``.md`` files
(one document per file), ``.jsonl``/``.json`` (one document per line, its ``text`` field; ``.gz``, ``.zst``
and other fsspec compressions too) and ``.parquet`` (the ``text`` column). A directory is searched
recursively; glob patterns are accepted for text. Either may be on object storage (``s3://``, ``gs://``
through :mod:`lmforge_jobs.storage`): remote token shards are detected and read like local ones.

Text is tokenized with the evaluated model's tokenizer and its default special tokens
(``tokenizer(text)``), exactly like ``model(ids, labels=ids)`` in transformers.

Every document is scored on its own. A document longer than ``seqLen`` is covered by sliding windows:
each window predicts the next ``stride`` tokens (at most ``seqLen - 1``) with the preceding tokens of the
window as context, so every token but a document's first is scored exactly once, with at least
``seqLen - stride`` tokens of context after the first window. Windows are batched (``batchSize``) with
right padding, longest first.

* ``nll``  = total NLL (nats) / scored tokens; ``perplexity`` = exp(nll)
* ``bitsPerByte`` = total NLL / ln 2 / UTF-8 bytes of the evaluated text (the tokenizer-independent figure)
"""

from __future__ import annotations

import glob
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from lmforge_jobs import storage
from lmforge_jobs.entry import ConfigError

FIELD = "perplexity.data"
TEXT_SUFFIXES = (".txt", ".md", ".text", ".jsonl", ".json", ".ndjson", ".parquet")
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")
TEXT_KEYS = ("text", "content", "document")
DEFAULT_MAX_CONTEXT = 8192


@dataclass
class Document:
    """Token ids of one document and the UTF-8 size of the text they encode."""

    ids: list[int]
    n_bytes: int


@dataclass
class PerplexityResult:
    nll: float
    perplexity: float
    bits_per_byte: float | None
    tokens: int
    bytes: int
    documents: int

    def as_results(self) -> dict[str, float]:
        out = {"perplexity": self.perplexity, "nll": self.nll}
        if self.bits_per_byte is not None:
            out["bitsPerByte"] = self.bits_per_byte
        return out


# ------------------------------------------------------------------------------------------------- data
def is_token_shards(uri: str) -> bool:
    """A ``.ds`` file or a directory holding some (a Corpus's tokens/held-out), local or on object storage;
    a storage failure (access denied, a missing bucket) is a ConfigError for ``perplexity.data``."""
    from lmforge_jobs.shards import has_shards

    try:
        return has_shards(uri)
    except (OSError, ValueError) as exc:
        raise storage.config_error(FIELD, exc, uri) from None


def _text_file(name: str) -> bool:
    lower = name.lower()
    for comp in COMPRESSIONS:
        lower = lower.removesuffix(comp)
    return lower.endswith(TEXT_SUFFIXES)


def text_files(uri: str) -> list[str]:
    """Text/JSONL/Parquet files named by ``uri`` (file, directory or glob; local or on object storage),
    sorted; ConfigError when there are none."""
    fs, root = storage.filesystem(uri)
    try:
        if glob.has_magic(root):
            found = [p for p in fs.glob(root) if fs.isfile(p)]
        elif fs.isfile(root):
            found = [root]
        elif fs.isdir(root):
            found = [p for p in fs.find(root) if _text_file(p.rsplit("/", 1)[-1])]
        else:
            storage.require(uri, FIELD)  # access denied, a missing bucket or the path itself
            found = []
    except (OSError, ValueError) as exc:
        raise storage.config_error(FIELD, exc, uri) from None
    if not found:
        raise ConfigError(
            FIELD, f"no data in {uri}: expected datatrove token shards (*.ds) or .txt/.jsonl/.parquet files"
        )
    return sorted(storage.to_uri(fs, p) for p in found)


def _jsonl_texts(fh: Iterable[str], name: str) -> Iterator[str]:
    for number, line in enumerate(fh, 1):
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ConfigError(FIELD, f"{name}:{number}: not valid JSON ({exc})") from exc
        if isinstance(row, str):
            yield row
            continue
        key = next((k for k in TEXT_KEYS if isinstance(row, dict) and isinstance(row.get(k), str)), None)
        if key is None:
            raise ConfigError(FIELD, f"{name}:{number}: no text field (one of {', '.join(TEXT_KEYS)})")
        yield row[key]


def read_texts(files: list[str]) -> Iterator[str]:
    """Documents of text files: a file per .txt/.md document, a line per JSONL document, rows of Parquet."""
    for name in files:
        fs, path = storage.filesystem(name)
        base = name.lower()
        for comp in COMPRESSIONS:
            base = base.removesuffix(comp)
        try:
            if base.endswith(".parquet"):
                import pyarrow.parquet as pq

                with fs.open(path, "rb") as fh:
                    table = pq.read_table(fh)
                column = next((k for k in TEXT_KEYS if k in table.column_names), None)
                if column is None:
                    raise ConfigError(FIELD, f"{name}: no text column (one of {', '.join(TEXT_KEYS)})")
                yield from (t for t in table.column(column).to_pylist() if t)
            elif base.endswith((".jsonl", ".json", ".ndjson")):
                with fs.open(path, "rt", encoding="utf-8", compression="infer") as fh:
                    yield from _jsonl_texts(fh, name)
            else:
                with fs.open(path, "rt", encoding="utf-8", compression="infer") as fh:
                    text = fh.read()
                if text.strip():
                    yield text
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(FIELD, f"cannot read {name}: {exc}") from exc


def load_documents(uri: str, tokenizer: Any, vocab_size: int | None = None) -> Iterator[Document]:
    """Documents of ``uri`` as token ids: token shards as they are, text through ``tokenizer``."""
    if is_token_shards(uri):
        from lmforge_jobs.shards import ShardError, read_documents

        try:
            for ids in read_documents(uri):
                if vocab_size is not None and len(ids) and int(ids.max()) >= vocab_size:
                    raise ConfigError(
                        FIELD,
                        f"token id {int(ids.max())} is outside the model's vocabulary ({vocab_size}): the shards "
                        "were tokenized with another tokenizer than the model's",
                    )
                text = tokenizer.decode(ids.tolist(), skip_special_tokens=True)
                yield Document(ids.tolist(), len(text.encode("utf-8")))
        except ShardError as exc:
            raise ConfigError(FIELD, str(exc)) from exc
        return
    for text in read_texts(text_files(uri)):
        ids = tokenizer(text)["input_ids"]
        yield Document(list(ids), len(text.encode("utf-8")))


# -------------------------------------------------------------------------------------------- windows
def windows(n: int, seq_len: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """``(start, end, first_target)`` windows over a document of ``n`` tokens.

    Tokens ``[first_target, end)`` are scored in window ``[start, end)``; together the windows score every
    token in ``[1, n)`` exactly once, each with its whole window before it as context."""
    if n < 2:
        return
    step = max(1, min(stride, seq_len - 1))
    end = min(n, seq_len)
    yield 0, end, 1
    while end < n:
        new_end = min(n, end + step)
        yield max(0, new_end - seq_len), new_end, end
        end = new_end


def default_seq_len(model: Any) -> int:
    """The model's context length, at most DEFAULT_MAX_CONTEXT tokens."""
    length = getattr(model.config, "max_position_embeddings", None) or getattr(
        model.config, "n_positions", None
    )
    return int(min(length or 1024, DEFAULT_MAX_CONTEXT))


# ------------------------------------------------------------------------------------------------ score
def evaluate_perplexity(
    model: Any,
    tokenizer: Any,
    uri: str,
    *,
    seq_len: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    chunk_windows: int = 4096,
) -> PerplexityResult:
    """Score ``uri`` with ``model``; see the module docstring for the definitions."""
    import torch

    seq_len = int(seq_len or default_seq_len(model))
    if seq_len < 2:
        raise ConfigError("perplexity.seqLen", "must be at least 2")
    stride = int(stride or seq_len)
    if stride > seq_len:
        raise ConfigError("perplexity.stride", f"stride {stride} is larger than seqLen {seq_len}")
    vocab = model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    total_nll, total_tokens, total_bytes, n_docs = 0.0, 0, 0, 0
    pending: list[tuple[list[int], int]] = []  # (window ids, number of tokens before the first target)

    def flush() -> None:
        nonlocal total_nll, total_tokens
        pending.sort(key=lambda w: len(w[0]), reverse=True)
        for i in range(0, len(pending), batch_size):
            batch = pending[i : i + batch_size]
            width = len(batch[0][0])
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for row, (window, first) in enumerate(batch):
                ids[row, : len(window)] = torch.tensor(window)
                mask[row, : len(window)] = 1
                labels[row, first : len(window)] = ids[row, first : len(window)]
            with torch.inference_mode():
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                shift = logits[:, :-1].float()
                target = labels[:, 1:].to(device)
                nll = torch.nn.functional.cross_entropy(
                    shift.reshape(-1, shift.size(-1)), target.reshape(-1), ignore_index=-100, reduction="sum"
                )
            total_nll += float(nll)
            total_tokens += int((target != -100).sum())
            if on_progress is not None:
                on_progress(total_tokens)
        pending.clear()

    budget = max_tokens
    for doc in load_documents(uri, tokenizer, vocab):
        ids = doc.ids
        if budget is not None:
            if budget <= 0:
                break
            if len(ids) - 1 > budget:  # keep the budget exactly: truncate the last document
                ids = ids[: budget + 1]
                doc = Document(ids, len(tokenizer.decode(ids, skip_special_tokens=True).encode("utf-8")))
        if len(ids) < 2:
            continue
        if max(ids) >= vocab:
            raise ConfigError(FIELD, f"token id {max(ids)} is outside the model's vocabulary ({vocab})")
        for start, end, first in windows(len(ids), seq_len, stride):
            pending.append((ids[start:end], first - start))
        n_docs += 1
        total_bytes += doc.n_bytes
        if budget is not None:
            budget -= len(ids) - 1
        if len(pending) >= chunk_windows:
            flush()
    flush()
    if total_tokens == 0:
        raise ConfigError(FIELD, f"no tokens to score in {uri} (every document is shorter than two tokens)")
    nll = total_nll / total_tokens
    bpb = total_nll / math.log(2) / total_bytes if total_bytes else None
    return PerplexityResult(nll, math.exp(nll), bpb, total_tokens, total_bytes, n_docs)


def perplexity_of_model(
    model: Any, model_dir: str, held_out: str, seq_len: int = 64, batch_size: int = 8
) -> float:
    """Perplexity of a loaded causal LM on ``held_out`` (token shards or text), tokenizer from ``model_dir``."""
    from transformers import AutoTokenizer

    from lmforge_jobs.evaluate.models import prepare_tokenizer

    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(str(model_dir)))
    model.eval()
    result = evaluate_perplexity(model, tokenizer, str(held_out), seq_len=seq_len, batch_size=batch_size)
    return result.perplexity


__all__ = [
    "Document",
    "PerplexityResult",
    "evaluate_perplexity",
    "is_token_shards",
    "load_documents",
    "perplexity_of_model",
    "text_files",
    "windows",
]
