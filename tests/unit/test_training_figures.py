"""The training curve of a fine-tuned adapter: drawn from its stored steps, one PNG per adapter,
listed in index.html; ``figures`` works with adapters and no runs, and refuses unknown names."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.engine import session_factory
from db.models import Adapter, AdapterQuery, CandidateSet, Query, TrainingStep
from orchestrator.cli import cli
from orchestrator.reporting.figures import (
    CHANCE,
    TrainingCurve,
    figure_training,
    running_mean,
    save,
    smoothing_window,
    training_curves,
)


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def embedded(tmp_path, monkeypatch) -> sessionmaker[Session]:
    """A SQLite database with a train and a test candidate set (different cities) and no run."""
    url = f"sqlite:///{tmp_path / 'cvgl.sqlite3'}"
    monkeypatch.setenv("CVGL_DATABASE_URL", url)
    monkeypatch.chdir(tmp_path)
    for args in (
        [
            "synth",
            "train",
            "--queries",
            "24",
            "--k",
            "10",
            "--cities",
            "NewYork,Seattle",
            "--image-size",
            "16",
        ],
        ["synth", "test", "--queries", "30", "--k", "10", "--image-size", "16"],
        ["ingest", "train", "--cities", "NewYork,Seattle"],
        ["ingest", "test"],
        ["import-candidates", "train/candidates.csv", "--name", "train"],
        ["import-candidates", "test/candidates.csv", "--name", "test"],
    ):
        out = run(*args)
        assert out.exit_code == 0, (args, out.output)
    return session_factory(url)


def add_adapter(
    sf: sessionmaker[Session],
    name: str,
    candidates: str = "train",
    total_steps: int = 120,
    steps: int | None = None,
    eval_every: int = 30,
    status: str = "done",
    queries: Sequence[int] | None = None,
    seed: int = 0,
) -> int:
    """An adapter row as a trainer leaves it: its train/validation queries (``queries``: these as
    'train', else every query of the candidate set's dataset) and ``steps`` (None: all of them)
    steps with a falling loss, validation at step 0 and every ``eval_every`` steps."""
    rng = random.Random(seed)
    with sf.begin() as s:
        cs = s.scalars(select(CandidateSet).where(CandidateSet.name == candidates)).one()
        adapter = Adapter(
            name=name, judge="llava", base_model="llava-hf/llava-1.5-7b-hf", candidate_set_id=cs.id,
            queue="train.llava-1.5-7b-hf", params={"lora_r": 16, "lr": 1e-4, "eval_every": eval_every},
            total_steps=total_steps, n_examples=8 * total_steps, output_dir=f"/srv/adapters/{name}",
            max_attempts=3, status=status, adapter_sha256=("ab" * 32) if status == "done" else None,
        )  # fmt: skip
        s.add(adapter)
        s.flush()
        ids = (
            list(queries)
            if queries is not None
            else list(s.scalars(select(Query.id).where(Query.dataset_id == cs.dataset_id)))
        )
        for i, q in enumerate(ids):
            s.add(AdapterQuery(adapter_id=adapter.id, query_id=q, role="val" if i % 10 == 9 else "train"))
        last = total_steps if steps is None else steps
        if last >= 0:
            s.add(TrainingStep(adapter_id=adapter.id, step=0, val_accuracy=0.5, val_loss=0.69))
        for step in range(1, last + 1):
            figures = {"loss": 0.69 * math.exp(-step / 40) + 0.05 + rng.uniform(0, 0.1), "lr": 1e-4}
            if step % eval_every == 0 or step == total_steps:
                figures.update(val_accuracy=0.5 + 0.4 * (1 - math.exp(-step / 50)), val_loss=0.4)
            s.add(TrainingStep(adapter_id=adapter.id, step=step, **figures))
        return adapter.id


def _png(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_figures_draws_every_adapter_with_steps_even_without_runs(embedded, tmp_path):
    add_adapter(embedded, "city-lora")
    add_adapter(embedded, "half-way", total_steps=200, steps=70, status="pending", seed=1)
    add_adapter(embedded, "queued", steps=-1, status="pending")  # no step stored yet: nothing to draw

    out = run("figures", "--out", "figs")
    assert out.exit_code == 0, out.output
    figs = tmp_path / "figs"
    for name in ("city-lora", "half-way"):
        path = figs / f"training-{name}.png"
        assert f"wrote figs/training-{name}.png" in out.output
        width, height = _png(path)
        assert 600 <= width <= 1600 and 350 <= height <= 1200, (name, width, height)
    assert not (figs / "training-queued.png").exists()
    page = (figs / "index.html").read_text()
    for name in ("city-lora", "half-way"):
        assert f'<img src="training-{name}.png"' in page
        assert f"Fine-tune {name} (llava on llava-hf/llava-1.5-7b-hf" in page
    assert "step 70 of 200, pending" in page
    assert (figs / "figure4_recall.png").exists()  # the candidate sets' baselines, as before


def test_figures_adapter_option_picks_and_refuses_in_one_line(embedded, tmp_path):
    add_adapter(embedded, "city-lora")
    add_adapter(embedded, "other", seed=2)
    add_adapter(embedded, "queued", steps=-1, status="pending")
    out = run("figures", "--out", "one", "--adapter", "other")
    assert out.exit_code == 0, out.output
    assert sorted(p.name for p in (tmp_path / "one").glob("training-*.png")) == ["training-other.png"]

    for args, message in (
        (["--adapter", "nope"], "no adapter named 'nope' (known: city-lora, other, queued)"),
        (
            ["--adapter", "city-lora", "--adapter", "queued"],
            "adapter 'queued' has no training step stored yet",
        ),
    ):
        bad = run("figures", "--out", "refused", *args)
        assert bad.exit_code == 1, bad.output
        assert message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert not (tmp_path / "refused").exists()  # refused before anything is written


def test_training_curves_read_the_stored_steps(embedded):
    add_adapter(embedded, "city-lora", total_steps=90, eval_every=30)
    with embedded() as s:
        (curve,) = training_curves(s)
        assert training_curves(s, ["city-lora"]) == [curve]
    assert curve.steps == list(range(91)) and curve.total_steps == 90 and curve.status == "done"
    assert curve.loss[0] is None and all(v is not None for v in curve.loss[1:])
    validated = [step for step, a in zip(curve.steps, curve.val_accuracy, strict=True) if a is not None]
    assert validated == [0, 30, 60, 90]


def _curve(n_steps: int, total: int | None = None, eval_every: int = 25) -> TrainingCurve:
    steps = list(range(n_steps + 1))
    return TrainingCurve(
        name="city-lora",
        judge="llava",
        base_model="llava-hf/llava-1.5-7b-hf",
        status="done",
        total_steps=total or n_steps,
        steps=steps,
        loss=[None] + [1.0 / (1 + s / 10) for s in steps[1:]],
        val_accuracy=[0.5 + 0.4 * s / max(1, n_steps) if s % eval_every == 0 else None for s in steps],
    )


def test_the_figure_draws_loss_smoothed_loss_accuracy_and_chance(tmp_path):
    curve = _curve(200)
    fig = figure_training(curve)
    left, right = fig.axes
    raw, smooth = left.get_lines()
    assert list(raw.get_xdata()) == list(range(1, 201))  # step 0 has no training loss
    assert np.allclose(raw.get_ydata(), [1.0 / (1 + s / 10) for s in range(1, 201)])
    window = smoothing_window(200)
    assert window == 10 and np.allclose(smooth.get_ydata(), running_mean(raw.get_ydata(), window))
    assert smooth.get_linewidth() > raw.get_linewidth()  # a thin line per step, a bold mean
    chance, accuracy = right.get_lines()
    assert set(chance.get_ydata()) == {CHANCE} and chance.get_linestyle() == "--"
    assert list(accuracy.get_xdata()) == [0, 25, 50, 75, 100, 125, 150, 175, 200]
    assert accuracy.get_marker() == "o"
    assert right.get_ylim() == (0, 1.02) and left.get_xlim() == (0, 200)
    title = fig._suptitle.get_text()
    assert "city-lora" in title and "llava-hf/llava-1.5-7b-hf" in title and "step 200 of 200" in title
    path = save(fig, tmp_path / "t.png")
    assert _png(path)[0] > 500


def test_the_figure_holds_a_job_with_no_step_trained_yet():
    curve = TrainingCurve("q", "llava", "m", "pending", 100, [0], [None], [0.5])
    fig = figure_training(curve)
    left, right = fig.axes
    assert left.get_lines() == [] and len(right.get_lines()) == 2  # chance and step 0's accuracy
    assert "no training step yet" in [t.get_text() for t in left.texts]
    assert left.get_xlim() == (0, 100)


def test_running_mean_is_a_trailing_mean():
    assert np.allclose(running_mean([1, 2, 3, 4, 5], 2), [1, 1.5, 2.5, 3.5, 4.5])
    assert np.allclose(running_mean([1, 2, 3], 1), [1, 2, 3])
    assert smoothing_window(5) == 1 and smoothing_window(5000) == 100
