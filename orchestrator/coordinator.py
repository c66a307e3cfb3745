"""The coordinator's I/O shell: load stored outcomes, replay the strategy, write or enqueue.

``advance`` is the whole coordinator. It is called after a run is created, by the
``cvgl.advance`` task when workers store verdicts, and by ``resume``; the same call resumes after
any crash because the strategy replays from what the database holds. New judgments are created
as pending rows first (their insert decides who enqueues them) and enqueued after the commit.
Between rounds a coordinator process keeps what it read (``replay_cache.py``): a round re-reads
only the judgments it still waits on, and a replay that asks for a row it did not know reads that
query in full and replays it again, so several coordinator processes stay correct.

Open queries: a run may keep at most ``max_open_queries`` queries open at once (run params; by
default 64 per GPU queue for VLM judges), letting the next one in, in query id order, as each
finishes. A GPU worker keeps each open query's prefixes (chat, panorama, first tile) in its
cache between rounds; with every query of a large run open at once, a query's next round comes
after all the others' and finds its prefixes evicted. Replays that finish queries start the
queries they let in (``admitted_queries``).

Judgment reuse: a needed judgment that another run already stored for the same judge, model,
revision, prompt and judge options (``db/reuse.py``) is copied into this run as done, with
``reused_from_id`` set, instead of being enqueued; the query is then replayed again at once, so a
run that repeats an earlier one finishes without a worker. ``--no-reuse`` turns this off.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from db.engine import session_factory
from db.models import RUN_CANCELLED, RUN_DONE
from db.queries import (
    RunInfo,
    add_pending,
    admitted_queries,
    chunked,
    finish_run_if_complete,
    open_queries,
    run_info,
    run_is_running,
    write_rankings,
)
from db.reuse import copy_row, insert_reused, reusable, reuse_enabled, reuse_sources
from orchestrator.replay_cache import JUDGMENTS, QueryJudgments, RunKey, cached_candidate_lists, run_key
from orchestrator.strategies.base import Done, Strategy, pairwise_value
from orchestrator.strategies.registry import get_strategy
from workers.dispatch import send_judgments

log = logging.getLogger(__name__)

# Queries replayed per transaction: bounds memory for runs of tens of thousands of queries.
REPLAY_CHUNK = 500


@dataclass
class Advance:
    """What one call did."""

    finished_queries: int = 0
    new_judgments: int = 0
    reused_judgments: int = 0
    tasks_sent: int = 0
    run_done: bool = False


class UnknownRun(LookupError):
    pass


def strategy_for(info: RunInfo) -> Strategy:
    return get_strategy(info.strategy, **info.params.get("strategy_options", {}))


def advance(
    run_id: int, query_ids: Iterable[int] | None = None, sessions: sessionmaker[Session] | None = None
) -> Advance:
    """Replay the run's unfinished queries (all, or those given); write rankings, enqueue needs."""
    sessions = sessions or session_factory()
    result = Advance()
    with sessions() as s:
        info = run_info(s, run_id)
        if info is None:
            raise UnknownRun(f"run {run_id} does not exist")
        if info.status == RUN_DONE:
            result.run_done = True
            return result
        if info.status == RUN_CANCELLED:  # no new judgments for a cancelled run
            return result
        window = open_window(info)
        if window is not None and query_ids is None:
            todo = admitted_queries(s, run_id, window)
        else:  # queries with judgments stored were let in when those were created
            todo = open_queries(s, run_id, query_ids)
        sources = reuse_sources(s, info) if (todo or window) and reuse_enabled(info) else []
        run = run_key(s, run_id)
    strategy = strategy_for(info)
    _replay(sessions, run, info, strategy, todo, sources, result)
    seen = 0
    while window is not None and result.finished_queries > seen:
        # The queries finished here let as many new ones in: start them now (a start can finish
        # a query at once, from reused judgments, and let in another).
        seen = result.finished_queries
        with sessions() as s:
            todo = admitted_queries(s, run_id, window, strategy.kind)
        _replay(sessions, run, info, strategy, todo, sources, result)
    if result.finished_queries or not todo:
        # After the commits: two calls finishing the last two queries at once each see the other's.
        with sessions.begin() as s:
            result.run_done = finish_run_if_complete(s, run_id)
    return result


def open_window(info: RunInfo) -> int | None:
    """How many queries the run keeps open at once; None: all."""
    window = info.params.get("max_open_queries")
    return int(window) if window else None


