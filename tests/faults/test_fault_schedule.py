"""A seeded random fault schedule against one pairwise run (schedule.py): every kind of fault once,
in an order and at gaps drawn from the seed, and the run must end as a fault-free one does.

The seed is printed; ``CVGL_FAULT_SEED=N`` reproduces a run. ``benchmarks/soak.py`` plays longer
schedules. About three minutes.
"""

from __future__ import annotations

import os
import random
import time

import pytest

from tests.builders import synthetic_dataset
from tests.faults.schedule import KINDS, FaultRun, Schedule
from tests.faults.stack import Stack
from tests.integration.conftest import cli

pytestmark = pytest.mark.integration

BATCH = 16
# Long enough to outlast the schedule (PostgreSQL down 30 s among it) with two workers.
SUBMIT = [
    "submit",
    "--strategy",
    "pairwise",
    "--all-queries",
    "--seed",
    "5",
    "--accuracy",
    "0.8",
    "--batch-size",
    str(BATCH),
    "--no-reuse",
]
RECOVERY_BOUND_S = 5.0
# Redis gives a dead or frozen worker's unacknowledged batch back after the visibility timeout (8 s
# here): until then the run may have nothing else to do.
VISIBILITY_TIMEOUT_CASES = {"freeze", "parent"}


def test_a_seeded_random_fault_schedule(tmp_path, capsys):
    seed = int(os.environ.get("CVGL_FAULT_SEED") or random.SystemRandom().randrange(10**6))
    schedule = Schedule.draw(seed)
    dataset = synthetic_dataset(tmp_path / "VIGOR", n_queries=40)
    stack = Stack(tmp_path, CVGL_LEASE_SECONDS="4")
    lines: list[str] = []
    try:
        cli(stack.env, "ingest", str(dataset))
        cli(stack.env, "import-candidates", str(dataset / "candidates.csv"), "--name", "s4g")
        run = FaultRun(stack, [*SUBMIT, "--latency-ms", "60"], BATCH, down_seconds=30, log=lines.append)
        run.start()
        t0 = time.monotonic()
        run.play(schedule)
        total = run.wait_done()
        reference = int(cli(stack.env, *SUBMIT, "--wait", timeout=300).stdout.split()[-1])
        counts = run.verify(reference)
    finally:
        with capsys.disabled():
            print(
                f"\nfault schedule: seed {seed} (CVGL_FAULT_SEED={seed} reproduces it): {' '.join(schedule.kinds)}"
            )
            for line in lines:
                print(line)
        stack.close()
    with capsys.disabled():
        print(f"  run done in {total:.0f} s ({time.monotonic() - t0:.0f} s of faults and recovery): {counts}")
        print("  rankings and verdicts identical to the fault-free run", reference)
    assert sorted(f.kind for f in run.faults) == sorted(KINDS)  # every kind was injected while the run ran
    slow = [
        f for f in run.faults if f.kind not in VISIBILITY_TIMEOUT_CASES and f.recovered_s > RECOVERY_BOUND_S
    ]
    assert not slow, f"slower than {RECOVERY_BOUND_S} s to move again: {slow}"
