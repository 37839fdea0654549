"""Every test in this folder (the Corpus job) must leave no process behind."""

import contextlib
import functools
import importlib.metadata
import os
import signal
import sys
import time

import pytest
from data_fixtures import tagged_processes
from datatrove.utils import _import_utils
from loguru import _better_exceptions


@functools.cache
def _distribution_names() -> frozenset[str]:
    return frozenset(
        name.lower() for dist in importlib.metadata.distributions() if (name := dist.metadata.get("Name"))
    )


# datatrove checks each block's pip dependencies by reading the metadata of every installed distribution,
# once per name (~0.15 s a scan); the jobs these tests run in this process need a dozen names. One scan
# for the session gives the same answers (True, or None when missing).
_import_utils._is_distribution_available = functools.cache(
    lambda distribution_name: True if distribution_name in _distribution_names() else None
)

_get_lib_dirs = _better_exceptions.ExceptionFormatter._get_lib_dirs


@functools.cache
def _lib_dirs(path: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(_get_lib_dirs())


# datatrove adds loguru sinks for every rank of every stage (three a rank), and each new sink works out the
# interpreter's library folders from sysconfig (~10 ms); the answer changes only with sys.path.
_better_exceptions.ExceptionFormatter._get_lib_dirs = staticmethod(lambda: list(_lib_dirs(tuple(sys.path))))


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
