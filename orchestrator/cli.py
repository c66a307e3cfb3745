"""The ``orchestrator`` command: synth, ingest, import candidates, submit, status, resume, report, demo.

One short function per command; domain errors become one-line ``click.ClickException``s (exit 1).
``CVGL_DATABASE_URL`` / ``CVGL_BROKER_URL`` select PostgreSQL and Redis; unset, the command runs
on a SQLite file and an in-process broker with a worker it starts itself.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db.engine import DATABASE_URL_ENV, database_url, is_sqlite, session_factory
from db.migrate import is_up_to_date, upgrade_to_head
from db.models import Run
from orchestrator import vigor
from orchestrator.candidates import CandidateFileError, import_candidates
from orchestrator.coordinator import UnknownRun, advance
from orchestrator.ingest import ingest as ingest_records
from orchestrator.progress import RunProgress, RunStalled, run_progress, wait_for_run
from orchestrator.reconcile import reconcile
from orchestrator.report import ReportError, format_rows, report_rows
from orchestrator.strategies.base import STRATEGY_NAMES, UnknownStrategy
from orchestrator.submit import RunSpec, SubmitError, create_run
from orchestrator.synth import write_synthetic_vigor
from workers.app import is_embedded
from workers.judges.registry import JUDGES, UnknownJudge
from workers.prompts import PROMPT_NAMES

log = logging.getLogger("orchestrator")

_USER_ERRORS = (
    vigor.VigorFormatError,
    CandidateFileError,
    SubmitError,
    UnknownStrategy,
    UnknownJudge,
    UnknownRun,
    ReportError,
    RunStalled,
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
            raise click.ClickException(f"database error: {exc.orig or exc}") from exc

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
@click.version_option(package_name="cvgl-rerank")
def cli(verbose: int) -> None:
    """Rerank cross-view geolocalization candidates with vision-language models.

    Every judgment is stored in SQL; Recall@k is computed from what is stored. Set
    CVGL_DATABASE_URL and CVGL_BROKER_URL to use PostgreSQL and Redis with Celery workers;
    unset, everything runs in this process on a SQLite file.
    """
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@cli.command()
@user_errors
def migrate() -> None:
    """Bring the database schema to the newest Alembic migration."""
    upgrade_to_head()
    click.echo(f"database at head: {_safe_url()}")


@cli.command()
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
@click.option("--seed", type=int, default=0, show_default=True)
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
    help="Tile side in pixels.",
)
@user_errors
def synth(directory: Path, n_queries: int, k: int, seed: int, cities: str, image_size: int) -> None:
    """Write a synthetic dataset in the VIGOR layout, plus DIRECTORY/candidates.csv."""
    summary = write_synthetic_vigor(
        directory, n_queries, k=k, seed=seed, cities=_split(cities), image_size=image_size
    )
    click.echo(
        f"wrote {summary.n_queries} panoramas and {summary.n_tiles} tiles in {', '.join(summary.cities)} "
        f"under {summary.root}; candidates: {summary.candidates_csv}"
    )


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--split", type=click.Choice(vigor.SPLITS), default="cross-area", show_default=True)
@click.option("--cities", default=None, help="Comma-separated cities (default: the split's test cities).")
@user_errors
def ingest(directory: Path, split: str, cities: str | None) -> None:
    """Read a VIGOR dataset into the database (idempotent)."""
    data = vigor.read_vigor(directory, split, _split(cities) if cities else None)
    with sessions().begin() as s:
        out = ingest_records(s, directory, data)
    click.echo(
        f"dataset {out.dataset_id}: {out.queries} queries ({out.new_queries} new), {out.tiles} tiles "
        f"({out.new_tiles} new), {out.labels} labels ({out.new_labels} new)"
    )
    if out.missing_images:
        click.echo(f"warning: {out.missing_images} image files listed in the splits are missing", err=True)


@cli.command("import-candidates")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", required=True, help="Name of the candidate set (a stage-1 retrieval run).")
@click.option(
    "--dataset", default=None, help="Dataset root or name (default: the one holding these queries)."
)
@user_errors
def import_candidates_cmd(file: Path, name: str, dataset: str | None) -> None:
    """Store precomputed top-K candidates (CSV: query,tile,rank,score)."""
    with sessions().begin() as s:
        out = import_candidates(s, file, name, dataset)
    verb = "imported" if out.created else "already stored:"
    click.echo(
        f"{verb} candidate set {out.name!r} (id {out.candidate_set_id}): {out.queries} queries, K={out.k}"
    )


@cli.command()
@click.option("--strategy", type=click.Choice(STRATEGY_NAMES), default="pairwise", show_default=True)
@click.option(
    "--prompt",
    type=click.Choice(PROMPT_NAMES),
    default=None,
    help="Default: pairwise, or yesno for pointwise.",
)
@click.option("--judge", default="simulated", show_default=True, help=f"One of: {', '.join(JUDGES)}.")
@click.option("--model", default=None, help="Hub id or local checkpoint folder (default: the judge's).")
@click.option("--revision", default=None, help="Model revision (commit, tag or branch).")
@click.option(
    "--accuracy",
    type=click.FloatRange(0, 1),
    default=None,
    help="Simulated judge: probability of a right answer.",
)
@click.option(
    "--position-bias",
    type=click.FloatRange(0, 1),
    default=None,
    help="Simulated judge: mass moved to the first tile.",
)
@click.option(
    "--latency-ms", type=click.FloatRange(min=0), default=None, help="Simulated judge: time per judgment."
)
@click.option("--candidates", default=None, help="Candidate set name (default: the only one).")
@click.option(
    "--queries",
    "n_queries",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Queries sampled.",
)
@click.option("--all-queries", is_flag=True, help="Rerank every query of the candidate set.")
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seeds the query sample (and the simulated judge)."
)
@click.option(
    "--k", type=click.IntRange(min=2), default=20, show_default=True, help="Candidates reranked per query."
)
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Judgments per task.")
@click.option("--max-attempts", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--queue", default=None, help="Override the model queue (default vlm.<model>).")
@click.option("--wait/--no-wait", default=False, help="Show progress until the run is done.")
@user_errors
def submit(
    strategy: str,
    prompt: str | None,
    judge: str,
    model: str | None,
    revision: str | None,
    accuracy: float | None,
    position_bias: float | None,
    latency_ms: float | None,
    candidates: str | None,
    n_queries: int,
    all_queries: bool,
    seed: int,
    k: int,
    batch_size: int | None,
    max_attempts: int,
    queue: str | None,
    wait: bool,
) -> None:
    """Create a rerank run and enqueue its judgments; prints the run id."""
    options = {
        name: v
        for name, v in (("accuracy", accuracy), ("position_bias", position_bias), ("latency_ms", latency_ms))
        if v is not None
    }
    if options and judge != "simulated":
        raise click.UsageError("--accuracy, --position-bias and --latency-ms apply to --judge simulated only")
    spec = RunSpec(
        strategy=strategy,
        prompt=prompt,
        judge=judge,
        model=model,
        revision=revision,
        candidates=candidates,
        n_queries=None if all_queries else n_queries,
        seed=seed,
        k=k,
        batch_size=batch_size,
        max_attempts=max_attempts,
        queue=queue,
        judge_options=options,
    )
    run_id = _submit(sessions(), spec, wait)
    click.echo(run_id)


def _submit(sf: sessionmaker[Session], spec: RunSpec, wait: bool) -> int:
    with sf.begin() as s:
        run_id = create_run(s, spec)
    _drive(sf, run_id, wait, start=lambda: advance(run_id, sessions=sf))
    return run_id


def _drive(
    sf: sessionmaker[Session], run_id: int, wait: bool, start: Callable[[], object]
) -> RunProgress | None:
    """Start (or resume) the run's work; in embedded mode, serve it in-process until done."""
    if is_embedded():
        from orchestrator.embedded import embedded_worker

        with sf() as s:
            queue = s.get(Run, run_id).queue
        with embedded_worker([queue]):
            start()
            return wait_for_run(
                sf, run_id, on_stall=lambda: reconcile(run_id, None, sf), stall_seconds=10, max_stalls=3
            )
    start()
    if not wait:
        return None
    return wait_for_run(
        sf, run_id, on_stall=lambda: reconcile(run_id, _stall_seconds(), sf), stall_seconds=_stall_seconds()
    )


