"""Fine-tuning as a queued job on real Celery workers, Redis and PostgreSQL, with a tiny LLaVA:
a trainer SIGKILLed mid-job is redelivered and resumes to the uninterrupted adapter; ``submit
--adapter`` refuses queries the adapter saw unless ``--allow-overlap``; bad input is one line,
exit 1, nothing stored; a tiny Qwen2.5-VL trains through the same path."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.orm import Session

from db.models import Adapter, AdapterCheckpoint, AdapterQuery, Run, TrainingStep
from tests.builders import synthetic_dataset
from tests.integration.conftest import cli, wait_for
from tests.tiny_vlms import build_tiny_llava, tiny_checkpoint
from workers.queues import train_queue_for

pytestmark = pytest.mark.integration

# Small and quick, dropout on (a resumed job must restore the random state too).
TRAIN = ["--candidates", "syn", "--lora-r", "4", "--lr", "5e-3", "--batch-size", "4", "--lora-dropout", "0.1",
         "--negatives", "2", "--val-share", "0.2", "--eval-every", "20", "--seed", "3"]  # fmt: skip


@pytest.fixture
def stack(stack_env, tmp_path):
    data = synthetic_dataset(tmp_path / "VIGOR", n_queries=10, k=5, image_size=32)
    cli(stack_env, "ingest", str(data))
    cli(stack_env, "import-candidates", str(data / "candidates.csv"), "--name", "syn")
    stack_env.update(OMP_NUM_THREADS="1", CVGL_VLM_DEVICE="cpu")
    return stack_env


def adapter(engine, name: str) -> Adapter | None:
    with Session(engine) as s:
        return s.scalars(select(Adapter).where(Adapter.name == name)).first()


def tensors(a: Adapter) -> dict:
    return load_file(str(Path(a.output_dir) / "adapter" / "adapter_model.safetensors"))


def test_a_sigkilled_trainer_is_redelivered_and_resumes_to_the_uninterrupted_adapter(
    stack, pg_url, workers, tmp_path_factory
):
    llava = str(tiny_checkpoint("llava", tmp_path_factory.getbasetemp() / "tiny-vlms"))
    queue = train_queue_for(llava)
    assert queue == "train.tiny-llava"
    engine = create_engine(pg_url)
    common = ["finetune", "--model", llava, *TRAIN, "--steps", "200", "--checkpoint-every", "20"]

    trainer = workers([queue], "trainer", app="workers.app")
    done = cli(stack, *common, "--name", "whole", "--wait")
    assert "adapter whole done: 200/200 steps" in done.stdout

    cli(stack, *common, "--name", "killed")  # queued; no wait
    killed_id = adapter(engine, "killed").id

    def checkpointed() -> int:
        with Session(engine) as s:
            return s.scalar(
                select(func.max(AdapterCheckpoint.step)).where(AdapterCheckpoint.adapter_id == killed_id)
            )

    at = wait_for(lambda: (checkpointed() or 0) >= 40, 120, "no checkpoint at step 40")
    trainer.kill()  # SIGKILL, parent and child: the message waits unacknowledged in Redis
    a = adapter(engine, "killed")
    assert a.status == "pending" and a.attempts == 1
    with Session(engine) as s:
        reached = s.scalar(select(func.max(TrainingStep.step)).where(TrainingStep.adapter_id == killed_id))
    assert at <= reached < 200, "killed before the end"

    second = workers([queue], "trainer2", app="workers.app")  # Redis redelivers after its visibility timeout
    wait_for(lambda: adapter(engine, "killed").status != "pending", 180, "the resumed job did not end")
    whole, resumed = adapter(engine, "whole"), adapter(engine, "killed")
    assert resumed.status == "done" and resumed.attempts == 2
    assert "resuming at step" in second.log.read_text()
    a, b = tensors(whole), tensors(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() < 1e-5, key
    with Session(engine) as s:
        steps = {
            name: {r.step: r for r in s.scalars(select(TrainingStep).where(TrainingStep.adapter_id == i))}
            for name, i in (("whole", whole.id), ("killed", resumed.id))
        }
    assert sorted(steps["killed"]) == list(range(201))  # every step once, the redone ones overwritten
    for step in range(1, 201):
        assert steps["killed"][step].loss == pytest.approx(steps["whole"][step].loss, abs=1e-5)
    assert steps["killed"][200].val_accuracy == steps["whole"][200].val_accuracy
    # status ADAPTER shows the job, its bar and its rows.
    shown = cli(stack, "status", "killed").stdout
    assert "adapter killed: done (attempt 2/3)" in shown and "step 200/200" in shown and "val acc" in shown


def test_submit_with_an_adapter_refuses_its_training_queries_and_bad_input_stores_nothing(
    stack, pg_url, workers, tmp_path, tmp_path_factory
):
    base = tmp_path_factory.getbasetemp() / "tiny-vlms"
    llava = str(tiny_checkpoint("llava", base))
    qwen = str(tiny_checkpoint("qwen2.5-vl", base))
    engine = create_engine(pg_url)
    workers([train_queue_for(llava)], "trainer", app="workers.app")
    cli(stack, "finetune", "--model", llava, *TRAIN, "--steps", "6", "--name", "lora", "--wait")
    with Session(engine) as s:
        roles = {
            r: n for r, n in s.execute(select(AdapterQuery.role, func.count()).group_by(AdapterQuery.role))
        }
    assert roles == {"train": 8, "val": 2}

    def refused(*args: str) -> str:
        before = _counts(engine)
        proc = cli(stack, *args, check=False)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
        assert _counts(engine) == before  # nothing stored
        return lines[0]

    submit = ["submit", "--judge", "llava", "--candidates", "syn", "--k", "3", "--queries", "4"]
    msg = refused(*submit, "--adapter", "lora")
    assert "4 of the run's 4 queries were in adapter 'lora'" in msg and "--allow-overlap" in msg
    run_id = int(cli(stack, *submit, "--adapter", "lora", "--allow-overlap").stdout.split()[-1])
    lora = adapter(engine, "lora")
    with Session(engine) as s:
        run = s.get(Run, run_id)
        assert run.model == llava  # the adapter's base, --model not given
        assert run.params["adapter"] == {"name": "lora", "sha256": lora.adapter_sha256, "overlap": 4}
        assert run.params["judge_options"]["adapter_sha256"] == lora.adapter_sha256
    cli(stack, "cancel", str(run_id))

    other = build_tiny_llava(tmp_path / "other-llava", seed=1)
    assert "was trained on" in refused(*submit, "--model", str(other), "--adapter", "lora", "--allow-overlap")
    assert "is a llava adapter" in refused(
        "submit", "--judge", "qwen2.5-vl", "--candidates", "syn", "--adapter", "lora", "--allow-overlap"
    )
    assert "no adapter named 'nope'" in refused(*submit, "--adapter", "nope")
    assert "not LLaVA-1.5" in refused("finetune", "--model", qwen, *TRAIN, "--steps", "2", "--name", "x")
    assert "exists" in refused("finetune", "--model", llava, *TRAIN, "--steps", "2", "--name", "lora")
    assert "only digits" in refused("finetune", "--model", llava, *TRAIN, "--steps", "2", "--name", "12")
    # A candidate set whose queries have no labels cannot teach anything.
    data = synthetic_dataset(tmp_path / "unlabelled", n_queries=3, k=3, image_size=32)
    cli(stack, "ingest", str(data))
    cli(stack, "import-candidates", str(data / "candidates.csv"), "--name", "bare")
    with engine.begin() as c:
        c.execute(text("DELETE FROM ground_truth WHERE query_id IN (SELECT query_id FROM candidates c "
                       "JOIN candidate_sets s ON s.id = c.candidate_set_id WHERE s.name = 'bare')"))  # fmt: skip
    args = ["finetune", "--model", llava, "--candidates", "bare", "--steps", "2", "--name", "y"]
    assert "has no training labels" in refused(*args)


def test_a_tiny_qwen_trains_through_the_same_path(stack, pg_url, workers, tmp_path_factory):
    qwen = str(tiny_checkpoint("qwen2.5-vl", tmp_path_factory.getbasetemp() / "tiny-vlms"))
    workers([train_queue_for(qwen)], "trainer", app="workers.app")
    out = cli(stack, "finetune", "--judge", "qwen2.5-vl", "--model", qwen, *TRAIN, "--steps", "6",
              "--checkpoint-every", "3", "--train-projector", "--name", "qwen-lora", "--wait")  # fmt: skip
    assert "adapter qwen-lora done: 6/6 steps" in out.stdout
    a = adapter(create_engine(pg_url), "qwen-lora")
    keys = tensors(a).keys()
    assert any("language_model" in k and "lora_A" in k for k in keys) and any("merger" in k for k in keys)
    assert not any("visual.blocks" in k for k in keys)  # the vision tower is never adapted


def _counts(engine) -> tuple[int, ...]:
    with Session(engine) as s:
        return tuple(s.scalar(select(func.count()).select_from(t)) for t in (Run, Adapter, AdapterQuery))
