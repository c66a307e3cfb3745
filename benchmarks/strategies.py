"""Every pairwise strategy on a synthetic experiment: Recall@k against VLM calls and rounds.

Queries get K = 20 candidates whose positive sits at a stage-1 rank drawn to the paper's
baseline (R@1/3/5/10/20 = 61.2 / 73.8 / 82.4 / 88 / 92 %). The simulated judge answers every
comparison through the workers' own batch procedure (``workers.judging.run_batch`` with the
pairwise prompt), and each strategy advances through the coordinator's replay code
(``get_strategy``, ``pairwise_value``, ``BothOrders``): every round, each open query is replayed
and all it needs is asked in one batch across queries. No Celery or database: the same replay
and the same judge, in one process.

A grid of judges (accuracy x position bias x noise) gives, per strategy: R@1/3/5, VLM calls per
query (mean and max) and sequential rounds per query, plus, for the consistent judge, how often
the top 5 equals the judge's own order (the positive first, then stage-1 order). Pointwise
Yes/No (the ``yesno`` prompt, score = P(Yes), sorted) is the reference row. Writes
``strategies.csv``, ``strategies.md`` and ``strategies.png`` under ``--out`` and prints the
checks the issue asks for.

``--calibrate`` (on by default): for the aims' judges (harmful, consistent, noisy and biased,
pointwise), whether or not in the grid, each parent's stored evidence goes through
``orchestrator.calibrate.derive`` (fuse and gate, dev share 0.3); baseline, parent and derived
R@1/R@5 on the test queries with Wilson intervals, PASS/MISS per aim, and the harmful judge over
split seeds 0-4. Writes ``calibrate.md`` and ``calibrate.csv``.

    .venv/bin/python benchmarks/strategies.py --queries 500 --out benchmarks/out
"""

from __future__ import annotations

import argparse
import csv
import itertools
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from db.models import FAILED  # noqa: E402
from orchestrator.calibrate import METHODS, STAGE1, QueryEvidence, derive  # noqa: E402
from orchestrator.reporting.stats import Proportion, paired_difference, wilson  # noqa: E402
from orchestrator.strategies.base import Done, pairwise_value  # noqa: E402
from orchestrator.strategies.mergesort import worst_case_comparisons  # noqa: E402
from orchestrator.strategies.registry import get_strategy  # noqa: E402
from orchestrator.strategies.tournament import tournament_bound  # noqa: E402
from orchestrator.synth import positive_ranks  # noqa: E402
from workers.judges.base import JudgeRequest  # noqa: E402
from workers.judges.simulated import SimulatedJudge  # noqa: E402
from workers.judging import Item, Outcome, run_batch  # noqa: E402
from workers.prompts import Prompt, load_prompt  # noqa: E402

JUDGE_BATCH = 4096


@dataclass(frozen=True)
class Variant:
    label: str
    strategy: str
    options: dict = field(default_factory=dict, hash=False, compare=False)


VARIANTS = [
    Variant("mergesort", "mergesort"),
    Variant("selection top 3", "selection", {"top": 3}),
    Variant("selection top 5", "selection", {"top": 5}),
    Variant("tournament top 5", "tournament", {"top": 5}),
    Variant("allpairs copeland", "allpairs", {"aggregate": "copeland"}),
    Variant("allpairs bradley-terry", "allpairs", {"aggregate": "bradley-terry"}),
]
VARIANTS += [Variant(v.label + " +both", v.strategy, {**v.options, "both_orders": True}) for v in VARIANTS]
# The pointwise reference: one Yes/No score per candidate, sorted (ties by stage-1 rank).
POINTWISE = Variant("pointwise yesno", "pointwise")


@dataclass(frozen=True)
class Setting:
    accuracy: float
    position_bias: float
    noise: float

    @property
    def label(self) -> str:
        return f"acc {self.accuracy:g}, bias {self.position_bias:g}, noise {self.noise:g}"


