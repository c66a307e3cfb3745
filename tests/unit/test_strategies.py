"""Every pairwise strategy as a pure replay: exact under a consistent judge, within its comparison
bound under any judge, and asking only for what is missing from any subset of its verdicts."""

from __future__ import annotations

import ast
import itertools
import math
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.strategies.allpairs import AllPairs, bradley_terry
from orchestrator.strategies.base import Done, Need, StrategyOptionError, pairwise_value
from orchestrator.strategies.both_orders import BothOrders, combined
from orchestrator.strategies.mergesort import worst_case_comparisons
from orchestrator.strategies.registry import get_strategy
from orchestrator.strategies.selection import selection_comparisons
from orchestrator.strategies.tournament import tournament_bound
from workers.judges.base import JudgeRequest
from workers.judges.simulated import SimulatedJudge

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# (registry name, options, how many leading places are exact, bound on comparisons for n items)
STRATEGIES = [  # "pairwise" is the same class as "mergesort" (test_registry_names_and_option_errors)
    ("mergesort", {}, lambda n: n, worst_case_comparisons),
    ("selection", {"top": 3}, lambda n: min(3, n), lambda n: selection_comparisons(n, 3)),
    ("selection", {"top": 5}, lambda n: min(5, n), lambda n: selection_comparisons(n, 5)),
    ("tournament", {"top": 1}, lambda n: min(1, n), lambda n: tournament_bound(n, 1)),
    ("tournament", {"top": 5}, lambda n: min(5, n), lambda n: tournament_bound(n, 5)),
    ("tournament", {"top": 20}, lambda n: n, lambda n: tournament_bound(n, 20)),
    ("allpairs", {}, lambda n: n, lambda n: n * (n - 1) // 2),
    ("allpairs", {"aggregate": "bradley-terry"}, lambda n: n, lambda n: n * (n - 1) // 2),
]
IDS = [f"{name}{''.join(f'-{v}' for v in opts.values())}" for name, opts, _, _ in STRATEGIES]


def drive(strategy, candidates, p_first, stored=None):
    """Play the coordinator: answer every Need with ``p_first(first, second)`` until Done.

    Returns (order, stored P(first wins) per asked order, rounds).
    """
    stored = {} if stored is None else stored
    probabilities = getattr(strategy, "reads_probabilities", False)
    rounds = 0
    while True:
        outcomes = {
            pair: pairwise_value(False, p >= 0.5, p, probabilities=probabilities)
            for pair, p in stored.items()
        }
        step = strategy.replay(candidates, outcomes)
        if isinstance(step, Done):
            return list(step.order), stored, rounds
        assert step.items, "a Need names at least one judgment"
        rounds += 1
        for a, b in step.items:
            assert a != b and a in candidates and b in candidates
            assert (a, b) not in stored, "asked again for a stored judgment"
            stored[(a, b)] = p_first(a, b)


def consistent(quality, bias=0.0):
    """A transitive judge: the better item wins with P = 0.9, after a shift to the first shown."""

    def p_first(a, b):
        p = 0.9 if quality[a] > quality[b] else 0.1
        return bias + (1.0 - bias) * p

    return p_first


def arbitrary(draw_bits):
    """Any judge at all: each ordered pair gets its own answer (non-transitive, order-dependent)."""
    return lambda a, b: 0.05 + 0.9 * draw_bits(a, b)


@st.composite
def scenario(draw, min_n=1, max_n=20):
    n = draw(st.integers(min_n, max_n))
    candidates = [f"t{i}" for i in draw(st.permutations(range(n)))]
    quality = dict(zip(candidates, draw(st.permutations(range(n))), strict=True))
    return candidates, quality


# ----------------------------------------------------------------------------------------------
# exact under a consistent judge


@pytest.mark.parametrize(("name", "options", "exact", "bound"), STRATEGIES, ids=IDS)
@FAST
@given(case=scenario())
def test_consistent_judge_gives_the_true_top_k(name, options, exact, bound, case):
    candidates, quality = case
    order, stored, _ = drive(get_strategy(name, **options), candidates, consistent(quality))
    truth = sorted(candidates, key=lambda c: -quality[c])
    k = exact(len(candidates))
    assert order[:k] == truth[:k]
    assert sorted(order) == sorted(candidates)
    # The places not ranked exactly keep stage-1 order.
    assert order[k:] == [c for c in candidates if c not in set(truth[:k])] or k == len(candidates)


@pytest.mark.parametrize(("name", "options", "exact", "bound"), STRATEGIES, ids=IDS)
@FAST
@given(case=scenario(), bias=st.sampled_from([0.1, 0.2, 0.5, 0.8]))
def test_both_orders_cancels_any_position_bias(name, options, exact, bound, case, bias):
    candidates, quality = case
    truth = sorted(candidates, key=lambda c: -quality[c])
    k = exact(len(candidates))
    debiased, stored, _ = drive(
        get_strategy(name, both_orders=True, **options), candidates, consistent(quality, bias)
    )
    assert debiased[:k] == truth[:k]
    plain, plain_stored, _ = drive(get_strategy(name, **options), candidates, consistent(quality))
    assert debiased == plain
    # Both orders of every comparison, and nothing else.
    assert set(stored) == set(plain_stored) | {(b, a) for a, b in plain_stored}


# ----------------------------------------------------------------------------------------------
# bounds on comparisons and rounds, under any judge


@pytest.mark.parametrize(("name", "options", "exact", "bound"), STRATEGIES, ids=IDS)
@FAST
@given(case=scenario(), rnd=st.randoms(use_true_random=False))
def test_comparisons_never_exceed_the_bound(name, options, exact, bound, case, rnd):
    candidates, _ = case
    answers: dict = {}

    def bits(a, b):
        return answers.setdefault((a, b), rnd.random() < 0.5)

    order, stored, rounds = drive(get_strategy(name, **options), candidates, arbitrary(bits))
    n = len(candidates)
    assert sorted(order) == sorted(candidates)
    assert len(stored) <= bound(n)
    assert rounds <= len(stored) or n <= 1
    _, both, _ = drive(get_strategy(name, both_orders=True, **options), candidates, arbitrary(bits))
    assert len(both) <= 2 * bound(n)


def test_stated_bounds_at_k20():
    assert worst_case_comparisons(20) == 69
    assert selection_comparisons(20, 3) == 19 + 18 + 17 == 54
    assert tournament_bound(20, 5) == 35
    assert tournament_bound(20, 5) <= 20 - 1 + (5 - 1) * math.ceil(math.log2(20))  # the looser form


def test_selection_asks_54_one_at_a_time_when_stage1_is_right():
    candidates = [f"t{i}" for i in range(20)]
    quality = {c: -i for i, c in enumerate(candidates)}
    order, stored, rounds = drive(get_strategy("selection", top=3), candidates, consistent(quality))
    assert len(stored) == rounds == 54
    assert order == candidates


def test_tournament_rounds_and_worst_case_over_many_judges():
    rng = random.Random(7)
    worst = 0
    for _ in range(300):
        candidates = [f"t{i}" for i in range(20)]
        answers = {}

        def bits(a, b, answers=answers):
            return answers.setdefault((a, b), rng.random() < 0.5)

        _, stored, rounds = drive(get_strategy("tournament", top=5), candidates, arbitrary(bits))
        worst = max(worst, len(stored))
        assert rounds <= 5 + 4 * 4  # ceil(log2 20) for the first place, then at most 4 per place
    assert 30 <= worst <= 35


def test_allpairs_is_one_round_of_190():
    candidates = [f"t{i}" for i in range(20)]
    quality = {c: i % 7 for i, c in enumerate(candidates)}
    _, stored, rounds = drive(get_strategy("allpairs"), candidates, consistent(quality))
    assert (len(stored), rounds) == (190, 1)
    _, stored, rounds = drive(get_strategy("allpairs", both_orders=True), candidates, consistent(quality))
    assert (len(stored), rounds) == (380, 1)


# ----------------------------------------------------------------------------------------------
# replay over any subset of the stored verdicts


@pytest.mark.parametrize(("name", "options", "exact", "bound"), STRATEGIES, ids=IDS)
@pytest.mark.parametrize("both_orders", [False, True], ids=["one-order", "both-orders"])
@FAST
@given(case=scenario(min_n=2), noisy=st.booleans(), rnd=st.randoms(use_true_random=False))
def test_replay_over_any_subset_asks_only_for_missing(
    name, options, exact, bound, both_orders, case, noisy, rnd
):
    candidates, quality = case
    strategy = get_strategy(name, both_orders=both_orders, **options)
    answers: dict = {}

    def p_first(a, b):
        if noisy:  # any judge: a probability of its own for each order shown
            return answers.setdefault((a, b), rnd.choice([0.0, 0.5, 1.0, rnd.random()]))
        return consistent(quality, 0.2)(a, b)

    final, stored, _ = drive(strategy, candidates, p_first)
    keep = {pair for pair in sorted(stored) if rnd.random() < rnd.choice([0.1, 0.5, 0.9])}
    subset = {pair: stored[pair] for pair in keep}
    probabilities = getattr(strategy, "reads_probabilities", False)
    step = strategy.replay(
        candidates,
        {p: pairwise_value(False, v >= 0.5, v, probabilities=probabilities) for p, v in subset.items()},
    )
    if isinstance(step, Done):
        assert list(step.order) == final
    else:
        assert step.items and all(item not in subset for item in step.items)
        assert all(item in stored for item in step.items), "the same verdicts lead the same way"
        assert len(set(step.items)) == len(step.items)
    # Resuming from the subset reaches the same order with no judgment asked twice.
    resumed, _, _ = drive(strategy, candidates, lambda a, b: stored[(a, b)], stored=dict(subset))
    assert resumed == final


# ----------------------------------------------------------------------------------------------
# failures keep the order shown


@pytest.mark.parametrize(("name", "options", "exact", "bound"), STRATEGIES, ids=IDS)
@pytest.mark.parametrize("both_orders", [False, True], ids=["one-order", "both-orders"])
def test_every_comparison_failed_keeps_stage1_order(name, options, exact, bound, both_orders):
    candidates = [f"t{i}" for i in range(13)]
    strategy = get_strategy(name, both_orders=both_orders, **options)
    probabilities = getattr(strategy, "reads_probabilities", False)
    failed = pairwise_value(True, None, None, probabilities=probabilities)
    outcomes: dict = {}
    while not isinstance(step := strategy.replay(candidates, outcomes), Done):
        outcomes.update(dict.fromkeys(step.items, failed))
    assert list(step.order) == candidates


def test_pairwise_value_reads_stored_rows():
    assert pairwise_value(True, None, None, probabilities=False) is True
    assert pairwise_value(False, False, 0.3, probabilities=False) is False
    assert pairwise_value(True, None, None, probabilities=True) == 0.5
    assert pairwise_value(False, True, None, probabilities=True) == 1.0  # a judge that only generates
    assert pairwise_value(False, False, 0.3, probabilities=True) == 0.3


# ----------------------------------------------------------------------------------------------
# both orders and aggregation in detail


def test_combined_cancels_a_position_shift():
    for p in (0.05, 0.3, 0.49, 0.51, 0.9):
        for bias in (0.0, 0.2, 0.6):
            p_ab = bias + (1 - bias) * p
            p_ba = bias + (1 - bias) * (1 - p)
            assert (combined(p_ab, p_ba) >= 0.5) == (p >= 0.5)
            assert combined(p_ab, p_ba) == pytest.approx(bias / 2 + (1 - bias) * p)


def test_both_orders_waits_for_the_second_order_and_a_failure_leaves_the_other_to_decide():
    strategy = BothOrders(get_strategy("mergesort"))
    assert strategy.replay(["a", "b"], {}) == Need((("a", "b"), ("b", "a")))
    assert strategy.replay(["a", "b"], {("a", "b"): 0.9}) == Need((("b", "a"),))
    # (b, a) failed (0.5): (a, b) alone decides; b shown first at 0.5 says nothing.
    assert strategy.replay(["a", "b"], {("a", "b"): 0.2, ("b", "a"): 0.5}) == Done(("b", "a"))
    assert strategy.replay(["a", "b"], {("a", "b"): 0.5, ("b", "a"): 0.5}) == Done(("a", "b"))


def test_bradley_terry_uses_confidence_where_copeland_ties():
    # A cycle: a beats b surely, b beats c and c beats a narrowly. Copeland: one win each, so
    # stage-1 order; Bradley-Terry puts a first and b last.
    probs = {("c", "a"): 0.55, ("c", "b"): 0.45, ("a", "b"): 0.99}
    # stage-1 order c, a, b; stored as (first, second) -> P(first wins)
    assert AllPairs("copeland").replay(["c", "a", "b"], probs) == Done(("c", "a", "b"))
    assert AllPairs("bradley-terry").replay(["c", "a", "b"], probs) == Done(("a", "c", "b"))


def test_bradley_terry_recovers_known_strengths():
    rng = random.Random(3)
    theta = {f"t{i}": rng.gauss(0, 1.5) for i in range(12)}
    items = list(theta)
    probs = {(a, b): 1 / (1 + math.exp(theta[b] - theta[a])) for a, b in itertools.combinations(items, 2)}
    fitted = bradley_terry(items, probs)
    assert sorted(items, key=lambda c: -fitted[c]) == sorted(items, key=lambda c: -theta[c])
    # Hard outcomes in a full round-robin: the fit orders as wins do.
    hard = {p: float(v >= 0.5) for p, v in probs.items()}
    assert AllPairs("bradley-terry").replay(items, hard) == AllPairs("copeland").replay(items, hard)


# ----------------------------------------------------------------------------------------------
# registry and options


def test_registry_names_and_option_errors():
    assert type(get_strategy("pairwise")) is type(get_strategy("mergesort"))
    assert get_strategy("selection").top == 3 and get_strategy("tournament").top == 5
    assert isinstance(get_strategy("tournament", top=2, both_orders=True), BothOrders)
    with pytest.raises(StrategyOptionError, match="takes no option 'top'"):
        get_strategy("mergesort", top=3)
    with pytest.raises(StrategyOptionError, match="positive integer"):
        get_strategy("tournament", top=0)
    with pytest.raises(StrategyOptionError, match="aggregate must be one of"):
        get_strategy("allpairs", aggregate="borda")
    with pytest.raises(StrategyOptionError, match="pairwise strategies"):
        get_strategy("pointwise", both_orders=True)
    with pytest.raises(StrategyOptionError, match="true or false"):
        get_strategy("mergesort", both_orders="yes")


def _strategy_imports() -> dict[str, set[str]]:
    """Each module of orchestrator/strategies -> the package's modules it imports, at any depth
    of the file (an import inside a function closes a circle as surely as one at the top)."""
    package = Path(__file__).resolve().parents[2] / "orchestrator" / "strategies"
    prefix = "orchestrator.strategies."
    graph = {}
    for path in package.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level:  # relative: from . import x, from .x import y
                    module = prefix + module if module else prefix.rstrip(".")
                names.add(module)
                names.update(f"{module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        graph[path.stem] = {n.removeprefix(prefix) for n in names if n.startswith(prefix)} - {path.stem}
    return {name: imports & set(graph) for name, imports in graph.items()}  # modules, not classes


def test_strategy_modules_import_without_a_circle():
    graph = _strategy_imports()
    assert {"base", "registry", "mergesort", "both_orders"} <= set(graph)
    # The registry is imported only from outside the package; the contract imports no strategy.
    assert [name for name, imports in graph.items() if "registry" in imports] == []
    assert graph["base"] == set()
    done, visiting = set(), []

    def visit(name):
        assert name not in visiting, f"import circle: {' -> '.join([*visiting, name])}"
        if name in done or name not in graph:
            return
        visiting.append(name)
        for imported in sorted(graph[name]):
            visit(imported)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


# ----------------------------------------------------------------------------------------------
# the simulated judge's noise (the benchmark's non-transitive judge)


def _pair(query, t1, t2, r1, r2):
    ctx = {"query": query, "tiles": (t1, t2), "positive": (False, False), "stage1_rank": (r1, r2)}
    return JudgeRequest("p", (Path("g"), Path("a"), Path("b")), context=ctx)


def test_noise_zero_changes_nothing_and_noise_is_deterministic():
    reqs = [_pair(f"q{i}", "x", "y", 1 + i % 3, 5) for i in range(300)]
    plain = SimulatedJudge(seed=1, accuracy=0.8, position_bias=0.1).choice_probs(reqs, ["1", "2"])
    zero = SimulatedJudge(seed=1, accuracy=0.8, position_bias=0.1, noise=0.0).choice_probs(reqs, ["1", "2"])
    assert plain == zero
    noisy = SimulatedJudge(seed=1, accuracy=0.8, noise=0.4).choice_probs(reqs, ["1", "2"])
    assert noisy == SimulatedJudge(seed=1, accuracy=0.8, noise=0.4).choice_probs(reqs, ["1", "2"])
    with pytest.raises(ValueError, match="noise"):
        SimulatedJudge(noise=1.5)


def test_noise_makes_the_two_orders_disagree_and_preferences_cyclic():
    judge = SimulatedJudge(seed=2, accuracy=1.0, noise=0.5)
    clean = SimulatedJudge(seed=2, accuracy=1.0)
    n, disagree, cycles = 2000, 0, 0
    for i in range(n):
        ab = judge.p_first(_pair(f"q{i}", "x", "y", 1, 2).context) >= 0.5
        ba = judge.p_first(_pair(f"q{i}", "y", "x", 2, 1).context) >= 0.5
        disagree += ab == ba  # both orders prefer the first shown (or both the second)
        assert clean.p_first(_pair(f"q{i}", "x", "y", 1, 2).context) > 0.5
        x_y = judge.p_first(_pair(f"q{i}", "x", "y", 1, 2).context) >= 0.5
        y_z = judge.p_first(_pair(f"q{i}", "y", "z", 2, 3).context) >= 0.5
        z_x = judge.p_first(_pair(f"q{i}", "z", "x", 3, 1).context) >= 0.5
        cycles += x_y and y_z and z_x
    # Each order is right with P = 0.5 + 0.5 * 0.5 = 0.75, so they contradict each other with
    # P = 2 * 0.75 * 0.25 = 0.375 (never, without noise).
    assert 0.33 < disagree / n < 0.42
    assert cycles > 0