def _replay(
    sessions: sessionmaker[Session],
    run: RunKey,
    info: RunInfo,
    strategy: Strategy,
    todo: Sequence[int],
    sources: Sequence[int],
    result: Advance,
) -> None:
    """Replay ``todo`` in chunks, one transaction each; write rankings, enqueue new judgments."""
    for part in chunked(todo, REPLAY_CHUNK):
        try:
            with sessions.begin() as s:
                replayed = _replay_part(s, run, info, strategy, part, sources)
        except BaseException:
            JUDGMENTS.forget(run, part)  # what this transaction wrote may not be stored
            raise
        # Committed: now the new pending rows are facts the cache may hold.
        JUDGMENTS.add_pending(run, strategy.kind, replayed.inserted)
        JUDGMENTS.forget(run, replayed.finished | replayed.reused_queries)
        result.finished_queries += len(replayed.finished)
        result.new_judgments += len(replayed.inserted)
        result.reused_judgments += replayed.reused
        result.tasks_sent += send_judgments(
            info, strategy.kind, [(row[0], row[1]) for row in replayed.inserted], sessions=sessions
        )


@dataclass
class Replayed:
    """What one replay transaction wrote."""

    finished: set[int] = field(default_factory=set)  # queries whose ranking it wrote
    inserted: list[tuple] = field(default_factory=list)  # new pending rows: (id, query_id, *key)
    reused: int = 0  # judgments copied from earlier runs
    reused_queries: set[int] = field(default_factory=set)
    conflicted: list[int] = field(default_factory=list)  # queries that asked for rows that exist


def _replay_part(
    s: Session,
    run: RunKey,
    info: RunInfo,
    strategy: Strategy,
    query_ids: Sequence[int],
    sources: Sequence[int] = (),
) -> Replayed:
    if not run_is_running(s, info.id):  # cancelled meanwhile: write nothing (the lock orders the two)
        return Replayed()
    candidates = cached_candidate_lists(s, info.candidate_set_id, query_ids, info.k)
    offers = reusable(s, strategy.kind, sources, query_ids) if sources else {}
    probabilities = getattr(strategy, "reads_probabilities", False)
    known = JUDGMENTS.view(s, run, strategy.kind, probabilities, query_ids)
    out = _replay_queries(s, info, strategy, query_ids, candidates, known, offers)
    if out.conflicted:
        # Rows this process did not know (another coordinator or ``resume`` inserted them): read
        # those queries in full and replay them again, so that this replay decides what a full read
        # would (the cache's guarantee, see replay_cache.py).
        known = JUDGMENTS.reload(s, run, strategy.kind, probabilities, out.conflicted)
        again = _replay_queries(s, info, strategy, out.conflicted, candidates, known, offers)
        out.finished |= again.finished
        out.inserted += again.inserted
        out.reused += again.reused
        out.reused_queries |= again.reused_queries
    return out


def _replay_queries(
    s: Session,
    info: RunInfo,
    strategy: Strategy,
    query_ids: Sequence[int],
    candidates: Mapping[int, list[int]],
    known: Mapping[int, QueryJudgments],
    offers: Mapping[int, dict],
) -> Replayed:
    probabilities = getattr(strategy, "reads_probabilities", False)
    orders: dict[int, tuple] = {}
    pending_rows: list[dict] = []
    reused_rows: list[dict] = []
    for q in query_ids:
        cands = candidates.get(q, [])
        stored = known[q]
        outcomes = stored.outcomes
        offer = offers.get(q, {})
        while True:
            step = strategy.replay(cands, outcomes)
            if isinstance(step, Done):
                break
            # Copy what an earlier run already judged, then replay: the copies may expose more.
            hits = [item for item in step.items if item not in stored and item in offer]
            if not hits:
                break
            if outcomes is stored.outcomes:
                outcomes = dict(outcomes)  # the copies are not stored yet: keep them out of the cache
            for item in hits:
                src = offer.pop(item)
                reused_rows.append(copy_row(strategy.kind, info.id, src))
                outcomes[item] = (
                    pairwise_value(False, src["first_wins"], src["p_first"], probabilities=probabilities)
                    if strategy.kind == "pairwise"
                    else src["score"]
                )
        if isinstance(step, Done):
            orders[q] = step.order
            continue
        for item in step.items:
            if item in stored:  # already pending: in flight, or reconciled later
                continue
            if strategy.kind == "pairwise":
                pending_rows.append(
                    {"run_id": info.id, "query_id": q, "tile_first": item[0], "tile_second": item[1]}
                )
            else:
                pending_rows.append({"run_id": info.id, "query_id": q, "tile_id": item})
    out = Replayed()
    # A copy that lost to a row stored meanwhile (a concurrent replay): the replay above read the
    # copy, so that query is replayed again from what is stored before its ranking is written.
    out.reused, contested = insert_reused(s, strategy.kind, reused_rows)
    out.reused_queries = {row["query_id"] for row in reused_rows}
    orders = {q: order for q, order in orders.items() if q not in contested}
    if orders:
        write_rankings(s, info.id, orders)
    out.finished = set(orders)
    out.inserted = add_pending(s, strategy.kind, pending_rows)
    asked = Counter(row["query_id"] for row in pending_rows)
    asked.subtract(row[1] for row in out.inserted)
    out.conflicted = sorted({q for q, n in asked.items() if n > 0} | contested)
    return out
