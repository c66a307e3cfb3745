"""The ``orchestrator`` command: migrate, synth, ingest, import-candidates, retrieve, submit, finetune,
status, watch, cancel, resume, report, figures, calibrate, worker, coordinator, demo.

Each command parses its options, calls one function and prints; domain errors become one-line ``click.ClickException``s (exit 1).
``CVGL_DATABASE_URL`` / ``CVGL_BROKER_URL`` (or ``--database-url`` / ``--broker-url``) select
PostgreSQL and Redis; unset, the command runs on a SQLite file and an in-process broker with a
worker it starts itself. Settings are read once here, at the edge (``db.settings``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any

import click
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db.engine import database_url, hide_password, is_sqlite, session_factory
from db.migrate import is_up_to_date, upgrade_to_head
from db.settings import SettingsError, override
from orchestrator import drive, launch, vigor
from orchestrator import finetune as fine
from orchestrator import retrieve as stage1
from orchestrator.calibrate import check_method
from orchestrator.candidates import CandidateFileError, import_candidates
from orchestrator.coordinator import UnknownRun
from orchestrator.demo import run_demo
from orchestrator.derived_runs import PARAMETER_NAMES, calibrate_run
from orchestrator.ingest import ingest_directory
from orchestrator.progress import RunStalled, run_status_lines
from orchestrator.reconcile import RunCancelled
from orchestrator.reporting.build import ReportError, build_report
from orchestrator.reporting.render import FORMATS, format_report, prepare_out_dir, write_report_files
from orchestrator.strategies.base import UnknownStrategy
from orchestrator.strategies.registry import STRATEGY_NAMES
from orchestrator.submit import SubmitError, spec_from_options
from orchestrator.synth import write_synthetic_vigor
from workers.app import is_embedded, use_current_settings
from workers.judges.registry import JUDGES, UnknownJudge
from workers.prompts import PROMPT_NAMES

log = logging.getLogger("orchestrator")

_USER_ERRORS = (
    vigor.VigorFormatError,
    CandidateFileError,
    SubmitError,
    fine.FinetuneError,
    UnknownStrategy,
    UnknownJudge,
    UnknownRun,
    ReportError,
    RunStalled,
    RunCancelled,
    drive.BrokerUnreachable,
    stage1.RetrievalFailed,
    ValueError,
    KeyError,
    FileNotFoundError,
    PermissionError,
)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn domain errors into one-line CLI errors (exit 1) instead of tracebacks."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _USER_ERRORS as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise click.ClickException(str(msg)) from exc
        except OperationalError as exc:
            reason = " ".join(str(exc.orig or exc).split())
            raise click.ClickException(f"database error at {_safe_url()}: {reason}") from exc

    return wrapper


def follows_run(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Ctrl-C while following a run: say how to watch, resume or cancel it (exit 130), no "Aborted!"."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except drive.Interrupted as exc:
            click.echo(f"\n{exc}", err=True)
            raise SystemExit(130) from None

    return wrapper


def sessions() -> sessionmaker[Session]:
    """The session factory, with the schema at head (migrated automatically on embedded SQLite)."""
    url = database_url()
    if is_sqlite(url):
        upgrade_to_head(url)
    elif not is_up_to_date(url):
        raise click.ClickException(
            "the database schema is not at the newest migration: run `orchestrator migrate`"
        )
    return session_factory(url)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option(
    "--database-url",
    envvar="CVGL_DATABASE_URL",
    show_envvar=True,
    metavar="URL",
    help="SQLAlchemy URL, e.g. postgresql://user:pw@host/cvgl (default: a SQLite file in CVGL_HOME).",
)
@click.option(
    "--broker-url",
    envvar="CVGL_BROKER_URL",
    show_envvar=True,
    metavar="URL",
    help="Celery broker, e.g. redis://host:6379/0 (default: an in-process broker and worker).",
)
@click.version_option(package_name="cvgl-rerank")
@click.pass_context
def cli(ctx: click.Context, verbose: int, database_url: str | None, broker_url: str | None) -> None:
    """Rerank cross-view geolocalization candidates with vision-language models.

    Every judgment is stored in SQL; Recall@k is computed from what is stored. Set
    CVGL_DATABASE_URL and CVGL_BROKER_URL (or --database-url and --broker-url) to use PostgreSQL
    and Redis with Celery workers; unset, everything runs in this process on a SQLite file. Every
    CVGL_* setting: docs/settings.md.
    """
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:  # the edge: the environment, then this command line; a bad value is one line here
        ctx.with_resource(_command_line_settings(database_url=database_url, broker_url=broker_url))
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from exc


@contextmanager
def _command_line_settings(**given: str | None) -> Iterator[None]:
    """The settings of one command (the environment, then its options), the Celery app following
    them; afterwards the app follows the environment again (one process may run many commands)."""
    with override(**given):
        use_current_settings()
        yield
    use_current_settings()


@cli.command(short_help="Bring the schema to the newest migration.")
@user_errors
def migrate() -> None:
    """Bring the database schema to the newest Alembic migration.

    Needed once per PostgreSQL database (and after an upgrade); the embedded SQLite file is
    migrated by every command. Name the database with CVGL_DATABASE_URL or --database-url (before
    the command's name).

    Example: orchestrator migrate
    """
    upgrade_to_head()
    click.echo(f"database at head: {_safe_url()}")


@cli.command(short_help="Write a synthetic dataset in the VIGOR layout.")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--queries",
    "n_queries",
    type=click.IntRange(min=1),
    default=200,
    show_default=True,
    help="Panoramas in total.",
)
@click.option(
    "--k",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Candidates per query in candidates.csv.",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seeds the images, places and candidates."
)
@click.option(
    "--cities",
    default=",".join(vigor.CROSS_AREA_TEST_CITIES),
    show_default=True,
    help="Comma-separated VIGOR cities.",
)
@click.option(
    "--image-size",
    type=click.IntRange(min=16, max=1024),
    default=64,
    show_default=True,
    help="Tile side in pixels (VIGOR: 640).",
)
@click.option(
    "--panorama-height",
    type=click.IntRange(min=16, max=2048),
    default=None,
    help="Panorama height; panoramas are twice as wide (default: the tile side; VIGOR: 1024).",
)
@user_errors
def synth(
    directory: Path,
    n_queries: int,
    k: int,
    seed: int,
    cities: str,
    image_size: int,
    panorama_height: int | None,
) -> None:
    """Write a synthetic dataset in the VIGOR layout, plus DIRECTORY/candidates.csv.

    Each query's true tile is among its candidates; feed it to ingest and import-candidates.

    Example: orchestrator synth data/synthetic --queries 50 --cities Chicago
    """
    summary = write_synthetic_vigor(
        directory,
        n_queries,
        k=k,
        seed=seed,
        cities=_split(cities),
        image_size=image_size,
        panorama_height=panorama_height,
    )
    click.echo(
        f"wrote {summary.n_queries} panoramas and {summary.n_tiles} tiles in {', '.join(summary.cities)} "
        f"under {summary.root}; candidates: {summary.candidates_csv}"
    )


@cli.command(short_help="Read a VIGOR dataset into the database.")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option(
    "--split",
    type=click.Choice(vigor.SPLITS),
    default="cross-area",
    show_default=True,
    help="Which label files to read.",
)
@click.option("--cities", default=None, help="Comma-separated cities (default: the split's test cities).")
@user_errors
def ingest(directory: Path, split: str, cities: str | None) -> None:
    """Read a VIGOR dataset into the database (idempotent).

    Tiles, panoramas and their ground truth of the split's cities; image files are checked, not
    read.

    Example: orchestrator ingest data/VIGOR --cities Chicago
    """
    with sessions().begin() as s:
        out = ingest_directory(s, directory, split, _split(cities) if cities else None)
    click.echo(
        f"dataset {out.dataset_id}: {out.queries} queries ({out.new_queries} new), {out.tiles} tiles "
        f"({out.new_tiles} new), {out.labels} labels ({out.new_labels} new)"
    )
    if out.missing_images:
        click.echo(f"warning: {out.missing_images} image files listed in the splits are missing", err=True)


@cli.command("import-candidates", short_help="Store precomputed top-K candidates from a CSV.")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", required=True, help="Name of the candidate set (a stage-1 retrieval run).")
@click.option(
    "--dataset", default=None, help="Dataset root or name (default: the one holding these queries)."
)
@user_errors
def import_candidates_cmd(file: Path, name: str, dataset: str | None) -> None:
    """Store precomputed top-K candidates (CSV: query,tile,rank,score).

    The file names the query and tile files as ingested; importing it again changes nothing.

    Example: orchestrator import-candidates data/synthetic/candidates.csv --name synthetic
    """
    with sessions().begin() as s:
        out = import_candidates(s, file, name, dataset)
    verb = "imported" if out.created else "already stored:"
    click.echo(
        f"{verb} candidate set {out.name!r} (id {out.candidate_set_id}): {out.queries} queries, K={out.k}"
    )


@cli.command(short_help="Stage 1: rank the gallery with Sample4Geo.")
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Sample4Geo checkpoint (its model.state_dict(): model.<timm name> keys plus logit_scale).",
)
@click.option(
    "--random-init",
    is_flag=True,
    help="No checkpoint: untrained weights seeded by --seed; the run is marked as such.",
)
@click.option(
    "--model",
    default=stage1.DEFAULT_MODEL,
    show_default=True,
    help="timm model name (num_classes=0; one encoder for both views).",
)
@click.option(
    "--k", type=click.IntRange(min=1), default=stage1.DEFAULT_K, show_default=True, help="Candidates per query."
)
@click.option("--name", required=True, help="Name of the retrieval run and of the candidate set it writes.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=stage1.DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Images per forward pass.",
)
@click.option(
    "--shard-size",
    type=click.IntRange(min=1),
    default=stage1.DEFAULT_SHARD_SIZE,
    show_default=True,
    help="Images per task and file.",
)
@click.option(
    "--img-size",
    type=click.IntRange(min=stage1.MIN_IMG_SIZE),
    default=stage1.DEFAULT_IMG_SIZE,
    show_default=True,
    help="Tile side in pixels; panoramas are S x 2S (Sample4Geo's VIGOR setting: 384).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the --random-init weights.")
@click.option("--dataset", default=None, help="Dataset root or name (default: the only one ingested).")
@click.option("--max-attempts", type=click.IntRange(min=1), default=3, show_default=True)
@click.option(
    "--wait/--no-wait", default=True, show_default=True, help="Follow the shards until the top-K is stored."
)
@user_errors
def retrieve(wait: bool, **options: Any) -> None:
    """Stage 1: embed the gallery and the queries on the `retrieval` queue, store the top-K per query.

    Retrieval workers (`celery -A workers.app worker -Q retrieval`) embed shards of images into
    float16 files under CVGL_EMBEDDINGS_DIR; the last one computes the top-K, stored as candidate
    set NAME. Running the same command again resumes: shards already stored are not recomputed,
    and only shards neither queued nor being embedded are sent again.

    Example: orchestrator retrieve --checkpoint weights_e40_0.6109.pth --name s4g
    """
    lines = stage1.run_retrieval(
        sessions(), stage1.RetrieveSpec(**options), wait, note=lambda m: click.echo(m, err=True)
    )
    click.echo("\n".join(lines))


def _run_spec_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """submit's options that make its RunSpec (``orchestrator.submit.spec_from_options``)."""
    options = [
        click.option(
            "--strategy",
            default="pairwise",
            show_default=True,
            metavar="NAME",
            help=f"One of: {', '.join(STRATEGY_NAMES)}.",
        ),
        click.option(
            "--prompt",
            default=None,
            metavar="NAME",
            help=f"One of: {', '.join(PROMPT_NAMES)} (default: pairwise, or yesno for pointwise).",
        ),
        click.option("--judge", default="simulated", show_default=True, help=f"One of: {', '.join(JUDGES)}."),
        click.option("--model", default=None, help="Hub id or local checkpoint folder (default: the judge's)."),
        click.option("--revision", default=None, help="Model revision (commit, tag or branch)."),
        click.option(
            "--decode",
            type=click.Choice(["choices", "generate"]),
            default="choices",
            show_default=True,
            help="Pairwise answers: choices = P('1') vs P('2') in one forward pass; generate = decode and parse the JSON (the paper's way).",
        ),
        click.option(
            "--accuracy",
            type=click.FloatRange(0, 1),
            default=None,
            help="Simulated judge: probability of a right answer (default 0.8; the demo uses 0.95).",
        ),
        click.option(
            "--position-bias",
            type=click.FloatRange(0, 1),
            default=None,
            help="Simulated judge: mass moved to the first tile.",
        ),
        click.option(
            "--noise",
            type=click.FloatRange(0, 1),
            default=None,
            help="Simulated judge: share of answers drawn at random per order shown (non-transitive).",
        ),
        click.option(
            "--latency-ms", type=click.FloatRange(min=0), default=None, help="Simulated judge: time per judgment."
        ),
        click.option(
            "--top",
            type=click.IntRange(min=1),
            default=None,
            help="selection / tournament: how many places to rank exactly (default 3 / 5); the rest keep stage-1 order.",
        ),
        click.option(
            "--both-orders",
            is_flag=True,
            help="Pairwise strategies: ask every comparison in both orders and combine them (cancels position bias).",
        ),
        click.option(
            "--aggregate",
            type=click.Choice(["copeland", "bradley-terry"]),
            default=None,
            help="allpairs: Copeland wins (default) or a Bradley-Terry fit to the probabilities.",
        ),
        click.option(
            "--reuse/--no-reuse",
            default=True,
            show_default=True,
            help="Copy verdicts earlier runs stored for the same judge, model, revision, prompt and options.",
        ),
        click.option(
            "--adapter",
            default=None,
            metavar="NAME",
            help="Rerank with this fine-tuned adapter of the judge (orchestrator finetune); --model defaults "
            "to its base.",
        ),
        click.option(
            "--allow-overlap",
            is_flag=True,
            help="With --adapter: allow queries the adapter was trained or validated on (the report marks them).",
        ),
        click.option("--candidates", default=None, help="Candidate set name (default: the only one)."),
        click.option(
            "--queries",
            "n_queries",
            type=click.IntRange(min=1),
            default=500,
            show_default=True,
            help="Queries sampled.",
        ),
        click.option(
            "--seed", type=int, default=0, show_default=True, help="Seeds the query sample (and the simulated judge)."
        ),
        click.option(
            "--k", type=click.IntRange(min=2), default=20, show_default=True, help="Candidates reranked per query."
        ),
        click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Judgments per task."),
        click.option("--max-attempts", type=click.IntRange(min=1), default=3, show_default=True),
        click.option("--queue", default=None, help="Override the model queue (default vlm.<model>)."),
        click.option(
            "--max-open-queries",
            type=click.IntRange(min=0),
            default=None,
            help="Queries sorted at once; the next starts as one finishes (default: 64 per GPU queue for "
            "VLM judges, so each GPU keeps every open query's prefixes cached; all for the simulated judge). "
            "0: all at once.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@cli.command(short_help="Create a rerank run; prints its id.")
@_run_spec_options
@click.option("--all-queries", is_flag=True, help="Rerank every query of the candidate set.")
@click.option(
    "--poison",
    multiple=True,
    help="Simulated judge, fault injection: a judgment ('QUERY|TILE' or 'QUERY|FIRST|SECOND', file names) "
    "that kills the worker process asking it. Repeatable. Only with separate worker processes.",
)
@click.option("--wait/--no-wait", default=False, show_default=True, help="Show progress until the run is done.")
@click.option(
    "--then-calibrate",
    "then_calibrate",
    default=None,
    metavar="fuse|gate",
    help="When the run is done, derive a calibrated run from it (orchestrator calibrate; implies --wait).",
)
@user_errors
@follows_run
def submit(
    all_queries: bool, poison: tuple[str, ...], wait: bool, then_calibrate: str | None, **options: Any
) -> None:
    """Create a rerank run and send its first judgments; prints the run id.

    With --wait (always without CVGL_BROKER_URL, where this process serves the run), shows progress
    until the run is done; Ctrl-C then leaves the run as it is and says how to watch, resume or
    cancel it.

    Example: orchestrator submit --strategy tournament --top 5 --queries 100 --wait
    """
    if then_calibrate is not None:
        check_method(then_calibrate)  # before anything is stored
    spec = spec_from_options(options, all_queries=all_queries, poison=poison, embedded=is_embedded())
    run_id = drive.submit_run(sessions(), spec, wait or then_calibrate is not None)
    click.echo(run_id)
    if then_calibrate is not None:
        _calibrate(run_id, then_calibrate, DEFAULT_DEV_SHARE, options["seed"])


DEFAULT_DEV_SHARE = 0.3


def _calibrate(run_id: int, method: str, dev_share: float, seed: int) -> None:
    sf = sessions()
    with sf.begin() as s:
        derived = calibrate_run(s, run_id, method, dev_share, seed)
    with sf() as s:
        result = build_report(s, [run_id, derived], common=True)
    fitted = result.run(derived).strategy_options
    name = PARAMETER_NAMES[method]
    click.echo(
        f"run {derived}: {method} of run {run_id}, {name} {fitted[name]} fitted on {fitted['dev_queries']} dev "
        f"queries; run {run_id} and run {derived} on the other {result.run(derived).n_queries} (test) queries:\n"
    )
    click.echo(format_report(result, "table"))


@cli.command(short_help="Derive a run that does no harm from a run's judgments.")
@click.argument("run_id", type=int)
@click.option("--method", required=True, metavar="fuse|gate", help="fuse: weigh the judge against stage 1; "
              "gate: move a candidate to first place only when the judge is confident.")  # fmt: skip
@click.option(
    "--dev-share",
    type=float,
    default=DEFAULT_DEV_SHARE,
    show_default=True,
    help="Share of the run's queries the weight or threshold is fitted on (chosen by query name).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the choice of dev queries.")
@user_errors
def calibrate(run_id: int, method: str, dev_share: float, seed: int) -> None:
    """Derive a run from RUN_ID's stored judgments and the stage-1 order, asking no worker anything.

    Fitted on a seeded share of the queries (dev), reported on the rest (test) beside RUN_ID and the
    stage-1 baseline on those same queries; a judge that hurts on dev is switched off.

    Example: orchestrator calibrate 3 --method fuse
    """
    _calibrate(run_id, method, dev_share, seed)


@cli.command(short_help="Progress of a run or an adapter, or of every run.")
@click.argument("target", metavar="[RUN_ID|ADAPTER]", required=False)
@user_errors
def status(target: str | None) -> None:
    """Progress of one run, of one fine-tuned adapter (by name: its steps, loss, learning rate and
    validation accuracy), or of every run and adapter (no argument), 120 columns wide.

    Example: orchestrator status 3
    """
    if target is not None:
        fine.check_target(target)
    with sessions()() as s:
        if target is not None and not target.isdigit():
            lines = fine.status_lines(s, target)
        else:
            lines = run_status_lines(s, int(target) if target else None)
            if target is None:
                lines += fine.adapters_lines(s, after_runs=bool(lines))
    click.echo("\n".join(lines) if lines else "no runs yet")


@cli.command(short_help="Re-send a run's (or an adapter's) stale work; continue it.")
@click.argument("target", metavar="RUN_ID|ADAPTER")
@click.option("--wait/--no-wait", default=False, show_default=True, help="Show progress until it is done.")
@user_errors
@follows_run
def resume(target: str, wait: bool) -> None:
    """Continue a run, or a fine-tune, from the database.

    A run: re-send its stale judgments, replay its open queries. Stale: pending, not being judged
    (no live lease) and not queued (the message it was last sent in is neither waiting in the
    broker nor held unacknowledged by a worker), so a judgment still queued gets no second
    message. A cancelled run is not resumed (submit it again). An adapter (by name): its job is
    sent again when stale; the trainer continues from its newest checkpoint. Without
    CVGL_BROKER_URL this process does the work until it is done.

    Example: orchestrator resume 3 --wait
    """
    if not fine.check_target(target).isdigit():
        try:
            sent, p = fine.resume_finetune(sessions(), target, wait)
        except KeyboardInterrupt:
            _interrupted_training(target)
        click.echo(
            f"adapter {target}: " + ("sent again" if sent else "still queued or training: nothing re-sent")
        )
        if p is not None:
            click.echo(fine.summary(p))
        return
    run_id = int(target)
    r = drive.resume_run(sessions(), run_id, wait)
    click.echo(
        f"run {run_id}: re-sent {r.requeued} stale judgments, {r.new_judgments} new, "
        f"{r.finished_queries} queries finished{' (run done)' if r.run_done else ''}"
    )


def _interrupted_training(name: str) -> None:
    hint = (
        f"stopped following adapter {name}; "
        + ("its in-process trainer stopped with this process (its checkpoints stay).\n"
           f"  continue it:  orchestrator resume {name}" if is_embedded()
           else f"it goes on on the training worker.\n  follow it:  orchestrator status {name}")
    )  # fmt: skip
    click.echo(f"\n{hint}", err=True)
    raise SystemExit(130)


@cli.command(short_help="Fine-tune a pairwise judge (LoRA) as a queued job.")
@click.option("--judge", type=click.Choice(["llava", "qwen2.5-vl"]), default="llava", show_default=True)
@click.option("--model", default=None, help="Base checkpoint: hub id or folder (default: the judge's).")
@click.option("--revision", default=None, help="Base model revision (commit, tag or branch).")
@click.option(
    "--candidates",
    default=None,
    help="Candidate set whose queries, labels and stage-1 candidates make the examples (default: the only one).",
)
@click.option("--name", required=True, help="The adapter's name (status NAME, submit --adapter NAME).")
@click.option(
    "--steps", type=click.IntRange(min=1), default=None, help="Optimiser steps [default: one epoch]."
)
@click.option(
    "--epochs", type=click.FloatRange(min=0, min_open=True), default=None, help="Passes over the examples."
)
@click.option("--lora-r", type=click.IntRange(min=1), default=16, show_default=True, help="LoRA rank.")
@click.option("--lora-alpha", type=float, default=None, help="LoRA scale numerator [default: 2 x rank].")
@click.option("--lora-dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=1e-4,
    show_default=True,
    help="Peak learning rate.",
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Examples per step."
)
@click.option(
    "--warmup-steps",
    type=click.IntRange(min=0),
    default=None,
    help="Linear warm-up [default: 3% of the steps].",
)
@click.option(
    "--both-orders", is_flag=True, help="Show every pair in both orders [default: one seeded order each]."
)
@click.option(
    "--negatives",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Hard negatives per query: its best-ranked candidates that are neither positive nor semi-positive.",
)
@click.option(
    "--val-share",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.05,
    show_default=True,
    help="Share of the queries held out for validation accuracy.",
)
@click.option("--train-projector", is_flag=True, help="Also train the vision-to-language projector (whole).")
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Steps between checkpoints.",
)
@click.option(
    "--eval-every",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Steps between validations.",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seeds the LoRA weights, data order and split."
)
@click.option(
    "--max-attempts",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Trainer deaths before the job fails.",
)
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Adapter and checkpoint folder [default: CVGL_ADAPTERS_DIR/NAME].")  # fmt: skip
@click.option("--wait/--no-wait", default=False, show_default=True, help="Show progress until the job ends.")
@user_errors
def finetune(wait: bool, **options: Any) -> None:
    """Fine-tune the pairwise judge with LoRA on a candidate set's labelled queries.

    Each example is a query's positive against one of its stage-1 hard negatives (never a
    semi-positive), the answer "1" or "2" after the forced {"preference": " prefix; the base
    weights stay frozen. The job goes to the train.<model> queue, served by `orchestrator worker
    --train --model MODEL`; without CVGL_BROKER_URL this process trains. Checkpoints are written
    every --checkpoint-every steps: a killed trainer resumes from the newest. Rerank with the
    result: `submit --judge llava --adapter NAME` (queries the adapter saw are refused).

    Example: orchestrator finetune --model ./llava --candidates train --name lora1 --steps 300
    """
    spec = fine.FinetuneSpec(**options)
    try:
        p = fine.start_finetune(sessions(), spec, wait)
    except KeyboardInterrupt:
        _interrupted_training(spec.name)
    if p is None:
        click.echo(f"adapter {spec.name} queued; follow it: orchestrator status {spec.name}")
        return
    click.echo(fine.summary(p))
    if p.status == "failed":
        raise SystemExit(1)


@cli.command(short_help="Follow a run until it is done; sends nothing.")
@click.argument("run_id", type=int)
@user_errors
@follows_run
def watch(run_id: int) -> None:
    """Follow a run with a progress bar until it is done, then print one line on it.

    Read-only: it sends no message and re-sends nothing. If nothing moves for CVGL_STALL_SECONDS
    (10 s without CVGL_BROKER_URL, where only `submit --wait` or `resume --wait` serve a run), it
    says so and exits 1: `orchestrator resume RUN_ID` re-sends what was lost.

    Example: orchestrator watch 3
    """
    click.echo(drive.summary(drive.watch_run(sessions(), run_id)))


@cli.command(short_help="Cancel a run: its pending judgments are not judged.")
@click.argument("run_id", type=int)
@user_errors
def cancel(run_id: int) -> None:
    """Cancel a run: it is marked cancelled, its pending judgments are closed as failed ("run
    cancelled") so no worker judges them, and no new judgments are created. What is stored stays
    (finished queries keep their rankings). Cancelling again says it is already cancelled;
    `resume` refuses a cancelled run.

    Example: orchestrator cancel 3
    """
    click.echo(drive.cancel(sessions(), run_id))


def _report_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--common / --confidence, shared by report and figures."""
    fn = click.option(
        "--confidence",
        type=click.FloatRange(0, 1, min_open=True, max_open=True),
        default=0.95,
        show_default=True,
        help="Level of every interval (Wilson for R@k, Newcombe for differences).",
    )(fn)
    return click.option(
        "--common",
        is_flag=True,
        help="Restrict every row of a candidate set to the queries all of its listed runs finished "
        "(default: each run on its own finished queries, against the baseline on those queries).",
    )(fn)


@cli.command(short_help="Table 1, paired tests, calibration and cost.")
@click.argument("run_ids", type=int, nargs=-1)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write table1.txt/.md/.csv/.json into this folder (table1.txt as with --wide).",
)
@click.option(
    "--wide",
    is_flag=True,
    help="Table format: every row on one line, intervals beside their values, nothing wrapped "
    "(default: fit 120 columns, each R@k interval below its value, long cells and notes wrapped).",
)
@_report_options
@user_errors
def report(
    run_ids: tuple[int, ...], fmt: str, out: Path | None, wide: bool, common: bool, confidence: float
) -> None:
    """Table 1: Recall@1/3/5/10 per run and its stage-1 baseline, paired tests, calibration, cost.

    No RUN_IDS: every run and candidate set stored. Each run is on the queries it finished,
    against the baseline on those queries cut at the run's K; exact McNemar p-values with
    Newcombe intervals, Holm-adjusted over the table.

    Example: orchestrator report 1 2 --format csv
    """
    if out is not None:
        prepare_out_dir(out)
    with sessions()() as s:
        result = build_report(s, list(run_ids) or None, common=common, confidence=confidence)
    click.echo(format_report(result, fmt, wide=wide))
    if out is not None:
        for path in write_report_files(result, out):
            click.echo(f"wrote {path}", err=True)


@cli.command(short_help="Write the figures and index.html.")
@click.argument("run_ids", type=int, nargs=-1)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder for the PNG files and index.html.",
)
@click.option(
    "--examples",
    type=click.IntRange(min=1, max=20),
    default=4,
    show_default=True,
    help="Figure 5: queries shown per run (chosen with --seed).",
)
@click.option(
    "--query",
    "query_names",
    multiple=True,
    help="Figure 5: show this query (file name; repeatable) instead of chosen examples.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds Figure 5's choice of examples.")
@click.option(
    "--adapter",
    "adapter_names",
    multiple=True,
    help="Draw this fine-tuned adapter's training curve (name; repeatable) [default: every adapter with "
    "stored steps].",
)
@_report_options
@user_errors
def figures(
    run_ids: tuple[int, ...],
    out: Path,
    examples: int,
    query_names: tuple[str, ...],
    seed: int,
    adapter_names: tuple[str, ...],
    common: bool,
    confidence: float,
) -> None:
    """Figures 3-5, calibration and position bias as PNG files, with index.html holding them and the report.

    Each fine-tuned adapter's training (orchestrator finetune) is drawn too, as
    training-<adapter>.png: loss per step and validation accuracy.

    Example: orchestrator figures 1 2 --out results/
    """
    from orchestrator.reporting.figures import training_curves, write_figures

    with sessions()() as s:
        # Validate the runs and adapters before creating anything on disk.
        result = build_report(s, list(run_ids) or None, common=common, confidence=confidence)
        training_curves(s, adapter_names)
        prepare_out_dir(out)
        written = write_figures(
            s,
            result,
            out,
            examples=examples,
            query_names=list(query_names),
            seed=seed,
            adapter_names=list(adapter_names),
        )
    for path in written:
        click.echo(f"wrote {path}")


@cli.command(short_help="Run the whole pipeline on synthetic data.")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("cvgl-demo"),
    show_default=True,
    help="Where the synthetic dataset (and, embedded, the SQLite file) go.",
)
@click.option("--queries", "n_queries", type=click.IntRange(min=1), default=500, show_default=True)
@click.option(
    "--accuracy",
    type=click.FloatRange(0, 1),
    default=0.95,
    show_default=True,
    help="Simulated judge accuracy.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@user_errors
def demo(directory: Path, n_queries: int, accuracy: float, seed: int) -> None:
    """Synthesize, ingest, import candidates, rerank pairwise and pointwise, report.

    Without CVGL_DATABASE_URL the database is DIR/cvgl.sqlite3; the last line says how to see
    the results again.

    Example: orchestrator demo --queries 100
    """
    for line in run_demo(directory, n_queries, accuracy, seed, sessions):
        click.echo(line)


@cli.command(short_help="Start a judgment (or training) worker for one model.")
@click.option(
    "--model", default="simulated", show_default=True, help="Hub id or folder; the queue is vlm.<model>."
)
@click.option(
    "--gpu",
    type=click.IntRange(min=0),
    default=None,
    help="GPU index: sets CUDA_VISIBLE_DEVICES (default: left as it is).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Pool processes (1 per GPU).",
)
@click.option("--queue", default=None, help="Override the queue (default vlm.<model>).")
@click.option(
    "--shard",
    type=click.IntRange(min=0),
    default=None,
    help="With CVGL_VLM_SHARDS > 1: this worker's own queue vlm.<model>.<shard> (default: --gpu, or 0).",
)
@click.option(
    "--loglevel", default="INFO", show_default=True, help='Celery\'s log level (INFO prints "ready").'
)
@click.option(
    "--train",
    is_flag=True,
    help="Serve fine-tunes of the model (train.<model>, one job at a time) instead of judgments.",
)
@click.option("--dry-run", is_flag=True, help="Print the celery command instead of running it.")
@user_errors
def worker(
    model: str,
    gpu: int | None,
    concurrency: int,
    queue: str | None,
    shard: int | None,
    loglevel: str,
    train: bool,
    dry_run: bool,
) -> None:
    """Start a judgment worker for one model (one per GPU), named vlm-<model>-gpu<N>@host; with
    --train, a training worker for its fine-tunes (orchestrator finetune), train-<model>-gpu<N>@host.

    Runs `celery -A workers.app worker` with this command's settings; --dry-run prints that
    command line instead.

    Example: orchestrator worker --model llava-hf/llava-1.5-7b-hf --gpu 0
    """
    if train:
        job = launch.training_worker(model, gpu, queue, loglevel)
    else:
        job = launch.judgment_worker(model, gpu, concurrency, queue, shard, loglevel)
    if dry_run:
        click.echo(job.shell())
        return
    job.exec()


@cli.command(short_help="Start the coordination worker.")
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Processes. One (the default, a solo pool) keeps each open query's judgments between rounds; "
    "more (a prefork pool) stay correct but re-read more.",
)
@click.option(
    "--loglevel", default="INFO", show_default=True, help='Celery\'s log level (INFO prints "ready").'
)
@click.option("--dry-run", is_flag=True, help="Print the celery command instead of running it.")
@user_errors
def coordinator(concurrency: int, loglevel: str, dry_run: bool) -> None:
    """Start the coordination worker (replays strategies as verdicts arrive).

    Runs `celery -A orchestrator.tasks worker -Q coordination` with this command's settings;
    --dry-run prints that command line instead.

    Example: orchestrator coordinator --dry-run
    """
    job = launch.coordinator(concurrency, loglevel)
    if dry_run:
        click.echo(job.shell())
        return
    job.exec()


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _safe_url() -> str:
    return hide_password(database_url())


def main() -> None:
    cli(prog_name="orchestrator")
