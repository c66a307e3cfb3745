"""What a worker serves, for ``celery -A workers.app inspect gpu`` (and Flower).

A prefork worker answers control commands in its parent process, but the judge lives in the pool
child. So each child writes a small status file (judge loaded, model revision, judgments served,
GPU memory) into a folder named for the worker's main process, and the parent's ``gpu`` inspect
command reads the files of its children.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from celery.signals import worker_init, worker_shutdown
from celery.worker.control import inspect_command

from db.settings import settings

MAIN_PID_ENV = "CVGL_WORKER_MAIN_PID"
_lock = threading.Lock()
_served = 0


@worker_init.connect
def _remember_main_pid(**_kwargs: Any) -> None:
    """Runs in the main worker process before the pool forks; children inherit the variable."""
    os.environ[MAIN_PID_ENV] = str(os.getpid())


@worker_shutdown.connect
def _remove_status_dir(**_kwargs: Any) -> None:
    """A cleanly stopped worker leaves no folder behind (its children have exited by now)."""
    shutil.rmtree(status_dir(os.getpid()), ignore_errors=True)


def status_dir(main_pid: int | None = None) -> Path:
    pid = main_pid if main_pid is not None else (settings().worker_main_pid or os.getpid())
    return Path(tempfile.gettempdir()) / f"cvgl-worker-{pid}"


def gpu_memory() -> dict[str, Any] | None:
    """CUDA memory of this process, if torch is loaded and a GPU is visible (never imports torch)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    dev = torch.cuda.current_device()
    return {
        "device": torch.cuda.get_device_name(dev),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "allocated_mib": round(torch.cuda.memory_allocated(dev) / 2**20, 1),
        "reserved_mib": round(torch.cuda.memory_reserved(dev) / 2**20, 1),
        "max_allocated_mib": round(torch.cuda.max_memory_allocated(dev) / 2**20, 1),
    }


def record_served(n: int, judges: list[dict[str, str]]) -> None:
    """Count judgments this process stored and publish its status file (best effort)."""
    global _served
    with _lock:
        _served += n
        status = {"pid": os.getpid(), "judges": judges, "judgments_served": _served, "gpu": gpu_memory()}
    folder = status_dir()
    try:
        if not folder.exists() and settings().worker_main_pid is None:
            # No Celery worker around this process (the embedded runner): it owns the folder.
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{os.getpid()}.json.tmp"
        tmp.write_text(json.dumps(status))
        tmp.replace(folder / f"{os.getpid()}.json")
    except OSError:  # status is informational; never fail a task for it
        pass


def read_status(main_pid: int | None = None) -> list[dict[str, Any]]:
    out = []
    for f in sorted(status_dir(main_pid).glob("*.json")):
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return out


@inspect_command(name="gpu")
def gpu(state, **_kwargs: Any) -> dict[str, Any]:
    """Model and revision loaded, GPU memory in use and judgments served, per pool process."""
    processes = read_status(os.getpid())
    return {
        "node": state.consumer.hostname if state and state.consumer else None,
        "queues": sorted(q.name for q in state.consumer.task_consumer.queues)
        if state and state.consumer
        else [],
        "judgments_served": sum(p.get("judgments_served", 0) for p in processes),
        "processes": processes,
    }
