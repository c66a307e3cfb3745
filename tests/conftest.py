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
