"""The job pods' torchrun launcher (`python -m lmforge_jobs.launch`), run for real on CPU.

* A worker's configuration error (exit 64) must end the launcher with 64 at once — plain torchrun restarts
  the worker and exits 1, which the Job's podFailurePolicy rule for 64 never matches.
* SIGTERM to the launcher (the container's first process) must reach the workers and let them finish
  within torchrun's ``--shutdown-timeout``, which the operator sets from the pod's grace period.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from data_fixtures import job_env, tagged_processes
from manifests import tiny_pretrain, write_manifest

from lmforge_jobs.launch import EXIT_DIR_ENV, final_code, record_exit, recorded_config_error, recorded_exits
from lmforge_jobs.spec import EXIT_CONFIG_ERROR, EXIT_STOPPED


def _bad_pretrain(tmp: Path) -> Path:
    """A valid PretrainRun whose token shards do not exist: the job finds out at run time (exit 64)."""
    data = {"tokens": str(tmp / "missing"), "tokenizer": str(tmp / "missing-tokenizer")}
    spec = tiny_pretrain(data, tmp / "out", budget={"steps": 2}, parallelism={"strategy": "ddp"})
    return write_manifest(tmp / "bad.yaml", "PretrainRun", "bad", spec)


TORCHRUN = ["--standalone", "--nnodes=1", "--nproc-per-node=2", "--max-restarts=2", "--monitor-interval=0.2"]


COUNTING_JOB = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path

    # one file per start of a worker: torchrun numbers its restarts
    Path(sys.argv[1], f"start-{os.environ['TORCHELASTIC_RESTART_COUNT']}-{os.environ['RANK']}").touch()
    from lmforge_jobs.pretrain.__main__ import main

    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.mark.slow
def test_config_error_under_torchrun_exits_64_without_restarts(tmp_path: Path) -> None:
    manifest = _bad_pretrain(tmp_path)
    script = tmp_path / "job.py"
    script.write_text(COUNTING_JOB, encoding="utf-8")

    def run(*launcher: str) -> tuple[int | None, str, set[int]]:
        """Exit code (None: still running after 180 s, then killed with its workers), stderr, and the
        torchrun restart counts the workers started under."""
        starts = tmp_path / launcher[-1]
        starts.mkdir()
        argv = [
            sys.executable,
            "-m",
            *launcher,
            *TORCHRUN,
            str(script),
            str(starts),
            "--manifest",
            str(manifest),
        ]
        proc = subprocess.Popen(
            argv, env=job_env(EXIT_DIR_ENV), stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        try:
            _, err = proc.communicate(timeout=180)
            code: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun
            # its workers run in sessions of their own and hold the stderr pipe: kill them too, or
            # communicate() waits for them forever
            for pid, cmdline in tagged_processes(os.environ["LMFORGE_TEST_SESSION"]).items():
                if str(script) in cmdline:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            _, err = proc.communicate()
            code = None
        return code, err, {int(p.name.split("-")[1]) for p in starts.iterdir()}

    code, err, attempts = run("lmforge_jobs.launch")
    assert code == 64, err[-3000:]
    assert "error: spec.data.tokens" in err
    assert "configuration error" in err
    # stopped at the first record: at most one restart raced the launcher, never all of them
    assert attempts in ({0}, {0, 1}), attempts

    # what the launcher is for: torchrun alone restarts the workers (--max-restarts) and, once it gives up,
    # ends with 1. (On a loaded machine torchrun's re-rendezvous sometimes stalls; the restart is the point.)
    code, err, attempts = run("torch.distributed.run")
    assert {0, 1} <= attempts, attempts
    assert code in (1, None), err[-3000:]


def test_exit_records_are_atomic_and_only_64_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EXIT_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "3")
    assert recorded_config_error(tmp_path) is None
    (tmp_path / "rank-1.99.tmp").write_text("64")  # a record still being written is not read
    (tmp_path / "rank-2").write_text("1")
    assert recorded_config_error(tmp_path) is None
    record_exit(64)
    assert recorded_config_error(tmp_path) == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank-1.99.tmp", "rank-2", "rank-3"]
    assert recorded_exits(tmp_path) == {"2": 1, "3": 64}
    monkeypatch.delenv(EXIT_DIR_ENV)
    record_exit(64)  # outside the launcher: nothing written, no error


SLOW_SAVER = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path

    out = Path(sys.argv[1])
    save_seconds = float(sys.argv[2])

    def on_term(signum, frame):
        time.sleep(save_seconds)  # a large final checkpoint
        (out / f"saved-{os.environ['RANK']}").write_text("ok")
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    (out / f"ready-{os.environ['RANK']}").write_text("ok")
    while True:
        time.sleep(0.1)
    """
)


