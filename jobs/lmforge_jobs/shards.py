"""Read datatrove token shards: the ``*.ds`` files ``DocumentTokenizer`` writes (numpy only).

A shard is three files with the same stem::

    00000_shuffled.ds           token ids, little-endian uint16 (vocab < 65536) or uint32, back to back
    00000_shuffled.ds.index     uint64 end offset (in tokens) of every document in the .ds file
    00000_shuffled.ds.metadata  "<tokenizer name>|<token size in bytes>\\n<token count>\\n<humanized>"

``read_documents(uri)`` yields each document's token ids in a deterministic order (shards sorted by path,
documents in file order); ``token_count(uri)`` sums them; :class:`TokenStream` maps every shard into
memory and serves any window of the concatenated stream (the training loader samples windows from it).
``uri`` is a directory (searched recursively) or one ``.ds`` file; ``file://`` is accepted.

Problems with the data raise :class:`ShardError` with a hint; jobs turn it into a ``ConfigError`` naming
the spec field that pointed here (``data.tokens``, ``data.heldOut``, ``perplexity.data``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUFFIX = ".ds"
INDEX_SUFFIX = ".ds.index"
METADATA_SUFFIX = ".ds.metadata"
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
_HINT = (
    "expected datatrove token shards (*.ds with .ds.index) as written by the Corpus job's DocumentTokenizer"
)


class ShardError(ValueError):
    """The token shards are missing, empty or malformed."""


@dataclass(frozen=True)
class Shard:
    """One ``.ds`` file and what its sidecars say about it."""

    path: Path
    token_size: int
    tokens: int
    tokenizer: str | None
    """Tokenizer name recorded in the .metadata file, when there is one."""

    @property
    def dtype(self) -> np.dtype:
        return _DTYPES[self.token_size]

    def memmap(self) -> np.ndarray:
        if self.tokens == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.tokens,))

    def doc_ends(self) -> np.ndarray:
        """End offsets of the documents; one document spanning the file when there is no index."""
        index = Path(str(self.path) + ".index")
        if not index.exists():
            return np.array([self.tokens], dtype=np.uint64) if self.tokens else np.zeros(0, np.uint64)
        ends = np.fromfile(index, dtype="<u8")
        if len(ends) and (int(ends[-1]) != self.tokens or np.any(np.diff(ends.astype(np.int64)) < 0)):
            raise ShardError(
                f"{index}: document offsets do not match {self.path.name} ({self.tokens} tokens)"
            )
        return ends


def _local(uri: str | os.PathLike[str]) -> Path:
    text = str(uri)
    if "://" in text and not text.startswith("file://"):
        raise ShardError(f"{text}: only local paths are read here (mount remote storage first)")
    return Path(text.removeprefix("file://"))


def _read_metadata(path: Path) -> tuple[str | None, int | None, int | None]:
    meta = Path(str(path) + ".metadata")
    if not meta.exists():
        return None, None, None
    lines = meta.read_text(encoding="utf-8").splitlines()
    name, size, count = None, None, None
    if lines and "|" in lines[0]:
        name, _, raw = lines[0].rpartition("|")
        size = int(raw) if raw.strip().isdigit() else None
    if len(lines) > 1 and lines[1].strip().lstrip("-").isdigit():
        count = int(lines[1])
    return name, size, count


def find_shards(uri: str | os.PathLike[str], token_size: int | None = None) -> list[Shard]:
    """The shards under ``uri`` sorted by path; raises ShardError when there are none."""
    root = _local(uri)
    if not root.exists():
        raise ShardError(f"{root} does not exist; {_HINT}")
    paths = [root] if root.is_file() else sorted(p for p in root.rglob(f"*{SUFFIX}") if p.is_file())
    if not paths:
        raise ShardError(f"no *.ds token shards in {root}; {_HINT}")
    shards = []
    for path in paths:
        if path.suffix != SUFFIX:
            raise ShardError(f"{path} is not a .ds token file; {_HINT}")
        name, size, _ = _read_metadata(path)
        size = size or token_size or 2
        if size not in _DTYPES:
            raise ShardError(f"{path}: token size {size} bytes is not 2 or 4")
        nbytes = path.stat().st_size
        if nbytes % size:
            raise ShardError(f"{path}: {nbytes} bytes is not a whole number of {size}-byte tokens")
        shards.append(Shard(path, size, nbytes // size, name))
    return shards


def token_count(uri: str | os.PathLike[str]) -> int:
    """Total tokens in the shards under ``uri``."""
    return sum(s.tokens for s in find_shards(uri))


def read_documents(uri: str | os.PathLike[str]) -> Iterator[np.ndarray]:
    """Every document's token ids (int64 arrays), shards in path order, documents in file order."""
    for shard in find_shards(uri):
        data = shard.memmap()
        start = 0
        for end in shard.doc_ends():
            end = int(end)
            if end > start:
                yield np.asarray(data[start:end], dtype=np.int64)
            start = end


class TokenStream:
    """All shards under ``uri`` as one memory-mapped token sequence with random access."""

    def __init__(self, uri: str | os.PathLike[str]):
        self.uri = str(uri)
        self.shards = [s for s in find_shards(uri) if s.tokens]
        if not self.shards:
            raise ShardError(f"the token shards in {_local(uri)} are empty; {_HINT}")
        self._maps = [s.memmap() for s in self.shards]
        self._starts = np.cumsum([0] + [s.tokens for s in self.shards])
        self.tokenizers = sorted({s.tokenizer for s in self.shards if s.tokenizer})

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def max_token_size(self) -> int:
        return max(s.token_size for s in self.shards)

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the concatenated stream, as int64."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"window [{start}, {start + length}) outside {len(self)} tokens")
        out = np.empty(length, dtype=np.int64)
        pos, filled = start, 0
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        while filled < length:
            local = pos - int(self._starts[i])
            take = min(length - filled, self.shards[i].tokens - local)
            out[filled : filled + take] = self._maps[i][local : local + take]
            filled += take
            pos += take
            i += 1
        return out

    def max_token(self, sample: int = 1 << 20) -> int:
        """Largest token id among the first ``sample`` tokens of every shard (a cheap vocabulary check)."""
        return max(int(m[:sample].max()) for m in self._maps)


__all__ = ["Shard", "ShardError", "TokenStream", "find_shards", "read_documents", "token_count"]
