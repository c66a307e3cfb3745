"""Soak: seeded random faults against pairwise runs, back to back, for as long as asked.

    python benchmarks/soak.py --minutes 20 --seed 7

The faults of the CI schedule (``tests/faults/schedule.py``: worker child, worker, coordinator and
waiting-process SIGKILLs, bursts of ``resume``, a frozen worker, Redis FLUSHALL, PostgreSQL SIGKILL
and PostgreSQL down), drawn at random every few seconds while a run goes on; each run is then held
to a fault-free run of the same judge and seed (rankings, verdicts, nothing lost, duplicated,
failed or pending), and the next one starts. Prints each fault as it happens and, at the end,
faults survived per hour and the recovery times per kind (median and worst). Needs redis-server
and PostgreSQL's initdb/pg_ctl, as the tests do. Exits 1 if any run ended differently.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.builders import synthetic_dataset  # noqa: E402
from tests.faults.schedule import KINDS, FaultRun  # noqa: E402
from tests.faults.stack import Stack  # noqa: E402
from tests.integration.conftest import cli  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument(
        "--latency-ms", type=float, default=60.0, help="simulated judge latency: how long runs last"
    )
    parser.add_argument("--down-seconds", type=float, default=30.0, help="PostgreSQL down for this long")
    parser.add_argument("--gap", type=float, nargs=2, default=(2.0, 5.0), help="seconds between faults")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    t_end = time.monotonic() + args.minutes * 60
    t0 = time.monotonic()
    recovery: dict[str, list[float]] = defaultdict(list)
    runs, judgments, bad = 0, 0, 0
    with tempfile.TemporaryDirectory(prefix="cvgl-soak-") as tmp:
        root = Path(tmp)
        dataset = synthetic_dataset(root / "VIGOR", n_queries=args.queries)
        stack = Stack(root, CVGL_LEASE_SECONDS="4")
        try:
            cli(stack.env, "ingest", str(dataset))
            cli(stack.env, "import-candidates", str(dataset / "candidates.csv"), "--name", "s4g")
            print(
                f"soak: seed {args.seed}, {args.minutes:g} minutes, {args.queries} queries a run", flush=True
            )
            while time.monotonic() < t_end:
                seed = rng.randrange(10**6)
                submit = [
                    "submit",
                    "--strategy",
                    "pairwise",
                    "--all-queries",
                    "--seed",
                    str(seed),
                    "--accuracy",
                    "0.8",
                    "--batch-size",
                    "16",
                    "--max-attempts",
                    "8",
                    "--no-reuse",
                ]
                run = FaultRun(
                    stack,
                    [*submit, "--latency-ms", str(args.latency_ms)],
                    16,
                    down_seconds=args.down_seconds,
                    log=lambda m: print(m, flush=True),
                )
                run.start()
                print(f"run {run.run_id} (judge seed {seed})", flush=True)
                while not run.done() and time.monotonic() < t_end:
                    time.sleep(rng.uniform(*args.gap))
                    run.inject(rng.choice(KINDS))
                try:
                    run.wait_done(timeout=600)
                    reference = int(cli(stack.env, *submit, "--wait", timeout=600).stdout.split()[-1])
                    counts = run.verify(reference)
                    print(f"run {run.run_id}: identical to fault-free run {reference}: {counts}", flush=True)
                    judgments += counts["judgments"]
                except AssertionError as exc:
                    bad += 1
                    print(f"run {run.run_id} ENDED DIFFERENTLY: {exc}", flush=True)
                runs += 1
                for f in run.faults:
                    recovery[f.kind].append(f.recovered_s or 0.0)
                run.stop()
        finally:
            stack.close()
    hours = (time.monotonic() - t0) / 3600
    n = sum(len(v) for v in recovery.values())
    print(
        f"\nsoak: {n} faults in {hours * 60:.1f} minutes ({n / hours:.0f} faults survived per hour), "
        f"{runs} runs, {judgments} judgments, {bad} runs ended differently"
    )
    print(f"  {'fault':<14}{'count':>6}{'median s':>10}{'worst s':>9}  (time until the run moved again)")
    for kind in KINDS:
        v = recovery.get(kind, [])
        if v:
            print(f"  {kind:<14}{len(v):>6}{statistics.median(v):>10.2f}{max(v):>9.2f}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
