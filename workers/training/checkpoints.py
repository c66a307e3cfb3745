"""Checkpoints of a fine-tune, written atomically: a folder appears whole or not at all.

A checkpoint is ``checkpoints/step-<N>/`` under the adapter's output folder: the adapter's
trainable weights (peft's ``save_pretrained``) and ``trainer_state.pt`` (optimiser, scheduler,
random states, the step: the data position, see ``examples.batch_indices``). It is written into a
temporary sibling, flushed to disk, then renamed; the database row that references it is written
after the rename, so a row always names a whole folder. A folder left by a crash mid-write keeps
its temporary name and is removed by the next trainer.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
CHECKPOINTS = "checkpoints"
TMP_MARK = ".tmp-"


def checkpoint_path(step: int) -> str:
    """The folder of step ``step``, relative to the output folder."""
    return f"{CHECKPOINTS}/step-{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_atomically(final: Path, write: Any) -> None:
    """Call ``write(folder)`` on a temporary folder beside ``final``, flush it, rename it to ``final``.

    An existing ``final`` (a redelivered job that got this far before) is replaced: the job is
    deterministic, so the two hold the same thing."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}{TMP_MARK}{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        write(tmp)
        for path in tmp.iterdir():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(final.parent)


def save_checkpoint(output_dir: Path, step: int, model: Any, optimizer: Any, scheduler: Any) -> str:
    """Write step ``step``'s checkpoint; its path relative to ``output_dir``."""
    relative = checkpoint_path(step)

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
        }
        torch.save(state, folder / STATE_FILE)

    write_atomically(output_dir / relative, write)
    return relative


def load_checkpoint(folder: Path, model: Any, optimizer: Any, scheduler: Any) -> int:
    """Restore the adapter weights, optimiser, scheduler and random states; the step it was taken at."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(folder / "adapter_model.safetensors"), device=str(_device_of(model)))
    result = set_peft_model_state_dict(model, weights)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(f"checkpoint {folder} does not fit this adapter: {unexpected[:3]}")
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["step"])


def remove_partial(output_dir: Path) -> int:
    """Delete the temporary folders a killed writer left; how many."""
    removed = 0
    for path in output_dir.glob(f"**/*{TMP_MARK}*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


def _device_of(model: Any) -> torch.device:
    return next(p.device for p in model.parameters())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
