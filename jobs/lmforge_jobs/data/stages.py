"""The Corpus job's stages, in execution order: what the operator runs as one Indexed Job each.

Pure on purpose (spec models and the standard library only; no datatrove): the operator imports it to
build its Jobs, and the data job (:mod:`lmforge_jobs.data.pipelines`) maps each name to a datatrove
pipeline. A stage starts only after every rank of the previous one completed; each rank leaves a datatrove
completion marker (``OUT/logs/<stage>/completions/<rank>``), so a rerun skips the ranks already done::

    for stage in stages(spec):   # e.g. on Kubernetes: an Indexed Job with completions = stage.tasks
        python -m lmforge_jobs.data --manifest corpus.yaml --stage {stage.name}   # rank = JOB_COMPLETION_INDEX

=====================  ==============  ============  =========================================================
name                   phase           tasks         what one rank does
=====================  ==============  ============  =========================================================
``extract``            Extracting      T             read its share of the sources, extract HTML, filter,
                                                     normalise, redact PII, label domains
``exact-sigs``         Deduplicating   T             exact-dedup signatures of its documents
``exact-dups``         Deduplicating   1             find exact duplicates among all signatures
``exact-filter``       Deduplicating   T             drop its exact duplicates
``minhash-sigs``       Deduplicating   T             MinHash signatures
``minhash-buckets``    Deduplicating   buckets       LSH: candidate pairs of one band
``minhash-clusters``   Deduplicating   1             union-find of all candidate pairs
``minhash-filter``     Deduplicating   T             drop all but one document of each cluster
``tokenizer``          TrainingTok…    1             train the byte-level BPE (or copy the pretrained one)
``tokenize``           Tokenizing      T             domain weights, held-out split, ``documents/``, shards
``stats``              Tokenizing      1             ``stats.json`` and ``outputs.json`` (completion marker)
=====================  ==============  ============  =========================================================

T is ``spec.parallelism.tasks``. The exact and MinHash stages appear only when ``spec.dedup`` enables them.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge_jobs.data.config import CorpusSpec

EXTRACTING = "Extracting"
DEDUPLICATING = "Deduplicating"
TRAINING_TOKENIZER = "TrainingTokenizer"
TOKENIZING = "Tokenizing"

# The stage whose single rank writes stats.json and outputs.json: the Corpus is complete when it is.
FINAL_STAGE = "stats"


@dataclass(frozen=True)
class Stage:
    """One step of the Corpus job: ``tasks`` ranks (an Indexed Job's completions) of one pipeline."""

    name: str
    """DNS-label safe, at most 20 characters (part of Job and pod names)."""
    tasks: int
    """Number of ranks (datatrove tasks); rank r of w processes the r-th share."""
    phase: str
    """status.stage while it runs: Extracting, Deduplicating, TrainingTokenizer or Tokenizing."""
    description: str
    """One line for humans (logs, events)."""


def stages(spec: CorpusSpec) -> list[Stage]:
    """The stages ``spec`` enables, in execution order."""
    t = spec.parallelism.tasks
    out = [
        Stage(
            "extract",
            t,
            EXTRACTING,
            "read sources, extract text, filter, normalise and redact PII",
        )
    ]
    if spec.dedup.exact:
        out += [
            Stage("exact-sigs", t, DEDUPLICATING, "exact dedup: content signatures"),
            Stage("exact-dups", 1, DEDUPLICATING, "exact dedup: find duplicate signatures"),
            Stage("exact-filter", t, DEDUPLICATING, "exact dedup: drop duplicates"),
        ]
    if spec.dedup.minhash.enabled:
        out += [
            Stage("minhash-sigs", t, DEDUPLICATING, "near dedup: MinHash signatures"),
            Stage(
                "minhash-buckets",
                spec.dedup.minhash.buckets,
                DEDUPLICATING,
                "near dedup: LSH candidate pairs, one band per rank",
            ),
            Stage("minhash-clusters", 1, DEDUPLICATING, "near dedup: cluster candidate pairs"),
            Stage("minhash-filter", t, DEDUPLICATING, "near dedup: keep one document per cluster"),
        ]
    train = spec.tokenizer.train is not None
    out += [
        Stage(
            "tokenizer",
            1,
            TRAINING_TOKENIZER,
            "train the byte-level BPE tokenizer" if train else "install the pretrained tokenizer",
        ),
        Stage("tokenize", t, TOKENIZING, "domain weights, held-out split, tokenised shards"),
        Stage(FINAL_STAGE, 1, TOKENIZING, "statistics and outputs (completion marker)"),
    ]
    return out


def stage_names(spec: CorpusSpec) -> list[str]:
    """Names of :func:`stages`, in order."""
    return [s.name for s in stages(spec)]


def get_stage(spec: CorpusSpec, name: str) -> Stage:
    """The stage called ``name``; KeyError naming the valid ones otherwise."""
    for stage in stages(spec):
        if stage.name == name:
            return stage
    raise KeyError(f"no stage {name!r} for this spec; stages: {', '.join(stage_names(spec))}")


__all__ = [
    "DEDUPLICATING",
    "EXTRACTING",
    "FINAL_STAGE",
    "TOKENIZING",
    "TRAINING_TOKENIZER",
    "Stage",
    "get_stage",
    "stage_names",
    "stages",
]
