"""Starting one job's processes, reading its logs and exit code, and stopping all of it.

A job is started through torchx's local scheduler (plain ``subprocess`` only when torchx is not
installed) with the argument list of :func:`command`. Each job process leads its own session, so its own
process group: a Ctrl-C in the terminal reaches only ``lmforge run``, which then stops the job on purpose
(:meth:`Launch.stop`: SIGTERM to the job's group — the job saves a checkpoint —, SIGKILL to whatever is
left after the grace period). The SIGKILL reaches the job's group and the groups of the processes below it
(torchrun starts each worker in a session of its own), so no worker outlives ``lmforge run``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge_jobs.kinds import KINDS
from lmforge_jobs.manifest import Resource
from lmforge_jobs.spec import EXIT_CONFIG_ERROR

EXIT_INTERRUPTED = 130
STOP_GRACE_SECONDS = 30.0
"""How long a stopped job may take to save its state before it is killed."""
KILL_WAIT_SECONDS = 10.0
"""How long a SIGKILLed process may take to die (it unwinds its memory first)."""
TORCHX_SCHEDULER = "local_cwd"
_TORCHX_SUBMIT = threading.Lock()
"""One torchx submission at a time: its dry run reads its scheduler's options with ``inspect.getsource``,
and CPython 3.11's AST constructor cannot run in two threads at once (``SystemError: AST constructor
recursion depth mismatch``, python/cpython#106905) — which trials launched side by side
(``lmforge run --parallel``) would do. A submission takes milliseconds; the jobs still run side by side."""


# ------------------------------------------------------------------------------------------------ devices
def local_gpus() -> int:
    """GPUs on this machine, without importing torch (CUDA_VISIBLE_DEVICES, else nvidia-smi)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


CPU_PROCESSES_PER_CORE = 4
"""A CPU mesh may start at most this many gloo processes per core (beyond it a step takes minutes)."""


class MeshRefused(Exception):
    """A mesh this machine cannot run on its CPUs; ``field`` is the spec field to change."""

    def __init__(self, field: str, message: str):
        super().__init__(f"spec.{field}: {message}")
        self.field = field
        self.message = message


def cpu_mesh(resource: Resource[Any, Any]) -> int | None:
    """Processes of the CPU mesh a PretrainRun asks for with gpusPerNode 0 (strategy fsdp and nodes ×
    gpusPerNode above one: each "node" is one gloo process here), None when it asks for none. Raises
    :class:`MeshRefused` for a mesh the CPU cannot run."""
    if resource.kind != "PretrainRun":
        return None
    spec = resource.spec
    par = spec.parallelism
    if par.gpus_per_node != 0 or par.strategy.value != "fsdp" or par.world_size <= 1:
        return None
    if spec.precision.value == "fp8":
        raise MeshRefused(
            "precision", "fp8 needs NVIDIA GPUs (torchao float8); a CPU mesh trains in fp32 or bf16"
        )
    if par.context_parallel > 1:
        raise MeshRefused(
            "parallelism.contextParallel",
            f"{par.context_parallel} needs CUDA GPUs: ring attention replaces the flash and memory-efficient "
            "attention kernels, which gloo processes on a CPU do not have; use 1 for a CPU mesh",
        )
    if par.async_tensor_parallel:
        raise MeshRefused(
            "parallelism.asyncTensorParallel",
            "true needs CUDA GPUs: its micro-pipelined collectives run on NCCL symmetric memory, which gloo "
            "processes on a CPU do not have; set it false for a CPU mesh",
        )
    cores = os.cpu_count() or 1
    if par.world_size > cores * CPU_PROCESSES_PER_CORE:
        raise MeshRefused(
            "parallelism.nodes",
            f"gpusPerNode 0 runs nodes × 1 = {par.world_size} gloo processes on this machine's {cores} CPU "
            f"cores, more than {CPU_PROCESSES_PER_CORE} per core; use a smaller mesh",
        )
    return int(par.world_size)


