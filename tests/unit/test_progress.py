"""What the progress bar counts, and the status table's width."""

from __future__ import annotations

import pytest

from orchestrator.drive import Interrupted
from orchestrator.progress import RunProgress, bar_state, expected_judgments, status_table


def _progress(**kw) -> RunProgress:
    base = dict(
        run_id=1,
        status="running",
        strategy="pairwise",
        prompt="pairwise",
        judge="simulated",
        model="simulated",
        queries_total=500,
        queries_done=0,
        judgments_pending=0,
        judgments_done=0,
        judgments_failed=0,
    )
    return RunProgress(**{**base, **kw})


@pytest.mark.parametrize(
    ("strategy", "options", "per_query"),
    [
        ("pairwise", {}, 69),  # merge sort's worst case for K = 20
        ("mergesort", {"both_orders": True}, 138),
        ("selection", {"top": 3}, 54),
        ("tournament", {"top": 5}, 35),
        ("allpairs", {}, 190),
        ("pointwise", {}, 20),
    ],
)
def test_expected_judgments_is_the_strategys_bound_per_query(strategy, options, per_query):
    assert expected_judgments(strategy, options, 20, 500) == per_query * 500


def test_a_derived_run_has_no_expected_count():
    assert expected_judgments("fuse", {}, 20, 10) is None


def test_a_merge_sort_run_moves_before_any_query_finishes():
    # Merge sort finishes a query only when its sort does: counted in queries, the bar sat at 0/500.
    p = _progress(queries_done=0, judgments_done=12000, judgments_failed=34, judgments_pending=800,
                  judgments_expected=500 * 69)  # fmt: skip
    state = bar_state(p)
    assert (state.done, state.total) == (12034, 34500)
    assert state.postfix["queries"] == "0/500"
    assert all(isinstance(v, int | str) and not isinstance(v, float) for v in state.postfix.values())


def test_a_run_that_ends_under_its_bound_ends_full():
    state = bar_state(_progress(status="done", queries_done=500, judgments_done=24000, judgments_expected=34500))
    assert (state.done, state.total) == (24000, 24000)


def test_without_a_bound_the_bar_counts_to_what_is_stored():
    state = bar_state(_progress(judgments_done=10, judgments_pending=5, judgments_expected=None))
    assert (state.done, state.total) == (10, 15)


def test_status_table_fits_120_columns_with_the_longest_realistic_values():
    long = _progress(
        run_id=9999,
        status="cancelled",
        strategy="tournament",
        prompt="pairwise",
        judge="qwen2.5-vl",
        model="Qwen/Qwen2.5-VL-7B-Instruct",
        queries_total=10000,
        queries_done=10000,
        judgments_done=690000,
        judgments_reused=690000,
        judgments_pending=690000,
        judgments_failed=690000,
    )
    folder = _progress(model="/data/checkpoints/llava-hf/llava-v1.6-mistral-7b-hf-finetuned-vigor-epoch-12")
    lines = status_table([long, folder])
    assert max(len(line) for line in lines) <= 120
    assert lines[1].endswith("Qwen/Qwen2.5-VL-7B-Instruct")  # a hub id fits whole
    assert "cancelled" in lines[1] and "10000/10000" in lines[1]
    assert lines[2].endswith("finetuned-vigor-epoch-12") and "…" in lines[2]  # a long folder keeps its end


@pytest.mark.parametrize("embedded", [False, True])
def test_interrupted_says_how_to_go_on(embedded):
    text = str(Interrupted(7, embedded))
    assert "orchestrator cancel 7" in text
    if embedded:
        assert "orchestrator resume 7 --wait" in text and "stopped with this process" in text
    else:
        assert "orchestrator watch 7" in text and "orchestrator resume 7" in text and "goes on" in text
