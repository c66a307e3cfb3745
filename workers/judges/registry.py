"""Judge names -> classes, imported lazily so torch loads only in the workers that need it."""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from workers.judges.base import Judge

# name -> (module:Class, default model, default revision). Real VLM judges import torch on load.
JUDGES: dict[str, tuple[str, str, str]] = {
    "simulated": ("workers.judges.simulated:SimulatedJudge", "simulated", "simulated-v1"),
}


class UnknownJudge(KeyError):
    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


def check_judge_name(name: str) -> None:
    if name not in JUDGES:
        close = difflib.get_close_matches(name, JUDGES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownJudge(f"Unknown judge {name!r}.{hint} Known judges: {', '.join(sorted(JUDGES))}")


def default_model(name: str) -> str:
    check_judge_name(name)
    return JUDGES[name][1]


def default_revision(name: str) -> str:
    check_judge_name(name)
    return JUDGES[name][2]


def judge_class(name: str) -> type:
    check_judge_name(name)
    module, _, cls = JUDGES[name][0].partition(":")
    return getattr(importlib.import_module(module), cls)


def load_judge(name: str, model: str, revision: str | None = None, **options: Any) -> Judge:
    """Build the judge ``name`` for ``model`` (hub id or local folder) with run options."""
    return judge_class(name)(model=model, revision=revision, **options)