def processes_for(resource: Resource[Any, Any], gpus: int) -> int:
    """Local worker processes of a distributed job: one per local GPU the spec asks for, else one; with
    gpusPerNode 0, the CPU mesh's processes (:func:`cpu_mesh`)."""
    if not KINDS[resource.kind].distributed:
        return 1
    mesh = cpu_mesh(resource)
    if mesh is not None:
        return mesh  # the job refuses a batch its data-parallel ranks cannot split (batch.globalTokens)
    if gpus == 0:
        return 1
    wanted = resource.spec.parallelism.world_size if resource.spec.parallelism.gpus_per_node else 1
    processes = min(gpus, wanted)
    # the global batch must still split evenly over the processes
    if resource.kind == "PretrainRun":
        spec = resource.spec
        while processes > 1 and spec.batch.global_tokens % (
            spec.model.seq_len * spec.batch.micro_batch_size * processes
        ):
            processes -= 1
    return processes


def command(resource: Resource[Any, Any], manifest: Path, processes: int) -> list[str]:
    """The job's argument list (never a shell string)."""
    module = KINDS[resource.kind].module
    if KINDS[resource.kind].distributed:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes=1",
            f"--nproc-per-node={processes}",
            "-m",
            module,
            "--manifest",
            str(manifest),
        ]
    extra = ["--stage", "all"] if resource.kind == "Corpus" else []
    return [sys.executable, "-m", module, "--manifest", str(manifest), *extra]


