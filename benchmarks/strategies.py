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
the top 5 equals the judge's own order (the positive first, then stage-1 order). Writes
``strategies.csv``, ``strategies.md`` and ``strategies.png`` under ``--out`` and prints the
checks the issue asks for.

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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from db.models import FAILED  # noqa: E402
from orchestrator.strategies.base import Done, get_strategy, pairwise_value  # noqa: E402
from orchestrator.strategies.mergesort import worst_case_comparisons  # noqa: E402
from orchestrator.strategies.tournament import tournament_bound  # noqa: E402
from orchestrator.synth import positive_ranks  # noqa: E402
from workers.judges.base import JudgeRequest  # noqa: E402
from workers.judges.simulated import SimulatedJudge  # noqa: E402
from workers.judging import Item, run_batch  # noqa: E402
from workers.prompts import load_prompt  # noqa: E402

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
    reuse across the strategies of one setting: what the database does across runs)."""

    def __init__(self, setting: Setting, seed: int, image: Path) -> None:
        self.judge = SimulatedJudge(
            seed=seed,
            accuracy=setting.accuracy,
            position_bias=setting.position_bias,
            noise=setting.noise,
        )
        self.prompt = load_prompt("pairwise")
        self.image = image
        self.answers: dict[tuple[str, str, str], tuple[bool, bool | None, float | None]] = {}
        self.asked = 0

    def ask(self, needs: Sequence[tuple[Case, str, str]]) -> None:
        todo = [(c, a, b) for c, a, b in dict.fromkeys(needs) if (c.name, a, b) not in self.answers]
        for start in range(0, len(todo), JUDGE_BATCH):
            chunk = todo[start : start + JUDGE_BATCH]
            items = [Item(i, self._request(c, a, b)) for i, (c, a, b) in enumerate(chunk)]
            for (c, a, b), out in zip(chunk, run_batch(self.judge, self.prompt, items), strict=True):
                res = out.result
                self.answers[(c.name, a, b)] = (
                    out.status == FAILED,
                    res.get("first_wins"),
                    res.get("p_first"),
                )
            self.asked += len(chunk)

    def _request(self, case: Case, a: str, b: str) -> JudgeRequest:
        # The context the worker builds (workers/tasks.py): names, positives, stage-1 ranks.
        context = {
            "query": case.name,
            "tiles": (a, b),
            "positive": (a == case.positive, b == case.positive),
            "stage1_rank": (case.tiles.index(a) + 1, case.tiles.index(b) + 1),
        }
        return JudgeRequest(self.prompt.text, (self.image, self.image, self.image), context=context)


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


def run_variant(variant: Variant, cases: Sequence[Case], judgments: Judgments) -> tuple[list, list, list]:
    """Replay every query as the coordinator does; returns (orders, calls, rounds) per query."""
    strategy = get_strategy(variant.strategy, **variant.options)
    probabilities = getattr(strategy, "reads_probabilities", False)
    outcomes: list[dict] = [{} for _ in cases]
    orders: list = [None] * len(cases)
    rounds = [0] * len(cases)
    open_queries = list(range(len(cases)))
    while open_queries:
        needs: list[tuple[int, str, str]] = []
        still_open = []
        for qi in open_queries:
            step = strategy.replay(cases[qi].tiles, outcomes[qi])
            if isinstance(step, Done):
                orders[qi] = list(step.order)
                continue
            still_open.append(qi)
            rounds[qi] += 1
            needs.extend((qi, a, b) for a, b in step.items)
        judgments.ask([(cases[qi], a, b) for qi, a, b in needs])
        for qi, a, b in needs:
            failed, first_wins, p_first = judgments.answers[(cases[qi].name, a, b)]
            outcomes[qi][(a, b)] = pairwise_value(failed, first_wins, p_first, probabilities=probabilities)
        open_queries = still_open
    return orders, [len(o) for o in outcomes], rounds


def evaluate(setting: Setting, variant: Variant, cases: Sequence[Case], judgments: Judgments) -> Result:
    orders, calls, rounds = run_variant(variant, cases, judgments)
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
    args = parser.parse_args(argv)

    cases = synthetic_cases(args.queries, args.k, args.seed)
    settings = [Setting(*g) for g in itertools.product(args.accuracy, args.position_bias, args.noise)]
    results: list[Result] = []
    t0 = time.perf_counter()
    asked = 0
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "tile.png"  # the simulated judge never looks; the workers check it opens
        Image.new("RGB", (8, 8)).save(image)
        bar = tqdm(total=len(settings) * len(VARIANTS), desc="strategies", unit="run", file=sys.stderr)
        for setting in settings:
            judgments = Judgments(setting, args.seed, image)
            results.append(baseline(setting, cases))
            for variant in VARIANTS:
                results.append(evaluate(setting, variant, cases, judgments))
                bar.update()
            asked += judgments.asked
        bar.close()
    elapsed = time.perf_counter() - t0

    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "strategies.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        w.writerows(row(r) for r in results)
    (args.out / "strategies.md").write_text(markdown(results) + "\n")
    plot(results, settings, args.out / "strategies.png")

    print(
        f"{len(cases)} queries, K = {args.k}, {len(settings)} judges x {len(VARIANTS)} strategies; "
        f"{asked} distinct judgments in {elapsed:.0f} s; wrote {args.out}/strategies.{{csv,md,png}}\n"
    )
    by = {(r.setting, r.variant): r for r in results}
    consistent = Setting(1.0, 0.0, 0.0)
    if consistent in settings:
        print(f"Consistent judge ({consistent.label}):\n")
        print(
            markdown([by[(consistent, v)] for v in ["stage 1 (no reranking)", *(x.label for x in VARIANTS)]])
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
    for v in VARIANTS:
        rs = [by[(s, v.label)] for s in settings]
        print(
            f"| {v.label} | {sum(r.calls_mean for r in rs) / len(rs):.1f} | {max(r.calls_max for r in rs)} | "
            f"{sum(r.rounds_mean for r in rs) / len(rs):.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
