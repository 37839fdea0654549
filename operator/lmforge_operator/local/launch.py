"""Starting one job's processes, reading its logs and exit code, and stopping it.

A job is started through torchx's local scheduler (plain ``subprocess`` only when torchx is not
installed) with the argument list of :func:`command`; :meth:`Launch.stop` ends it gracefully (the job
saves a checkpoint).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from lmforge_jobs.manifest import Resource
from lmforge_jobs.spec import EXIT_CONFIG_ERROR

MODULES = {
    "Corpus": "lmforge_jobs.data",
    "PretrainRun": "lmforge_jobs.pretrain",
    "AlignmentRun": "lmforge_jobs.align",
    "Evaluation": "lmforge_jobs.evaluate",
}
"""The job entry point of each kind, in the order ``lmforge status`` lists the kinds."""
DISTRIBUTED = ("PretrainRun", "AlignmentRun")  # launched under torchrun
EXIT_INTERRUPTED = 130
STOP_GRACE_SECONDS = 30.0
"""How long a stopped job may take to save its state before it is killed."""
TORCHX_SCHEDULER = "local_cwd"


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


def processes_for(resource: Resource[Any, Any], gpus: int) -> int:
    """Local worker processes of a distributed job: one per local GPU the spec asks for, else one."""
    if resource.kind not in DISTRIBUTED or gpus == 0:
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
    module = MODULES[resource.kind]
    if resource.kind in DISTRIBUTED:
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
    """One job's process tree. ``poll()`` returns the exit code once it ended."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path):
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self._torchx_runner: Any = None
        self._torchx_handle: Any = None
        self._process: subprocess.Popen[bytes] | None = None
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
        self._torchx_handle = self._torchx_runner.run(
            app, scheduler=TORCHX_SCHEDULER, cfg={"log_dir": str(log_dir)}
        )
        # torchx installs its own SIGINT/SIGTERM handlers; Ctrl-C is ours to handle gracefully
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])

    def _start_process(self, args: list[str], env: dict[str, str]) -> None:
        stdout = open(self.log_dir / "stdout.log", "ab")  # noqa: SIM115 - closed with the process
        stderr = open(self.log_dir / "stderr.log", "ab")  # noqa: SIM115
        self._process = subprocess.Popen(
            args, env={**os.environ, **env}, stdout=stdout, stderr=stderr, start_new_session=True
        )
        stdout.close()  # the child holds its own copies
        stderr.close()

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

    # -------------------------------------------------------------------------------------------- stop
    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM to the job (it saves a checkpoint), SIGKILL after ``grace`` seconds."""
        if self._process is not None:
            with contextlib.suppress(OSError):
                os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(self._process.pid, signal.SIGKILL)
            return
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
