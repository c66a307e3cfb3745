"""Table 1 end to end: the real commands on the embedded default, with a LLaVA-1.5 checkpoint on disk.

A random-weight LLaVA-1.5 of the requested shapes is saved as a checkpoint in a Hugging Face cache
(``models--cvgl-bench--llava-1.5-<shapes>-random/snapshots/<commit>``), so the worker loads it the
way a GPU host without network loads a real one: by hub id, offline, ``from_pretrained``. Then, as
subprocesses with their own ``CVGL_HOME`` (SQLite) and the in-process broker:

    orchestrator synth DATA --queries N --image-size 640 --panorama-height 1024   (VIGOR's sizes)
    orchestrator ingest DATA && orchestrator import-candidates DATA/candidates.csv --name stage1
    orchestrator submit --strategy pairwise   --judge llava --model ID --queries N --wait
    orchestrator submit --strategy tournament --top 5 --judge llava --model ID --queries N --wait
    orchestrator report 1 2 --format json

Random weights make the recall meaningless; the point is time: wall time, judgments per second
(computed and reused), the GPU's busy share (``nvidia-smi`` sampled twice a second) and, when fewer
than 500 queries fit the time, the same extrapolated to 500 (model load once, then per query).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TARGET_QUERIES = 500
MODEL_ID = "cvgl-bench/llava-1.5-{shapes}-random"


def save_hub_checkpoint(model: Any, processor: Any, hf_home: Path, shapes: str) -> str:
    """Save a model and processor as a hub-cache snapshot under ``hf_home``; returns the hub id."""
    repo_id = MODEL_ID.format(shapes=shapes)
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(snapshot)
    processor.save_pretrained(snapshot)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo_id


class GpuSampler:
    """``nvidia-smi`` utilization (%) and memory (MiB) twice a second, in a background thread."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []  # (time, utilization %, memory MiB)
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu,memory.used",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "500",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                util, mem = (float(x) for x in line.split(","))
            except ValueError:
                continue
            self.samples.append((time.time(), util, mem))

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=5)

    def busy(self, start: float, end: float) -> dict[str, float] | None:
        inside = [(u, m) for t, u, m in self.samples if start <= t <= end]
        if not inside:
            return None
        return {
            "gpu_utilization_mean": statistics.fmean(u for u, _ in inside) / 100,
            "gpu_memory_max_gib": max(m for _, m in inside) / 1024,
            "samples": len(inside),
        }


