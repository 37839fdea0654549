"""Every AlignmentRun test runs offline, with one torch thread, without a metrics port, a termination log or
torchrun's variables."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(key, "1")
    monkeypatch.setenv("LMFORGE_METRICS_PORT", "off")
    monkeypatch.delenv("LMFORGE_TERMINATION_LOG", raising=False)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    torch.set_num_threads(1)
