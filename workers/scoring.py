"""Pure scoring: turn answer-token probabilities or generated text into scores and verdicts.

No torch, no model: the judges hand over plain floats and strings.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping

from workers.prompts import LIKERT, PAIR, YES_NO


class UnparsableAnswer(ValueError):
    """A generated answer that holds no usable score or preference (recorded, never a crash)."""


def normalize(probs: Mapping[str, float], choices: tuple[str, ...]) -> dict[str, float]:
    """Renormalise the probabilities of ``choices`` to sum to one (uniform if all are zero)."""
    raw = [float(probs[c]) for c in choices]
    if not all(math.isfinite(v) for v in raw):  # check before clamping: max(0.0, nan) is 0.0
        raise ValueError(f"non-finite choice probabilities {dict(probs)}")
    values = [max(0.0, v) for v in raw]
    total = sum(values)
    if total <= 1e-12:
        return {c: 1.0 / len(choices) for c in choices}
    return {c: v / total for c, v in zip(choices, values, strict=True)}


def p_yes(probs: Mapping[str, float]) -> float:
    """P(Yes) / (P(Yes) + P(No)), the paper's Yes/No score in [0, 1]."""
    return normalize(probs, YES_NO)["Yes"]


def likert_expectation(probs: Mapping[str, float]) -> float:
    """Expected Likert score sum_k k * p_k over the digits 1-5 (renormalised), in [1, 5]."""
    p = normalize(probs, LIKERT)
    return sum(int(k) * v for k, v in p.items())


def pairwise_preference(probs: Mapping[str, float]) -> tuple[float, float]:
    """(P("1"), P("2")) renormalised: the probability that the first / second shown tile wins."""
    p = normalize(probs, PAIR)
    return p["1"], p["2"]


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_direct_score(text: str) -> float:
    """Read a 0-100 confidence score from generated text.

    Accepts a bare number ("85", "Score: 85/100") or the paper code's JSON ({"score": 85}).
    Raises UnparsableAnswer when no number in [0, 100] is found.
    """
    obj = _json_object(text)
    if isinstance(obj, dict) and "score" in obj:
        try:
            value = float(obj["score"])
        except (TypeError, ValueError) as exc:
            raise UnparsableAnswer(f"score is not a number: {obj['score']!r}") from exc
    else:
        m = _NUMBER.search(text)
        if m is None:
            raise UnparsableAnswer(f"no score in {text[:200]!r}")
        value = float(m.group())
    if not 0.0 <= value <= 100.0:
        raise UnparsableAnswer(f"score {value} outside 0-100")
    return value


def parse_preference(text: str) -> int:
    """Read the preferred image (1 or 2) from a generated JSON answer, as the paper's code does."""
    obj = _json_object(text)
    if not isinstance(obj, dict) or "preference" not in obj:
        raise UnparsableAnswer(f"no preference in {text[:200]!r}")
    value = obj["preference"]
    try:
        # As the paper's code reads it, int(value): 2, "2", " 2 " and 2.0 are 2; "2.0" is not a number.
        pref = int(value)
    except (TypeError, ValueError) as exc:
        raise UnparsableAnswer(f"preference is not 1 or 2: {value!r}") from exc
    if pref not in (1, 2):
        raise UnparsableAnswer(f"preference is not 1 or 2: {pref}")
    return pref


def _json_object(text: str) -> object:
    """The paper code's parse: strip fences, take the first '{' to the last '}', json.loads."""
    s = text.strip()
    if s.startswith("```") and s.endswith("```"):
        s = s.removeprefix("```json").removeprefix("```").removesuffix("```").strip()
    start, end = s.find("{"), s.rfind("}")
    if start == -1 or end <= start:
        return None
    try:
        return json.loads(s[start : end + 1])
    except json.JSONDecodeError:
        return None
