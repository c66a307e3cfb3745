"""Which checkpoint a judge loads and the revision stored with every judgment (no model, no torch).

A hub id resolves to its commit (offline from the local cache); a folder inside the hub cache is
named by its commit; any other folder by a hash of its files, so a copy has the same revision.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from workers.judges.registry import checkpoint_family_error, read_model_type

# The files that make a checkpoint what it is (weights, config, tokenizer, processor, template).
REVISION_SUFFIXES = {".json", ".safetensors", ".bin", ".jinja", ".model", ".txt"}


def folder_revision(folder: Path) -> str:
    """A stable name for a local checkpoint: the commit of a hub-cache snapshot, else a content hash.

    The hash covers the config, weights, tokenizer, processor and chat-template files (names and
    bytes), so two copies of one checkpoint share it and any change to those files changes it.
    """
    folder = folder.resolve()
    if folder.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", folder.name):
        return folder.name
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in REVISION_SUFFIXES:
            digest.update(path.name.encode() + b"\0")
            with path.open("rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 24), b""):
                    digest.update(block)
    return "local-" + digest.hexdigest()[:12]


def hub_revision(model: str, revision: str | None) -> tuple[str | None, str]:
    """(revision to load, commit to store) for a hub id; works offline from the local cache."""
    from transformers.utils.hub import cached_file, extract_commit_hash

    try:  # transformers >= 5.20 resolves named revisions itself
        from transformers.utils.hub import resolve_revision
    except ImportError:
        resolved: object = revision
    else:
        resolved = resolve_revision(model, revision)
    commit = getattr(resolved, "resolved", None)
    if commit is None:
        try:
            commit = extract_commit_hash(cached_file(model, "config.json", revision=resolved), None)
        except OSError:
            commit = None
    return resolved, str(commit or revision or "main")  # type: ignore[return-value]


def resolve_checkpoint(model: str, revision: str | None) -> tuple[str | None, str]:
    """(revision to pass to ``from_pretrained``, revision to store) for a hub id or a folder."""
    if Path(model).is_dir():
        return None, folder_revision(Path(model))
    return hub_revision(model, revision)


def check_family(judge_name: str, model: str, revision: str | None) -> None:
    """Refuse a checkpoint of another family before loading any weights."""
    if Path(model).is_dir():
        model_type = read_model_type(Path(model))
    else:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(model, revision=revision).model_type
    problem = checkpoint_family_error(judge_name, model, model_type)
    if problem:
        raise ValueError(problem)