def _terminate_during_save(tmp: Path, save_seconds: float, shutdown_timeout: int) -> tuple[int, bool]:
    script = tmp / "saver.py"
    script.write_text(SLOW_SAVER, encoding="utf-8")
    out = tmp / f"out-{save_seconds}-{shutdown_timeout}"
    out.mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lmforge_jobs.launch",
            "--standalone",
            "--nnodes=1",
            "--nproc-per-node=1",
            "--monitor-interval=0.2",
            f"--shutdown-timeout={shutdown_timeout}",
            str(script),
            str(out),
            str(save_seconds),
        ],
        env=job_env(EXIT_DIR_ENV),
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "ready-0").exists():
            assert proc.poll() is None, "the worker did not start"
            assert time.monotonic() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # what the kubelet sends the container's first process
        code = proc.wait(timeout=save_seconds + shutdown_timeout + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return code, (out / "saved-0").exists()


@pytest.mark.slow
def test_sigterm_reaches_the_workers_and_waits_the_shutdown_timeout(tmp_path: Path) -> None:
    code, saved = _terminate_during_save(tmp_path, save_seconds=3, shutdown_timeout=15)
    assert saved, "the worker was killed before its save finished"
    assert code == EXIT_STOPPED  # stopped is not finished, whatever torchrun's own code was
    _, saved = _terminate_during_save(tmp_path, save_seconds=6, shutdown_timeout=1)
    assert not saved, "torchrun should have killed the worker after --shutdown-timeout"


@pytest.mark.slow
def test_a_save_longer_than_torchruns_default_30s_finishes(tmp_path: Path) -> None:
    from lmforge_operator.builders import shutdown_timeout

    _, saved = _terminate_during_save(
        tmp_path, save_seconds=35, shutdown_timeout=shutdown_timeout("PretrainRun")
    )
    assert saved


def test_final_code_never_reports_a_stop_as_success() -> None:
    assert final_code(0, {}, signalled=False) == 0
    assert final_code(0, {"0": 0}, signalled=True) == 0  # finished before the signal landed
    assert final_code(1, {}, signalled=True) == EXIT_STOPPED
    assert final_code(1, {"1": EXIT_STOPPED}, signalled=False) == EXIT_STOPPED  # a peer's rank was stopped
    assert final_code(1, {"0": EXIT_STOPPED, "1": EXIT_CONFIG_ERROR}, signalled=True) == EXIT_CONFIG_ERROR
    assert final_code(1, {}, signalled=False) == 1
    assert final_code(-9, {}, signalled=False) == 137


@pytest.mark.slow
def test_pretrain_stopped_under_the_launcher_exits_143_and_resumes(tmp_path: Path) -> None:
    """The preemption path end to end on one node: SIGTERM to the launcher → every rank saves and stops →
    the pod's code is 143 (the Job replaces the pod) → a new launcher resumes from that checkpoint."""
    from lmforge_jobs.pretrain import checkpoint as ckpt
    from lmforge_jobs.pretrain.testing import make_token_data

    data = make_token_data(tmp_path / "data", vocab_size=320, documents=200, held_out=30)
    spec = tiny_pretrain(
        data,
        tmp_path / "run",
        budget={"steps": 100000},
        optimizer={"warmupSteps": 1},
        batch={"globalTokens": 512},
        parallelism={"strategy": "ddp"},
        checkpoint={"everySteps": 100000},
        eval={"everySteps": 100000, "batches": 1},
    )
    manifest = write_manifest(tmp_path / "p.yaml", "PretrainRun", "p", spec)
    argv = [sys.executable, "-m", "lmforge_jobs.launch", "--standalone", "--nnodes=1", "--nproc-per-node=2"]
    argv += ["--monitor-interval=0.2", "-m", "lmforge_jobs.pretrain", "--manifest", str(manifest)]
    metrics = tmp_path / "run" / "metrics.jsonl"
    proc = subprocess.Popen(argv, env=job_env(EXIT_DIR_ENV))
    try:
        deadline = time.monotonic() + 240
        while not (metrics.exists() and metrics.read_text().count('"loss"') >= 2):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == EXIT_STOPPED
    finally:
        if proc.poll() is None:
            proc.kill()
    steps = [s for s, _ in ckpt.list_complete(str(tmp_path / "run" / "checkpoints"))]
    assert len(steps) == 1 and steps[0] >= 2
    assert not (tmp_path / "run" / "outputs.json").exists()
