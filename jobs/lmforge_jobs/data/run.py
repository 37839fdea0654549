"""Running a stage: one rank (or all ranks, ``rank=None``) with datatrove's LocalPipelineExecutor, which
skips ranks whose completion marker exists; the checks that a stage may start (the previous stage
completed every rank, something is left to process)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge_jobs import storage
from lmforge_jobs.data import blocks
from lmforge_jobs.data import stages as st
from lmforge_jobs.data.config import CorpusSpec
from lmforge_jobs.data.layout import Layout, completed_ranks, join, read_counts
from lmforge_jobs.data.pipelines import build_pipeline
from lmforge_jobs.data.preflight import expand_paths
from lmforge_jobs.entry import ConfigError

# Stages whose Counts files feed stats.json, with the key of what they remove.
COUNTED = ("extract", "exact-filter", "minhash-filter", "tokenize")
# Filter stages and the signature stage whose per-rank document indexes they apply.
SIGNATURES = {"exact-filter": "exact-sigs", "minhash-filter": "minhash-sigs"}


def check_not_empty(spec: CorpusSpec, layout: Layout, stage: str) -> None:
    """After a document-writing stage completed all ranks: ConfigError if no document is left."""
    names = st.stage_names(spec)
    before = [n for n in names[: names.index(stage)] if n in COUNTED]
    if not before:
        return
    last = before[-1]
    if completed_ranks(layout, last) < st.get_stage(spec, last).tasks:
        return
    counts = read_counts(layout, last)
    if counts and sum(int(c.get("kept", 0)) for c in counts) == 0:
        read = sum(int(c.get("in", 0)) for c in read_counts(layout, "extract"))
        field = "filters" if last == "extract" and read else ("sources" if not read else "dedup")
        raise ConfigError(
            field,
            f"no documents left after the {last} stage ({read} read): the corpus would be empty; "
            "loosen the filters or add sources",
        )


class StageNotReady(Exception):
    """A stage was started before every rank of the one before it completed (an orchestration error,
    worth a retry; exit code 75)."""


def check_previous_complete(spec: CorpusSpec, layout: Layout, stage: str) -> None:
    names = st.stage_names(spec)
    index = names.index(stage)
    if index == 0:
        return
    previous = st.get_stage(spec, names[index - 1])
    if previous.name == st.FINAL_STAGE:
        return
    done = completed_ranks(layout, previous.name)
    if done < previous.tasks:
        raise StageNotReady(
            f"stage {stage} needs every rank of {previous.name}: {done}/{previous.tasks} completed"
        )


def run_stage(
    spec: CorpusSpec,
    stage: str,
    *,
    rank: int | None,
    world: int | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Run ``stage`` for one rank or all of them; returns ``{documents, seconds, documentsPerSecond}``."""
    assert spec.output is not None
    layout = Layout(spec.output)
    info = st.get_stage(spec, stage)
    world = world or info.tasks
    if info.tasks == 1 and world != 1:
        raise ConfigError("parallelism.tasks", f"stage {stage} runs as one rank; --world must be 1")
    if stage == "minhash-buckets" and world % spec.dedup.minhash.buckets:
        raise ConfigError("dedup.minhash.buckets", f"--world {world} must be a multiple of the bucket count")
    if rank is not None and not 0 <= rank < world:
        raise ConfigError("parallelism.tasks", f"rank {rank} is outside 0..{world - 1} for stage {stage}")
    check_previous_complete(spec, layout, stage)
    signed = SIGNATURES.get(stage)
    if signed is not None and completed_ranks(layout, signed) not in (0, world):
        # duplicate indexes are positions within one rank's documents: other ranks would drop others
        raise ConfigError(
            "parallelism.tasks",
            f"--world {world} of stage {stage} must equal that of {signed} "
            f"({completed_ranks(layout, signed)} ranks)",
        )
    check_not_empty(spec, layout, stage)
    started = time.monotonic()
    if stage == "tokenizer":
        _run_tokenizer(spec, layout, rank or 0)
    elif stage == st.FINAL_STAGE:
        pass  # the caller writes stats.json and outputs.json
    else:
        ranks = list(range(world)) if rank is None else [rank]
        try:
            _run_ranks(spec, stage, layout, ranks, world, workers)
        except blocks.UnreadableInput as exc:
            raise ConfigError(
                _field_of(spec, exc.path), f"{exc.path}: not a readable input: {exc.reason}"
            ) from None
        except blocks.ExtractorBroken as exc:
            raise ConfigError("extract.method", exc.reason) from None
    seconds = max(time.monotonic() - started, 1e-9)
    docs = _stage_documents(layout, stage)
    return {"documents": docs, "seconds": seconds, "documentsPerSecond": docs / seconds if docs else 0.0}


def _field_of(spec: CorpusSpec, path: str) -> str:
    """The spec field of the source an unreadable file belongs to."""
    for i, source in enumerate(spec.sources):
        if source.kind == "huggingface":
            continue
        _, files = expand_paths(source, i)
        if any(path == rel or path.endswith("/" + rel) for rel in files):
            return f"sources[{i}].{source.kind}.paths"
    return "sources"


def _stage_documents(layout: Layout, stage: str) -> int:
    if stage in COUNTED:
        return sum(int(c.get("in", 0)) for c in read_counts(layout, stage))
    return 0


def _run_ranks(
    spec: CorpusSpec, stage: str, layout: Layout, ranks: list[int], world: int, workers: int
) -> None:
    """Ranks differ only in their source limits; each gets its own executor when limits are set."""
    from datatrove.executor import LocalPipelineExecutor

    blocks.workers_die_with_parent()
    limited = stage == "extract" and any(getattr(s, s.kind).limit for s in spec.sources)
    groups = [[r] for r in ranks] if limited else [ranks]
    for group in groups:
        ex = LocalPipelineExecutor(
            pipeline=build_pipeline(spec, stage, group[0], world, layout),
            tasks=world,
            workers=max(1, min(workers, len(group))),
            logging_dir=layout.logs(stage),
            local_tasks=len(group),
            local_rank_offset=group[0],
            start_method="fork" if os.name == "posix" else "spawn",
        )
        if len(group) > 1 and group != list(range(group[0], group[0] + len(group))):
            raise AssertionError("rank groups are contiguous")
        ex.run()


def _run_tokenizer(spec: CorpusSpec, layout: Layout, rank: int) -> None:
    """The tokenizer stage: one rank, built in a local directory and copied to ``OUT/tokenizer/``; its
    completion marker, written last like datatrove's, says the copy is whole."""
    import tempfile

    from datatrove.pipeline.readers import JsonlReader

    from lmforge_jobs.data import tokenizer

    marker = join(layout.logs("tokenizer"), "completions", f"{rank:05d}")
    if storage.exists(marker):
        return
    source = layout.docs_after(spec, "tokenizer")
    train = spec.tokenizer.train
    limit = train.sample_documents if train is not None else 0

    def texts() -> Iterator[str]:
        reader = JsonlReader(source)
        n = 0
        for name in sorted(reader.data_folder.list_files(glob_pattern="*.jsonl.gz")):
            for doc in reader.read_file(name):
                if n >= limit:
                    return
                n += 1
                yield doc.text

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.build(spec, texts(), Path(tmp))
        storage.upload_tree(tmp, layout.tokenizer)
    storage.write_text_atomic(marker, "")


__all__ = ["COUNTED", "StageNotReady", "check_not_empty", "check_previous_complete", "run_stage"]
