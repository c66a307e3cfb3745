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
    ForeignKeyConstraint,
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
RUN_RUNNING, RUN_DONE, RUN_CANCELLED = "running", "done", "cancelled"


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


class DerivedRun(Base):
    """A run ``orchestrator calibrate`` derived from a parent's stored rows (its own table, not a
    column of ``runs``: SQLite would rebuild ``runs`` to add one, cascading into its children)."""

    __tablename__ = "derived_runs"
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    parent_run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"))
    method: Mapped[str] = mapped_column(String(16))


class FitQuery(Base):
    """The dev queries a derived run was fitted on; the run itself holds (and is reported on) only
    the other queries of its parent, so the two sets are disjoint by construction."""

    __tablename__ = "fit_queries"
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    query_id: Mapped[int] = mapped_column(ForeignKey("queries.id", ondelete="CASCADE"), primary_key=True)


class RunQuery(Base):
    """The queries a run reranks; ``done_at`` is set when its ranking is written."""

    __tablename__ = "run_queries"
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    query_id: Mapped[int] = mapped_column(ForeignKey("queries.id", ondelete="CASCADE"), primary_key=True)
    done_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


def _run_query_key() -> ForeignKeyConstraint:
    """(run_id, query_id) -> run_queries: the query belongs to the run; deleting the run cascades.

    Judgment and ranking rows carry this one key and no keys to queries or tiles: each key costs
    PostgreSQL a lookup and a row lock per insert (migration 0004 has the figures), and their tile
    ids are always taken from the run's candidate list, whose rows reference the tiles.
    """
    return ForeignKeyConstraint(
        ["run_id", "query_id"], ["run_queries.run_id", "run_queries.query_id"], ondelete="CASCADE"
    )


class Ranking(Base):
    """The reranked order of a query's K candidates in a run."""

    __tablename__ = "rankings"
    __table_args__ = (UniqueConstraint("run_id", "query_id", "tile_id"), _run_query_key())
    run_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    query_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)  # 1-based
    tile_id: Mapped[int] = mapped_column(Integer)  # one of the query's candidates (see _run_query_key)


# A judgment row is inserted pending, then updated twice (claimed, completed). Room left in each
# page lets PostgreSQL keep those updates on the page without new index entries (HOT updates),
# which are cheaper and leave the indexes unbloated (migration 0004).
_HOT_UPDATES = {"postgresql_with": {"fillfactor": 70}}


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
    task_id: Mapped[str | None] = mapped_column(String(64))  # the message it was last sent in (0008)
    # The lease of the worker process judging it (db/leases.py, migration 0005).
    leased_by: Mapped[str | None] = mapped_column(String(255))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class PairwiseVerdict(_JudgmentColumns, Base):
    """One comparison: which of two tiles (in the order shown) better matches the query."""

    __tablename__ = "pairwise_verdicts"
    __table_args__ = (
        UniqueConstraint("run_id", "query_id", "tile_first", "tile_second"),
        CheckConstraint("status IN ('pending', 'done', 'failed')", name="status"),
        CheckConstraint("tile_first <> tile_second", name="distinct_tiles"),
        _run_query_key(),
        _HOT_UPDATES,
    )
    run_id: Mapped[int] = mapped_column(Integer)
    query_id: Mapped[int] = mapped_column(Integer)
    tile_first: Mapped[int] = mapped_column(Integer)
    tile_second: Mapped[int] = mapped_column(Integer)
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
        _run_query_key(),
        _HOT_UPDATES,
    )
    run_id: Mapped[int] = mapped_column(Integer)
    query_id: Mapped[int] = mapped_column(Integer)
    tile_id: Mapped[int] = mapped_column(Integer)
    score: Mapped[float | None] = mapped_column(Float)
    probs: Mapped[dict | None] = mapped_column(JSON)
    reused_from_id: Mapped[int | None] = mapped_column(ForeignKey("pointwise_scores.id", ondelete="SET NULL"))


# ----------------------------------------------------------------------------------------------
# stage 1: retrieval runs (migration 0003)

# Retrieval run and shard states; a shard is 'done' once its embedding file is stored, and is
# never recomputed after that.
RETRIEVAL_RUNNING, RETRIEVAL_DONE, RETRIEVAL_FAILED = "running", "done", "failed"


