"""Judge names -> classes, imported lazily so torch loads only in the workers that need it."""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path
from typing import Any

from workers.judges.base import Judge
from workers.names import did_you_mean

# name -> (module:Class, default model, default revision). Real VLM judges import torch on load.
JUDGES: dict[str, tuple[str, str, str]] = {
    "simulated": ("workers.judges.simulated:SimulatedJudge", "simulated", "simulated-v1"),
    "llava": ("workers.judges.llava:LlavaJudge", "llava-hf/llava-1.5-7b-hf", "main"),
    "qwen2.5-vl": ("workers.judges.qwen_vl:QwenVLJudge", "Qwen/Qwen2.5-VL-7B-Instruct", "main"),
}

# Checkpoint families: the config.json ``model_type`` each real judge loads, and its name for people.
CHECKPOINT_TYPES: dict[str, tuple[tuple[str, ...], str]] = {
    "llava": (("llava",), "LLaVA-1.5"),
    "qwen2.5-vl": (("qwen2_5_vl",), "Qwen2.5-VL"),
}


class UnknownJudge(KeyError):
    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


def check_judge_name(name: str) -> None:
    if name not in JUDGES:
        raise UnknownJudge(
            f"Unknown judge {name!r}.{did_you_mean(name, JUDGES)} Known judges: {', '.join(sorted(JUDGES))}"
        )


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


def judge_option_defaults(name: str) -> dict[str, Any]:
    """The options a run may give judge ``name``, with their defaults (stored complete on the run).

    Only the simulated judge takes run options; a VLM judge's settings belong to its worker
    (device, dtype, caches), so its class is not imported here (that would load torch)."""
    if name != "simulated":
        return {}
    params = inspect.signature(judge_class(name).__init__).parameters.values()
    return {
        p.name: list(p.default) if isinstance(p.default, tuple) else p.default
        for p in params
        if p.kind is p.KEYWORD_ONLY
    }


def load_judge(name: str, model: str, revision: str | None = None, **options: Any) -> Judge:
    """Build the judge ``name`` for ``model`` (hub id or local folder) with run options."""
    return judge_class(name)(model=model, revision=revision, **options)


def read_model_type(folder: Path) -> str:
    """The ``model_type`` of a local checkpoint folder, from its config.json (no torch)."""
    config = folder / "config.json"
    if not config.is_file():
        raise ValueError(f"{folder} is not a model checkpoint folder: it has no config.json")
    try:
        model_type = json.loads(config.read_text("utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise ValueError(f"{config} is not a readable model config: {exc}") from exc
    return str(model_type or "")


def checkpoint_family_error(name: str, model: str, model_type: str) -> str | None:
    """Why checkpoint ``model`` (of ``model_type``) cannot serve judge ``name``; None when it can."""
    if name not in CHECKPOINT_TYPES:
        return None
    types, family = CHECKPOINT_TYPES[name]
    if model_type in types:
        return None
    return (
        f"{model} is a {model_type or 'unknown'!r} checkpoint, not {family} "
        f"(judge {name!r} loads config model_type {' or '.join(map(repr, types))})"
    )


def check_model_folder(name: str, model: str) -> None:
    """At submit: a local folder given as ``--model`` must be a checkpoint of the judge's family.

    Hub ids are not checked here (no network at submit); the worker refuses them on load.
    """
    if name not in CHECKPOINT_TYPES:
        return
    path = Path(model).expanduser()
    if not path.exists():
        if model.startswith(("/", "./", "../", "~")):
            raise ValueError(f"model folder {model} does not exist")
        return
    if not path.is_dir():
        raise ValueError(f"--model {model} is a file; give a checkpoint folder or a hub id")
    problem = checkpoint_family_error(name, model, read_model_type(path))
    if problem:
        raise ValueError(problem)