def _stall_seconds() -> float:
    return float(os.environ.get("CVGL_STALL_SECONDS", "60"))


@cli.command()
@click.argument("run_id", type=int, required=False)
@user_errors
def status(run_id: int | None) -> None:
    """Progress of one run, or of every run."""
    sf = sessions()
    with sf() as s:
        if run_id is not None:
            p = run_progress(s, run_id)
            if p is None:
                raise UnknownRun(f"run {run_id} does not exist")
            rows = [p]
        else:
            from db.reports import all_run_ids

            rows = [run_progress(s, r) for r in all_run_ids(s)]
    if not rows:
        click.echo("no runs yet")
        return
    click.echo(
        f"{'run':>4}  {'status':8}  {'strategy/prompt':20}  {'judge':10}  {'queries':>11}  "
        f"{'judged':>8}  {'pending':>8}  {'failed':>7}  model"
    )
    for p in rows:
        assert p is not None
        click.echo(
            f"{p.run_id:>4}  {p.status:8}  {p.strategy + '/' + p.prompt:20}  {p.judge:10}  "
            f"{f'{p.queries_done}/{p.queries_total}':>11}  {p.judgments_done:>8}  {p.judgments_pending:>8}  "
            f"{p.judgments_failed:>7}  {p.model}"
        )


