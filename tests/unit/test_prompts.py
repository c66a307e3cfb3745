"""The five paper prompts: verbatim files, validated placeholders, stable hashes."""

from __future__ import annotations

import hashlib
from importlib import resources

import pytest

from workers.prompts import PROMPT_NAMES, SPECS, load_prompt, split_prompt


def test_all_five_prompts_of_appendix_a1_are_present():
    assert set(PROMPT_NAMES) == {"direct", "likert", "yesno", "reason", "pairwise"}


@pytest.mark.parametrize("name", PROMPT_NAMES)
def test_hash_is_the_sha256_of_the_file_text(name):
    raw = resources.files("workers").joinpath("prompts", f"{name}.txt").read_text("utf-8").rstrip("\n")
    assert load_prompt(name).sha256 == hashlib.sha256(raw.encode()).hexdigest()


@pytest.mark.parametrize(
    ("name", "ending"),
    [
        ("direct", "Provide a confidence score between 0 (no match) and 100 (perfect match). Respond ONLY with the score."),
        ("yesno", "Answer ONLY with the single word 'Yes' or 'No'."),
        ("likert", "Respond ONLY with a single digit (1, 2, 3, 4, or 5)."),
        ("reason", "Concisely, does the satellite image match the ground-level panorama? Answer ONLY with the single word 'Yes' or 'No'."),
        ("pairwise", 'indicating the preferred image number (1 or 2), like this: {"preference": "<1 or 2>"}'),
    ],
)
def test_text_is_verbatim_with_line_break_hyphens_undone(name, ending):
    text = load_prompt(name).text
    assert text.startswith("You are an expert geospatial analyst. Your task is to determine the best satellite image")
    assert text.endswith(ending)
    for broken in ("panor- ama", "satel- lite", "geo- spatial", "ar- rangement", "’", "”"):
        assert broken not in text


def test_split_puts_images_where_the_placeholders_are():
    parts = split_prompt(load_prompt("pairwise").text)
    assert [p for p in parts if isinstance(p, int)] == [0, 1, 2]
    assert parts[0].endswith("Here is the ground-level panorama query image")
    assert parts[2] == "Here is satellite image 1:"
    assert all("<" not in p or "<1 or 2>" in p for p in parts if isinstance(p, str))


def test_pointwise_prompts_take_two_images_and_pairwise_three():
    for name, spec in SPECS.items():
        n_images = sum(isinstance(p, int) for p in split_prompt(load_prompt(name).text))
        assert n_images == (3 if spec.kind == "pairwise" else 2)


def test_unknown_prompt_lists_the_known_ones():
    with pytest.raises(KeyError, match="direct, likert, yesno, reason, pairwise"):
        load_prompt("fancy")
