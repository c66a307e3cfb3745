"""The ``celery worker`` command lines of a judgment worker and of the coordinator.

``orchestrator worker`` / ``coordinator`` run them (``--dry-run`` prints them, and the docs copy
what it prints): queues and node names from the model and GPU, so Flower names each worker by
both. The child gets this process's settings, command-line overrides included, as ``CVGL_*``
variables.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import NoReturn

from db.settings import settings
from workers.app import is_embedded
from workers.queues import (
    COORDINATION_QUEUE,
    model_slug,
    queue_for,
    train_queue_for,
    vlm_shards,
    worker_queues,
)


class NeedsBroker(ValueError):
    """A separate worker process cannot reach the in-process broker of the embedded mode."""


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # set for the child on top of the environment

    def shell(self) -> str:
        """The command as one shell line (what ``--dry-run`` prints)."""
        prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in self.env.items())
        return prefix + shlex.join(self.argv)

    def exec(self) -> NoReturn:
        """Replace this process with the worker (a separate worker needs a real broker)."""
        if is_embedded():
            raise NeedsBroker(
                "set CVGL_BROKER_URL or --broker-url (and CVGL_DATABASE_URL or --database-url): "
                "a separate worker needs Redis"
            )
        env = {**os.environ, **settings().to_env(), **self.env}
        # This interpreter's celery: the environment may not be activated (no `celery` on PATH).
        argv = [sys.executable, "-m", *self.argv] if self.argv[0] == "celery" else self.argv
        os.execvpe(argv[0], argv, env)


def worker_argv(
    model: str,
    gpu: int | None,
    concurrency: int,
    queue: str | None,
    loglevel: str,
    shards: int = 1,
    shard: int | None = None,
) -> list[str]:
    """The ``celery worker`` command line for one model (and one GPU): queues and node name from the
    model; with several per-GPU queues, this GPU's own first (``workers.queues.worker_queues``)."""
    slug = model_slug(model)
    node = f"vlm-{slug}" + (f"-gpu{gpu}" if gpu is not None else "") + "@%h"
    home = shard if shard is not None else (gpu or 0)
    queues = ",".join(worker_queues(queue or queue_for(model), shards, home))
    return ["celery", "-A", "workers.app", "worker", "-Q", queues, "-P", "prefork",
            "-c", str(concurrency), "-n", node, "-E", "--loglevel", loglevel]  # fmt: skip


def judgment_worker(
    model: str,
    gpu: int | None = None,
    concurrency: int = 1,
    queue: str | None = None,
    shard: int | None = None,
    loglevel: str = "INFO",
) -> Launch:
    """A judgment worker for ``model``, on GPU ``gpu`` (CUDA_VISIBLE_DEVICES) when given."""
    argv = worker_argv(model, gpu, concurrency, queue, loglevel, vlm_shards(), shard)
    return Launch(argv, {"CUDA_VISIBLE_DEVICES": str(gpu)} if gpu is not None else {})


def training_worker(
    model: str, gpu: int | None = None, queue: str | None = None, loglevel: str = "INFO"
) -> Launch:
    """A training worker for fine-tunes of ``model`` (``train.<model>``), one job at a time, on GPU
    ``gpu`` when given. ``--max-tasks-per-child 1``: each job gets a fresh process, so nothing of
    one job's model stays in memory for the next."""
    node = f"train-{model_slug(model)}" + (f"-gpu{gpu}" if gpu is not None else "") + "@%h"
    argv = ["celery", "-A", "workers.app", "worker", "-Q", queue or train_queue_for(model), "-P", "prefork",
            "-c", "1", "--max-tasks-per-child", "1", "-n", node, "-E", "--loglevel", loglevel]  # fmt: skip
    return Launch(argv, {"CUDA_VISIBLE_DEVICES": str(gpu)} if gpu is not None else {})


def coordinator(concurrency: int = 1, loglevel: str = "INFO") -> Launch:
    """The coordination worker. One process runs its tasks itself (solo pool: prefork would hand
    each task to a child and lose the per-process replay cache between rounds)."""
    pool = ["-P", "solo"] if concurrency == 1 else ["-P", "prefork", "-c", str(concurrency)]
    return Launch(["celery", "-A", "orchestrator.tasks", "worker", "-Q", COORDINATION_QUEUE, *pool,
                   "-n", "coordinator@%h", "-E", "--loglevel", loglevel])  # fmt: skip