@cli.command()
@click.argument("run_id", type=int)
@click.option("--wait/--no-wait", default=False, help="Show progress until the run is done.")
@click.option(
    "--stale-after",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Re-enqueue pending judgments enqueued more than this many seconds ago.",
)
@user_errors
def resume(run_id: int, wait: bool, stale_after: float) -> None:
    """Rebuild a run's queue from the database and continue it (after any failure)."""
    sf = sessions()
    with sf() as s:
        if run_progress(s, run_id) is None:
            raise UnknownRun(f"run {run_id} does not exist")
    summary: dict[str, Any] = {}

    def start() -> None:
        summary["r"] = reconcile(run_id, stale_after, sf)

    _drive(sf, run_id, wait, start)
    r = summary["r"]
    click.echo(
        f"run {run_id}: re-enqueued {r.requeued} pending judgments, {r.new_judgments} new, "
        f"{r.finished_queries} queries finished{' (run done)' if r.run_done else ''}"
    )


@cli.command()
@click.argument("run_ids", type=int, nargs=-1)
@click.option(
    "--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True
)
@user_errors
def report(run_ids: tuple[int, ...], fmt: str) -> None:
    """Recall@1/3/5/10 of runs and of the stage-1 baseline on the same queries (SQL views)."""
    with sessions()() as s:
        rows = report_rows(s, list(run_ids) or None)
    click.echo(format_rows(rows, fmt))


@cli.command()
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
    """Synthesize, ingest, import candidates, rerank pairwise and pointwise, report."""
    t0 = time.perf_counter()
    if not os.environ.get(DATABASE_URL_ENV):
        os.environ[DATABASE_URL_ENV] = f"sqlite:///{(directory / 'cvgl.sqlite3').resolve()}"
    data_dir = directory / "vigor"
    summary = write_synthetic_vigor(data_dir, n_queries, k=20, seed=seed)
    click.echo(f"1/5 synthesized {summary.n_queries} panoramas, {summary.n_tiles} tiles under {data_dir}")
    sf = sessions()
    with sf.begin() as s:
        out = ingest_records(s, data_dir, vigor.read_vigor(data_dir))
    click.echo(
        f"2/5 ingested {out.queries} queries, {out.tiles} tiles, {out.labels} labels into {_safe_url()}"
    )
    name = f"demo-synthetic-{seed}"
    with sf.begin() as s:
        imp = import_candidates(s, summary.candidates_csv, name, str(data_dir))
    click.echo(f"3/5 candidate set {name!r}: {imp.queries} queries, K={imp.k}")
    runs = []
    for step, (strategy, prompt) in enumerate((("pairwise", "pairwise"), ("pointwise", "yesno")), start=4):
        spec = RunSpec(
            strategy=strategy,
            prompt=prompt,
            judge="simulated",
            candidates=name,
            n_queries=n_queries,
            seed=seed,
            judge_options={"accuracy": accuracy},
        )
        run_id = _submit(sf, spec, wait=True)
        runs.append(run_id)
        click.echo(
            f"{step}/5 run {run_id}: {strategy} ({prompt}) with the simulated judge at accuracy {accuracy}"
        )
    with sf() as s:
        click.echo("\n" + format_rows(report_rows(s, runs), "table"))
    click.echo(f"\ndone in {time.perf_counter() - t0:.1f} s")


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _safe_url() -> str:
    url = database_url()
    if "@" in url:  # hide the password
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def main() -> None:
    cli(prog_name="orchestrator")
