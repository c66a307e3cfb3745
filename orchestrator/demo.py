"""The demo pipeline: synthesize, ingest, import candidates, rerank pairwise and pointwise, report.

Embedded unless ``CVGL_DATABASE_URL`` is set: the database is a SQLite file beside the data, and
the last lines say how to see the results again with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from db.engine import database_url, hide_password
from db.settings import override, settings
from orchestrator import vigor
from orchestrator.candidates import import_candidates
from orchestrator.drive import submit_run
from orchestrator.ingest import ingest as ingest_records
from orchestrator.reporting.build import build_report
from orchestrator.reporting.render import format_report
from orchestrator.submit import RunSpec
from orchestrator.synth import write_synthetic_vigor


def run_demo(
    directory: Path,
    n_queries: int,
    accuracy: float,
    seed: int,
    sessions: Callable[[], sessionmaker[Session]],
) -> Iterator[str]:
    """The demo, step by step: yields what to print. ``sessions``: the schema-checked session
    factory of the CLI, called once the database URL is settled."""
    t0 = time.perf_counter()
    own_db = None if settings().database_url else f"sqlite:///{(directory / 'cvgl.sqlite3').resolve()}"
    with override(database_url=own_db):
        yield from _steps(directory, n_queries, accuracy, seed, sessions, t0)


def _steps(
    directory: Path,
    n_queries: int,
    accuracy: float,
    seed: int,
    sessions: Callable[[], sessionmaker[Session]],
    t0: float,
) -> Iterator[str]:
    url = hide_password(database_url())
    data_dir = directory / "vigor"
    summary = write_synthetic_vigor(data_dir, n_queries, k=20, seed=seed)
    yield f"1/5 synthesized {summary.n_queries} panoramas, {summary.n_tiles} tiles under {data_dir}"
    sf = sessions()
    with sf.begin() as s:
        out = ingest_records(s, data_dir, vigor.read_vigor(data_dir))
    yield f"2/5 ingested {out.queries} queries, {out.tiles} tiles, {out.labels} labels into {url}"
    name = f"demo-synthetic-{seed}"
    with sf.begin() as s:
        imp = import_candidates(s, summary.candidates_csv, name, str(data_dir))
    yield f"3/5 candidate set {name!r}: {imp.queries} queries, K={imp.k}"
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
        run_id = submit_run(sf, spec, wait=True)
        runs.append(run_id)
        yield f"{step}/5 run {run_id}: {strategy} ({prompt}) with the simulated judge at accuracy {accuracy}"
    with sf() as s:
        yield "\n" + format_report(build_report(s, runs), "table")
    yield f"\ndone in {time.perf_counter() - t0:.1f} s"
    yield (
        f"see these results again: orchestrator --database-url {url} report "
        f"(or: orchestrator --database-url {url} figures --out results/)"
    )
