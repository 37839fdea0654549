"""Read datatrove token shards: the ``*.ds`` files ``DocumentTokenizer`` writes (numpy only).

A shard is three files with the same stem::

    00000_shuffled.ds           token ids, little-endian uint16 (vocab < 65536) or uint32, back to back
    00000_shuffled.ds.index     uint64 end offset (in tokens) of every document in the .ds file
    00000_shuffled.ds.metadata  "<tokenizer name>|<token size in bytes>\\n<token count>\\n<humanized>"

``read_documents(uri)`` yields each document's token ids in a deterministic order (shards sorted by path,
documents in file order); ``token_count(uri)`` sums them; :class:`TokenStream` maps every shard into
memory and serves any window of the concatenated stream (the training loader samples windows from it).
``uri`` is a directory (searched recursively) or one ``.ds`` file: a local path, ``file://`` or an object
storage URI (``s3://``, ``gs://`` … through :mod:`lmforge_jobs.storage`).

Remote shards are not copied whole before training: :class:`TokenStream` reads them in blocks
(``LMFORGE_CACHE_BLOCK_BYTES``, default 4 MiB) kept in a bounded local cache (a directory under
``LMFORGE_CACHE``, default the system temp directory; at most ``LMFORGE_CACHE_BYTES``, default 16 GiB, the
least recently used blocks evicted first): a corpus that fits the budget is downloaded at most once. A
larger one is read window by window instead (exact byte ranges, nothing kept on disk: the shuffled order
would otherwise read a whole block for every window). Either way the training loader knows which windows
the next steps read (the order is a function of the step), so it hands them to :meth:`TokenStream.prefetch`
and background threads download them while the current step computes.

Problems with the data raise :class:`ShardError` with a hint; jobs turn it into a ``ConfigError`` naming
the spec field that pointed here (``data.tokens``, ``data.heldOut``, ``perplexity.data``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge_jobs import storage

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

    path: Path | str
    """Local path; for remote shards the URI string (``remote`` is set)."""
    token_size: int
    tokens: int
    tokenizer: str | None
    """Tokenizer name recorded in the .metadata file, when there is one."""
    remote: bool = False
    index: np.ndarray | None = None
    """Document end offsets of a remote shard (read with the listing)."""

    @property
    def dtype(self) -> np.dtype:
        return _DTYPES[self.token_size]

    def memmap(self) -> np.ndarray:
        if self.tokens == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.tokens,))

    def doc_ends(self) -> np.ndarray:
        """End offsets of the documents; one document spanning the file when there is no index."""
        if self.remote:
            return self.index if self.index is not None else np.array([self.tokens], dtype=np.uint64)
        index = Path(str(self.path) + ".index")
        if not index.exists():
            return np.array([self.tokens], dtype=np.uint64) if self.tokens else np.zeros(0, np.uint64)
        return _check_index(np.fromfile(index, dtype="<u8"), self.tokens, str(index), Path(self.path).name)


def _parse_metadata(text: str | None) -> tuple[str | None, int | None, int | None]:
    if text is None:
        return None, None, None
    lines = text.splitlines()
    name, size, count = None, None, None
    if lines and "|" in lines[0]:
        name, _, raw = lines[0].rpartition("|")
        size = int(raw) if raw.strip().isdigit() else None
    if len(lines) > 1 and lines[1].strip().lstrip("-").isdigit():
        count = int(lines[1])
    return name, size, count


def _read_metadata(path: Path) -> tuple[str | None, int | None, int | None]:
    meta = Path(str(path) + ".metadata")
    return _parse_metadata(meta.read_text(encoding="utf-8") if meta.exists() else None)


def _check_index(ends: np.ndarray, tokens: int, where: str, name: str) -> np.ndarray:
    if len(ends) and (int(ends[-1]) != tokens or np.any(np.diff(ends.astype(np.int64)) < 0)):
        raise ShardError(f"{where}: document offsets do not match {name} ({tokens} tokens)")
    return ends


def _find_remote(uri: str, token_size: int | None) -> list[Shard]:
    """Shards under a remote URI: one listing, plus the small .metadata and .index objects."""
    fs, root = storage.filesystem(uri)
    try:
        if fs.isfile(root):
            listing = {root: fs.info(root)}
        else:
            listing = fs.find(root, detail=True)
            if not listing and not fs.exists(root):
                raise FileNotFoundError(uri)
    except (OSError, ValueError) as exc:
        raise ShardError(f"{storage.describe(exc, uri)}; {_HINT}") from None
    paths = sorted(p for p, info in listing.items() if p.endswith(SUFFIX) and info.get("type") != "directory")
    if not paths:
        raise ShardError(f"no *.ds token shards in {uri}; {_HINT}")
    try:
        sidecars = fs.cat([p + ".metadata" for p in paths if p + ".metadata" in listing])
        sidecars.update(fs.cat([p + ".index" for p in paths if p + ".index" in listing]))
    except (OSError, ValueError) as exc:
        raise ShardError(f"{storage.describe(exc, uri)}; {_HINT}") from None
    shards = []
    for path in paths:
        where = storage.to_uri(fs, path)
        meta = sidecars.get(path + ".metadata")
        name, size, _ = _parse_metadata(meta.decode("utf-8") if meta is not None else None)
        size = size or token_size or 2
        if size not in _DTYPES:
            raise ShardError(f"{where}: token size {size} bytes is not 2 or 4")
        nbytes = int(listing[path]["size"])
        if nbytes % size:
            raise ShardError(f"{where}: {nbytes} bytes is not a whole number of {size}-byte tokens")
        raw = sidecars.get(path + ".index")
        index = None
        if raw is not None:
            index = _check_index(np.frombuffer(raw, dtype="<u8"), nbytes // size, where + ".index", where)
        shards.append(Shard(where, size, nbytes // size, name, remote=True, index=index))
    return shards


def find_shards(uri: str | os.PathLike[str], token_size: int | None = None) -> list[Shard]:
    """The shards under ``uri`` sorted by path; raises ShardError when there are none."""
    if storage.is_remote(uri):
        return _find_remote(str(uri), token_size)
    root = storage.local_path(uri)
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


def has_shards(uri: str | os.PathLike[str]) -> bool:
    """True when ``uri`` is a ``.ds`` file or a directory (prefix) holding some, local or on object
    storage; False for anything else, a missing path included. Storage errors propagate as OSError."""
    fs, path = storage.filesystem(uri)
    if fs.isfile(path):
        return path.endswith(SUFFIX)
    return fs.isdir(path) and any(p.endswith(SUFFIX) for p in fs.find(path))


def token_count(uri: str | os.PathLike[str]) -> int:
    """Total tokens in the shards under ``uri``."""
    return sum(s.tokens for s in find_shards(uri))


def read_documents(uri: str | os.PathLike[str]) -> Iterator[np.ndarray]:
    """Every document's token ids (int64 arrays), shards in path order, documents in file order."""
    for shard in find_shards(uri):
        data = _download(shard) if shard.remote else shard.memmap()
        start = 0
        for end in shard.doc_ends():
            end = int(end)
            if end > start:
                yield np.asarray(data[start:end], dtype=np.int64)
            start = end


