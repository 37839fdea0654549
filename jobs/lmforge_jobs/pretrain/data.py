"""Training and held-out batches from datatrove token shards, deterministic and resumable by step.

The concatenated token stream (documents already end in EOS) is cut into fixed windows; every epoch
visits them in a permutation seeded by (seed, epoch). Global sequence ``g`` of the run is window
``perm_epoch[g mod W]``; step ``s``, micro-batch ``m`` on data-parallel rank ``r`` reads sequences
``s·G + m·world·mb + r·mb + j`` (G sequences per step). So the loader's whole state is the step: a resumed
run reads exactly what the uninterrupted one would have, and the global batch does not depend on how the
processes are arranged. Masking for the encoder objectives draws from a generator seeded by (seed, g).
Remote shards are prefetched: at the start of each step the windows of the next ``LMFORGE_PREFETCH_STEPS``
(default 2) steps go to the stream's background downloads.

Objectives:

* decoder: windows of seqLen+1 tokens, inputs ``w[:-1]``, labels ``w[1:]`` (next-token prediction);
* encoder: masked LM (BERT): maskProbability of the positions predicted; of those 80 % become the mask
  token, 10 % a random token, 10 % stay;
* encoder-decoder: span corruption (T5): noise density maskProbability in spans of mean length
  meanSpanLength; each span becomes one sentinel in the input, the target is the sentinels each followed
  by their span, then EOS.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from lmforge_jobs.shards import TokenStream

IGNORE = -100
PREFETCH_STEPS = int(os.environ.get("LMFORGE_PREFETCH_STEPS", "2"))
"""Steps whose windows are downloaded ahead when the shards are remote."""


@dataclass(frozen=True)
class Objective:
    architecture: str
    seq_len: int
    tokenizer_vocab: int
    eos: int
    pad: int
    mask: int | None = None
    sentinel0: int | None = None
    mask_probability: float = 0.15
    mean_span_length: float = 3.0

    @property
    def window(self) -> int:
        return self.seq_len + 1 if self.architecture == "decoder" else self.seq_len

    @property
    def noise_tokens(self) -> int:
        return max(1, round(self.seq_len * self.mask_probability))

    @property
    def spans(self) -> int:
        return max(1, round(self.noise_tokens / self.mean_span_length))

    @property
    def target_len(self) -> int:
        return self.noise_tokens + self.spans + 1


def _segments(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Split n items into k positive lengths at random."""
    if k <= 1:
        return np.array([n])
    cuts = np.sort(rng.choice(np.arange(1, n), size=k - 1, replace=False))
    return np.diff(np.concatenate(([0], cuts, [n])))


