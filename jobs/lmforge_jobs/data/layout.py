"""Where everything of one Corpus lives under ``spec.output`` (``OUT``), and the per-rank files there::

OUT/documents/{train,held-out}/NNNNN.jsonl.gz   kept documents (outputs.documents)
OUT/tokens/{train,held-out}/NNNNN_unshuffled.ds* token shards (see lmforge_jobs.data.tokenize)
OUT/tokenizer/                                 tokenizer.json + config (outputs.tokenizer)
OUT/stats.json                                 counts (outputs.stats); OUT/outputs.json marks completion
OUT/work/<stage>/…                             intermediate documents, signatures, duplicates
OUT/logs/<stage>/{completions,stats,logs}/     datatrove's per-rank markers, stats and logs
OUT/logs/<stage>/counts/NNNNN.json             per-rank document counts (added up in stats.json)
"""

from __future__ import annotations

import json
from typing import Any

from lmforge_jobs import storage
from lmforge_jobs.data import stages as st
from lmforge_jobs.data.config import CorpusSpec
from lmforge_jobs.storage import join


class Layout:
    """Where everything of one Corpus lives (see the module docstring)."""

    def __init__(self, output: str):
        self.out = output
        self.documents = join(output, "documents")
        self.tokens_train = join(output, "tokens", "train")
        self.tokens_held_out = join(output, "tokens", "held-out")
        self.tokenizer = join(output, "tokenizer")
        self.stats = join(output, "stats.json")
        self.work = join(output, "work")

    def logs(self, stage: str) -> str:
        return join(self.out, "logs", stage)

    def counts(self, stage: str) -> str:
        return join(self.logs(stage), "counts")

    def docs_after(self, spec: CorpusSpec, stage: str) -> str:
        """Folder of the documents a stage reads: those the last document-writing stage before it wrote."""
        names = st.stage_names(spec)
        folder = join(self.work, "extract")
        for name in names[: names.index(stage)]:
            if name in ("exact-filter", "minhash-filter"):
                folder = join(self.work, name)
        return folder


def read_counts(layout: Layout, stage: str) -> list[dict[str, Any]]:
    """The Counts files of a stage's completed ranks."""
    return [json.loads(storage.read_text(uri)) for uri in storage.list_files(layout.counts(stage), "*.json")]


def completed_ranks(layout: Layout, stage: str) -> int:
    """Ranks of ``stage`` whose completion marker exists."""
    return len(storage.list_files(join(layout.logs(stage), "completions")))


__all__ = ["Layout", "completed_ranks", "join", "read_counts"]
