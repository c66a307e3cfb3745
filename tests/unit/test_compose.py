"""docker-compose.yml: valid, no baked-in passwords, loopback-only ports, GPU reservations."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SECRETS = {"POSTGRES_PASSWORD": "pg-secret", "REDIS_PASSWORD": "redis-secret", "FLOWER_BASIC_AUTH": "admin:x",
           "CVGL_DATA": "/data/VIGOR"}


def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_config_validates_with_secrets_and_refuses_without():
    cmd = compose_command()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    ok = subprocess.run([*cmd, "config", "-q"], cwd=REPO, env={**env, **SECRETS}, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    missing = subprocess.run([*cmd, "config", "-q"], cwd=REPO, env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "Variable not set" in missing.stderr + missing.stdout


def test_services_and_safe_defaults(compose):
    services = compose["services"]
    assert {"postgres", "redis", "migrate", "coordinator", "flower", "worker-llava", "worker-qwen"} <= set(services)
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    text = (REPO / "docker-compose.yml").read_text()
    for var in ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "FLOWER_BASIC_AUTH"):
        assert f"${{{var}:?" in text, f"{var} must be required, with no default"
    assert "--requirepass" in services["redis"]["command"]
    for gpu_worker in ("worker-llava", "worker-qwen"):
        svc = services[gpu_worker]
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"]
        queue = svc["command"][svc["command"].index("-Q") + 1]
        assert queue.startswith("vlm.")
        assert svc["command"][svc["command"].index("-c") + 1] == "1"
    assert all("healthcheck" in services[s] for s in ("postgres", "redis", "flower"))
    # The training worker: its own profile and GPU, one job per child, the adapters volume shared
    # (read-only) with the judgment workers that load what it writes.
    trainer = services["worker-train-llava"]
    assert trainer["profiles"] == ["train"]
    assert trainer["command"][trainer["command"].index("-Q") + 1] == "train.llava-1.5-7b-hf"
    assert trainer["command"][trainer["command"].index("--max-tasks-per-child") + 1] == "1"
    assert trainer["environment"]["CVGL_ADAPTERS_DIR"] == "/adapters"
    gpus = {s: services[s]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"][0]
            for s in ("worker-llava", "worker-qwen", "worker-train-llava")}  # fmt: skip
    assert len(set(gpus.values())) == 3
    for name in ("worker-train-llava", "worker-llava", "worker-qwen"):
        mounts = [m for m in services[name]["volumes"] if _mount_target(m) == "/adapters"]
        assert len(mounts) == 1, name
        assert _read_only(mounts[0]) == (name != "worker-train-llava"), name


def _mount_target(mount) -> str:
    return mount["target"] if isinstance(mount, dict) else str(mount).split(":")[1]


def _read_only(mount) -> bool:
    return bool(mount.get("read_only")) if isinstance(mount, dict) else str(mount).endswith(":ro")
