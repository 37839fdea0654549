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

import glob as _glob
import json
import os
from pathlib import Path
from typing import Any

from lmforge_jobs.data import stages as st
from lmforge_jobs.data.config import CorpusSpec


def join(base: str, *parts: str) -> str:
    """``base/part/…`` for local paths and URIs alike."""
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local(uri: str) -> str:
    return uri.removeprefix("file://")


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
    folder = layout.counts(stage)
    if not is_local(folder):
        from datatrove.io import get_datafolder

        df = get_datafolder(folder)
        return (
            [json.loads(df.open(f).read()) for f in df.list_files(glob_pattern="*.json")]
            if df.exists("")
            else []
        )
    return [
        json.loads(Path(p).read_text()) for p in sorted(_glob.glob(os.path.join(local(folder), "*.json")))
    ]


def completed_ranks(layout: Layout, stage: str) -> int:
    folder = join(layout.logs(stage), "completions")
    if is_local(folder):
        return len(_glob.glob(os.path.join(local(folder), "*")))
    from datatrove.io import get_datafolder

    return len(get_datafolder(folder).list_files())


__all__ = ["Layout", "completed_ranks", "is_local", "join", "local", "read_counts"]
