"""A Corpus job that is killed or interrupted takes its worker processes (datatrove's pool and its
Manager, the extraction sandboxes) with it: none is left running, adopted by init."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from data_fixtures import ROOT, SESSION_VARIABLE, WARC, job_env, tagged_processes, write_manifest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc; PR_SET_PDEATHSIG is Linux's")


# every rank of the extract stage, run locally: two pool workers with an extraction sandbox each
STAGE = ("--stage", "extract", "--rank", "all")


# SIGTERM (what Kubernetes sends) in the default suite, the other two in the slow one.
@pytest.mark.parametrize(
    "signum",
    [
        pytest.param(signal.SIGKILL, marks=pytest.mark.slow),
        signal.SIGTERM,
        pytest.param(signal.SIGINT, marks=pytest.mark.slow),
    ],
    ids=lambda s: s.name,
)
def test_a_stopped_job_leaves_no_worker_behind(signum: signal.Signals, tmp_path: Path) -> None:
    out = tmp_path / "out"
    web = tmp_path / "web"  # two archives per rank: work enough to be caught with every worker running
    web.mkdir()
    for i in range(4):
        (web / f"{i}.warc.gz").write_bytes(WARC.read_bytes())
    spec = {
        "sources": [{"warc": {"paths": [str(web)]}}],
        "extract": {"method": "trafilatura", "timeoutSeconds": 60},
        "tokenizer": {"train": {"vocabSize": 300}},
        "parallelism": {"tasks": 2, "workers": 2},
    }
    manifest = write_manifest(tmp_path / "c.yaml", out, spec)
    tag = uuid.uuid4().hex  # this job's processes, and only them, carry it
    log = (tmp_path / "job.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge_jobs.data", "--manifest", str(manifest), *STAGE],
        env={**job_env(), SESSION_VARIABLE: tag},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        # the job, datatrove's Manager, two pool workers and their extraction sandboxes
        deadline = time.monotonic() + 120
        while len(tagged_processes(tag)) < 6 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = tagged_processes(tag)
        assert proc.poll() is None, "the stage finished before it could be stopped"
        assert len(workers) >= 6, (workers, (tmp_path / "job.log").read_text()[-2000:])
        proc.send_signal(signum)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 5
        while tagged_processes(tag) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tagged_processes(tag) == {}
        assert not (out / "logs" / "extract" / "completions").exists()
    finally:
        for pid in [proc.pid, *tagged_processes(tag)]:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        log.close()
