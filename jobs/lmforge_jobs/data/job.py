"""The Corpus job: every stage in order (``--stage all``) or one rank of one stage, then stats.json and
outputs.json. Usage and exit codes: :mod:`lmforge_jobs.data.__main__`."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from lmforge_jobs import storage
from lmforge_jobs.data import stages as st
from lmforge_jobs.entry import ConfigError
from lmforge_jobs.manifest import Resource
from lmforge_jobs.telemetry import Telemetry

KIND = "Corpus"
# A stage started before the previous one completed every rank: not a spec problem, retry later.
EXIT_NOT_READY = 75


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", default="all", help="stage name (see lmforge_jobs.data.stages) or all")
    parser.add_argument("--rank", default=None, help="rank to run (default: $JOB_COMPLETION_INDEX or 0); all")
    parser.add_argument(
        "--world", type=int, default=None, help="number of ranks (default: the stage's tasks)"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="local processes (default: parallelism.workers)"
    )


def _stage_gauges(tel: Telemetry, stage: str, result: dict[str, Any]) -> None:
    tel.gauge("lmforge_data_stage_documents", "Documents processed by a Corpus stage", ["stage"]).labels(
        stage=stage
    ).set(result["documents"])
    tel.gauge(
        "lmforge_data_stage_documents_per_second", "Documents per second of a Corpus stage", ["stage"]
    ).labels(stage=stage).set(result["documentsPerSecond"])


def finish(spec: Any, tel: Telemetry) -> dict[str, Any]:
    """stats.json, the final progress and outputs.json (the completion marker)."""
    from lmforge_jobs.data.stats import build_stats, write_stats
    from lmforge_jobs.resolve import expected_outputs

    stats = build_stats(spec)
    if stats["kept"] == 0:
        # what reaches the tokenize stage is not empty (checked before it), so the weights dropped it all
        field = "domains.weights" if stats["removedBy"].get("domains") else "filters"
        raise ConfigError(field, "no documents left: the corpus would be empty")
    write_stats(str(spec.output), stats)
    tokens = stats["tokens"]["train"]
    tel.update(
        tokens=tokens,
        stage="Done",
        metrics={
            "documentsRead": stats["read"],
            "documentsKept": stats["kept"],
            "tokensHeldOut": stats["tokens"]["heldOut"],
        },
        force=True,
    )
    # status-shaped numbers for the operator, which reads them from the termination message
    results = {
        "documents": {"read": stats["read"], "kept": stats["kept"], "removedBy": stats["removedBy"]},
        "tokens": {"train": stats["tokens"]["train"], "heldOut": stats["tokens"]["heldOut"]},
    }
    tel.finish(expected_outputs(KIND, spec.output), results=results)
    return stats


def run(resource: Resource[Any, Any], args: argparse.Namespace) -> int:
    with exit_on_sigterm():
        return run_stages(resource, args)


@contextlib.contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """SIGTERM (what Kubernetes sends a pod being stopped) unwinds the job as Ctrl-C does, so the worker
    pool, its Manager and the extraction sandboxes are shut down on the way out; a worker that misses it
    dies with its parent anyway (:func:`lmforge_jobs.data.blocks.die_with_parent`)."""

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_stages(resource: Resource[Any, Any], args: argparse.Namespace) -> int:
    """Every stage in order (``--stage all``), or one rank (or all ranks) of one stage."""
    from lmforge_jobs.data.layout import Layout
    from lmforge_jobs.data.preflight import preflight
    from lmforge_jobs.data.run import StageNotReady, check_previous_complete, run_stage

    spec = resource.spec
    names = st.stage_names(spec)
    if args.stage != "all" and args.stage not in names:
        print(
            f"error: unknown stage {args.stage!r}; stages for this spec: {', '.join(names)}", file=sys.stderr
        )
        return 2
    raw_rank = args.rank if args.rank is not None else os.environ.get("JOB_COMPLETION_INDEX", "0")
    every = args.stage == "all" or raw_rank == "all"
    if not every and not str(raw_rank).isdigit():
        print(
            f"error: --rank (or $JOB_COMPLETION_INDEX) must be a rank number or all: {raw_rank!r}",
            file=sys.stderr,
        )
        return 2
    rank = None if every else int(raw_rank)
    workers = args.workers or spec.parallelism.workers
    tel = Telemetry(KIND, spec.output, enabled=every or rank == 0)
    storage.configure()  # datatrove's folders and worker processes reach the same object store
    preflight(spec, None if args.stage == "all" else args.stage)
    todo = st.stages(spec) if args.stage == "all" else [st.get_stage(spec, args.stage)]
    progress = RankProgress(tel, spec)
    for stage in todo:
        progress.report(stage.phase, force=True)
        if stage.name == st.FINAL_STAGE:
            if rank in (None, 0):
                try:
                    check_previous_complete(spec, Layout(spec.output), stage.name)
                except StageNotReady as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    return EXIT_NOT_READY
                stats = finish(spec, tel)
                print(
                    f"corpus: read {stats['read']}, kept {stats['kept']}, "
                    f"tokens train {stats['tokens']['train']} held-out {stats['tokens']['heldOut']}"
                )
            continue
        try:
            with progress.polling(stage.phase):
                result = run_stage(spec, stage.name, rank=rank, world=args.world, workers=workers)
        except StageNotReady as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_NOT_READY
        metrics = {"documentsPerSecond": result["documentsPerSecond"]} if result["documents"] else {}
        progress.report(stage.phase, metrics=metrics, force=True)
        _stage_gauges(tel, stage.name, result)
    return 0


class RankProgress:
    """Progress as completed ranks over all stages (step / totalSteps), read from datatrove's completion
    markers — once per second while a stage runs, so the bar moves during a long stage."""

    def __init__(self, tel: Telemetry, spec: Any) -> None:
        from lmforge_jobs.data.layout import Layout

        self.tel = tel
        self.layout = Layout(spec.output)
        self.stages = [s for s in st.stages(spec) if s.name != st.FINAL_STAGE]
        self.total = sum(s.tasks for s in self.stages) + 1
        self.lock = threading.Lock()

    def report(self, phase: str, metrics: dict[str, float] | None = None, force: bool = False) -> None:
        from lmforge_jobs.data.layout import completed_ranks

        if not self.tel.enabled:
            return
        done = sum(min(completed_ranks(self.layout, s.name), s.tasks) for s in self.stages)
        with self.lock:
            self.tel.update(step=done, total_steps=self.total, stage=phase, metrics=metrics, force=force)

    @contextlib.contextmanager
    def polling(self, phase: str, every: float = 1.0) -> Iterator[None]:
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(every):
                with contextlib.suppress(Exception):  # reporting must never break the job
                    self.report(phase)

        thread = threading.Thread(target=loop, name="corpus-progress", daemon=True)
        if self.tel.enabled:
            thread.start()
        try:
            yield
        finally:
            stop.set()
            if thread.is_alive():
                thread.join()