def orchestrator(
    args: list[str], env: dict[str, str], log: Callable[[str], None], timeout: float, logs: Path
) -> tuple[str, float]:
    """Run ``python -m orchestrator ARGS``; (stdout, seconds). Its stderr (progress bars, warnings)
    goes to a file under ``logs``, whose last line is shown."""
    logs.mkdir(parents=True, exist_ok=True)
    err = logs / f"{len(list(logs.iterdir())):02d}-{args[0]}.log"
    t0 = time.perf_counter()
    with err.open("w") as fh:
        proc = subprocess.run(
            [sys.executable, "-m", "orchestrator", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=fh,
            text=True,
            timeout=timeout,
        )
    seconds = time.perf_counter() - t0
    lines = [
        ln.strip() for ln in err.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()
    ]
    if proc.returncode != 0:
        tail = "\n".join(lines[-15:])
        raise RuntimeError(
            f"orchestrator {' '.join(args)} exited {proc.returncode}:\n{tail}\n{proc.stdout[-1000:]}"
        )
    log(
        f"  orchestrator {' '.join(args[:2])} ...: {seconds:.1f} s"
        + (f"  [{lines[-1][:150]}]" if lines else "")
    )
    return proc.stdout, seconds


def run_figures(home: Path, run_id: int) -> dict[str, Any]:
    """Timestamps and judgment counts of a finished run, from its database."""
    from sqlalchemy import func, select

    from db.engine import session_factory
    from db.models import PairwiseVerdict, Run

    sf = session_factory(f"sqlite:///{home / 'cvgl.sqlite3'}")
    with sf() as s:
        run = s.get(Run, run_id)
        computed = PairwiseVerdict.reused_from_id.is_(None)
        n_done, n_failed, n_reused, latency, first, last = s.execute(
            select(
                func.count().filter(PairwiseVerdict.status == "done", computed),
                func.count().filter(PairwiseVerdict.status == "failed"),
                func.count(PairwiseVerdict.reused_from_id),
                func.sum(PairwiseVerdict.latency_ms).filter(computed),
                func.min(PairwiseVerdict.finished_at).filter(computed),
                func.max(PairwiseVerdict.finished_at).filter(computed),
            ).where(PairwiseVerdict.run_id == run_id)
        ).one()
        created, finished = run.created_at, run.finished_at
    to_s = lambda d: d.timestamp() if isinstance(d, datetime) else None  # noqa: E731
    out: dict[str, Any] = {
        "run_id": run_id,
        "status": run.status,
        "judgments_computed": n_done,
        "judgments_failed": n_failed,
        "judgments_reused": n_reused,
        "judge_seconds": (latency or 0) / 1000,
        "created": to_s(created),
        "finished": to_s(finished),
        "first_verdict": to_s(first),
        "last_verdict": to_s(last),
    }
    if out["finished"] and out["created"]:
        out["run_wall_s"] = out["finished"] - out["created"]
        out["judgments_per_s"] = n_done / out["run_wall_s"] if out["run_wall_s"] > 0 else None
    if out["first_verdict"] and out["created"]:
        # The worker loads the model on its first task: the first verdict lands after the load.
        out["first_verdict_after_s"] = out["first_verdict"] - out["created"]
        steady = out["finished"] - out["first_verdict"] if out["finished"] else None
        out["steady_wall_s"] = steady
        out["steady_judgments_per_s"] = (n_done / steady) if steady else None
        out["judge_busy_share"] = (out["judge_seconds"] / steady) if steady else None
    return out


def worker_stats(tmp: Path, since: float) -> dict[str, Any] | None:
    """The judge's figures from the newest worker status file (workers/control.py) under ``tmp``
    written after ``since`` (a run whose every judgment was reused runs no worker task)."""
    files = sorted(
        (f for f in tmp.glob("cvgl-worker-*/*.json") if f.stat().st_mtime >= since),
        key=lambda f: f.stat().st_mtime,
    )
    if not files:
        return None
    status = json.loads(files[-1].read_text())
    judges = [j for j in status.get("judges", []) if "stats" in j]
    return judges[0]["stats"] if judges else None


def plan_queries(seconds_left: float, ms_per_judgment: float, overhead_s: float, cap: int) -> int:
    """Queries that fit: merge sort (about 42 computed comparisons a query at K=20) plus the
    tournament's new ones (about 20), at ``ms_per_judgment`` with a margin, after ``overhead_s``."""
    per_query_s = (42 + 20) * ms_per_judgment / 1000 * 1.4
    return int(max(4, min(cap, (seconds_left - overhead_s) / per_query_s)))


def run_table1(
    work: Path,
    repo_id: str,
    shapes: str,
    n_queries: int,
    *,
    device: str,
    image_sizes: str,
    log: Callable[[str], None],
    deadline: float,
    max_open_queries: int | None = None,
) -> dict[str, Any]:
    """Make the data, run both submits and the report with checkpoint ``repo_id`` saved under
    ``work/hf`` (``save_hub_checkpoint``); the figures as a dict."""
    hf_home, home, data, logs = work / "hf", work / "home", work / "data", work / "logs"
    env = {
        **os.environ,
        "CVGL_HOME": str(home),
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "CVGL_VLM_DEVICE": device,
        "PYTHONUNBUFFERED": "1",
        # The worker's status file (cache hits, work per prefix level) lands here: see worker_stats.
        "TMPDIR": str(work / "tmp"),
    }
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    env.pop("CVGL_DATABASE_URL", None)
    env.pop("CVGL_BROKER_URL", None)
    sizes = (
        ["--image-size", "640", "--panorama-height", "1024"]
        if image_sizes == "real"
        else ["--image-size", "32"]
    )
    out: dict[str, Any] = {
        "model": repo_id,
        "queries": n_queries,
        "logs": str(logs),
        "max_open_queries": max_open_queries,
    }
    window = [] if max_open_queries is None else ["--max-open-queries", str(max_open_queries)]
    left = lambda: max(30.0, deadline - time.perf_counter())  # noqa: E731
    _, out["synth_s"] = orchestrator(
        ["synth", str(data), "--queries", str(n_queries), *sizes], env, log, left(), logs
    )
    _, out["ingest_s"] = orchestrator(["ingest", str(data)], env, log, left(), logs)
    orchestrator(
        ["import-candidates", str(data / "candidates.csv"), "--name", "stage1"], env, log, left(), logs
    )
    runs = {}
    with GpuSampler() as sampler:
        for label, strategy in (
            ("pairwise", ["--strategy", "pairwise"]),
            ("tournament", ["--strategy", "tournament", "--top", "5"]),
        ):
            started = time.time()
            stdout, wall = orchestrator(
                [
                    "submit",
                    *strategy,
                    "--judge",
                    "llava",
                    "--model",
                    repo_id,
                    "--candidates",
                    "stage1",
                    "--queries",
                    str(n_queries),
                    *window,
                    "--wait",
                ],
                env,
                log,
                left(),
                logs,
            )
            run_id = int(stdout.strip().splitlines()[-1])
            figures = run_figures(home, run_id)
            figures["command_wall_s"] = wall
            figures["worker"] = worker_stats(work / "tmp", started)
            if figures.get("first_verdict") and figures.get("finished"):
                figures["gpu"] = sampler.busy(figures["first_verdict"], figures["finished"])
            runs[label] = figures
            log(
                f"table1: {label}: {figures['judgments_computed']} computed + {figures['judgments_reused']} reused "
                f"judgments, run {figures.get('run_wall_s', 0):.1f} s (first verdict after "
                f"{figures.get('first_verdict_after_s', 0):.1f} s), {figures.get('steady_judgments_per_s') or 0:.1f} judgments/s steady"
            )
    out["runs"] = runs
    report, _ = orchestrator(
        ["report", *(str(r["run_id"]) for r in runs.values()), "--format", "json"], env, log, left(), logs
    )
    out["report"] = json.loads(report)
    out["note"] = "random weights: recall is not meaningful; the figures measure time"
    # Extrapolation to 500 queries: the model load once, then the steady per-query time.
    pw = runs["pairwise"]
    if n_queries < TARGET_QUERIES and pw.get("steady_wall_s"):
        per_query = pw["steady_wall_s"] / n_queries
        out["pairwise_500_extrapolated_s"] = pw["first_verdict_after_s"] + per_query * TARGET_QUERIES
        out["extrapolated"] = f"measured on {n_queries} queries, extrapolated linearly to {TARGET_QUERIES}"
    elif pw.get("run_wall_s"):
        out["pairwise_500_s"] = pw["run_wall_s"]
    return out
