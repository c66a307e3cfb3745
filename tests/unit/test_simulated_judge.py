"""The simulated judge: deterministic, with the accuracy semantics the issue states."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers import scoring
from workers.judges.base import JudgeRequest
from workers.judges.simulated import SimulatedJudge

GROUND, A, B = Path("g.jpg"), Path("a.png"), Path("b.png")


def pair(query, t1, t2, pos1, pos2, r1, r2):
    ctx = {"query": query, "tiles": (t1, t2), "positive": (pos1, pos2), "stage1_rank": (r1, r2)}
    return JudgeRequest("p", (GROUND, A, B), context=ctx)


def single(query, tile, positive, rank=1):
    ctx = {"query": query, "tiles": (tile,), "positive": (positive,), "stage1_rank": (rank,)}
    return JudgeRequest("p", (GROUND, A), context=ctx)


def test_same_inputs_same_answer_in_any_instance():
    reqs = [pair(f"q{i}", "t1", "t2", False, True, 1, 2) for i in range(50)]
    a = SimulatedJudge(seed=3, accuracy=0.7).choice_probs(reqs, ["1", "2"])
    b = SimulatedJudge(seed=3, accuracy=0.7).choice_probs(reqs, ["1", "2"])
    c = SimulatedJudge(seed=4, accuracy=0.7).choice_probs(reqs, ["1", "2"])
    assert a == b and a != c


def test_perfect_judge_prefers_the_positive_in_either_order():
    judge = SimulatedJudge(seed=0, accuracy=1.0)
    for i in range(200):
        p_first = judge.choice_probs([pair(f"q{i}", "x", "pos", False, True, 1, 9)], ["1", "2"])[0]["1"]
        assert p_first < 0.5
        p_first = judge.choice_probs([pair(f"q{i}", "pos", "x", True, False, 9, 1)], ["1", "2"])[0]["1"]
        assert p_first > 0.5


def test_without_a_positive_it_prefers_the_better_stage1_rank_with_probability_accuracy():
    judge = SimulatedJudge(seed=0, accuracy=0.7)
    n = 4000
    right = sum(
        judge.choice_probs([pair(f"q{i}", "x", "y", False, False, 2, 5)], ["1", "2"])[0]["1"] > 0.5 for i in range(n)
    )
    assert abs(right / n - 0.7) < 0.03


def test_position_bias_moves_mass_to_the_first_tile():
    plain = SimulatedJudge(seed=0, accuracy=0.8)
    biased = SimulatedJudge(seed=0, accuracy=0.8, position_bias=0.3)
    req = pair("q", "x", "y", False, True, 1, 2)
    p, pb = plain.choice_probs([req], ["1", "2"])[0]["1"], biased.choice_probs([req], ["1", "2"])[0]["1"]
    assert pb == pytest.approx(0.3 + 0.7 * p)


def test_pointwise_scores_split_at_one_half_with_probability_accuracy():
    judge = SimulatedJudge(seed=0, accuracy=1.0)
    probs = judge.choice_probs([single("q", f"t{i}", i == 0) for i in range(20)], ["Yes", "No"])
    yes = [scoring.p_yes(p) for p in probs]
    assert yes[0] > 0.5 and all(y < 0.5 for y in yes[1:])
    texts = judge.generate([single("q", f"t{i}", i == 0) for i in range(20)], 8)
    scores = [scoring.parse_direct_score(t) for t in texts]
    assert scores[0] > max(scores[1:])


def test_likert_expectation_reads_back_the_score():
    judge = SimulatedJudge(seed=0, accuracy=0.8)
    req = single("q", "t", True)
    s = judge.score(req.context)
    probs = judge.choice_probs([req], ["1", "2", "3", "4", "5"])[0]
    assert scoring.likert_expectation(probs) == pytest.approx(1 + 4 * s)


def test_invalid_options_are_refused():
    with pytest.raises(ValueError, match="accuracy"):
        SimulatedJudge(accuracy=1.5)
    with pytest.raises(ValueError, match="position_bias"):
        SimulatedJudge(position_bias=-0.1)
