"""The coordinator's I/O shell: load stored outcomes, replay the strategy, write or enqueue.

``advance`` is the whole coordinator. It is called after a run is created, by the
``cvgl.advance`` task when workers store verdicts, and by ``resume``; the same call resumes after
any crash because the strategy replays from what the database holds. New judgments are created
as pending rows first (their insert decides who enqueues them) and enqueued after the commit.

Judgment reuse: a needed judgment that another run already stored for the same judge, model,
revision, prompt and judge options (``db/reuse.py``) is copied into this run as done, with
``reused_from_id`` set, instead of being enqueued; the query is then replayed again at once, so a
run that repeats an earlier one finishes without a worker. ``--no-reuse`` turns this off.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from db.engine import session_factory
from db.models import FAILED, PENDING
from db.queries import (
    RunInfo,
    add_pending,
    candidate_lists,
    chunked,
    finish_run_if_complete,
    mark_enqueued,
    open_queries,
    pairwise_outcomes,
    pointwise_outcomes,
    run_info,
    write_rankings,
)
from db.reuse import copy_row, insert_reused, reusable, reuse_enabled, reuse_sources
from orchestrator.strategies.base import Done, Strategy, get_strategy, pairwise_value
from workers.tasks import judge_pairwise, judge_pointwise

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


# Candidate lists never change once imported; the coordinator replays the same queries again and
# again (a merge sort of 20 takes up to 35 rounds), so it keeps them instead of re-reading them.
_CANDIDATES: OrderedDict[tuple[int, int, int], list[int]] = OrderedDict()
_CANDIDATES_MAX = 100_000


def cached_candidate_lists(
    s: Session, candidate_set_id: int, query_ids: Sequence[int], k: int
) -> dict[int, list[int]]:
    missing = [q for q in query_ids if (candidate_set_id, k, q) not in _CANDIDATES]
    if missing:
        for q, tiles in candidate_lists(s, candidate_set_id, missing, k).items():
            _CANDIDATES[(candidate_set_id, k, q)] = tiles
        while len(_CANDIDATES) > _CANDIDATES_MAX:
            _CANDIDATES.popitem(last=False)
    out = {}
    for q in query_ids:
        tiles = _CANDIDATES.get((candidate_set_id, k, q))
        if tiles is not None:
            _CANDIDATES.move_to_end((candidate_set_id, k, q))
            out[q] = tiles
    return out


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
    if info.status == "done":
        result.run_done = True
        return result
    strategy = strategy_for(info)
    with sessions() as s:
        todo = open_queries(s, run_id, query_ids)
        sources = reuse_sources(s, info) if todo and reuse_enabled(info) else []
    for part in chunked(todo, REPLAY_CHUNK):
        with sessions.begin() as s:
            finished, new_ids, reused = _replay_part(s, info, strategy, part, sources)
        result.finished_queries += finished
        result.new_judgments += len(new_ids)
        result.reused_judgments += reused
        result.tasks_sent += enqueue(sessions, info, strategy.kind, new_ids)
    with sessions.begin() as s:
        result.run_done = finish_run_if_complete(s, run_id)
    return result


def _replay_part(
    s: Session, info: RunInfo, strategy: Strategy, query_ids: Sequence[int], sources: Sequence[int] = ()
) -> tuple[int, list[int], int]:
    candidates = cached_candidate_lists(s, info.candidate_set_id, query_ids, info.k)
    if strategy.kind == "pairwise":
        stored = pairwise_outcomes(s, info.id, query_ids)
    else:
        stored = pointwise_outcomes(s, info.id, query_ids)
    offers = reusable(s, strategy.kind, sources, query_ids) if sources else {}
    probabilities = getattr(strategy, "reads_probabilities", False)
    orders: dict[int, tuple] = {}
    pending_rows: list[dict] = []
    reused_rows: list[dict] = []
    for q in query_ids:
        cands = candidates.get(q, [])
        rows = stored.get(q, {})
        if strategy.kind == "pairwise":
            # A failed comparison counts as "first wins": the order shown (current order) is kept.
            outcomes = {
                pair: pairwise_value(r.status == FAILED, r.first_wins, r.p_first, probabilities=probabilities)
                for pair, r in rows.items()
                if r.status != PENDING
            }
        else:
            outcomes = {
                t: (None if r.status == FAILED else r.score) for t, r in rows.items() if r.status != PENDING
            }
        offer = offers.get(q, {})
        while True:
            step = strategy.replay(cands, outcomes)
            if isinstance(step, Done):
                break
            # Copy what an earlier run already judged, then replay: the copies may expose more.
            hits = [item for item in step.items if item not in rows and item in offer]
            for item in hits:
                src = offer.pop(item)
                reused_rows.append(copy_row(strategy.kind, info.id, src))
                outcomes[item] = (
                    pairwise_value(False, src["first_wins"], src["p_first"], probabilities=probabilities)
                    if strategy.kind == "pairwise"
                    else src["score"]
                )
            if not hits:
                break
        if isinstance(step, Done):
            orders[q] = step.order
            continue
        for item in step.items:
            if item in rows:  # already pending: in flight, or reconciled later
                continue
            if strategy.kind == "pairwise":
                pending_rows.append(
                    {"run_id": info.id, "query_id": q, "tile_first": item[0], "tile_second": item[1]}
                )
            else:
                pending_rows.append({"run_id": info.id, "query_id": q, "tile_id": item})
    # A copy that lost to a row stored meanwhile (a concurrent replay): the replay above read the
    # copy, so wait for the stored row's outcome before writing that query's ranking.
    reused, contested = insert_reused(s, strategy.kind, reused_rows)
    orders = {q: order for q, order in orders.items() if q not in contested}
    if orders:
        write_rankings(s, info.id, orders)
    new_ids = add_pending(s, strategy.kind, pending_rows)
    return len(orders), new_ids, reused


def enqueue(sessions: sessionmaker[Session], info: RunInfo, kind: str, ids: Sequence[int]) -> int:
    """Send judgment ids to the run's model queue in tasks of ``batch_size``; stamp them enqueued."""
    if not ids:
        return 0
    task = judge_pairwise if kind == "pairwise" else judge_pointwise
    sent = 0
    for batch in chunked(list(ids), max(1, info.batch_size)):
        task.apply_async(args=[list(batch)], queue=info.queue)
        with sessions.begin() as s:
            mark_enqueued(s, kind, batch)
        sent += 1
    return sent
