"""A seeded random schedule of faults against one pairwise run on a whole stack (``stack.py``).

The run: two judgment workers (simulated judge with a latency, so the run lasts), two coordinators
and the ``submit --wait`` process that follows it. The faults, drawn from a seed:

- ``child``: SIGKILL of a worker's pool child mid-batch;
- ``parent``: SIGKILL of a whole worker (parent and child), then a new one;
- ``coordinator``: SIGKILL of a coordinator, then a new one;
- ``waiter``: SIGKILL of the process following the run, restarted as ``resume RUN --wait``;
- ``resume-burst``: three ``resume RUN`` at once (every pending judgment sent three times more);
- ``freeze``: SIGSTOP of a worker's child holding a batch, past the visibility timeout, then SIGCONT;
- ``flushall``: Redis FLUSHALL, with no manual resume (the waiting process reconciles a stall);
- ``pg-kill``: PostgreSQL SIGKILLed with its backends (crash recovery on start);
- ``pg-down``: PostgreSQL stopped for ``down_seconds``, then started.

For each fault the time until the run moves again (a batch more stored) is measured from when
the fault is complete (PostgreSQL back, the worker frozen); for ``freeze`` also the time until the
frozen batch is done elsewhere (bounded by the visibility timeout). ``verify`` then holds the run to
a fault-free run of the same judge and seed: every ranking and verdict equal, nothing lost,
duplicated, failed or pending.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
from sqlalchemy import func, select, text

from db.models import PairwiseVerdict, Ranking, Run
from tests.faults.stack import Stack

KINDS = (
    "child",
    "parent",
    "coordinator",
    "waiter",
    "resume-burst",
    "freeze",
    "flushall",
    "pg-kill",
    "pg-down",
)
V = PairwiseVerdict


@dataclass
class Fault:
    kind: str
    at: float  # seconds since the run started
    recovered_s: float | None = None  # until a batch more was stored
    detail: str = ""


@dataclass
class Schedule:
    seed: int
    kinds: list[str]
    gaps: list[float]  # seconds before each fault

    @classmethod
    def draw(cls, seed: int, n: int | None = None, gap: tuple[float, float] = (2.0, 4.0)) -> Schedule:
        """Every kind once, in a seeded order (``n`` > len(KINDS): then more drawn at random)."""
        rng = random.Random(seed)
        kinds = list(KINDS)
        rng.shuffle(kinds)
        while n is not None and len(kinds) < n:
            kinds.append(rng.choice(KINDS))
        return cls(seed, kinds, [round(rng.uniform(*gap), 2) for _ in kinds])


@dataclass
class FaultRun:
    """One pairwise run under a schedule of faults."""

    stack: Stack
    submit: list[str]  # the submit arguments (without --wait)
    batch: int
    down_seconds: float = 30.0
    log: Callable[[str], None] = print
    run_id: int = 0
    faults: list[Fault] = field(default_factory=list)
    judges: list = field(default_factory=list)
    coordinators: list = field(default_factory=list)
    waiter: subprocess.Popen | None = None
    t0: float = 0.0
    _names: int = 0

    # -- the stack --------------------------------------------------------------------------------

    def start(self) -> None:
        self.judges = [self._judge() for _ in range(2)]
        self.coordinators = [self._coordinator_worker() for _ in range(2)]
        before = self.stack.scalar(select(func.max(Run.id))) or 0  # earlier runs on this stack
        self.t0 = time.monotonic()
        self.waiter = self.stack.cli(*self.submit, "--wait")
        while self.run_id <= before:
            self.run_id = self.stack.scalar(select(func.max(Run.id))) or 0
            time.sleep(0.1)

    def _name(self, prefix: str) -> str:
        self._names += 1
        return f"{prefix}-{self._names}"

    def _judge(self):
        return self.stack.worker(["vlm.simulated"], self._name("vlm-simulated"), "workers.app")

    def stored(self) -> int:
        return self.stack.scalar(
            select(func.count()).select_from(V).where(V.run_id == self.run_id, V.status != "pending")
        )

    def done(self) -> bool:
        return self.stack.scalar(select(Run.status).where(Run.id == self.run_id)) == "done"

    def held_by(self, pid: int) -> set[int]:
        with self.stack.engine.connect() as c:
            return set(
                c.scalars(
                    select(V.id).where(
                        V.run_id == self.run_id, V.status == "pending", V.leased_by.like(f"%:{pid}:%")
                    )
                )
            )

    def _child_with_batch(self, timeout: float = 20) -> tuple[object, int] | None:
        """A judge worker and its pool child's pid, while that child holds a batch."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.done():
            for w in self.judges:
                for child in w.children():
                    if self.held_by(child.pid):
                        return w, child.pid
            time.sleep(0.05)
        return None

    # -- faults -----------------------------------------------------------------------------------

    def inject(self, kind: str) -> Fault | None:
        """Apply one fault; returns it with its recovery time, or None if the run ended first."""
        if self.done():
            return None
        fault = Fault(kind, round(time.monotonic() - self.t0, 1))
        before = self.stored()
        getattr(self, "_" + kind.replace("-", "_"))(fault)
        t = time.monotonic()
        while not self.done() and self.stored() < before + self.batch:
            time.sleep(0.05)
        fault.recovered_s = round(time.monotonic() - t, 2)
        self.faults.append(fault)
        self.log(
            f"  {fault.at:6.1f} s  {kind:<13} run moving again after {fault.recovered_s:5.2f} s  {fault.detail}"
        )
        return fault

    def _child(self, fault: Fault) -> None:
        found = self._child_with_batch()
        if found:
            os.kill(found[1], signal.SIGKILL)
            fault.detail = f"killed pid {found[1]} holding a batch"

    def _parent(self, fault: Fault) -> None:
        found = self._child_with_batch()
        w = found[0] if found else self.judges[0]
        w.kill()
        self.judges.remove(w)
        self.judges.append(self._judge())
        fault.detail = f"killed {w.name}, started another"

    def _coordinator(self, fault: Fault) -> None:
        w = self.coordinators.pop(0)
        w.kill()
        self.coordinators.append(self._coordinator_worker())
        fault.detail = f"killed {w.name}, started another"

    def _coordinator_worker(self):
        return self.stack.worker(["coordination"], self._name("coordinator"), "orchestrator.tasks")

    def _waiter(self, fault: Fault) -> None:
        assert self.waiter is not None
        self.waiter.kill()
        self.waiter.wait(timeout=10)
        self.waiter = self.stack.cli("resume", str(self.run_id), "--wait")
        fault.detail = "killed the waiting orchestrator; resume --wait"

    def _resume_burst(self, fault: Fault) -> None:
        burst = [self.stack.cli("resume", str(self.run_id)) for _ in range(3)]
        for p in burst:
            p.wait(timeout=120)
        fault.detail = "3 concurrent resume"

    def _freeze(self, fault: Fault) -> None:
        found = self._child_with_batch()
        if not found:
            return
        _, pid = found
        batch = self.held_by(pid)
        os.kill(pid, signal.SIGSTOP)
        t = time.monotonic()
        try:
            deadline = t + 60
            while time.monotonic() < deadline:
                with self.stack.engine.connect() as c:
                    left = (
                        c.scalar(select(func.count()).where(V.id.in_(batch), V.status == "pending"))
                        if batch
                        else 0
                    )
                if not left:
                    break
                time.sleep(0.1)
        finally:
            os.kill(pid, signal.SIGCONT)
        fault.detail = (
            f"froze pid {pid} with {len(batch)} judgments: done elsewhere after {time.monotonic() - t:.1f} s"
        )

    def _flushall(self, fault: Fault) -> None:
        redis.Redis.from_url(self.stack.redis.url).flushall()
        fault.detail = "Redis FLUSHALL, no resume"

    def _pg_kill(self, fault: Fault) -> None:
        self.stack.kill_postgres()
        self.stack.pg.start()
        fault.detail = "PostgreSQL SIGKILL, crash recovery"

    def _pg_down(self, fault: Fault) -> None:
        self.stack.pg.stop("fast")
        time.sleep(self.down_seconds)
        self.stack.pg.start()
        fault.detail = f"PostgreSQL down {self.down_seconds:.0f} s"

    def play(self, schedule: Schedule) -> None:
        for kind, gap in zip(schedule.kinds, schedule.gaps, strict=True):
            time.sleep(gap)
            if self.inject(kind) is None:
                self.log(f"  the run finished before {kind}")
                break

    def stop(self) -> None:
        """Stop this run's workers (and its waiting process, if still there)."""
        for w in [*self.judges, *self.coordinators]:
            w.stop()
        if self.waiter is not None and self.waiter.poll() is None:
            self.waiter.kill()

    def wait_done(self, timeout: float = 300) -> float:
        assert self.waiter is not None
        out, _ = self.waiter.communicate(timeout=timeout)
        if self.waiter.returncode != 0 or not self.done():
            raise AssertionError(f"the run did not finish: exit {self.waiter.returncode}, {out[-2000:]}")
        return time.monotonic() - self.t0

    # -- the verdict --------------------------------------------------------------------------------

    def verify(self, reference: int) -> dict[str, int]:
        """Hold the run to a fault-free one; returns counts for the printout."""
        with self.stack.engine.connect() as c:
            rows = c.execute(
                select(V.query_id, V.tile_first, V.tile_second, V.status, V.first_wins, V.attempts).where(
                    V.run_id == self.run_id
                )
            ).all()
            ref = c.execute(
                select(V.query_id, V.tile_first, V.tile_second, V.status, V.first_wins).where(
                    V.run_id == reference
                )
            ).all()
            dup = c.execute(
                text(
                    "SELECT COUNT(*) FROM (SELECT 1 FROM pairwise_verdicts WHERE run_id = :r "
                    "GROUP BY query_id, tile_first, tile_second HAVING COUNT(*) > 1) d"
                ),
                {"r": self.run_id},
            ).scalar()

            def ranking(run_id: int) -> list:
                return c.execute(
                    select(Ranking.query_id, Ranking.rank, Ranking.tile_id)
                    .where(Ranking.run_id == run_id)
                    .order_by(Ranking.query_id, Ranking.rank)
                ).all()

            rankings_equal = ranking(self.run_id) == ranking(reference)
        verdicts = {(r.query_id, r.tile_first, r.tile_second): (r.status, r.first_wins) for r in rows}
        expected = {(r.query_id, r.tile_first, r.tile_second): (r.status, r.first_wins) for r in ref}
        counts = {
            "judgments": len(rows),
            "lost": len(set(expected) - set(verdicts)),
            "extra": len(set(verdicts) - set(expected)),
            "duplicated": int(dup or 0),
            "failed": sum(r.status == "failed" for r in rows),
            "pending": sum(r.status == "pending" for r in rows),
            "verdicts_differing": sum(verdicts.get(k) != v for k, v in expected.items()),
            "re_judged": sum(max(0, r.attempts - 1) for r in rows),
            "max_attempts_used": max((r.attempts for r in rows), default=0),
        }
        assert rankings_equal, "rankings differ from the fault-free run"
        assert counts["lost"] == counts["extra"] == counts["duplicated"] == 0, counts
        assert counts["failed"] == counts["pending"] == counts["verdicts_differing"] == 0, counts
        return counts