# ---------------------------------------------------------------------------------------------- launching
class Launch:
    """One job's process tree. ``poll()`` returns the exit code once it ended; ``stop()`` ends all of it."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path):
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self._torchx_runner: Any = None
        self._torchx_handle: Any = None
        self._process: subprocess.Popen[bytes] | None = None
        self._groups: set[int] = set()
        try:
            from torchx import specs
            from torchx.runner import get_runner
        except ImportError:
            self._start_process(args, env)
            return
        role = specs.Role(
            name=name,
            image=os.getcwd(),
            entrypoint=args[0],
            args=args[1:],
            env=env,
            resource=specs.Resource(cpu=1, gpu=0, memMB=1024),
        )
        app = specs.AppDef(name=name, roles=[role])
        handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
        self._torchx_runner = get_runner()
        with _TORCHX_SUBMIT:
            self._torchx_handle = self._torchx_runner.run(
                app, scheduler=TORCHX_SCHEDULER, cfg={"log_dir": str(log_dir)}
            )
        # torchx installs its own SIGINT/SIGTERM handlers; Ctrl-C is ours to handle gracefully (it does so
        # only in the main thread: a trial launched from a thread of its own leaves them alone)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, handlers[0])
            signal.signal(signal.SIGTERM, handlers[1])
        self._groups = {process.pid for process in self._job_popens()}

    def _start_process(self, args: list[str], env: dict[str, str]) -> None:
        stdout = open(self.log_dir / "stdout.log", "ab")  # noqa: SIM115 - closed with the process
        stderr = open(self.log_dir / "stderr.log", "ab")  # noqa: SIM115
        self._process = subprocess.Popen(
            args, env={**os.environ, **env}, stdout=stdout, stderr=stderr, start_new_session=True
        )
        stdout.close()  # the child holds its own copies
        stderr.close()
        self._groups = {self._process.pid}

    # ------------------------------------------------------------------------------------------- state
    def poll(self) -> int | None:
        if self._process is not None:
            return self._process.poll()
        status = self._torchx_runner.status(self._torchx_handle)
        if status is None or not status.is_terminal():
            return None
        return 0 if status.state.name == "SUCCEEDED" else self._exit_code(status)

    def _exit_code(self, status: Any) -> int:
        """torchx reports FAILED without the code; the replica's error file or log names it."""
        for role_status in getattr(status, "roles", []) or []:
            for replica in getattr(role_status, "replicas", []) or []:
                code = getattr(replica, "exit_code", None)
                if isinstance(code, int) and code:
                    return code
        if "error: spec." in self.log_tail(50):
            return EXIT_CONFIG_ERROR
        return 1

    def _job_popens(self) -> list[Any]:
        """The processes this launch started itself (Popen objects); each leads its own session."""
        if self._process is not None:
            return [self._process]
        # torchx's cancel() sends SIGTERM to each replica's group but SIGKILL only to the replica
        # itself, which would leave torchrun's workers behind: stop() signals the groups itself
        from torchx.specs import parse_app_handle

        scheduler = self._torchx_runner._scheduler(TORCHX_SCHEDULER)
        app = scheduler._apps.get(parse_app_handle(self._torchx_handle).app_id)
        if app is None:
            return []
        return [replica.proc for replicas in app.role_replicas.values() for replica in replicas]

    def job_processes(self) -> list[int]:
        """The processes this launch started itself that have not exited (once reaped, their pid may
        be given to someone else's process)."""
        return [process.pid for process in self._job_popens() if process.poll() is None]

    def process_groups(self) -> set[int]:
        """The job's process groups: those of its own processes (recorded at the start), and those of the
        processes below them that lead groups of their own (torchrun starts each worker in a new
        session). Groups once seen are remembered: a worker whose parent exited is no longer found below
        the job."""
        for pid in descendants(self.job_processes()):
            with contextlib.suppress(OSError):
                self._groups.add(os.getpgid(pid))
        self._groups.discard(os.getpgid(0))  # never our own (a descendant cannot join it; be sure)
        return set(self._groups)

    def running(self) -> bool:
        """Whether any process of the job is left (the job's own processes, or anything they started)."""
        self.poll()  # reaps the job's own process once it exited
        return bool(live_groups(self.process_groups()))

    # -------------------------------------------------------------------------------------------- stop
    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM to the job's own process groups (the job saves a checkpoint; torchrun passes the signal
        on to its workers), then SIGKILL to every process of the job left after ``grace`` seconds."""
        self.process_groups()  # before the SIGTERM, while the workers are still found below the job
        for group in self.job_processes():
            _signal_group(group, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.kill()

    def kill(self) -> None:
        """SIGKILL to every process of the job that is left, now; returns once they are gone and the
        job's log files are closed."""
        groups = self.process_groups()
        for group in groups:
            _signal_group(group, signal.SIGKILL)
        deadline = time.monotonic() + KILL_WAIT_SECONDS
        while live_groups(groups) and time.monotonic() < deadline:
            time.sleep(0.02)
        if self._process is not None:
            self._process.wait()
        else:
            self._torchx_runner.cancel(self._torchx_handle)

    # -------------------------------------------------------------------------------------------- logs
    def log_files(self) -> list[Path]:
        return sorted(p for p in self.log_dir.rglob("*.log") if p.is_file())

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the job wrote (torchx's combined log, else stderr)."""
        files = self.log_files()
        chosen = [p for p in files if p.name == "combined.log"] or [
            p for p in files if p.name == "stderr.log"
        ]
        tail: list[str] = []
        for path in chosen:
            with contextlib.suppress(OSError):
                tail.extend(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        return "\n".join(tail[-lines:])


@dataclass(frozen=True)
class ProcessEntry:
    pid: int
    parent: int
    group: int
    zombie: bool


def process_table() -> list[ProcessEntry] | None:
    """Every process of this machine, from /proc; None where there is no /proc."""
    entries = []
    try:
        listing = list(Path("/proc").iterdir())
    except OSError:
        return None
    for entry in listing:
        if not entry.name.isdigit():
            continue
        try:
            # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses
            state, parent, group = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        entries.append(ProcessEntry(int(entry.name), int(parent), int(group), state in ("Z", "X")))
    return entries


def descendants(roots: list[int]) -> set[int]:
    """Every process below ``roots`` (none where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for entry in process_table() or []:
        children.setdefault(entry.parent, []).append(entry.pid)
    found: set[int] = set()
    pending = list(roots)
    while pending:
        for child in children.get(pending.pop(), []):
            if child not in found:
                found.add(child)
                pending.append(child)
    return found


def live_groups(groups: set[int]) -> set[int]:
    """Those of ``groups`` with a process that still runs. A zombie does not count: it is dead, only not
    reaped yet (by its parent, or by init — which in a container may never do it)."""
    table = process_table()
    if table is None:
        return {group for group in groups if _signal_group(group, 0)}
    return {entry.group for entry in table if not entry.zombie} & groups


def _signal_group(group: int, signum: int) -> bool:
    """Send ``signum`` to a process group (0: only check it); False when no process of it is left."""
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        return False
    except PermissionError:  # the group's id now belongs to someone else's processes
        return False
    return True
