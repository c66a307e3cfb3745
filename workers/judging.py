"""Ask a batch of judgments of one prompt and read the answers: the procedure per prompt mode.

- choices: one forward pass; the answer is the renormalised probability of the choice tokens.
- generate (Direct): decode the answer and parse a 0-100 score; unparsable -> a failed judgment.
- reason: decode the reasoning, then read P(Yes) after it (one more forward pass).
- pairwise with ``decode="generate"``: the paper's way, decode the JSON answer and parse the
  preference; unparsable -> a failed judgment (the coordinator keeps the order shown).
A batch that raises is retried one request at a time, so one bad item fails alone.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from db.models import DONE, FAILED
from workers import scoring
from workers.judges.base import Judge, JudgeRequest
from workers.judges.images import BadImage, open_checked
from workers.prompts import Prompt

log = logging.getLogger(__name__)

DIRECT_MAX_NEW_TOKENS = 16
REASONING_MAX_NEW_TOKENS = 256
# Asked after the model's reasoning, so the next token is the Yes/No answer.
REASONING_ANSWER_CUE = "\nAnswer:"
# The paper's code decodes up to 128 new tokens for its JSON answers (--max_new_tokens 128).
PAIRWISE_MAX_NEW_TOKENS = 128
DECODE_MODES = ("choices", "generate")


@dataclass
class Item:
    """One judgment of a batch: its row id and the request to ask."""

    id: int
    request: JudgeRequest


@dataclass
class Outcome:
    id: int
    status: str
    raw_output: str | None = None
    error: str | None = None
    latency_ms: float | None = None
    result: dict[str, Any] = field(default_factory=dict)  # table-specific columns

    def row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "raw_output": self.raw_output,
            "error": self.error,
            "latency_ms": self.latency_ms,
            **self.result,
        }


def failed(item_id: int, error: str) -> Outcome:
    return Outcome(item_id, FAILED, error=error[:2000])


@lru_cache(maxsize=200_000)
def resolve_image(root: str, relative: str) -> Path:
    """The image path under the dataset root; a path that escapes the root is refused.

    Lexical (normpath), not realpath: it runs for every image of every judgment, and the
    filesystem walk of ``Path.resolve`` cost more than the rest of a simulated judgment.
    """
    base = os.path.normpath(root)
    path = os.path.normpath(os.path.join(base, relative))
    if os.path.isabs(relative) or not path.startswith(base.rstrip(os.sep) + os.sep):
        raise ValueError(f"image path {relative!r} leaves the dataset root {base}")
    return Path(path)


# Images already found readable in this process: each appears in many judgments.
_READABLE: OrderedDict[Path, None] = OrderedDict()
_READABLE_MAX = 50_000


def unreadable_images(request: JudgeRequest) -> list[str]:
    """Problems with the request's images ("missing: path", "corrupt: ...", "too large: ..."); empty if fine.

    Checked before any judge runs, so a bad file fails its own judgments with its name, and the
    simulated judge (which never opens images) sees the same failures a real model would.
    """
    problems = []
    for path in request.images:
        if path in _READABLE:
            continue
        if not path.is_file():
            problems.append(f"missing: {path}")
            continue
        try:
            with open_checked(path) as im:  # header checked: sizes bounded before anything decodes
                im.verify()
        except BadImage as exc:
            problems.append(f"{exc.reason}: {exc}")
            continue
        except Exception as exc:  # PIL raises many types for broken files
            problems.append(f"corrupt: {path} ({type(exc).__name__}: {exc})")
            continue
        _READABLE[path] = None
        if len(_READABLE) > _READABLE_MAX:
            _READABLE.popitem(last=False)
    return problems


def run_batch(judge: Judge, prompt: Prompt, items: Sequence[Item], decode: str = "choices") -> list[Outcome]:
    """Judge ``items`` with ``prompt``; one Outcome per item, in order. Never raises for an item.

    ``decode`` is how a pairwise prompt is answered: "choices" (one forward pass, P("1") vs
    P("2") after the forced JSON prefix) or "generate" (the paper's way). Pointwise prompts
    follow their own mode.
    """
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    ready: list[Item] = []
    outcomes: dict[int, Outcome] = {}
    for it in items:
        problems = unreadable_images(it.request)
        if problems:
            outcomes[it.id] = failed(it.id, "unreadable image: " + "; ".join(problems))
        else:
            ready.append(it)
    if ready:
        if prompt.spec.kind == "pairwise" and decode == "generate":
            procedure = _ask_pairwise_generate
        else:
            procedure = _PROCEDURES[prompt.spec.mode]
        t0 = time.perf_counter()
        try:
            done = procedure(judge, prompt, ready)
        except Exception as exc:  # isolate the bad request: retry one at a time
            log.warning(
                "batch of %d failed (%s: %s); retrying one at a time", len(ready), type(exc).__name__, exc
            )
            done = []
            for it in ready:
                t1 = time.perf_counter()
                try:
                    (one,) = procedure(judge, prompt, [it])
                except Exception as item_exc:
                    one = failed(it.id, f"{type(item_exc).__name__}: {item_exc}")
                one.latency_ms = (time.perf_counter() - t1) * 1000.0
                done.append(one)
        else:
            per_item = (time.perf_counter() - t0) * 1000.0 / len(ready)
            for o in done:
                o.latency_ms = per_item
        outcomes.update((o.id, o) for o in done)
    return [outcomes[it.id] for it in items]


def _ask_choices(judge: Judge, prompt: Prompt, items: Sequence[Item]) -> list[Outcome]:
    spec = prompt.spec
    reqs = [replace(it.request, answer_prefix=spec.answer_prefix) for it in items]
    probs = judge.choice_probs(reqs, spec.choices)
    return [_read_choices(prompt, it.id, p) for it, p in zip(items, probs, strict=True)]


def _read_choices(prompt: Prompt, item_id: int, probs: dict[str, float], raw_prefix: str = "") -> Outcome:
    raw = raw_prefix + json.dumps({c: probs[c] for c in prompt.spec.choices})
    if prompt.spec.kind == "pairwise":
        p1, p2 = scoring.pairwise_preference(probs)
        # Ties keep the order shown (the first tile), as the paper's code keeps the incumbent.
        return Outcome(
            item_id, DONE, raw_output=raw, result={"first_wins": p1 >= p2, "p_first": p1, "p_second": p2}
        )
    if prompt.spec.choices == ("Yes", "No"):
        score = scoring.p_yes(probs)
    else:
        score = scoring.likert_expectation(probs)
    return Outcome(
        item_id,
        DONE,
        raw_output=raw,
        result={"score": score, "probs": scoring.normalize(probs, prompt.spec.choices)},
    )


def _ask_direct(judge: Judge, prompt: Prompt, items: Sequence[Item]) -> list[Outcome]:
    texts = judge.generate([it.request for it in items], DIRECT_MAX_NEW_TOKENS)
    out = []
    for it, text in zip(items, texts, strict=True):
        try:
            score = scoring.parse_direct_score(text)
        except scoring.UnparsableAnswer as exc:
            out.append(Outcome(it.id, FAILED, raw_output=text, error=f"unparsable answer: {exc}"))
        else:
            out.append(Outcome(it.id, DONE, raw_output=text, result={"score": score, "probs": None}))
    return out


def _ask_reason(judge: Judge, prompt: Prompt, items: Sequence[Item]) -> list[Outcome]:
    first = [replace(it.request, context={**it.request.context, "step": "reasoning"}) for it in items]
    reasoning = judge.generate(first, REASONING_MAX_NEW_TOKENS)
    second = [
        replace(
            it.request,
            answer_prefix=text.strip() + REASONING_ANSWER_CUE,
            context={**it.request.context, "step": "answer"},
        )
        for it, text in zip(items, reasoning, strict=True)
    ]
    probs = judge.choice_probs(second, prompt.spec.choices)
    return [
        _read_choices(prompt, it.id, p, raw_prefix=text.strip() + "\n")
        for it, text, p in zip(items, reasoning, probs, strict=True)
    ]


def _ask_pairwise_generate(judge: Judge, prompt: Prompt, items: Sequence[Item]) -> list[Outcome]:
    texts = judge.generate([it.request for it in items], PAIRWISE_MAX_NEW_TOKENS)
    out = []
    for it, text in zip(items, texts, strict=True):
        try:
            preference = scoring.parse_preference(text)
        except scoring.UnparsableAnswer as exc:
            out.append(Outcome(it.id, FAILED, raw_output=text, error=f"unparsable answer: {exc}"))
        else:
            # Decoded text has no probabilities: p_first / p_second stay empty.
            out.append(Outcome(it.id, DONE, raw_output=text, result={"first_wins": preference == 1}))
    return out


_PROCEDURES: dict[str, Callable[[Judge, Prompt, Sequence[Item]], list[Outcome]]] = {
    "choices": _ask_choices,
    "generate": _ask_direct,
    "reason": _ask_reason,
}
