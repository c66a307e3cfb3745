"""The judge interface every model (and the simulated judge) implements: batch in, list out.

Judges know models, not prompts: ``workers.prompts`` renders and ``workers.scoring`` reads the
answers. No torch here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class JudgeRequest:
    """One judgment to ask.

    Attributes:
        prompt: the prompt text with its image placeholders (see ``workers.prompts.split_prompt``).
        images: ground panorama first, then the tile or tiles, in the placeholders' order.
        answer_prefix: text the assistant turn is forced to begin with (e.g. ``{"preference": "``).
        context: what the worker knows about the items (query and tile names, which tile is the
            positive, stage-1 ranks). Real judges ignore it; the simulated judge answers from it.
    """

    prompt: str
    images: tuple[Path, ...]
    answer_prefix: str = ""
    context: Mapping[str, Any] = field(default_factory=dict, compare=False)


@runtime_checkable
class Judge(Protocol):
    """A loaded judge. One per worker process; batches of requests from many queries.

    ``choice_probs`` is one forward pass: for each request, the next-token probability of the
    first token of each choice, after the prompt and the answer prefix (not renormalised).
    ``generate`` decodes greedily and returns the new text only.
    """

    name: str  # registry name
    model: str  # hub id or folder
    revision: str  # stored with every judgment

    def choice_probs(
        self, requests: Sequence[JudgeRequest], choices: Sequence[str]
    ) -> list[dict[str, float]]: ...

    def generate(self, requests: Sequence[JudgeRequest], max_new_tokens: int) -> list[str]: ...
