"""Scoring of each strategy on fixed next-token logits and on fixed generated text (pure, no model).

A judge hands over P(first token of each choice) = softmax(logits)[choice id], not renormalised
(the rest of the vocabulary keeps its mass); ``workers.scoring`` and ``workers.judging`` turn
those into the stored score or verdict.
"""

from __future__ import annotations

import json
import math

import pytest

from db.models import DONE
from workers import judging, scoring
from workers.prompts import LIKERT, PAIR, YES_NO, load_prompt

# A fixed logit vector over a toy vocabulary: the choices plus tokens that keep some mass.
VOCAB = ["Yes", "No", "1", "2", "3", "4", "5", "the", "{", '"']
LOGITS = [2.0, 0.5, -1.0, 1.5, 0.0, 3.0, 0.5, 4.0, 1.0, -2.0]


def next_token_probs(logits: list[float], choices: tuple[str, ...]) -> dict[str, float]:
    """What a judge returns: softmax over the whole vocabulary, read at the choices' tokens."""
    z = sum(math.exp(v) for v in logits)
    return {c: math.exp(logits[VOCAB.index(c)]) / z for c in choices}


def test_yes_no_is_p_yes_over_yes_plus_no():
    probs = next_token_probs(LOGITS, YES_NO)
    assert sum(probs.values()) < 0.5  # "the" holds most of the mass; the score renormalises
    expected = math.exp(2.0) / (math.exp(2.0) + math.exp(0.5))
    assert scoring.p_yes(probs) == pytest.approx(expected, abs=1e-12)
    assert scoring.p_yes(next_token_probs([0.0] * 10, YES_NO)) == pytest.approx(0.5)


def test_likert_is_the_expected_digit():
    probs = next_token_probs(LOGITS, LIKERT)
    weights = [math.exp(v) for v in (-1.0, 1.5, 0.0, 3.0, 0.5)]
    expected = sum((k + 1) * w for k, w in enumerate(weights)) / sum(weights)
    assert scoring.likert_expectation(probs) == pytest.approx(expected, abs=1e-12)
    assert 3.5 < expected < 4.0  # "4" dominates
    assert scoring.likert_expectation({c: 1.0 if c == "5" else 0.0 for c in LIKERT}) == 5.0
    assert scoring.likert_expectation({c: 0.0 for c in LIKERT}) == pytest.approx(3.0)  # no mass: the middle


def test_pairwise_is_p1_against_p2():
    p1, p2 = scoring.pairwise_preference(next_token_probs(LOGITS, PAIR))
    assert p1 == pytest.approx(math.exp(-1.0) / (math.exp(-1.0) + math.exp(1.5)), abs=1e-12)
    assert p1 + p2 == pytest.approx(1.0) and p2 > p1


def test_choice_probabilities_become_the_stored_outcome():
    yesno, likert, pair = (load_prompt(n) for n in ("yesno", "likert", "pairwise"))
    out = judging._read_choices(yesno, 1, next_token_probs(LOGITS, YES_NO))
    assert out.status == DONE and out.result["score"] == pytest.approx(
        scoring.p_yes(next_token_probs(LOGITS, YES_NO))
    )
    assert out.result["probs"]["Yes"] + out.result["probs"]["No"] == pytest.approx(1.0)
    assert set(json.loads(out.raw_output)) == set(YES_NO)  # the raw (not renormalised) probabilities
    out = judging._read_choices(likert, 2, next_token_probs(LOGITS, LIKERT))
    assert 1.0 <= out.result["score"] <= 5.0
    out = judging._read_choices(pair, 3, next_token_probs(LOGITS, PAIR))
    assert out.result["first_wins"] is False and out.result["p_second"] > 0.9
    tie = judging._read_choices(pair, 4, {"1": 0.2, "2": 0.2})
    assert tie.result["first_wins"] is True  # a tie keeps the order shown, as the paper's code does


@pytest.mark.parametrize(
    ("text", "score"),
    [("85", 85.0), ("Score: 72/100", 72.0), ('{"score": 64}', 64.0), ('```json\n{"score": 9.5}\n```', 9.5)],
)
def test_direct_scores_are_parsed(text, score):
    assert scoring.parse_direct_score(text) == score


@pytest.mark.parametrize("text", ["no idea", "150", '{"score": "high"}', ""])
def test_unparsable_direct_answers_raise(text):
    with pytest.raises(scoring.UnparsableAnswer):
        scoring.parse_direct_score(text)


@pytest.mark.parametrize(
    ("text", "pref"),
    [
        ('{"preference": "2"}', 2),
        ('{"preference": 1}', 1),
        ('{"preference": 2.0}', 2),  # int(2.0), as the paper's code reads it
        ('{"preference": " 1 "}', 1),
        ('```json\n{"preference": "1"}\n```', 1),
    ],
)
def test_generated_preferences_are_parsed_as_the_paper_code_does(text, pref):
    assert scoring.parse_preference(text) == pref


@pytest.mark.parametrize(
    "text",
    [
        '{"preference": "<1 or 2>"}',
        "Image 2 is better.",
        '{"pref": 2}',
        '{"preference": 3}',
        '{"preference": "2.0"}',  # int("2.0") fails in the paper's code too
        '{"preference": null}',
    ],
)
def test_unparsable_preferences_raise(text):
    with pytest.raises(scoring.UnparsableAnswer):
        scoring.parse_preference(text)
