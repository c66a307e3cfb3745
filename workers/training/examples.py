"""Pairwise training examples from stored labels, and which of them each optimiser step takes.

Pure: no model, no database. An example is a query's positive against one of its stage-1 hard
negatives (a candidate that is neither the positive nor a semi-positive: a semi-positive also shows
the place, so calling it wrong would teach the judge to reject the right area), shown in an order
whose answer is "1" or "2". The examples of step ``i`` follow from the seed and ``i`` alone (an
epoch is a seeded permutation), so the data position of a checkpoint is its step.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class QueryLabels:
    """What training needs of one query: its positive, semi-positives and stage-1 candidates."""

    query_id: int
    name: str
    positive: int
    semi_positives: frozenset[int]
    candidates: tuple[int, ...]  # tile ids in stage-1 order


@dataclass(frozen=True)
class PairExample:
    query_id: int
    first: int  # tile ids in the order shown
    second: int
    answer: int  # index of the right answer among the choices ("1", "2"): 0 when the first is the positive


def split_queries(names: Mapping[str, int], val_share: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) query ids: a seeded shuffle of the names (the same in any database), the
    first ``round(n * val_share)`` held out (at least one when the share is positive and n > 1)."""
    if not 0 <= val_share < 1:
        raise ValueError(f"--val-share must be in [0, 1), got {val_share}")
    ordered = sorted(names)
    random.Random(f"val:{seed}").shuffle(ordered)
    n_val = round(len(ordered) * val_share)
    if val_share > 0 and len(ordered) > 1:
        n_val = max(1, min(n_val, len(ordered) - 1))
    val = sorted(names[q] for q in ordered[:n_val])
    train = sorted(names[q] for q in ordered[n_val:])
    return train, val


def hard_negatives(labels: QueryLabels, n: int) -> list[int]:
    """The query's ``n`` best-ranked candidates that are neither its positive nor a semi-positive."""
    out = [t for t in labels.candidates if t != labels.positive and t not in labels.semi_positives]
    return out[:n]


def pair_examples(
    labels: Sequence[QueryLabels], negatives: int, both_orders: bool, seed: int
) -> list[PairExample]:
    """Every (positive, hard negative) pair of ``labels``: in both orders, or in one seeded order."""
    rng = random.Random(f"order:{seed}")
    out: list[PairExample] = []
    for q in sorted(labels, key=lambda x: x.query_id):
        for neg in hard_negatives(q, negatives):
            if both_orders:
                out += [
                    PairExample(q.query_id, q.positive, neg, 0),
                    PairExample(q.query_id, neg, q.positive, 1),
                ]
            elif rng.random() < 0.5:
                out.append(PairExample(q.query_id, q.positive, neg, 0))
            else:
                out.append(PairExample(q.query_id, neg, q.positive, 1))
    return out


def steps_for(n_examples: int, batch_size: int, steps: int | None, epochs: float | None) -> int:
    """Optimiser steps of a job: ``steps`` as given, else ``epochs`` passes over the examples."""
    if steps is not None:
        return steps
    return max(1, round((epochs if epochs is not None else 1.0) * n_examples / batch_size))


def batch_indices(n_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the examples of step ``step`` (0-based): positions ``step * batch_size`` onwards
    of the endless sequence of epochs, each a seeded permutation of the examples."""
    if n_examples < 1:
        raise ValueError("no training examples")
    out: list[int] = []
    position = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(position, n_examples)
        order = _epoch_order(n_examples, seed, epoch)
        take = order[offset : offset + batch_size - len(out)]
        out.extend(take)
        position += len(take)
    return out


_ORDERS: dict[tuple[int, int, int], list[int]] = {}


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    order = _ORDERS.get(key)
    if order is None:
        if len(_ORDERS) > 8:
            _ORDERS.clear()
        order = _ORDERS[key] = random.Random(f"epoch:{seed}:{epoch}").sample(range(n), n)
    return order
