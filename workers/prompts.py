"""The five prompts of the paper's Appendix A.1: load, validate, hash, split around images.

The text files in ``workers/prompts/`` are verbatim from the paper (only the PDF's
line-break hyphens and curly quotes undone). An image goes where its placeholder
``'<GROUNDIMAGE>'``, ``'<AERIALIMAGE>'``, ``'<AERIALIMAGE1>'`` or ``'<AERIALIMAGE2>'`` stands;
the quotes around a placeholder belong to the placeholder. Pure: no model, no I/O but the files.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

from workers.names import did_you_mean

PLACEHOLDER = re.compile(r"'?<(GROUNDIMAGE|AERIALIMAGE[12]?)>'?")

POINTWISE_SLOTS = ("GROUNDIMAGE", "AERIALIMAGE")
PAIRWISE_SLOTS = ("GROUNDIMAGE", "AERIALIMAGE1", "AERIALIMAGE2")

YES_NO = ("Yes", "No")
LIKERT = ("1", "2", "3", "4", "5")
PAIR = ("1", "2")
# The paper's pairwise answer format is {"preference": "<1 or 2>"}: forcing the assistant turn
# to start with this prefix makes the next token the answer, read in one forward pass.
PAIRWISE_ANSWER_PREFIX = '{"preference": "'


@dataclass(frozen=True)
class PromptSpec:
    """How a prompt is asked and read.

    Attributes:
        name: file stem and CLI name.
        kind: 'pointwise' (ground + one tile) or 'pairwise' (ground + two tiles).
        mode: 'choices' (one forward pass over answer tokens), 'generate' (parse a 0-100 score)
            or 'reason' (generate reasoning, then read the Yes/No probability).
        choices: answer strings whose next-token probabilities are read.
        answer_prefix: text the assistant turn is forced to begin with.
    """

    name: str
    kind: str
    mode: str
    choices: tuple[str, ...] = ()
    answer_prefix: str = ""


SPECS: dict[str, PromptSpec] = {
    "direct": PromptSpec("direct", "pointwise", "generate"),
    "likert": PromptSpec("likert", "pointwise", "choices", LIKERT),
    "yesno": PromptSpec("yesno", "pointwise", "choices", YES_NO),
    "reason": PromptSpec("reason", "pointwise", "reason", YES_NO),
    "pairwise": PromptSpec("pairwise", "pairwise", "choices", PAIR, PAIRWISE_ANSWER_PREFIX),
}
PROMPT_NAMES = tuple(SPECS)


@dataclass(frozen=True)
class Prompt:
    spec: PromptSpec
    text: str

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def sha256(self) -> str:
        return prompt_sha256(self.text)


def prompt_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@cache
def load_prompt(name: str) -> Prompt:
    """Load and validate a prompt by name; raises ``KeyError`` with the known names."""
    if name not in SPECS:
        hint = did_you_mean(name, PROMPT_NAMES)
        raise KeyError(f"Unknown prompt {name!r}.{hint} Known prompts: {', '.join(PROMPT_NAMES)}")
    spec = SPECS[name]
    text = resources.files("workers").joinpath("prompts", f"{name}.txt").read_text("utf-8").rstrip("\n")
    expected = PAIRWISE_SLOTS if spec.kind == "pairwise" else POINTWISE_SLOTS
    found = tuple(m.group(1) for m in PLACEHOLDER.finditer(text))
    if found != expected:
        raise ValueError(
            f"prompt {name!r} must hold the image placeholders {expected} in order, found {found}"
        )
    return Prompt(spec, text)


def split_prompt(text: str) -> list[str | int]:
    """Split a prompt into text pieces and image positions (0 = ground, 1.. = tiles in order).

    Newlines that only framed a placeholder are dropped; empty pieces are omitted.
    """
    parts: list[str | int] = []
    pos = 0
    for i, m in enumerate(PLACEHOLDER.finditer(text)):
        piece = text[pos : m.start()].strip("\n")
        if piece:
            parts.append(piece)
        parts.append(i)
        pos = m.end()
    tail = text[pos:].strip("\n")
    if tail:
        parts.append(tail)
    return parts
