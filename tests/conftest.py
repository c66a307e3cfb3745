"""Shared test setup: no CVGL_* settings leak in from the environment; no model hub."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """Each test starts in the embedded default with its own CVGL_HOME."""
    for name in list(os.environ):
        if name.startswith("CVGL_") and not name.startswith("CVGL_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CVGL_HOME", str(tmp_path / "cvgl-home"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: a second intra-op thread only spins, and makes each
    call several times slower. Modules that run torch use it with ``pytestmark``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
