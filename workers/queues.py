"""Queue names: one queue per judge model, one for retrieval, one for coordination."""

from __future__ import annotations

import re

COORDINATION_QUEUE = "coordination"
RETRIEVAL_QUEUE = "retrieval"
VLM_PREFIX = "vlm."


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
