"""SQLAlchemy tables. Natural unique keys make every write idempotent.

The schema is created only by Alembic migrations (``migrations/versions``); this module is
their ``target_metadata`` and the ORM the code uses. Imports nothing of ours.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Judgment row states. A row is created 'pending' by the coordinator when it needs the
# judgment; a worker moves it to 'done' or 'failed' exactly once (guarded by status).
PENDING, DONE, FAILED = "pending", "done", "failed"
RUN_RUNNING, RUN_DONE = "running", "done"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _now() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class Dataset(Base):
    """A VIGOR-layout folder; image paths below are relative to ``root``."""

    __tablename__ = "datasets"
    id: Mapped[int] = mapped_column(primary_key=True)
    root: Mapped[str] = mapped_column(Text, unique=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = _now()


class Tile(Base):
    """A satellite tile (gallery item)."""

    __tablename__ = "tiles"
    __table_args__ = (UniqueConstraint("dataset_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    city: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(255))
    path: Mapped[str] = mapped_column(Text)  # relative to the dataset root
    lat: Mapped[float] = mapped_column(Float)
    lon: Mapped[float] = mapped_column(Float)


class Query(Base):
    """A ground-level panorama."""

    __tablename__ = "queries"
    __table_args__ = (UniqueConstraint("dataset_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    city: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(255))  # the file name, e.g. "<panoid>,<lat>,<lon>,.jpg"
    panoid: Mapped[str] = mapped_column(String(128))
    path: Mapped[str] = mapped_column(Text)
    lat: Mapped[float] = mapped_column(Float)
    lon: Mapped[float] = mapped_column(Float)


class GroundTruth(Base):
    """VIGOR labels: one positive and (usually) three semi-positive tiles per query."""

    __tablename__ = "ground_truth"
    __table_args__ = (
        CheckConstraint("relation IN ('positive', 'semi_positive')", name="relation"),
        Index("ix_ground_truth_positive", "query_id", "relation"),
    )
    query_id: Mapped[int] = mapped_column(ForeignKey("queries.id", ondelete="CASCADE"), primary_key=True)
    tile_id: Mapped[int] = mapped_column(ForeignKey("tiles.id", ondelete="CASCADE"), primary_key=True)
    relation: Mapped[str] = mapped_column(String(16))
    dy: Mapped[float] = mapped_column(Float)
    dx: Mapped[float] = mapped_column(Float)


class CandidateSet(Base):
    """A stage-1 retrieval run: top-K tiles per query (imported or computed)."""

    __tablename__ = "candidate_sets"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    k: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(32))  # 'import' | 'retrieval'
    details: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = _now()


class Candidate(Base):
    __tablename__ = "candidates"
    __table_args__ = (UniqueConstraint("candidate_set_id", "query_id", "tile_id"),)
    candidate_set_id: Mapped[int] = mapped_column(
        ForeignKey("candidate_sets.id", ondelete="CASCADE"), primary_key=True
    )
    query_id: Mapped[int] = mapped_column(ForeignKey("queries.id", ondelete="CASCADE"), primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)  # 1-based stage-1 rank
    tile_id: Mapped[int] = mapped_column(ForeignKey("tiles.id", ondelete="CASCADE"))
    score: Mapped[float | None] = mapped_column(Float)


class Run(Base):
    """A rerank run: one strategy, judge, model and prompt over sampled queries of a candidate set."""

    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    candidate_set_id: Mapped[int] = mapped_column(ForeignKey("candidate_sets.id", ondelete="CASCADE"))
    strategy: Mapped[str] = mapped_column(String(32))
    prompt_name: Mapped[str] = mapped_column(String(64))
    prompt_sha256: Mapped[str] = mapped_column(String(64))
    judge: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(Text)
    model_revision: Mapped[str] = mapped_column(String(128))
    queue: Mapped[str] = mapped_column(String(200))
    seed: Mapped[int] = mapped_column(Integer)
    k: Mapped[int] = mapped_column(Integer)
    n_queries: Mapped[int] = mapped_column(Integer)
    batch_size: Mapped[int] = mapped_column(Integer)
    max_attempts: Mapped[int] = mapped_column(Integer)
    params: Mapped[dict] = mapped_column(JSON, default=dict)  # judge and strategy options
    status: Mapped[str] = mapped_column(String(16), default=RUN_RUNNING, server_default=RUN_RUNNING)
    created_at: Mapped[datetime] = _now()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class RunQuery(Base):
    """The queries a run reranks; ``done_at`` is set when its ranking is written."""

    __tablename__ = "run_queries"
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    query_id: Mapped[int] = mapped_column(ForeignKey("queries.id", ondelete="CASCADE"), primary_key=True)
    done_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Ranking(Base):
    """The reranked order of a query's K candidates in a run."""

    __tablename__ = "rankings"
    __table_args__ = (UniqueConstraint("run_id", "query_id", "tile_id"),)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    query_id: Mapped[int] = mapped_column(ForeignKey("queries.id", ondelete="CASCADE"), primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)  # 1-based
    tile_id: Mapped[int] = mapped_column(ForeignKey("tiles.id", ondelete="CASCADE"))