def _download(shard: Shard) -> np.ndarray:
    """One remote shard's tokens, read whole (one shard at a time, for ``read_documents``)."""
    fs, path = storage.filesystem(str(shard.path))
    return np.frombuffer(fs.cat_file(path), dtype=shard.dtype)


def _env_bytes(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


MAX_PREFETCHED = 4096
"""Byte ranges held ahead of their use at most (a few steps' windows)."""


class BlockCache:
    """Blocks of remote shards in a local directory, at most ``budget`` bytes, least recently used evicted.

    ``get`` returns a block (downloading it, or waiting for a prefetch already downloading it);
    ``prefetch`` starts downloads on background threads and returns at once. One cache per process: its
    directory is removed when the stream is garbage collected or the process exits."""

    def __init__(self, shards: list[Shard], block_bytes: int, budget: int, root: str | None = None):
        import fsspec  # noqa: F401  (the remote shards need it; imported before the threads start)

        self.shards = shards
        self.block_bytes = block_bytes
        self.budget = max(budget, block_bytes)
        base = Path(root or os.environ.get("LMFORGE_CACHE") or tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="shards-", dir=base))
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.dir), True)
        self._fs = [storage.filesystem(str(s.path)) for s in shards]
        self._lock = threading.Lock()
        self._blocks: OrderedDict[tuple[int, int], int] = OrderedDict()  # key → bytes on disk
        self._pending: dict[tuple[int, int], Future[Path]] = {}
        self._ranges: dict[tuple[int, int, int], Future[bytes]] = {}
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="lmforge-prefetch")
        self._finalizer_pool = weakref.finalize(self, self._pool.shutdown, False, cancel_futures=True)
        self.downloaded = 0
        """Bytes fetched from storage so far."""

    def _file(self, key: tuple[int, int]) -> Path:
        return self.dir / f"{key[0]:06d}-{key[1]:08d}.bin"

    def _fetch(self, key: tuple[int, int]) -> Path:
        fs, path = self._fs[key[0]]
        shard = self.shards[key[0]]
        start = key[1] * self.block_bytes
        end = min(start + self.block_bytes, shard.tokens * shard.token_size)
        data = fs.cat_file(path, start=start, end=end)
        if len(data) != end - start:
            raise OSError(f"{shard.path}: read {len(data)} bytes at {start}, expected {end - start}")
        out = self._file(key)
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, out)  # a block on disk is whole
        with self._lock:
            self._pending.pop(key, None)
            self._blocks[key] = len(data)
            self.downloaded += len(data)
            self._evict(keep=key)
        return out

    def _evict(self, keep: tuple[int, int]) -> None:
        total = sum(self._blocks.values())
        while total > self.budget and len(self._blocks) > 1:
            key = next(iter(self._blocks))
            if key == keep:
                self._blocks.move_to_end(key)
                continue
            total -= self._blocks.pop(key)
            self._file(key).unlink(missing_ok=True)

    def _future(self, key: tuple[int, int]) -> Future[Path] | None:
        """None when the block is on disk (marked recently used); else its (possibly new) download."""
        with self._lock:
            if key in self._blocks:
                self._blocks.move_to_end(key)
                return None
            future = self._pending.get(key)
            if future is None:
                future = self._pending[key] = self._pool.submit(self._fetch, key)
            return future

    def get(self, shard: int, block: int) -> np.ndarray:
        """The block's tokens (memory-mapped: a block evicted meanwhile stays readable until dropped)."""
        key = (shard, block)
        while True:
            future = self._future(key)
            if future is not None:
                try:
                    future.result()
                except BaseException:
                    with self._lock:
                        self._pending.pop(key, None)
                    raise
            with self._lock:  # not evicted between the download and here
                if key in self._blocks:
                    return np.memmap(self._file(key), dtype=self.shards[shard].dtype, mode="r")

    def prefetch(self, keys: Iterable[tuple[int, int]]) -> None:
        for key in keys:
            self._future(key)

    # exact byte ranges: for a corpus larger than the budget, where a block would be read for one window
    def _fetch_range(self, key: tuple[int, int, int]) -> bytes:
        fs, path = self._fs[key[0]]
        data = fs.cat_file(path, start=key[1], end=key[2])
        if len(data) != key[2] - key[1]:
            raise OSError(f"{self.shards[key[0]].path}: read {len(data)} bytes at {key[1]}, expected more")
        with self._lock:
            self.downloaded += len(data)
        return data

    def read_range(self, shard: int, start: int, end: int) -> np.ndarray:
        """Bytes ``[start, end)`` of a shard as tokens: from a prefetch of that range, or fetched now."""
        key = (shard, start, end)
        with self._lock:
            future = self._ranges.pop(key, None)
        data = future.result() if future is not None else self._fetch_range(key)
        return np.frombuffer(data, dtype=self.shards[shard].dtype)

    def prefetch_ranges(self, keys: Iterable[tuple[int, int, int]]) -> None:
        with self._lock:
            for key in keys:
                if key not in self._ranges:
                    self._ranges[key] = self._pool.submit(self._fetch_range, key)
            while len(self._ranges) > MAX_PREFETCHED:  # ranges prefetched but never read (the run ended)
                self._ranges.pop(next(iter(self._ranges))).cancel()


