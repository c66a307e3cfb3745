"""Leases: one work-item protocol for judgments and retrieval shards.

Delivery is at least once: a message may arrive twice (``resume``, a visibility-timeout
redelivery while the first worker still runs, a restored Redis), and a duplicate must cost nothing.
So a worker does not just count an attempt when it takes a pending row; it takes a lease:
``leased_by`` names its process (host, pid and a token), ``lease_until`` says until when, and it
renews the lease while it works (``LeaseKeeper``). A delivery that finds

- no lease yet: takes it and counts an attempt (``fresh``);
- its own process's lease (a retry after a database error, or one handed to it): keeps it,
  no attempt (``mine``);
- a live lease of another process: a duplicate (``busy``), sent again for when that lease would
  run out: the copy Redis restores after its visibility timeout may be the only message left of a
  frozen worker's batch, so a duplicate is never just dropped;
- a lease that lapsed, or whose holder process on this host is gone: the holder died or froze
  without a result. The row is taken again one at a time (``take_one``, an attempt each), so a
  poison item spends only its own attempts; after ``max_attempts`` it is failed (``spent``).

Every write is guarded by the condition it was decided on, so two deliveries racing for a row
cannot both take it; results are stored only by the lease holder (``db.queries.record_outcomes``),
so a frozen worker that wakes up changes nothing another stored. Imports only ``db`` modules.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Table, and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from db.settings import settings

log = logging.getLogger(__name__)

PENDING, FAILED = "pending", "failed"

_token: tuple[int, str] | None = None


def lease_seconds() -> float:
    """How long a lease lasts without renewal; renewed every quarter of it while work runs."""
    return settings().lease_seconds


def holder() -> str:
    """This process as a lease holder: ``host:pid:token`` (a fork gets a new token)."""
    global _token
    pid = os.getpid()
    if _token is None or _token[0] != pid:
        _token = (pid, secrets.token_hex(4))
    return f"{socket.gethostname()}:{pid}:{_token[1]}"


def holder_gone(name: str | None) -> bool:
    """True when ``name`` is a process of this host that no longer runs (killed, exited); a holder
    on another host is never known gone: its lease lapses instead."""
    if not name:
        return False
    host, _, rest = name.partition(":")
    pid_text, _, token = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return name != holder()  # an earlier process that had this pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a killed child its parent has not reaped yet is a zombie: gone all the same
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] in ("Z", "X")
    except OSError:
        return False


def _now() -> datetime:
    return datetime.now(UTC)


def live_lease(leased_by: str | None, lease_until: datetime | None, at: datetime | None = None) -> bool:
    """True while a worker holds the row: a holder named, its lease not run out, not known gone."""
    if leased_by is None:
        return False
    return _aware(lease_until) >= (at or _now()) and not holder_gone(leased_by)


@dataclass
class Claim:
    """What one delivery found, by row id."""

    fresh: list[int] = field(default_factory=list)  # leased now, first attempt counted
    mine: list[int] = field(default_factory=list)  # this process's (or a handed-over) lease: no attempt
    recovered: list[int] = field(default_factory=list)  # the last holder died or froze: take one at a time
    busy: list[int] = field(default_factory=list)  # another live worker holds it: a duplicate, deferred
    spent: list[int] = field(default_factory=list)  # lapsed max_attempts times: failed here
    busy_until: datetime | None = None  # when the latest of the busy rows' leases runs out

    def defer_seconds(self, margin: float = 1.0) -> float:
        """How long a duplicate waits before asking again: until the busy leases run out."""
        if self.busy_until is None:
            return lease_seconds() + margin
        return max(0.0, (self.busy_until - _now()).total_seconds()) + margin

    @property
    def held(self) -> list[int]:
        return self.fresh + self.mine


def claim(
    session: Session,
    table: Table,
    rows: Iterable[Sequence[Any]],
    *,
    me: str,
    max_attempts: int,
    give_up: str,
    adopt: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
) -> Claim:
    """Classify and lease pending rows ``(id, attempts, leased_by, lease_until)`` read in this
    transaction. ``adopt``: holders whose leases this delivery takes over as its own (a retried task
    carries its first holder). ``extra``: more columns to set on the rows taken (e.g. ``worker``).
    ``give_up``: the error of a spent row ("... after N attempts: ...").
    """
    now = _now()
    out = Claim()
    ours = {me, *adopt}
    gone: set[str] = set()
    for row_id, attempts, leased_by, lease_until in rows:
        if leased_by in ours:
            out.mine.append(row_id)
        elif leased_by is None and not attempts:
            out.fresh.append(row_id)
        elif leased_by is not None and _aware(lease_until) >= now and not holder_gone(leased_by):
            out.busy.append(row_id)
            until = _aware(lease_until)
            out.busy_until = until if out.busy_until is None else max(out.busy_until, until)
        else:
            if leased_by is not None:
                gone.add(leased_by)
            (out.spent if attempts >= max_attempts else out.recovered).append(row_id)
    until = now + timedelta(seconds=lease_seconds())
    values = {"leased_by": me, "lease_until": until, **(extra or {})}
    if out.fresh:
        taken = _update(
            session, table, out.fresh, table.c.leased_by.is_(None), attempts=table.c.attempts + 1, **values
        )
        out.busy += [i for i in out.fresh if i not in taken]
        out.fresh = [i for i in out.fresh if i in taken]
    if out.mine:
        kept = _update(session, table, out.mine, table.c.leased_by.in_(sorted(ours)), **values)
        out.busy += [i for i in out.mine if i not in kept]
        out.mine = [i for i in out.mine if i in kept]
    if out.spent:
        failed = _update(
            session,
            table,
            out.spent,
            _lapsed(table, now, gone),
            status=FAILED,
            error=give_up,
            finished_at=now,
            leased_by=None,
            lease_until=None,
        )
        out.busy += [i for i in out.spent if i not in failed]
        out.spent = [i for i in out.spent if i in failed]
    return out


def take_one(
    session: Session,
    table: Table,
    row_id: int,
    *,
    me: str,
    max_attempts: int,
    give_up: str,
    extra: dict[str, Any] | None = None,
) -> bool:
    """Take a row whose last lease lapsed, counting an attempt; False when another delivery took it
    first, it is no longer pending, or its attempts are spent (then it is failed here)."""
    row = session.execute(
        select(table.c.attempts, table.c.leased_by, table.c.lease_until).where(
            table.c.id == row_id, table.c.status == PENDING
        )
    ).first()
    if row is None:
        return False
    now = _now()
    gone = {row.leased_by} if row.leased_by and holder_gone(row.leased_by) else set()
    free = or_(_lapsed(table, now, gone), table.c.leased_by == me)
    if row.attempts >= max_attempts:
        _update(
            session,
            table,
            [row_id],
            free,
            status=FAILED,
            error=give_up,
            finished_at=now,
            leased_by=None,
            lease_until=None,
        )
        return False
    until = now + timedelta(seconds=lease_seconds())
    taken = _update(
        session,
        table,
        [row_id],
        and_(free, table.c.attempts == row.attempts),
        attempts=table.c.attempts + 1,
        leased_by=me,
        lease_until=until,
        **(extra or {}),
    )
    return bool(taken)


def renew(session: Session, table: Table, ids: Sequence[int], me: str) -> int:
    """Push the leases this process holds on ``ids`` forward; returns how many it still holds."""
    until = _now() + timedelta(seconds=lease_seconds())
    return len(_update(session, table, ids, table.c.leased_by == me, lease_until=until))


def _lapsed(table: Table, now: datetime, gone: set[str]) -> Any:
    cond = or_(table.c.leased_by.is_(None), table.c.lease_until < now)
    return or_(cond, table.c.leased_by.in_(sorted(gone))) if gone else cond


def _update(session: Session, table: Table, ids: Sequence[int], condition: Any, **values: Any) -> set[int]:
    """Set ``values`` on the pending rows among ``ids`` that meet ``condition``; the ids changed."""
    if not ids:
        return set()
    stmt = (
        update(table)
        .where(and_(table.c.id.in_(list(ids)), table.c.status == PENDING, condition))
        .values(**values)
        .returning(table.c.id)
    )
    return set(session.execute(stmt).scalars())


def _aware(value: datetime | None) -> datetime:
    """SQLite returns naive datetimes (stored as UTC): make them comparable."""
    if value is None:
        return datetime.min.replace(tzinfo=UTC)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class LeaseKeeper:
    """Renews this process's leases on the rows it works on, every quarter of the lease, in a
    thread, for as long as the block runs (a 7B model loading on the first task, a long batch).
    A renewal that fails (the database restarting) is logged and tried again at the next tick."""

    def __init__(self, sessions: sessionmaker[Session], table: Table, me: str) -> None:
        self.sessions = sessions
        self.table = table
        self.me = me
        self._ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, ids: Iterable[int]) -> None:
        with self._lock:
            self._ids.update(ids)

    def release(self, ids: Iterable[int]) -> None:
        with self._lock:
            self._ids.difference_update(ids)

    def renew_now(self) -> None:
        with self._lock:
            ids = sorted(self._ids)
        if ids:
            with self.sessions.begin() as s:
                renew(s, self.table, ids, self.me)

    def _run(self) -> None:
        interval = lease_seconds() / 4
        while not self._stop.wait(interval):
            try:
                self.renew_now()
            except Exception as exc:  # the lease may lapse; the work is then redone elsewhere
                log.warning("could not renew leases: %s", exc)

    def __enter__(self) -> LeaseKeeper:
        self._thread = threading.Thread(target=self._run, name="cvgl-lease-keeper", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
