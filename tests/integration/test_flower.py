"""Flower (basic auth) sees the judgment and training workers and their tasks; `inspect gpu`
reports what the judgment worker serves."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.integration.conftest import REPO, cli
from tests.services import free_port, wait_for_port
from tests.tiny_vlms import tiny_checkpoint
from workers.queues import train_queue_for

pytestmark = pytest.mark.integration
AUTH = "admin:s3cret"


def get(url: str, auth: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_flower_lists_the_worker_and_counts_its_tasks(stack_env, dataset, workers, tmp_path, tmp_path_factory):
    port = free_port()
    log = (tmp_path / "flower.log").open("wb")
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers.app", "flower", "--address=127.0.0.1", f"--port={port}",
         f"--basic-auth={AUTH}"],
        env=stack_env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, timeout=60)
        node = f"vlm-simulated-gpu0@{socket.gethostname()}"
        workers(["vlm.simulated"], "vlm-simulated-gpu0", app="workers.app")
        workers(["coordination"], "coordinator")
        cli(stack_env, "ingest", str(dataset))
        cli(stack_env, "import-candidates", str(dataset / "candidates.csv"), "--name", "s4g")
        cli(stack_env, "submit", "--queries", "5", "--k", "8", "--wait")
        # A fine-tune is a task like the others: Flower counts it on its training worker.
        tiny = str(tiny_checkpoint("llava", tmp_path_factory.getbasetemp() / "tiny-vlms"))
        trainer = f"train-tiny-llava@{socket.gethostname()}"
        workers([train_queue_for(tiny)], "train-tiny-llava", app="workers.app")
        cli(stack_env, "finetune", "--model", tiny, "--candidates", "s4g", "--name", "lora", "--steps", "2",
            "--negatives", "1", "--wait")  # fmt: skip

        base = f"http://127.0.0.1:{port}"
        assert get(base + "/healthcheck")[0] == 200
        assert get(base + "/api/workers")[0] == 401  # the API needs the password
        assert get(base + "/api/workers", "admin:wrong")[0] == 401
        deadline = time.monotonic() + 30
        while True:
            status, body = get(base + "/api/workers?refresh=1", AUTH)
            metrics = get(base + "/metrics")[1]
            listed = status == 200 and node in json.loads(body)
            counted = 'task="cvgl.judge_pairwise"' in metrics and f'worker="{node}"' in metrics
            counted = counted and f'task="cvgl.train",type="task-succeeded",worker="{trainer}"' in metrics
            if listed and counted or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert listed, body[:500]
        assert counted, [m for m in metrics.splitlines() if "flower_events_total" in m][:10]

        out = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "workers.app", "inspect", "gpu", "-d", node, "--json"],
            env=stack_env, cwd=REPO, capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 0, out.stderr
        reply = json.loads(out.stdout)[node]
        assert reply["queues"] == ["vlm.simulated"]
        assert reply["judgments_served"] > 0
        (proc,) = reply["processes"]
        assert proc["judges"][0]["model"] == "simulated" and proc["judges"][0]["revision"] == "simulated-v1"
        assert proc["gpu"] is None  # no GPU here
    finally:
        flower.terminate()
        flower.wait(timeout=20)
        log.close()
