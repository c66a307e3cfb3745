"""Reading the VIGOR layout, and the synthetic dataset written in it."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from orchestrator.synth import positive_ranks, write_synthetic_vigor
from orchestrator.vigor import (
    VigorFormatError,
    parse_label_line,
    parse_panorama_name,
    parse_satellite_name,
    read_vigor,
)
from tests.builders import candidates_from_csv, positives_from_files, recall_at

REAL_LINE = (
    "L-1poX8YZAmBZVLMqBu-4w,41.877949,-87.689396,.jpg satellite_41.877971796211014_-87.68943505304125.png 23.0 -29.0 "
    "satellite_41.877971796211014_-87.68899446364951.png 20.0 300.0 satellite_41.877643723758375_-87.68943505304125.png "
    "-304.0 -32.0 satellite_41.877643723758375_-87.68899446364951.png -307.0 297.0"
)


def test_a_real_label_line_parses():
    pano, triples = parse_label_line(REAL_LINE, "x:1")
    assert pano.startswith("L-1poX8YZAmBZVLMqBu-4w,")
    assert triples[0] == ("satellite_41.877971796211014_-87.68943505304125.png", 23.0, -29.0)
    assert len(triples) == 4
    assert parse_panorama_name(pano) == ("L-1poX8YZAmBZVLMqBu-4w", 41.877949, -87.689396)
    assert parse_satellite_name(triples[0][0]) == (41.877971796211014, -87.68943505304125)


def test_malformed_line_names_file_and_line():
    with pytest.raises(VigorFormatError, match=r"labels.txt:7: expected 13 space-separated fields, got 12"):
        parse_label_line(REAL_LINE.rsplit(" ", 1)[0], "labels.txt:7")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vigor")
    write_synthetic_vigor(root, 500, k=20, seed=0, image_size=16)
    return root


def test_synthetic_dataset_has_the_vigor_layout(synth):
    for city in ("Chicago", "SanFrancisco"):
        for f in ("satellite_list.txt", "pano_label_balanced.txt", "same_area_balanced_train.txt",
                  "same_area_balanced_test.txt"):
            assert (synth / "splits" / city / f).is_file()
    data = read_vigor(synth)
    assert len(data.queries) == 500 and not data.missing_images
    assert len(data.labels) == 4 * 500
    line = (synth / "splits" / "Chicago" / "pano_label_balanced.txt").read_text().splitlines()[0]
    assert len(line.split(" ")) == 13
    # The positive is the covering tile whose centre is nearest: |dy|, |dx| within a quarter tile.
    for lb in data.labels:
        limit = 160.5 if lb.relation == "positive" else 320.5
        assert abs(lb.dy) <= limit and abs(lb.dx) <= limit
    assert read_vigor(synth, "same-area", ["Chicago"]).queries  # same-area split files parse too


def test_synthetic_candidates_match_the_paper_baseline(synth):
    positives = positives_from_files(synth)
    stage1 = candidates_from_csv(synth / "candidates.csv")
    got = [recall_at(stage1, positives, k) for k in (1, 3, 5, 10, 20)]
    assert got == pytest.approx([61.2, 73.8, 82.4, 88.0, 92.0])
    with (synth / "candidates.csv").open() as fh:
        assert next(csv.reader(fh)) == ["query", "tile", "rank", "score"]


def test_positive_ranks_are_stratified_and_respect_k():
    import random

    ranks = positive_ranks(1000, 5, random.Random(0))
    assert sum(r == 1 for r in ranks) == 612
    assert all(r is None or 1 <= r <= 5 for r in ranks)


def test_missing_root_and_files_are_clear_errors(tmp_path, synth):
    with pytest.raises(VigorFormatError, match="does not exist"):
        read_vigor(tmp_path / "nope")
    with pytest.raises(VigorFormatError, match="satellite_list.txt is missing"):
        read_vigor(tmp_path)


def test_label_naming_an_unlisted_tile_is_refused(tmp_path):
    root = tmp_path / "v"
    write_synthetic_vigor(root, 4, k=5, seed=1, image_size=16)
    sat = root / "splits" / "Chicago" / "satellite_list.txt"
    lines = sat.read_text().splitlines()
    first_label = (root / "splits" / "Chicago" / "pano_label_balanced.txt").read_text().split(" ")[1]
    sat.write_text("\n".join(x for x in lines if x != first_label) + "\n")
    with pytest.raises(VigorFormatError, match=r"pano_label_balanced.txt:1: tile .* is not in"):
        read_vigor(root)