@dataclass(frozen=True)
class Case:
    """One query: its candidates (stage-1 order) and which of them is the positive (or None)."""

    name: str
    tiles: tuple[str, ...]
    positive: str | None

    def truth(self) -> list[str]:
        """The consistent simulated judge's own order: the positive first, then stage-1 order."""
        head = [self.positive] if self.positive else []
        return head + [t for t in self.tiles if t != self.positive]


def synthetic_cases(n: int, k: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for i, rank in enumerate(positive_ranks(n, k, rng)):
        tiles = tuple(f"q{i:05d}-t{r:02d}" for r in range(1, k + 1))
        cases.append(Case(f"q{i:05d}", tiles, tiles[rank - 1] if rank is not None else None))
    return cases


class Judgments:
    """The simulated judge behind the workers' batch procedure, with every answer kept (judgment
    reuse across the strategies of one setting: what the database does across runs). Pairwise
    comparisons use the pairwise prompt; pointwise scores the yesno prompt (score = P(Yes))."""

    def __init__(self, setting: Setting, seed: int, image: Path) -> None:
        self.judge = SimulatedJudge(
            seed=seed,
            accuracy=setting.accuracy,
            position_bias=setting.position_bias,
            noise=setting.noise,
        )
        self.prompt = load_prompt("pairwise")
        self.yesno = load_prompt("yesno")
        self.image = image
        self.answers: dict[tuple[str, str, str], tuple[bool, bool | None, float | None]] = {}
        self.scores: dict[tuple[str, str], float | None] = {}  # None: a failed judgment
        self.asked = 0

    def ask(self, needs: Sequence[tuple[Case, str, str]]) -> None:
        todo = [(c, a, b) for c, a, b in dict.fromkeys(needs) if (c.name, a, b) not in self.answers]
        outcomes = self._judge(self.prompt, [self._request(c, a, b) for c, a, b in todo])
        for (c, a, b), out in zip(todo, outcomes, strict=True):
            res = out.result
            self.answers[(c.name, a, b)] = (out.status == FAILED, res.get("first_wins"), res.get("p_first"))

    def score(self, needs: Sequence[tuple[Case, str]]) -> None:
        todo = [(c, t) for c, t in dict.fromkeys(needs) if (c.name, t) not in self.scores]
        outcomes = self._judge(self.yesno, [self._pointwise_request(c, t) for c, t in todo])
        for (c, t), out in zip(todo, outcomes, strict=True):
            self.scores[(c.name, t)] = None if out.status == FAILED else out.result["score"]

    def _judge(self, prompt: Prompt, requests: Sequence[JudgeRequest]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for start in range(0, len(requests), JUDGE_BATCH):
            chunk = requests[start : start + JUDGE_BATCH]
            outcomes += run_batch(self.judge, prompt, [Item(i, r) for i, r in enumerate(chunk)])
        self.asked += len(requests)
        return outcomes

    # The context the worker builds (workers/tasks.py): names, positives, stage-1 ranks.
    def _request(self, case: Case, a: str, b: str) -> JudgeRequest:
        context = {
            "query": case.name,
            "tiles": (a, b),
            "positive": (a == case.positive, b == case.positive),
            "stage1_rank": (case.tiles.index(a) + 1, case.tiles.index(b) + 1),
        }
        return JudgeRequest(self.prompt.text, (self.image, self.image, self.image), context=context)

    def _pointwise_request(self, case: Case, tile: str) -> JudgeRequest:
        context = {
            "query": case.name,
            "tiles": (tile,),
            "positive": (tile == case.positive,),
            "stage1_rank": (case.tiles.index(tile) + 1,),
        }
        return JudgeRequest(self.yesno.text, (self.image, self.image), context=context)


@dataclass
class Result:
    setting: Setting
    variant: str
    recall: dict[int, float]
    calls_mean: float
    calls_max: int
    rounds_mean: float
    rounds_max: int
    exact_top5: float


@dataclass
class Replay:
    """Per query: the final order, VLM calls, rounds, and what the finished run stores for
    calibration (``orchestrator.calibrate``): pairwise, (first, second) -> P(first wins) of every
    answered comparison; pointwise, tile -> score. Failed judgments are left out of it."""

    orders: list[list[str]]
    calls: list[int]
    rounds: list[int]
    evidence: list[dict]


def run_variant(variant: Variant, cases: Sequence[Case], judgments: Judgments) -> Replay:
    """Replay every query as the coordinator does."""
    strategy = get_strategy(variant.strategy, **variant.options)
    pointwise = strategy.kind == "pointwise"
    probabilities = getattr(strategy, "reads_probabilities", False)
    outcomes: list[dict] = [{} for _ in cases]
    evidence: list[dict] = [{} for _ in cases]
    orders: list = [None] * len(cases)
    rounds = [0] * len(cases)
    open_queries = list(range(len(cases)))
    while open_queries:
        needs: list[tuple[int, Any]] = []  # (query, tile) or (query, (first, second))
        still_open = []
        for qi in open_queries:
            step = strategy.replay(cases[qi].tiles, outcomes[qi])
            if isinstance(step, Done):
                orders[qi] = list(step.order)
                continue
            still_open.append(qi)
            rounds[qi] += 1
            needs.extend((qi, item) for item in step.items)
        if pointwise:
            judgments.score([(cases[qi], t) for qi, t in needs])
            for qi, t in needs:
                outcomes[qi][t] = judgments.scores[(cases[qi].name, t)]
                if outcomes[qi][t] is not None:
                    evidence[qi][t] = outcomes[qi][t]
        else:
            judgments.ask([(cases[qi], a, b) for qi, (a, b) in needs])
            for qi, (a, b) in needs:
                failed, first_wins, p_first = judgments.answers[(cases[qi].name, a, b)]
                outcomes[qi][(a, b)] = pairwise_value(
                    failed, first_wins, p_first, probabilities=probabilities
                )
                # The store keeps P(first wins) whatever the strategy reads.
                if not failed:
                    evidence[qi][(a, b)] = pairwise_value(failed, first_wins, p_first, probabilities=True)
        open_queries = still_open
    return Replay(orders, [len(o) for o in outcomes], rounds, evidence)


def evaluate(setting: Setting, variant: Variant, cases: Sequence[Case], judgments: Judgments) -> Result:
    replay = run_variant(variant, cases, judgments)
    orders, calls, rounds = replay.orders, replay.calls, replay.rounds
    recall = {
        k: 100.0
        * sum(c.positive is not None and c.positive in o[:k] for c, o in zip(cases, orders, strict=True))
        / len(cases)
        for k in (1, 3, 5)
    }
    exact = 100.0 * sum(o[:5] == c.truth()[:5] for c, o in zip(cases, orders, strict=True)) / len(cases)
    return Result(
        setting,
        variant.label,
        recall,
        sum(calls) / len(calls),
        max(calls),
        sum(rounds) / len(rounds),
        max(rounds),
        exact,
    )


def baseline(setting: Setting, cases: Sequence[Case]) -> Result:
    recall = {
        k: 100.0 * sum(c.positive is not None and c.positive in c.tiles[:k] for c in cases) / len(cases)
        for k in (1, 3, 5)
    }
    exact = 100.0 * sum(list(c.tiles[:5]) == c.truth()[:5] for c in cases) / len(cases)
    return Result(setting, "stage 1 (no reranking)", recall, 0.0, 0, 0.0, 0, exact)


COLUMNS = [
    "accuracy",
    "position_bias",
    "noise",
    "strategy",
    "R@1",
    "R@3",
    "R@5",
    "calls/query",
    "max calls",
    "rounds/query",
    "max rounds",
    "exact top-5 %",
]


def row(r: Result) -> list:
    s = r.setting
    return [
        s.accuracy,
        s.position_bias,
        s.noise,
        r.variant,
        f"{r.recall[1]:.1f}",
        f"{r.recall[3]:.1f}",
        f"{r.recall[5]:.1f}",
        f"{r.calls_mean:.1f}",
        r.calls_max,
        f"{r.rounds_mean:.1f}",
        r.rounds_max,
        f"{r.exact_top5:.1f}",
    ]


def markdown(results: Sequence[Result]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(x) for x in row(r)) + " |" for r in results]
    return "\n".join(lines)


# A consistent judge, the same with a position bias, and a realistic one (errors, bias and noise).
PLOTTED = (Setting(1.0, 0.0, 0.0), Setting(1.0, 0.2, 0.0), Setting(0.95, 0.2, 0.1))


def plot(results: Sequence[Result], settings: Sequence[Setting], path: Path) -> None:
    """R@1 and R@5 against calls and rounds per query, for up to three judges of the grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    shown = [s for s in PLOTTED if s in settings] or list(settings[:3])
    bases = [v.label for v in VARIANTS if "+both" not in v.label]
    colours = dict(zip(bases, plt.get_cmap("tab10").colors, strict=False))
    markers = dict(zip(shown, "osD", strict=False))
    by = {(r.setting, r.variant): r for r in results}
    axes_spec = (("calls_mean", "VLM calls per query"), ("rounds_mean", "sequential rounds per query"))
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), sharey="row")
    for (i, k), (j, (attr, xlabel)) in itertools.product(enumerate((1, 5)), enumerate(axes_spec)):
        ax = axes[i][j]
        for setting, base in itertools.product(shown, bases):
            one, both = by[(setting, base)], by[(setting, base + " +both")]
            xs = [getattr(one, attr), getattr(both, attr)]
            ys = [one.recall[k], both.recall[k]]
            ax.plot(xs, ys, color=colours[base], lw=0.8, alpha=0.6)
            ax.scatter(xs[0], ys[0], color=colours[base], marker=markers[setting], s=40)
            ax.scatter(
                xs[1], ys[1], facecolors="white", edgecolors=colours[base], marker=markers[setting], s=40
            )
        for setting in shown:
            ax.axhline(by[(setting, "stage 1 (no reranking)")].recall[k], color="grey", lw=0.7, ls=":")
        ax.set_xscale("log")
        ax.set_xticks([20, 35, 50, 69, 100, 190, 380] if attr == "calls_mean" else [1, 2, 5, 10, 20, 50, 100])
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"R@{k} (%)")
        ax.grid(alpha=0.3, which="both")
    handles = [plt.Line2D([], [], color=colours[b], marker="o", ls="", label=b) for b in bases]
    handles += [
        plt.Line2D([], [], color="black", marker="o", mfc="white", ls="-", lw=0.8, label="+ both orders")
    ]
    handles += [plt.Line2D([], [], color="black", marker=markers[s], ls="", label=s.label) for s in shown]
    handles.append(plt.Line2D([], [], color="grey", ls=":", label="stage 1"))
    fig.legend(handles=handles, loc="center right", fontsize=9, frameon=False)
    fig.suptitle(
        "Pairwise strategies at K = 20 with the simulated judge (filled: one order; hollow: both orders)"
    )
    fig.tight_layout(rect=(0, 0, 0.8, 0.96))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Calibration (orchestrator/calibrate.py): a reranking derived from a finished run's stored
# judgments and the stage-1 order, fitted on a dev share of the queries, reported on the rest.

DEV_SHARE = 0.3
SPLIT_SEEDS = range(5)  # the harmful-judge check is repeated over these dev/test splits
CALIBRATED = [
    v
    for v in VARIANTS
    if v.label.removesuffix(" +both") in ("mergesort", "tournament top 5", "allpairs copeland")
]
RUNS = ("baseline", "parent", "derived")


@dataclass(frozen=True)
class Aim:
    name: str
    setting: Setting
    variants: tuple[Variant, ...]
    bar: str  # what the derived run must do, for the report


AIMS = (
    Aim(
        "harmful",
        Setting(0.3, 0.0, 0.0),
        (*CALIBRATED, POINTWISE),
        "R@1 >= baseline - 1 where the parent loses 20 points or more",
    ),
    Aim(
        "consistent",
        Setting(1.0, 0.0, 0.0),
        (*CALIBRATED, POINTWISE),
        "keeps >= 90 % of the parent's gain over the baseline in R@1 and R@5",
    ),
    Aim("noisy", Setting(0.95, 0.2, 0.1), tuple(CALIBRATED), "R@1 >= the better of baseline and parent"),
    Aim("pointwise", Setting(0.95, 0.0, 0.0), (POINTWISE,), "R@1 above both baseline and parent"),
)


def aim_margin(
    aim: str, base: dict[int, float], parent: dict[int, float], derived: dict[int, float]
) -> float | None:
    """Points by which the derived run clears the aim's bar (negative: missed), from R@k in percent;
    None where the aim does not apply (harmful: the parent lost under 20 points; consistent: no gain)."""
    if aim == "harmful":
        margin = derived[1] - (base[1] - 1.0) if parent[1] <= base[1] - 20.0 else None
    elif aim == "consistent":
        gains = {k: parent[k] - base[k] for k in (1, 5) if parent[k] > base[k]}
        margin = min(derived[k] - base[k] - 0.9 * g for k, g in gains.items()) if gains else None
    else:
        margin = derived[1] - max(base[1], parent[1])
    return None if margin is None else round(margin, 6)  # R@k are multiples of 100 / n: no float dust


def aim_verdict(aim: str, margin: float | None) -> str:
    if margin is None:
        return "n/a"
    strict = aim == "pointwise"  # "above": a tie misses
    if margin > 0 or (margin == 0 and not strict):
        return f"PASS (+{margin:.1f})"
    return "MISS (ties, must be above)" if margin == 0 else f"MISS: missed by {-margin:.1f} points"


@dataclass
class Calibrated:
    """One derived run on its test queries, with the baseline and the parent on the same queries."""

    aim: Aim
    variant: str
    method: str
    split_seed: int
    parameter: float
    dev: int
    hits: dict[str, dict[int, list[int]]]  # run -> k -> per test query, 1 if the positive is in the top k

    def interval(self, run: str, k: int) -> Proportion:
        h = self.hits[run][k]
        return wilson(sum(h), len(h))

    def recall(self, run: str) -> dict[int, float]:
        return {k: 100.0 * self.interval(run, k).estimate for k in (1, 5)}

    @property
    def margin(self) -> float | None:
        return aim_margin(self.aim.name, *(self.recall(r) for r in RUNS))

    @property
    def reference(self) -> str:
        """The run the derived R@1 is compared with: what the aim measures against."""
        if self.aim.name == "harmful":
            return "baseline"
        if self.aim.name == "consistent":
            return "parent"
        return "parent" if self.recall("parent")[1] > self.recall("baseline")[1] else "baseline"

    def difference(self) -> tuple[float, float, float]:
        """Derived minus reference R@1 in points, with its paired (Newcombe) 95 % interval."""
        d = paired_difference(self.hits["derived"][1], self.hits[self.reference][1])
        return 100.0 * d.estimate, 100.0 * d.low, 100.0 * d.high


def query_evidence(case: Case, order: Sequence[str], stored: dict, pointwise: bool) -> QueryEvidence:
    """What a finished run stores for one query, in calibrate's terms (tiles numbered by stage-1 rank)."""
    ids = {t: i for i, t in enumerate(case.tiles, start=1)}
    tiles, positive = tuple(ids.values()), ids.get(case.positive)
    if pointwise:
        return QueryEvidence(case.name, tiles, positive, scores={ids[t]: p for t, p in stored.items()})
    return QueryEvidence(
        case.name,
        tiles,
        positive,
        judge_order=tuple(ids[t] for t in order),
        comparisons={(ids[a], ids[b]): p for (a, b), p in stored.items()},
    )


def calibrate(
    aim: Aim, variant: Variant, cases: Sequence[Case], judgments: Judgments, split_seeds: Sequence[int]
) -> list[Calibrated]:
    """Replay the parent strategy, then derive both methods from its evidence on each split."""
    replay = run_variant(variant, cases, judgments)
    pointwise = variant.strategy == "pointwise"
    queries = {
        c.name: query_evidence(c, o, e, pointwise)
        for c, o, e in zip(cases, replay.orders, replay.evidence, strict=True)
    }
    parent = {
        c.name: tuple(c.tiles.index(t) + 1 for t in o) for c, o in zip(cases, replay.orders, strict=True)
    }
    out = []
    for seed, method in itertools.product(split_seeds, METHODS):
        d = derive(method, list(queries.values()), DEV_SHARE, seed)
        orders = {
            "baseline": [queries[n].tiles for n in d.test],
            "parent": [parent[n] for n in d.test],
            "derived": [d.orders[n] for n in d.test],
        }
        positives = [queries[n].positive for n in d.test]
        hits = {
            run: {
                k: [int(p is not None and p in o[:k]) for p, o in zip(positives, run_orders, strict=True)]
                for k in (1, 5)
            }
            for run, run_orders in orders.items()
        }
        out.append(Calibrated(aim, variant.label, method, seed, d.parameter, len(d.dev), hits))
    return out


def _pct(p: Proportion) -> str:
    return f"{100 * p.estimate:.1f} [{100 * p.low:.1f}, {100 * p.high:.1f}]"


def _parameter(c: Calibrated) -> str:
    return f"{c.parameter:g}" + (" (stage 1)" if c.parameter == STAGE1[c.method] else "")


def _difference(c: Calibrated) -> str:
    est, low, high = c.difference()
    return f"{est:+.1f} [{low:+.1f}, {high:+.1f}] vs {c.reference}"


CALIBRATE_COLUMNS = [
    "aim",
    "judge",
    "strategy",
    "method",
    "parameter",
    *(f"{run} R@{k}" for k in (1, 5) for run in RUNS),
    "derived - reference R@1",
    "verdict",
]


def calibrate_markdown(rows: Sequence[Calibrated], seed: int) -> str:
    """The aims table on split ``seed``, then the harmful-judge check's worst split."""
    lines = ["| " + " | ".join(CALIBRATE_COLUMNS) + " |", "|" + "---|" * len(CALIBRATE_COLUMNS)]
    for c in (c for c in rows if c.split_seed == seed):
        cells = [c.aim.name, c.aim.setting.label, c.variant, c.method, _parameter(c)]
        cells += [_pct(c.interval(run, k)) for k in (1, 5) for run in RUNS]
        cells += [_difference(c), aim_verdict(c.aim.name, c.margin)]
        lines.append("| " + " | ".join(cells) + " |")
    harmful = [c for c in rows if c.aim.name == "harmful"]
    seeds = sorted({c.split_seed for c in harmful})
    lines += [
        "",
        f"Harmful judge over split seeds {', '.join(map(str, seeds))}: the worst split per strategy and method.",
        "",
        "| strategy | method | passed | worst split | parameter | baseline R@1 | parent R@1 | derived R@1 | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[Calibrated]] = {}
    for c in harmful:
        groups.setdefault((c.variant, c.method), []).append(c)
    for (variant, method), group in groups.items():
        applies = [c for c in group if c.margin is not None]
        if not applies:
            lines.append(f"| {variant} | {method} | n/a | | | | | | n/a |")
            continue
        worst = min(applies, key=lambda c: c.margin)
        passed = sum(aim_verdict("harmful", c.margin).startswith("PASS") for c in applies)
        cells = [variant, method, f"{passed}/{len(applies)}", str(worst.split_seed), _parameter(worst)]
        cells += [_pct(worst.interval(run, 1)) for run in RUNS] + [aim_verdict("harmful", worst.margin)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Aims (split seed {seed}):", ""]
    for aim in AIMS:
        verdicts = [aim_verdict(aim.name, c.margin) for c in rows if c.aim is aim and c.split_seed == seed]
        counts = {v: sum(x.startswith(v) for x in verdicts) for v in ("PASS", "MISS", "n/a")}
        lines.append(
            f"- {aim.name} ({aim.setting.label}): {aim.bar}: "
            + ", ".join(f"{n} {v}" for v, n in counts.items() if n)
        )
    return "\n".join(lines)


def write_calibrate_csv(rows: Sequence[Calibrated], path: Path) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["aim", "accuracy", "position_bias", "noise", "strategy", "method", "split_seed", "parameter"]
            + ["dev_queries", "test_queries"]
            + [f"{run}_R@{k}{end}" for k in (1, 5) for run in RUNS for end in ("", "_low", "_high")]
            + ["reference", "derived_minus_reference_R@1", "low", "high", "margin", "verdict"]
        )
        for c in rows:
            s = c.aim.setting
            line = [
                c.aim.name,
                s.accuracy,
                s.position_bias,
                s.noise,
                c.variant,
                c.method,
                c.split_seed,
                c.parameter,
            ]
            line += [c.dev, len(c.hits["derived"][1])]
            for k, run in itertools.product((1, 5), RUNS):
                p = c.interval(run, k)
                line += [f"{100 * p.estimate:.2f}", f"{100 * p.low:.2f}", f"{100 * p.high:.2f}"]
            line += [c.reference, *(f"{x:.2f}" for x in c.difference())]
            line += ["" if c.margin is None else f"{c.margin:.2f}", aim_verdict(c.aim.name, c.margin)]
            w.writerow(line)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="seeds the data and the judge")
    parser.add_argument("--accuracy", type=_floats, default=[1.0, 0.95, 0.9, 0.8])
    parser.add_argument("--position-bias", type=_floats, default=[0.0, 0.1, 0.2])
    parser.add_argument("--noise", type=_floats, default=[0.0, 0.1])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    parser.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also derive fuse and gate reranks (orchestrator/calibrate.py) for the aims' judges, "
        "whether or not they are in the grid; writes calibrate.{md,csv}",
    )
    args = parser.parse_args(argv)

    cases = synthetic_cases(args.queries, args.k, args.seed)
    settings = [Setting(*g) for g in itertools.product(args.accuracy, args.position_bias, args.noise)]
    grid_variants = [*VARIANTS, POINTWISE]
    results: list[Result] = []
    calibrated: list[Calibrated] = []
    kept: dict[Setting, Judgments] = {}  # the aims' judges: calibration reuses their answers
    t0 = time.perf_counter()
    asked = 0
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "tile.png"  # the simulated judge never looks; the workers check it opens
        Image.new("RGB", (8, 8)).save(image)
        bar = tqdm(total=len(settings) * len(grid_variants), desc="strategies", unit="run", file=sys.stderr)
        for setting in settings:
            judgments = Judgments(setting, args.seed, image)
            results.append(baseline(setting, cases))
            for variant in grid_variants:
                results.append(evaluate(setting, variant, cases, judgments))
                bar.update()
            asked += judgments.asked
            if args.calibrate and any(a.setting == setting for a in AIMS):
                kept[setting] = judgments
        bar.close()
        elapsed = time.perf_counter() - t0
        if args.calibrate:
            t1 = time.perf_counter()
            bar = tqdm(
                total=sum(len(a.variants) for a in AIMS), desc="calibrate", unit="run", file=sys.stderr
            )
            for aim in AIMS:
                if aim.setting not in kept:
                    kept[aim.setting] = Judgments(aim.setting, args.seed, image)
                judgments = kept[aim.setting]
                seeds = sorted({args.seed, *SPLIT_SEEDS}) if aim.name == "harmful" else [args.seed]
                for variant in aim.variants:
                    calibrated += calibrate(aim, variant, cases, judgments, seeds)
                    bar.update()
            bar.close()
            calibrate_elapsed = time.perf_counter() - t1

    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "strategies.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        w.writerows(row(r) for r in results)
    (args.out / "strategies.md").write_text(markdown(results) + "\n")
    plot(results, settings, args.out / "strategies.png")

    print(
        f"{len(cases)} queries, K = {args.k}, {len(settings)} judges x {len(grid_variants)} strategies; "
        f"{asked} distinct judgments in {elapsed:.0f} s; wrote {args.out}/strategies.{{csv,md,png}}\n"
    )
    by = {(r.setting, r.variant): r for r in results}
    consistent = Setting(1.0, 0.0, 0.0)
    if consistent in settings:
        print(f"Consistent judge ({consistent.label}):\n")
        print(
            markdown(
                [by[(consistent, v)] for v in ["stage 1 (no reranking)", *(x.label for x in grid_variants)]]
            )
        )
        t, m = by[(consistent, "tournament top 5")], by[(consistent, "mergesort")]
        print(
            f"\n- tournament top 5: at most {t.calls_max} calls per query (bound {tournament_bound(args.k, 5)}), "
            f"exact top 5 in {t.exact_top5:.1f} % of queries; merge sort: up to {m.calls_max} "
            f"(bound {worst_case_comparisons(args.k)})"
        )
        print(
            f"- R@1: tournament {t.recall[1]:.1f} %, merge sort {m.recall[1]:.1f} % "
            f"({'the same' if t.recall[1] == m.recall[1] else 'DIFFERENT'})"
        )
    print("\nBoth orders against position bias (R@1 %; restored = share of the loss won back):\n")
    print("| judge | strategy | bias 0 | bias B | bias B, both orders | restored |")
    print("|---|---|---|---|---|---|")
    for s in settings:
        if s.position_bias == 0:
            continue
        clean = Setting(s.accuracy, 0.0, s.noise)
        if clean not in settings:
            continue
        for v in VARIANTS:
            if "+both" in v.label:
                continue
            r0, rb, rd = by[(clean, v.label)], by[(s, v.label)], by[(s, v.label + " +both")]
            lost = r0.recall[1] - rb.recall[1]
            restored = (rd.recall[1] - rb.recall[1]) / lost if lost > 0 else float("nan")
            print(
                f"| {s.label} | {v.label} | {r0.recall[1]:.1f} | {rb.recall[1]:.1f} | {rd.recall[1]:.1f} | "
                f"{'-' if lost <= 0 else f'{100 * restored:.0f} %'} |"
            )
    print("\nCalls per query at K = 20 (mean over the grid, and the largest seen):\n")
    print("| strategy | calls/query | max | rounds/query |")
    print("|---|---|---|---|")
    for v in grid_variants:
        rs = [by[(s, v.label)] for s in settings]
        print(
            f"| {v.label} | {sum(r.calls_mean for r in rs) / len(rs):.1f} | {max(r.calls_max for r in rs)} | "
            f"{sum(r.rounds_mean for r in rs) / len(rs):.1f} |"
        )
    if args.calibrate:
        table = calibrate_markdown(calibrated, args.seed)
        (args.out / "calibrate.md").write_text(table + "\n")
        write_calibrate_csv(calibrated, args.out / "calibrate.csv")
        n_test = len(calibrated[0].hits["derived"][1])
        print(
            f"\nCalibration: derived reranks (fuse, gate) fitted on {calibrated[0].dev} dev queries "
            f"(share {DEV_SHARE}), reported on the {n_test} test queries of split seed {args.seed}; "
            f"R@k in % with 95 % Wilson intervals, the difference with its paired Newcombe interval "
            f"({calibrate_elapsed:.0f} s; wrote {args.out}/calibrate.{{md,csv}}):\n"
        )
        print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
