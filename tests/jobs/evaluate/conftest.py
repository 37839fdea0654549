"""Every Evaluation job test runs offline, with one torch thread, no metrics port, and none of the
variables a launcher or a Secret would set."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMFORGE_METRICS_PORT", "off")
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(key, "1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LMFORGE_TERMINATION_LOG", "LMFORGE_SECRET_JUDGE_KEY"):
        monkeypatch.delenv(key, raising=False)
    torch.set_num_threads(1)