class TokenBatches:
    """Batches of one process: ``train(step, micro)`` and ``held_out(k)`` as dicts of tensors."""

    def __init__(
        self,
        stream: TokenStream,
        objective: Objective,
        micro_batch: int,
        accumulation: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        self.stream, self.obj = stream, objective
        self.mb, self.accum, self.rank, self.world = micro_batch, accumulation, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.prefetching = bool(getattr(stream, "remote", False))
        """The stream reads remote shards: hand it the windows of the next steps ahead of time."""
        self.windows = (
            (len(stream) - 1) // objective.seq_len
            if objective.architecture == "decoder"
            else len(stream) // objective.seq_len
        )
        if self.windows < 1:
            raise ValueError(
                f"{stream.uri} holds {len(stream)} tokens, fewer than one sequence of {objective.window}"
            )
        self._perm: tuple[int, np.ndarray] | None = None

    @property
    def sequences_per_step(self) -> int:
        return self.accum * self.world * self.mb

    def _window_of(self, g: int) -> int:
        epoch, i = divmod(g, self.windows)
        if not self.shuffle:
            return i
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.windows))
        return int(self._perm[1][i])

    def sequence_ids(self, step: int, micro: int) -> list[int]:
        base = step * self.sequences_per_step + micro * self.world * self.mb + self.rank * self.mb
        return [base + j for j in range(self.mb)]

    def train(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        if micro == 0 and self.prefetching:
            # the order is a function of the step: fetch what the next steps read while this one computes
            ahead = range(step, step + PREFETCH_STEPS + 1)
            self._prefetch(g for s in ahead for m in range(self.accum) for g in self.sequence_ids(s, m))
        return self._batch(self.sequence_ids(step, micro))

    def _prefetch(self, ids: Iterable[int]) -> None:
        o = self.obj
        self.stream.prefetch((self._window_of(g) * o.seq_len, o.window) for g in ids)

    def held_out_batches(self, wanted: int) -> int:
        """How many held-out micro-batches per process evaluate each window at most once (at least 1)."""
        return max(1, min(wanted, self.windows // (self.world * self.mb)))

    def held_out(self, k: int) -> dict[str, torch.Tensor]:
        if self.prefetching:
            self._prefetch(
                (((k + n) * self.world + self.rank) * self.mb + j) % self.windows
                for n in range(PREFETCH_STEPS + 1)
                for j in range(self.mb)
            )
        base = (k * self.world + self.rank) * self.mb
        return self._batch([(base + j) % self.windows for j in range(self.mb)])

    # ------------------------------------------------------------------------------------------- objectives
    def _batch(self, ids: list[int]) -> dict[str, torch.Tensor]:
        o = self.obj
        windows = np.stack([self.stream.window(self._window_of(g) * o.seq_len, o.window) for g in ids])
        if o.architecture == "decoder":
            return {
                "input_ids": torch.from_numpy(windows[:, :-1].copy()),
                "labels": torch.from_numpy(windows[:, 1:].copy()),
            }
        rngs = [np.random.default_rng([self.seed, 1, g]) for g in ids]
        if o.architecture == "encoder":
            return self._masked_lm(windows, rngs)
        return self._span_corruption(windows, rngs)

    def _masked_lm(self, windows: np.ndarray, rngs: list[np.random.Generator]) -> dict[str, torch.Tensor]:
        o = self.obj
        inputs, labels = windows.copy(), np.full_like(windows, IGNORE)
        for row, rng in enumerate(rngs):
            pos = rng.choice(o.seq_len, size=o.noise_tokens, replace=False)
            labels[row, pos] = windows[row, pos]
            roll = rng.random(len(pos))
            inputs[row, pos[roll < 0.8]] = o.mask
            rand = pos[(roll >= 0.8) & (roll < 0.9)]
            inputs[row, rand] = rng.integers(0, o.tokenizer_vocab, size=len(rand))
        return {
            "input_ids": torch.from_numpy(inputs),
            "attention_mask": torch.ones(windows.shape, dtype=torch.long),
            "labels": torch.from_numpy(labels),
        }

    def _span_corruption(
        self, windows: np.ndarray, rngs: list[np.random.Generator]
    ) -> dict[str, torch.Tensor]:
        o = self.obj
        assert o.sentinel0 is not None
        n = o.seq_len
        inputs = np.full((len(windows), n), o.pad, dtype=np.int64)
        attention = np.zeros((len(windows), n), dtype=np.int64)
        labels = np.full((len(windows), o.target_len), IGNORE, dtype=np.int64)
        for row, rng in enumerate(rngs):
            noise = _segments(rng, o.noise_tokens, o.spans)
            keep = _segments(rng, n - o.noise_tokens, o.spans)
            src, tgt, pos = [], [], 0
            for k, (a, b) in enumerate(zip(keep, noise, strict=True)):
                sentinel = o.sentinel0 + k
                src.extend(windows[row, pos : pos + a])
                src.append(sentinel)
                pos += a
                tgt.append(sentinel)
                tgt.extend(windows[row, pos : pos + b])
                pos += b
            tgt.append(o.eos)
            inputs[row, : len(src)] = src
            attention[row, : len(src)] = 1
            labels[row, : len(tgt)] = tgt
        return {
            "input_ids": torch.from_numpy(inputs),
            "attention_mask": torch.from_numpy(attention),
            "labels": torch.from_numpy(labels),
        }


__all__ = ["IGNORE", "Objective", "TokenBatches"]
