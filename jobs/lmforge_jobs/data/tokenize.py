"""The ``tokenize`` stage: kept documents → datatrove ``DocumentTokenizer`` shards, train and held-out apart.

Layout under ``spec.output`` (what the PretrainRun and Evaluation jobs read)::

    tokens/train/00000_unshuffled.ds           one file per rank (ranks without documents write none)
    tokens/train/00000_unshuffled.ds.index     uint64 little-endian: end offset (in tokens) of each document
    tokens/train/00000_unshuffled.ds.metadata  3 lines: "<tokenizer path>|<token size>", token count, humanized
    tokens/held-out/…                          the same for the held-out documents
    documents/train/00000.jsonl.gz             the kept documents themselves ({"text", "id", "metadata"})
    documents/held-out/00000.jsonl.gz

Reading a shard:

* **dtype**: the token size is the number after ``|`` on the first line of ``.ds.metadata`` — 2 bytes
  (``numpy.uint16``) when the vocabulary has at most 65 536 tokens, else 4 (``numpy.uint32``), always
  little-endian: ``np.fromfile(path, dtype="<u2" if size == 2 else "<u4")``. The ``.ds.index`` holds one
  ``<u8`` per document: its end (exclusive, in tokens); the first document starts at 0.
* **EOS**: every document ends with the tokenizer's end-of-text token (the first of
  ``spec.tokenizer.train.specialTokens``, ``<|endoftext|>`` by default, or a pretrained tokenizer's
  ``eos_token``; written to ``tokenizer/tokenizer_config.json``),
  appended by DocumentTokenizer's post-processor; no BOS is added. Documents are concatenated, so a
  loader may cut fixed windows across boundaries, or use ``.ds.index`` to find them.
* **Order**: documents appear in the order of the previous stage's output for that rank (not shuffled),
  so a run is reproducible; shuffle in the loader. Shard files sorted by name give the corpus order.
* **Repeats**: a document whose domain weight is above 1 appears ``metadata.repeats`` times in the
  train shards (consecutively); ``documents/`` holds it once.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.tokens import DocumentTokenizer

from lmforge_jobs import storage

TRAIN = "train"
HELD_OUT = "held-out"


def shard_name(rank: int) -> str:
    """Base name of rank ``rank``'s token file (DocumentTokenizer's unshuffled file name)."""
    return f"{rank:05d}_unshuffled.ds"


class SplitTokenizer(PipelineStep):
    """Tokenises ``train`` documents (repeated per ``metadata.repeats``) into ``train_folder`` while they
    stream by, then the rank's held-out documents (read back from ``documents/held-out``, which the writer
    before this step has just closed) into ``held_out_folder``. Both use datatrove's DocumentTokenizer."""

    name = "🔢 Split tokenizer"
    type = "🔢 - TOKENIZER"

    def __init__(
        self,
        tokenizer_path: str,
        eos_token: str,
        train_folder: str,
        held_out_folder: str,
        held_out_documents: str,
        batch_size: int = 1000,
    ) -> None:
        super().__init__()
        self.tokenizer_path = tokenizer_path
        self.eos_token = eos_token
        self.train_folder = train_folder
        self.held_out_folder = held_out_folder
        self.held_out_documents = held_out_documents
        self.batch_size = batch_size

    def _tokenizer(self, folder: str, local_file: Path) -> DocumentTokenizer:
        # datatrove takes a name it cannot open as a hub repo id: a tokenizer on object storage is copied
        # to a local file first (``local_file``), and the shards' metadata still names where it lives
        tokenizer = DocumentTokenizer(
            output_folder=folder,
            tokenizer_name_or_path=str(local_file),
            eos_token=self.eos_token,
            shuffle_documents=False,
            batch_size=self.batch_size,
        )
        _ = tokenizer.tokenizer  # loaded (and cached) from the local file
        tokenizer.tokenizer_name_or_path = self.tokenizer_path
        return tokenizer

    def _write(self, docs: Iterator[Document], folder: str, local_file: Path, rank: int, label: str) -> int:
        tokenizer = self._tokenizer(folder, local_file)
        # the file lands straight in folder (no shuffling, no working dir); an empty one is removed
        written = tokenizer.write_unshuffled(docs, shard_name(rank))
        count = len(written)
        if count == 0:
            written.cleanup()
        self.stats += _renamed(tokenizer.stats, self.stats.name)
        self.stat_update(f"tokens_{label}", value=count)
        return count

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        def train_docs() -> Iterator[Document]:
            for doc in data:
                if doc.metadata.get("split") == HELD_OUT:
                    continue
                for _ in range(int(doc.metadata.get("repeats", 1))):
                    yield doc

        with tempfile.TemporaryDirectory(prefix="lmforge-tokenizer-") as tmp:
            local_file = storage.local_copy(self.tokenizer_path, tmp)
            self._write(train_docs(), self.train_folder, local_file, rank, "train")
            held = get_datafolder(self.held_out_documents)
            name = f"{rank:05d}.jsonl.gz"
            docs: Iterator[Document] = iter(())
            if held.exists(name):
                docs = JsonlReader(self.held_out_documents).read_file(name)
            self._write(docs, self.held_out_folder, local_file, rank, "heldOut")
        return
        yield  # a generator, like every step


def _renamed(stats: Any, name: str) -> Any:
    stats.name = name
    return stats


__all__ = ["HELD_OUT", "TRAIN", "SplitTokenizer", "shard_name"]
