import sys
from pathlib import Path

# helpers shared by tests (crdcheck) are imported as top-level modules
sys.path.insert(0, str(Path(__file__).parent))


# ------------------------------------------------------------------------------ no processes left behind
import contextlib
import os
import signal
import time

import pytest

# Every process a test starts inherits this, so one that outlives its test is found even after its
# parent died and init adopted it (see data_fixtures.tagged_processes).
os.environ["LMFORGE_TEST_SESSION"] = str(os.getpid())


@pytest.fixture(autouse=True)
def _no_processes_left_behind(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """A Corpus job test fails if a process it started (a job, a datatrove worker, an extraction
    sandbox) is still alive a few seconds after it ended; the leftovers are killed. Limited to the data
    tests: elsewhere long-lived helpers (compile workers, servers kept for a module) are expected."""
    if not request.node.path.name.startswith("test_data"):
        yield
        return
    from data_fixtures import tagged_processes

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


# ------------------------------------------------------------------ a loopback S3 server (s3_fixtures)
from s3_fixtures import s3, s3_server  # noqa: E402,F401
