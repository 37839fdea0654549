"""A Sweep's trials or a ScalingStudy's points side by side on this machine.

How many run at once: the least of the spec's ``maxParallel``, ``lmforge run --parallel N`` (default:
auto) and what the machine allows —

* on GPUs, one child per free set of GPUs: a child that starts P processes (:func:`processes_for`, one
  per GPU its spec asks for) gets P GPUs of its own through ``CUDA_VISIBLE_DEVICES``, so at most
  GPUs // P children run at once;
* on CPU, one at a time unless ``--parallel`` asks for more: two tiny trials already share the cores of
  a small machine, side by side each only runs slower. With ``--parallel N`` each child gets
  cores // N threads (``OMP_NUM_THREADS`` in its environment, which torch reads for its own threads).

The children run in threads of ``lmforge run``: each thread launches its job's processes and polls them,
the work is in those processes (the GIL is not the bottleneck). The next child is chosen and a finished
one recorded in the calling thread, in order, so trial numbers follow the seed as they do one at a time.
Ctrl-C stops every running child (each saves its checkpoint) and the next run resumes them; a second
Ctrl-C kills them. One at a time, children run in the calling thread, as they always did.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar

from lmforge_operator.local.launch import MeshRefused, processes_for

Child = TypeVar("Child")
Result = TypeVar("Result")


@dataclass(frozen=True)
class Slot:
    """Where one child runs beside others: its own GPUs, or its share of the CPU's threads."""

    devices: tuple[str, ...] = ()
    """GPU ids for CUDA_VISIBLE_DEVICES (none: the runner's GPUs, or the CPU)."""
    threads: int | None = None
    """OMP_NUM_THREADS of a CPU child (None: left to torch)."""

    def env(self) -> dict[str, str]:
        env = {}
        if self.devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.devices)
        if self.threads is not None:
            env["OMP_NUM_THREADS"] = str(self.threads)
        return env


ALONE = Slot()
"""The one slot of a child that runs alone: nothing in its environment changes."""


def gpu_ids(gpus: int) -> list[str]:
    """The ids of this machine's first ``gpus`` GPUs as CUDA_VISIBLE_DEVICES names them (the ones it
    already lists, else 0..gpus-1)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"][:gpus]
    return [str(i) for i in range(gpus)]


def slots(
    max_parallel: int, requested: int | None, gpus: int, per_child: int, cores: int | None = None
) -> list[Slot]:
    """The slots children run in (see the module docstring); ``[ALONE]`` is one at a time.

    ``max_parallel``: the spec's; ``requested``: ``--parallel`` (None: auto); ``gpus``: this machine's;
    ``per_child``: GPUs one child uses; ``cores``: this machine's CPU cores (os.cpu_count())."""
    wanted = max_parallel if requested is None else min(max_parallel, requested)
    if gpus:
        per_child = max(1, per_child)
        count = min(wanted, gpus // per_child)
        if count <= 1:
            return [ALONE]
        ids = gpu_ids(gpus)
        return [Slot(devices=tuple(ids[i * per_child : (i + 1) * per_child])) for i in range(count)]
    if requested is None or wanted <= 1:
        return [ALONE]
    threads = max(1, (cores or os.cpu_count() or 1) // wanted)
    return [Slot(threads=threads) for _ in range(wanted)]


def gpus_per_child(children: list[Any], gpus: int) -> int:
    """GPUs the most demanding of ``children`` (resources) would start processes on."""
    if not gpus:
        return 0
    needs = [1]
    for child in children:
        try:
            needs.append(processes_for(child, gpus))
        except MeshRefused:  # the child itself reports it when it runs
            continue
    return max(needs)


def run_children(
    runner: Any,
    places: list[Slot],
    next_child: Callable[[], Child | None],
    run: Callable[[Child, Slot], Result],
    done: Callable[[Child, Result], None],
) -> None:
    """Run children until ``next_child()`` has no more or ``runner.interrupted``: ``run(child, slot)``
    in a thread per slot (in this thread with one slot), ``next_child`` and ``done(child, result)`` in
    this thread, in the order the children were started."""
    if len(places) == 1:
        while not runner.interrupted:
            child = next_child()
            if child is None:
                return
            done(child, run(child, places[0]))
        return
    free = list(places)
    running: dict[Future[Result], tuple[Child, Slot]] = {}
    exhausted = False
    with ThreadPoolExecutor(len(places), thread_name_prefix="lmforge-child") as pool:
        try:
            while True:
                while free and not exhausted and not runner.interrupted:
                    child = next_child()
                    if child is None:
                        exhausted = True
                        break
                    slot = free.pop(0)
                    running[pool.submit(run, child, slot)] = (child, slot)
                if not running:
                    return
                # a timeout, so that the main thread's signal handler (Ctrl-C) runs while it waits
                finished, _ = wait(running, timeout=runner.poll_seconds, return_when=FIRST_COMPLETED)
                for future in [f for f in running if f in finished]:  # in the order they started
                    child, slot = running.pop(future)
                    free.append(slot)
                    done(child, future.result())
        except BaseException:  # a second Ctrl-C, or a child's thread failed: stop every child now
            runner.interrupted = True
            runner.kill_running()
            raise


__all__ = ["ALONE", "Slot", "gpu_ids", "gpus_per_child", "run_children", "slots"]
