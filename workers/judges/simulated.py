"""A deterministic judge for dry runs, tests and benchmarks (like lm-eval's DummyLM).

It answers from the request context (which tile is the query's positive, stage-1 ranks), with a
set accuracy, and the same answer for the same seed, query and tiles every time, in any process.

- Pairwise: when exactly one of the two tiles is the positive, it prefers the positive with
  probability ``accuracy``; otherwise it prefers the tile with the better stage-1 rank with
  probability ``accuracy``. ``position_bias`` B moves probability mass to the first-shown tile:
  P(first) <- B + (1 - B) * P(first).
- ``noise`` N (pairwise only): with probability N, drawn separately for each order shown, the
  answer above is replaced by a coin flip (before the position bias). The same two tiles can then
  get opposite answers in the two orders, and preferences are non-transitive, as a real VLM's
  are. Accuracy errors, by contrast, are the same in both orders. N = 0 changes nothing.
- Pointwise: it scores the positive above 0.5 and every other tile below 0.5, each with
  probability ``accuracy`` (scores in [0.55, 1] or [0, 0.45], so Direct's rounding never ties
  across 0.5). Yes/No reads the score as P(Yes), Likert as expectation 1 + 4 * score, Direct as
  round(100 * score).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import time
from collections.abc import Sequence
from typing import Any

from workers.judges.base import JudgeRequest

REVISION = "simulated-v1"  # bump (here and in the registry) when the answers for the same inputs change


def unit_hash(*parts: object) -> float:
    """A uniform number in [0, 1) from the parts, stable across processes and platforms."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class SimulatedJudge:
    name = "simulated"

    def __init__(
        self,
        model: str = "simulated",
        revision: str | None = None,
        *,
        seed: int = 0,
        accuracy: float = 0.8,
        position_bias: float = 0.0,
        noise: float = 0.0,
        latency_ms: float = 0.0,
        poison: Sequence[str] = (),
    ) -> None:
        if not 0.0 <= accuracy <= 1.0:
            raise ValueError(f"accuracy must be within [0, 1], got {accuracy}")
        if not 0.0 <= position_bias <= 1.0:
            raise ValueError(f"position_bias must be within [0, 1], got {position_bias}")
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise must be within [0, 1], got {noise}")
        self.model = model
        self.revision = REVISION
        self.seed = int(seed)
        self.accuracy = float(accuracy)
        self.position_bias = float(position_bias)
        self.noise = float(noise)
        self.latency_ms = float(latency_ms)
        # Fault injection: judgments ("query|tile" or "query|first|second", by file name) that kill
        # the process asking them, as a segfaulting model would. For separate worker processes only.
        self.poison = frozenset(poison)

    # -- Judge protocol -------------------------------------------------------------------------

    def choice_probs(
        self, requests: Sequence[JudgeRequest], choices: Sequence[str]
    ) -> list[dict[str, float]]:
        self._crash_on_poison(requests)
        self._pretend_to_work(len(requests))
        out = []
        for req in requests:
            if len(req.images) == 3:
                if tuple(choices) != ("1", "2"):
                    raise ValueError(f"a pairwise request asks for choices '1'/'2', not {list(choices)}")
                p_first = self.p_first(req.context)
                out.append({"1": p_first, "2": 1.0 - p_first})
            else:
                out.append(self._pointwise_probs(self.score(req.context), tuple(choices)))
        return out

    def generate(self, requests: Sequence[JudgeRequest], max_new_tokens: int) -> list[str]:
        self._crash_on_poison(requests)
        self._pretend_to_work(len(requests))
        out = []
        for req in requests:
            if len(req.images) == 3:
                first = self.p_first(req.context) >= 0.5
                out.append(json.dumps({"preference": "1" if first else "2"}))
            elif req.context.get("step") == "reasoning":
                out.append("Comparing road layout, building shapes and landmarks of the two views.")
            else:
                out.append(str(round(100 * self.score(req.context))))
        return out

    # -- the simulated answers ------------------------------------------------------------------

    def p_first(self, ctx: Any) -> float:
        """P(the first-shown tile is the better match)."""
        query = ctx["query"]
        a, b = ctx["tiles"]
        pos_a, pos_b = ctx["positive"]
        rank_a, rank_b = ctx["stage1_rank"]
        lo, hi = sorted((a, b))  # the draw ignores the order shown: a consistent judge
        u = unit_hash(self.seed, query, lo, hi, "pair")
        conf = 0.6 + 0.35 * unit_hash(self.seed, query, lo, hi, "conf")
        if pos_a != pos_b:
            target_first = bool(pos_a)
        else:
            target_first = rank_a < rank_b
        prefers_first = target_first if u < self.accuracy else not target_first
        if self.noise > 0.0 and unit_hash(self.seed, query, a, b, "noise") < self.noise:
            # Drawn from the order shown: the two orders of one pair answer independently.
            prefers_first = unit_hash(self.seed, query, a, b, "coin") < 0.5
            conf = 0.6 + 0.35 * unit_hash(self.seed, query, a, b, "noise-conf")
        p = conf if prefers_first else 1.0 - conf
        return self.position_bias + (1.0 - self.position_bias) * p

    def score(self, ctx: Any) -> float:
        """A score in [0, 1]; the positive lands above 0.5 with probability ``accuracy``."""
        (tile,) = ctx["tiles"]
        (positive,) = ctx["positive"]
        u = unit_hash(self.seed, ctx["query"], tile, "point")
        v = unit_hash(self.seed, ctx["query"], tile, "value")
        correct = u < self.accuracy
        high = positive == correct
        return 0.55 + 0.45 * v if high else 0.45 * v

    @staticmethod
    def _pointwise_probs(score: float, choices: tuple[str, ...]) -> dict[str, float]:
        if choices == ("Yes", "No"):
            return {"Yes": score, "No": 1.0 - score}
        if choices == ("1", "2", "3", "4", "5"):
            x = 1.0 + 4.0 * score  # mass on the two digits around x: expectation exactly x
            lo = min(int(math.floor(x)), 4)
            frac = x - lo
            probs = dict.fromkeys(choices, 0.0)
            probs[str(lo)] = 1.0 - frac
            probs[str(lo + 1)] += frac
            return probs
        raise ValueError(f"the simulated judge cannot answer choices {list(choices)}")

    def _crash_on_poison(self, requests: Sequence[JudgeRequest]) -> None:
        if not self.poison:
            return
        for req in requests:
            if "|".join([req.context["query"], *req.context["tiles"]]) in self.poison:
                os.kill(os.getpid(), signal.SIGKILL)

    def _pretend_to_work(self, n: int) -> None:
        if self.latency_ms > 0 and n:
            time.sleep(self.latency_ms * n / 1000.0)
