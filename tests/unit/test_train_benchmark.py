"""The training-step benchmark of the GPU bundle (benchmarks/gpu/train_step.py) on its CPU smoke
path: tiny LLaVA, small images, a few steps per batch size, the figures the issue asks for in its
JSON; and a batch size that runs out of GPU memory is recorded and stops the larger ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
GPU = REPO / "benchmarks" / "gpu"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def train_step():
    if str(GPU) not in sys.path:
        sys.path.insert(0, str(GPU))
    import train_step

    return train_step


def test_the_smoke_path_writes_examples_per_second_and_peak_memory_per_batch_size(tmp_path):
    out = tmp_path / "train.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(GPU / "train_step.py"), "--cpu-smoke", "--threads", "1", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert results["mode"] == "cpu-smoke" and "errors" not in results
    train = results["train"]
    assert train["shapes"] == "tiny" and train["lora_r"] == 16 and train["trainable_params"] > 0
    assert train["image_sizes"] == {"panorama": [64, 32], "tile": [32, 32]}
    assert [e["batch_size"] for e in train["sizes"]] == [1, 4, 8]
    for entry in train["sizes"]:
        assert entry["examples_per_second"] > 0
        assert entry["peak_memory_gib"] > 0 and entry["peak_memory_kind"]
        assert len(entry["step_s"]) == train["timed_steps"] == 2
        assert entry["epoch_hours"] == pytest.approx(20_000 / entry["examples_per_second"] / 3600)
        assert entry["loss_finite"]
    assert train["best_examples_per_second"] == max(e["examples_per_second"] for e in train["sizes"])
    assert proc.stdout.splitlines()[-1].startswith("train: LoRA r=16 tiny float32")


def test_a_batch_size_out_of_memory_is_recorded_and_stops_the_larger_ones(train_step, tmp_path, monkeypatch):
    import micro

    real_step = train_step.train_step

    def step(judge, optimizer, params, batch, config):
        if len(batch) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_step(judge, optimizer, params, batch, config)

    monkeypatch.setattr(train_step, "train_step", step)
    images = micro.write_images(tmp_path, 1, 4, "small", 0)
    saved = []
    got = train_step.bench_train(
        "tiny", "cpu", images, batch_sizes=[1, 2, 3], warmup=0, steps=1, seed=0, log=lambda _: None,
        save=lambda: saved.append(1),
    )  # fmt: skip
    assert [e["batch_size"] for e in got["sizes"]] == [1, 2]
    assert got["sizes"][1]["out_of_memory"] and "out of memory" in got["sizes"][1]["error"]
    assert got["best_batch_size"] == 1 and got["examples"] == 6  # 3 other tiles, both orders
    assert len(saved) == 3  # built, then after each size
