"""The judge a worker process holds: loaded lazily on the first task, once per process.

A GPU worker serves one model (its queue is ``vlm.<model>``), so at most one real model is kept;
the simulated judge is cheap and rebuilt per run options. Loading happens in the prefork child,
never in the parent (CUDA is not fork-safe).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from typing import Any

from workers.judges.base import Judge
from workers.judges.registry import load_judge

log = logging.getLogger(__name__)

_lock = threading.Lock()
_loaded: dict[str, Judge] = {}
# Judges whose construction is cheap may be cached per options; a real model is one per process.
_CHEAP = {"simulated"}


def _key(name: str, model: str, revision: str | None, options: Mapping[str, Any]) -> str:
    return json.dumps([name, model, revision, dict(options)], sort_keys=True, default=str)


def get_judge(
    name: str, model: str, revision: str | None = None, options: Mapping[str, Any] | None = None
) -> Judge:
    """The judge for a run, loading it on first use (and unloading another real model)."""
    options = dict(options or {})
    key = _key(name, model, revision, options)
    with _lock:
        judge = _loaded.get(key)
        if judge is not None:
            return judge
        if name not in _CHEAP:
            for old in [k for k in _loaded if json.loads(k)[0] not in _CHEAP]:
                log.warning("unloading %s to load %s %s: one model per worker process", old, name, model)
                del _loaded[old]
        log.info("loading judge %s model=%s revision=%s", name, model, revision)
        judge = _loaded[key] = load_judge(name, model, revision, **options)
        return judge


def loaded_judges() -> list[Judge]:
    with _lock:
        return list(_loaded.values())
