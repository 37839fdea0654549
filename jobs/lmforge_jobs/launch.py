"""torchrun for a job pod, with the two things plain torchrun gets wrong there.

    python -m lmforge_jobs.launch [torchrun options] -m lmforge_jobs.pretrain --manifest FILE

The arguments are torchrun's own (``python -m torch.distributed.run``); the launcher adds nothing to them.

* **A configuration error stays exit 64.** torchrun restarts a failed worker up to ``--max-restarts`` times
  and then exits 1, whatever the worker's code was, so the Job's podFailurePolicy rule for exit 64 (fail the
  Job at once, see ``lmforge_operator.builders``) never matched and a bad spec was retried
  backoffLimit × restarts times. Each worker that ends with a configuration error records it in the
  directory named by ``LMFORGE_EXIT_DIR`` (:func:`record_exit`, called by ``lmforge_jobs.entry``); the
  launcher watches it, stops torchrun at the first record (no restarts), and exits 64 itself.
* **SIGTERM gets the pod's grace period.** The launcher is the container's first process: it forwards
  SIGTERM/SIGINT/SIGHUP to torchrun, which forwards it to the workers and waits ``--shutdown-timeout``
  seconds (the operator sets it from ``terminationGracePeriodSeconds``; torchrun's default is 30 s, too
  short for a large checkpoint) before SIGKILL. A first process without handlers would ignore SIGTERM.
* **A stop is never success.** Workers stopped by a signal save a checkpoint and exit 143
  (``EXIT_STOPPED``); torchrun itself ends with 1 or 0 whatever they did. The launcher exits 143 when it
  forwarded a stop signal or a worker recorded one (and torchrun did not finish cleanly), so the Job's
  podFailurePolicy replaces the pod without counting it and the run resumes from the checkpoint.

Any other outcome is torchrun's exit code, unchanged.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmforge_jobs.spec import EXIT_CONFIG_ERROR, EXIT_STOPPED

EXIT_DIR_ENV = "LMFORGE_EXIT_DIR"
POLL_SECONDS = 0.2
STOP_SECONDS = 30.0
"""How long torchrun may take to stop its workers after a configuration error before it is killed."""
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StopFlag:
    """Set by SIGTERM/SIGINT while a worker trains (a ``with`` block installs the handlers and restores the
    previous ones): the training loop checks it after each step, agreed across ranks, saves a checkpoint
    and exits 143 (``EXIT_STOPPED``)."""

    def __init__(self) -> None:
        self.set = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        self.set = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def record_exit(code: int) -> None:
    """Record this worker's exit code where the launcher looks (no-op outside the launcher)."""
    folder = os.environ.get(EXIT_DIR_ENV)
    if not folder:
        return
    rank = os.environ.get("RANK", "0")
    path = Path(folder) / f"rank-{rank}"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_text(str(code), encoding="utf-8")
        os.replace(tmp, path)  # the launcher never reads a half-written record
    except OSError:
        pass  # the exit code itself still tells torchrun the worker failed


def recorded_exits(folder: Path) -> dict[str, int]:
    """Rank → exit code of every complete record in ``folder``."""
    found = {}
    for path in sorted(folder.glob("rank-*")):
        if path.suffix == ".tmp":
            continue
        try:
            found[path.name.removeprefix("rank-")] = int(path.read_text(encoding="utf-8").strip())
        except (OSError, ValueError):
            continue
    return found


def recorded_config_error(folder: Path) -> str | None:
    """The first rank that recorded a configuration error, if any."""
    return next((rank for rank, code in recorded_exits(folder).items() if code == EXIT_CONFIG_ERROR), None)


def final_code(torchrun_code: int, recorded: dict[str, int], signalled: bool) -> int:
    """The pod's exit code once torchrun has ended."""
    if EXIT_CONFIG_ERROR in recorded.values():
        return EXIT_CONFIG_ERROR
    if torchrun_code == 0:
        return 0
    if signalled or EXIT_STOPPED in recorded.values():
        return EXIT_STOPPED
    return 128 - torchrun_code if torchrun_code < 0 else torchrun_code  # killed by a signal: shell's code


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    folder = Path(tempfile.mkdtemp(prefix="lmforge-exit-"))
    env = {**os.environ, EXIT_DIR_ENV: str(folder)}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], env=env)

    signalled = False

    def forward(signum: int, frame: object) -> None:
        nonlocal signalled
        signalled = True
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        while proc.poll() is None:
            rank = recorded_config_error(folder)
            if rank is not None:
                print(
                    f"lmforge launch: rank {rank} ended with a configuration error (exit "
                    f"{EXIT_CONFIG_ERROR}); stopping torchrun instead of restarting it",
                    file=sys.stderr,
                    flush=True,
                )
                _stop(proc, STOP_SECONDS)
                return EXIT_CONFIG_ERROR
            time.sleep(POLL_SECONDS)
        return final_code(proc.returncode, recorded_exits(folder), signalled)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
