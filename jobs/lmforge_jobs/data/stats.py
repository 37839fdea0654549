"""stats.json: what each stage read, removed and kept, bytes and tokens per split, added up from the
per-rank Counts files and the token shards' metadata."""

from __future__ import annotations

import json
from typing import Any

from lmforge_jobs import storage
from lmforge_jobs.data import stages as st
from lmforge_jobs.data.config import CorpusSpec
from lmforge_jobs.data.layout import Layout, join, read_counts
from lmforge_jobs.data.pipelines import filter_keys
from lmforge_jobs.data.run import COUNTED


def token_counts(folder: str) -> int:
    """Tokens in a shard folder, from the ``.ds.metadata`` files (0 when there is none)."""
    total = 0
    for uri in storage.list_files(folder, "*.ds.metadata"):
        lines = storage.read_text(uri).splitlines()
        total += int(lines[1]) if len(lines) > 1 else 0
    return total


def build_stats(spec: CorpusSpec) -> dict[str, Any]:
    """stats.json: read = kept + Σ removedBy, per-filter kept/removed in order, bytes and tokens per split."""
    assert spec.output is not None
    layout = Layout(spec.output)
    names = st.stage_names(spec)
    extract = read_counts(layout, "extract")
    read = sum(int(c["in"]) for c in extract)
    removed: dict[str, int] = {}
    for stage in COUNTED:
        if stage not in names:
            continue
        for c in read_counts(layout, stage):
            for key, n in c.get("removed", {}).items():
                removed[key] = removed.get(key, 0) + int(n)
    filters = []
    remaining = read - removed.get("extract", 0)
    for i, (flt, key) in enumerate(zip(spec.filters, filter_keys(spec), strict=True)):
        gone = removed.get(key, 0)
        remaining -= gone
        filters.append({"name": key, "kind": flt.kind, "position": i, "kept": remaining, "removed": gone})
    splits: dict[str, dict[str, int]] = {}
    for c in read_counts(layout, "tokenize"):
        for split, entry in c.get("splits", {}).items():
            agg = splits.setdefault(split, {"documents": 0, "bytes": 0, "repeats": 0})
            for k in agg:
                agg[k] += int(entry.get(k, 0))
    train, held = splits.get("train", {}), splits.get("held-out", {})
    kept = int(train.get("documents", 0)) + int(held.get("documents", 0))
    stats = {
        "read": read,
        "kept": kept,
        "removedBy": removed,
        "filters": filters,
        "documents": {"train": int(train.get("documents", 0)), "heldOut": int(held.get("documents", 0))},
        "repeated": int(train.get("repeats", 0)),
        "bytes": {
            "afterFilters": sum(int(c.get("bytes", 0)) for c in extract),
            "kept": int(train.get("bytes", 0)) + int(held.get("bytes", 0)),
            "train": int(train.get("bytes", 0)),
            "heldOut": int(held.get("bytes", 0)),
        },
        "tokens": {
            "train": token_counts(layout.tokens_train),
            "heldOut": token_counts(layout.tokens_held_out),
        },
        # of removedBy.extract: documents the extractor timed out on, and those it failed on
        "extraction": {
            key: sum(int(c.get("extraction", {}).get(key, 0)) for c in extract)
            for key in ("timeouts", "failures")
        },
        "consistent": read == kept + sum(removed.values()),
    }
    return stats


def write_stats(output: str, stats: dict[str, Any]) -> None:
    """``OUT/stats.json``, replaced atomically (read whole or not at all), local or on object storage."""
    # removedBy and filters stay in pipeline order (extract, filters by position, duplicates, …)
    storage.write_text_atomic(join(output, "stats.json"), json.dumps(stats, indent=2) + "\n")


__all__ = ["build_stats", "token_counts", "write_stats"]