class RetrievalRun(Base):
    """A stage-1 retrieval job: embed every tile and query of a dataset, then store the top-K."""

    __tablename__ = "retrieval_runs"
    __table_args__ = (CheckConstraint("status IN ('running', 'done', 'failed')", name="status"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)  # also the candidate set's name
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(Text)  # timm model name
    checkpoint: Mapped[str | None] = mapped_column(Text)  # absolute path; NULL with random_init
    checkpoint_sha256: Mapped[str | None] = mapped_column(String(64))
    random_init: Mapped[bool] = mapped_column(Boolean)
    seed: Mapped[int] = mapped_column(Integer)  # initialises the weights when random_init
    img_size: Mapped[int] = mapped_column(Integer)  # satellite side; panoramas are img_size x 2*img_size
    k: Mapped[int] = mapped_column(Integer)
    batch_size: Mapped[int] = mapped_column(Integer)
    shard_size: Mapped[int] = mapped_column(Integer)
    max_attempts: Mapped[int] = mapped_column(Integer)
    n_tiles: Mapped[int] = mapped_column(Integer)
    n_queries: Mapped[int] = mapped_column(Integer)
    embeddings_dir: Mapped[str] = mapped_column(Text)  # absolute; shared by every retrieval worker
    embed_dim: Mapped[int | None] = mapped_column(Integer)
    n_gallery: Mapped[int | None] = mapped_column(Integer)  # tiles with an embedding, set by the top-K job
    candidate_set_id: Mapped[int | None] = mapped_column(ForeignKey("candidate_sets.id", ondelete="SET NULL"))
    status: Mapped[str] = mapped_column(
        String(16), default=RETRIEVAL_RUNNING, server_default=RETRIEVAL_RUNNING
    )
    error: Mapped[str | None] = mapped_column(Text)
    params: Mapped[dict] = mapped_column(JSON, default=dict)  # normalisation, devices, timings
    created_at: Mapped[datetime] = _now()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class EmbeddingShard(Base):
    """A slice of a retrieval run's tiles or queries, embedded by one task into one float16 .npy file."""

    __tablename__ = "embedding_shards"
    __table_args__ = (
        UniqueConstraint("retrieval_run_id", "kind", "shard_index"),
        CheckConstraint("kind IN ('tile', 'query')", name="kind"),
        CheckConstraint("status IN ('pending', 'done', 'failed')", name="status"),
        Index("ix_embedding_shards_run_status", "retrieval_run_id", "status"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    retrieval_run_id: Mapped[int] = mapped_column(ForeignKey("retrieval_runs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(8))
    shard_index: Mapped[int] = mapped_column(Integer)
    item_ids: Mapped[list] = mapped_column(JSON)  # tile or query ids, in the file's row order
    n_items: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=PENDING, server_default=PENDING)
    file: Mapped[str | None] = mapped_column(String(255))  # relative to the run's embeddings_dir
    n_embedded: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    worker: Mapped[str | None] = mapped_column(String(255))
    device: Mapped[str | None] = mapped_column(String(64))
    seconds: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    task_id: Mapped[str | None] = mapped_column(String(64))  # the message it was last sent in (0008)
    # The lease of the worker process embedding it (db/leases.py, migration 0005).
    leased_by: Mapped[str | None] = mapped_column(String(255))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class SkippedImage(Base):
    """An image a retrieval run skipped (missing, corrupt, or in a shard that kept killing its worker)."""

    __tablename__ = "skipped_images"
    __table_args__ = (CheckConstraint("kind IN ('tile', 'query')", name="kind"),)
    retrieval_run_id: Mapped[int] = mapped_column(
        ForeignKey("retrieval_runs.id", ondelete="CASCADE"), primary_key=True
    )
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)
    item_id: Mapped[int] = mapped_column(Integer, primary_key=True)  # tiles.id or queries.id
    path: Mapped[str] = mapped_column(Text)
    error: Mapped[str] = mapped_column(Text)


class RetrievalQueryRank(Base):
    """Where a query's positive falls in the whole gallery (for R@k, R@1% and hit rate by SQL).

    ``positive_rank`` counts gallery tiles scoring strictly above the positive (Sample4Geo's
    ``(sim > gt_sim).sum()``, ties favour the positive); ``hit_rank`` counts the same with the
    semi-positives left out. Both are NULL when the positive has no embedding: a miss.
    """

    __tablename__ = "retrieval_query_ranks"
    retrieval_run_id: Mapped[int] = mapped_column(
        ForeignKey("retrieval_runs.id", ondelete="CASCADE"), primary_key=True
    )
    query_id: Mapped[int] = mapped_column(ForeignKey("queries.id", ondelete="CASCADE"), primary_key=True)
    positive_rank: Mapped[int | None] = mapped_column(Integer)
    hit_rank: Mapped[int | None] = mapped_column(Integer)
    positive_score: Mapped[float | None] = mapped_column(Float)


# ----------------------------------------------------------------------------------------------
# fine-tuning (migration 0009)


class Adapter(Base):
    """A LoRA adapter of a pairwise judge, trained by one queued job (a work item, like a judgment:
    'pending' while queued or training, leased by the trainer process, then 'done' or 'failed').

    Its files live under ``output_dir``: ``checkpoints/step-<N>/`` (each referenced by an
    ``adapter_checkpoints`` row once written whole) and ``adapter/``, the final adapter, whose
    content hash ``adapter_sha256`` names it in the revision of every judgment it makes.
    """

    __tablename__ = "adapters"
    __table_args__ = (CheckConstraint("status IN ('pending', 'done', 'failed')", name="status"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    judge: Mapped[str] = mapped_column(String(64))  # 'llava' | 'qwen2.5-vl'
    base_model: Mapped[str] = mapped_column(Text)  # hub id or folder, as given
    base_revision: Mapped[str | None] = mapped_column(String(128))  # as resolved by the trainer
    candidate_set_id: Mapped[int] = mapped_column(ForeignKey("candidate_sets.id", ondelete="CASCADE"))
    queue: Mapped[str] = mapped_column(String(200))
    params: Mapped[dict] = mapped_column(JSON, default=dict)  # LoRA and optimiser settings, seed
    total_steps: Mapped[int] = mapped_column(Integer)
    n_examples: Mapped[int] = mapped_column(Integer)  # training examples (pairs x orders)
    output_dir: Mapped[str] = mapped_column(Text)  # absolute; shared by every training worker
    adapter_sha256: Mapped[str | None] = mapped_column(String(64))
    max_attempts: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=PENDING, server_default=PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(255))
    task_id: Mapped[str | None] = mapped_column(String(64))
    leased_by: Mapped[str | None] = mapped_column(String(255))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _now()
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AdapterQuery(Base):
    """The queries an adapter learnt from ('train') or was validated on ('val'): what ``submit
    --adapter`` checks a run's queries against (leakage)."""

    __tablename__ = "adapter_queries"
    __table_args__ = (CheckConstraint("role IN ('train', 'val')", name="role"),)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True)
    query_id: Mapped[int] = mapped_column(ForeignKey("queries.id", ondelete="CASCADE"), primary_key=True)
    role: Mapped[str] = mapped_column(String(8))


class TrainingStep(Base):
    """One optimiser step's figures; validation rows (every ``--eval-every`` steps, and step 0
    before any training) carry the pairwise accuracy on the held-out queries."""

    __tablename__ = "training_steps"
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    loss: Mapped[float | None] = mapped_column(Float)  # mean over the step's examples
    lr: Mapped[float | None] = mapped_column(Float)
    val_accuracy: Mapped[float | None] = mapped_column(Float)
    val_loss: Mapped[float | None] = mapped_column(Float)
    seconds: Mapped[float | None] = mapped_column(Float)  # the step's wall time
    created_at: Mapped[datetime] = _now()


class AdapterCheckpoint(Base):
    """A checkpoint folder written whole (adapter, optimiser, scheduler, random state, data
    position): a killed trainer resumes from the newest one."""

    __tablename__ = "adapter_checkpoints"
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text)  # relative to the adapter's output_dir
    created_at: Mapped[datetime] = _now()