class _JudgmentColumns:
    """Columns shared by both judgment tables: outcome bookkeeping and provenance."""

    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default=PENDING, server_default=PENDING)
    raw_output: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    error: Mapped[str | None] = mapped_column(Text)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    worker: Mapped[str | None] = mapped_column(String(255))
    model_revision: Mapped[str | None] = mapped_column(String(128))  # as resolved by the worker
    created_at: Mapped[datetime] = _now()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class PairwiseVerdict(_JudgmentColumns, Base):
    """One comparison: which of two tiles (in the order shown) better matches the query."""

    __tablename__ = "pairwise_verdicts"
    __table_args__ = (
        UniqueConstraint("run_id", "query_id", "tile_first", "tile_second"),
        CheckConstraint("status IN ('pending', 'done', 'failed')", name="status"),
        CheckConstraint("tile_first <> tile_second", name="distinct_tiles"),
        Index("ix_pairwise_verdicts_run_status", "run_id", "status"),
        # Finds a verdict already stored for the same query and tiles by any run (judgment reuse).
        Index("ix_pairwise_verdicts_query_tiles", "query_id", "tile_first", "tile_second"),
    )
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    query_id: Mapped[int] = mapped_column(ForeignKey("queries.id", ondelete="CASCADE"))
    tile_first: Mapped[int] = mapped_column(ForeignKey("tiles.id", ondelete="CASCADE"))
    tile_second: Mapped[int] = mapped_column(ForeignKey("tiles.id", ondelete="CASCADE"))
    first_wins: Mapped[bool | None] = mapped_column(Boolean)
    p_first: Mapped[float | None] = mapped_column(Float)
    p_second: Mapped[float | None] = mapped_column(Float)
    reused_from_id: Mapped[int | None] = mapped_column(
        ForeignKey("pairwise_verdicts.id", ondelete="SET NULL")
    )


class PointwiseScore(_JudgmentColumns, Base):
    """One candidate scored alone against the query (Direct, Likert, Yes/No, reasoning)."""

    __tablename__ = "pointwise_scores"
    __table_args__ = (
        UniqueConstraint("run_id", "query_id", "tile_id"),
        CheckConstraint("status IN ('pending', 'done', 'failed')", name="status"),
        Index("ix_pointwise_scores_run_status", "run_id", "status"),
        Index("ix_pointwise_scores_query_tile", "query_id", "tile_id"),
    )
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    query_id: Mapped[int] = mapped_column(ForeignKey("queries.id", ondelete="CASCADE"))
    tile_id: Mapped[int] = mapped_column(ForeignKey("tiles.id", ondelete="CASCADE"))
    score: Mapped[float | None] = mapped_column(Float)
    probs: Mapped[dict | None] = mapped_column(JSON)
    reused_from_id: Mapped[int | None] = mapped_column(ForeignKey("pointwise_scores.id", ondelete="SET NULL"))
