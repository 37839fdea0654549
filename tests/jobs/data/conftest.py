"""Every test in this folder (the Corpus job) must leave no process behind."""

import contextlib
import os
import signal
import time

import pytest
from data_fixtures import tagged_processes


@pytest.fixture(autouse=True)
def _no_processes_left_behind():  # type: ignore[no-untyped-def]
    """A Corpus job test fails if a process it started (a job, a datatrove worker, an extraction
    sandbox) is still alive a few seconds after it ended; the leftovers are killed. Limited to the data
    tests (this folder): elsewhere long-lived helpers (compile workers, servers kept for a module) are
    expected."""
    tag = os.environ["LMFORGE_TEST_SESSION"]
    before = tagged_processes(tag)
    yield
    deadline = time.monotonic() + 5
    while (left := {p: c for p, c in tagged_processes(tag).items() if p not in before}) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    if left:
        pytest.fail(
            f"{len(left)} process(es) outlived the test: "
            + "; ".join(f"{pid} {cmd[:120]}" for pid, cmd in sorted(left.items())),
            pytrace=False,
        )