class TokenStream:
    """All shards under ``uri`` as one token sequence with random access: memory-mapped local files, or
    remote shards read in blocks through a bounded local cache with prefetch."""

    def __init__(self, uri: str | os.PathLike[str], cache: str | None = None):
        self.uri = str(uri)
        self.shards = [s for s in find_shards(uri) if s.tokens]
        if not self.shards:
            raise ShardError(f"the token shards in {self.uri.removeprefix('file://')} are empty; {_HINT}")
        self.remote = self.shards[0].remote
        self._cache: BlockCache | None = None
        self._whole_blocks = False
        """Remote shards that fit the cache budget are read in cached blocks; larger ones window by window."""
        self._maps: list[Any] = []
        if self.remote:
            block = _env_bytes("LMFORGE_CACHE_BLOCK_BYTES", 4 << 20)
            block -= block % 4  # whole tokens of either size
            budget = _env_bytes("LMFORGE_CACHE_BYTES", 16 << 30)
            self._cache = BlockCache(self.shards, block, budget, cache)
            self._whole_blocks = sum(s.tokens * s.token_size for s in self.shards) <= budget
        else:
            self._maps = [s.memmap() for s in self.shards]
        self._starts = np.cumsum([0] + [s.tokens for s in self.shards])
        self.tokenizers = sorted({s.tokenizer for s in self.shards if s.tokenizer})

    def __len__(self) -> int:
        return int(self._starts[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the concatenated stream, as int64."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"window [{start}, {start + length}) outside {len(self)} tokens")
        out = np.empty(length, dtype=np.int64)
        for i, local, take, filled in self._pieces(start, length):
            out[filled : filled + take] = self._read(i, local, take)
        return out

    def _pieces(self, start: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """(shard, offset in it, tokens, offset in the window) of each shard a window touches."""
        pos, filled = start, 0
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        while filled < length:
            local = pos - int(self._starts[i])
            take = min(length - filled, self.shards[i].tokens - local)
            yield i, local, take, filled
            filled += take
            pos += take
            i += 1

    def _blocks(self, i: int, local: int, take: int) -> range:
        size = self.shards[i].token_size
        assert self._cache is not None
        per = self._cache.block_bytes
        return range(local * size // per, ((local + take) * size - 1) // per + 1)

    def _read(self, i: int, local: int, take: int) -> np.ndarray:
        if self._cache is None:
            return self._maps[i][local : local + take]
        size = self.shards[i].token_size
        if not self._whole_blocks:
            return self._cache.read_range(i, local * size, (local + take) * size)
        per = self._cache.block_bytes // self.shards[i].token_size
        parts = []
        for b in self._blocks(i, local, take):
            block = self._cache.get(i, b)
            lo = max(local - b * per, 0)
            hi = min(local + take - b * per, len(block))
            parts.append(block[lo:hi])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def prefetch(self, windows: Iterable[tuple[int, int]]) -> None:
        """Start downloading what windows ``(start, length)`` will read (remote shards only; returns at
        once)."""
        if self._cache is None:
            return
        if not self._whole_blocks:
            self._cache.prefetch_ranges(
                (i, local * self.shards[i].token_size, (local + take) * self.shards[i].token_size)
                for start, length in windows
                for i, local, take, _ in self._pieces(start, length)
            )
            return
        keys = []
        for start, length in windows:
            for i, local, take, _ in self._pieces(start, length):
                keys.extend((i, b) for b in self._blocks(i, local, take))
        self._cache.prefetch(dict.fromkeys(keys))

    @property
    def downloaded(self) -> int:
        """Bytes read from remote storage so far (0 for local shards)."""
        return self._cache.downloaded if self._cache is not None else 0

    def max_token(self, sample: int = 1 << 20) -> int:
        """Largest token id among the first ``sample`` tokens of every shard (a cheap vocabulary check)."""
        return max(int(self._read(i, 0, min(sample, s.tokens)).max()) for i, s in enumerate(self.shards))


__all__ = [
    "BlockCache",
    "Shard",
    "ShardError",
    "TokenStream",
    "find_shards",
    "has_shards",
    "read_documents",
    "token_count",
]
