"""LoRA adapters of a judge: which modules they adapt, their content hash, merging one on load.

An adapter adapts the language model's attention and MLP projections (never the vision tower,
whose blocks have modules of the same names) and, optionally, the family's projector from vision
features to the language model (trained whole). A judge that loads an adapter checks its files
against the hash the database holds for it, then merges it into the base weights, so the judge's
fast paths run unchanged. Needs ``peft`` only when an adapter is used.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

# Attention and MLP projections of the language model's layers (LLaVA-1.5 and Qwen2.5-VL alike).
LORA_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
# The module that maps vision features into the language model, by family.
PROJECTORS = {"llava": "multi_modal_projector", "qwen2.5-vl": "merger"}
# The final adapter's folder under a fine-tune's output folder (checkpoints sit beside it).
ADAPTER_DIR = "adapter"
# Written beside the adapter's weights: what it was trained from (read by people and `status`).
METADATA_FILE = "cvgl_adapter.json"


class AdapterError(ValueError):
    """The adapter's files are missing or are not the adapter the database names."""


def adapter_sha256(folder: str | Path) -> str:
    """The hash of an adapter folder: every file's name and bytes, in name order."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    if not any(p.name == "adapter_config.json" for p in files):
        raise AdapterError(f"{folder} is not an adapter folder: it has no adapter_config.json")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def adapted_revision(base_revision: str, sha256: str) -> str:
    """The revision stored with a judgment made through an adapter: base revision and adapter hash."""
    return f"{base_revision}+adapter-{sha256[:12]}"


def lora_config(judge_name: str, r: int, alpha: float | None, dropout: float, train_projector: bool) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha if alpha is not None else 2 * r,
        lora_dropout=dropout,
        target_modules=LORA_TARGETS,
        modules_to_save=[PROJECTORS[judge_name]] if train_projector else None,
        bias="none",
    )


def merge_adapter(hf_model: Any, folder: str | Path, sha256: str | None) -> tuple[Any, str]:
    """(``hf_model`` with the adapter in ``folder`` merged into its weights, the adapter's hash),
    the files checked against ``sha256`` first when given."""
    found = adapter_sha256(folder)
    if sha256 is not None and found != sha256:
        raise AdapterError(
            f"the adapter in {folder} has hash {found[:12]}, not the {sha256[:12]} it was stored with: "
            "its files changed after training"
        )
    from peft import PeftModel

    return PeftModel.from_pretrained(hf_model, str(folder)).merge_and_unload(), found
