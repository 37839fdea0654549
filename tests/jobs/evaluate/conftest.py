"""Every Evaluation job test runs offline, with one torch thread, no metrics port, and none of the
variables a launcher or a Secret would set.

Two costs of running the job inside the test process are taken out, neither of which the tests check:

- the job frees each model with ``gc.collect()``, which walks every object the process holds (pytest,
  torch, transformers, lm-eval: a quarter of a second a call, several calls a run). What existed before
  the test is frozen for its duration (``gc.freeze``), so a collection walks what the test made, the job's
  models included;
- lm-eval adds torch's environment report to its results, which runs ``pip list`` and other programs
  (half a second a benchmark); the job keeps only the scores, so the report is a fixed string here.
"""

import gc
import time
from collections.abc import Iterator

import pytest
import torch
import torch.utils.collect_env


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMFORGE_METRICS_PORT", "off")
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(key, "1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LMFORGE_TERMINATION_LOG", "LMFORGE_SECRET_JUDGE_KEY"):
        monkeypatch.delenv(key, raising=False)
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_environment_report(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.utils.collect_env, "get_pretty_env_info", lambda: "(not collected in tests)")


@pytest.fixture(autouse=True)
def _collect_only_what_the_test_made() -> Iterator[None]:
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class PollClock:
    """The Evaluation job's clock while it follows checkpoints: a poll's sleep advances it at once (and
    yields the CPU for a moment), so the job waits ``checkpointPollSeconds`` and gives up after
    ``checkpointTimeoutSeconds`` without the test waiting as long; ``polls`` counts the job's looks."""

    def __init__(self) -> None:
        self.polls = 0
        self.skipped = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.skipped

    def sleep(self, seconds: float) -> None:
        self.skipped += seconds
        self.polls += 1
        time.sleep(0.01)

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


@pytest.fixture
def poll_clock(monkeypatch: pytest.MonkeyPatch) -> PollClock:
    from lmforge_jobs.evaluate import job

    clock = PollClock()
    monkeypatch.setattr(job, "time", clock)
    return clock
