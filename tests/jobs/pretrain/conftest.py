"""Every PretrainRun test computes with one torch thread: the models are tiny, and two threads per test
process oversubscribe the cores as soon as tests run in parallel (pytest -n 2), which makes a step many
times slower (the jobs a test starts as processes get OMP_NUM_THREADS=1 from job_env)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread() -> None:
    torch.set_num_threads(1)
