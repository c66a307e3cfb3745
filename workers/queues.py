"""Queue names: one queue per judge model (or several, one per GPU), one for retrieval, one for coordination.

With ``CVGL_VLM_SHARDS`` = N > 1 a model has N queues, ``vlm.<model>.0`` .. ``vlm.<model>.<N-1>``,
one per GPU worker, and each query's judgments always go to the same one (a hash of the query):
the worker that judged a query's last round holds its prefixes in its cache. A worker reads its
own queue first and the others only when its own is empty, so a dead or slow worker's queries
still finish elsewhere (``worker_queues``; the Redis transport reads queues in the given order).

Every Celery task is named here, beside the queue it travels on: definitions (``workers/tasks.py``,
``workers/retrieval/tasks.py``, ``orchestrator/tasks.py``) and senders use these constants.
"""

from __future__ import annotations

import re
import zlib

from db.settings import settings

COORDINATION_QUEUE = "coordination"
RETRIEVAL_QUEUE = "retrieval"
VLM_PREFIX = "vlm."
TRAIN_PREFIX = "train."  # fine-tuning jobs of a base model: train.<model>

# The coordinator's task (defined in orchestrator/tasks.py: workers send it by name, never import it).
ADVANCE_TASK = "cvgl.advance"
EMBED_SHARD_TASK = "cvgl.embed_shard"
RANK_CANDIDATES_TASK = "cvgl.rank_candidates"
# Judgments go to their model's queue (``queue_for``, one of ``run_queues``), named at each send.
JUDGE_PAIRWISE_TASK = "cvgl.judge_pairwise"
JUDGE_POINTWISE_TASK = "cvgl.judge_pointwise"
JUDGE_TASKS = {"pairwise": JUDGE_PAIRWISE_TASK, "pointwise": JUDGE_POINTWISE_TASK}
# A fine-tune goes to its base model's training queue (``train_queue_for``), named at each send.
TRAIN_TASK = "cvgl.train"
# The tasks with a fixed queue: the app's ``task_routes``, so a send that names no queue lands right.
TASK_ROUTES = {
    ADVANCE_TASK: COORDINATION_QUEUE,
    EMBED_SHARD_TASK: RETRIEVAL_QUEUE,
    RANK_CANDIDATES_TASK: RETRIEVAL_QUEUE,
}
TASK_NAMES = (*TASK_ROUTES, *JUDGE_TASKS.values(), TRAIN_TASK)


def model_slug(model: str) -> str:
    """A queue- and node-name-safe slug: the last path part of a hub id or folder, lowercased.

    ``llava-hf/llava-1.5-7b-hf`` -> ``llava-1.5-7b-hf``; ``/models/qwen/`` -> ``qwen``.
    """
    last = model.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    slug = re.sub(r"[^a-z0-9._-]+", "-", last.lower()).strip("-.")
    if not slug:
        raise ValueError(f"cannot derive a queue name from model {model!r}")
    return slug


def queue_for(model: str) -> str:
    """The Celery queue that workers holding ``model`` consume: ``vlm.<slug>``."""
    return VLM_PREFIX + model_slug(model)


def train_queue_for(model: str) -> str:
    """The Celery queue of fine-tuning jobs on ``model``: ``train.<slug>`` (``worker --train``)."""
    return TRAIN_PREFIX + model_slug(model)


def vlm_shards() -> int:
    """Per-GPU queues per model, from ``CVGL_VLM_SHARDS`` (default 1: one shared queue)."""
    return settings().vlm_shards


def shard_of(query_id: int, shards: int) -> int:
    """The shard of a query: stable across processes and machines (not Python's salted hash)."""
    return zlib.crc32(str(query_id).encode()) % shards if shards > 1 else 0


def shard_queue(queue: str, shard: int, shards: int) -> str:
    """Queue ``shard`` of a model's ``shards``: the base name itself when there is one."""
    return queue if shards <= 1 else f"{queue}.{shard}"


def run_queues(queue: str, shards: int) -> list[str]:
    """Every queue a run's judgments may be sent to."""
    return [shard_queue(queue, i, shards) for i in range(max(1, shards))]


def worker_queues(queue: str, shards: int, home: int) -> list[str]:
    """What a worker consumes, in order: its own shard first, then the others (taken only when its
    own is empty), then the base queue (runs sent unsharded)."""
    if shards <= 1:
        return [queue]
    home %= shards
    order = [home, *(i for i in range(shards) if i != home)]
    return [shard_queue(queue, i, shards) for i in order] + [queue]
