"""The LoRA loop on a tiny real LLaVA (CPU): the training path is the judging path, a resumed job
ends with the uninterrupted job's adapter, checkpoints appear whole, and a judge loads the adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orchestrator.vigor import read_vigor
from tests.builders import candidates_from_csv, synthetic_dataset
from tests.tiny_vlms import tiny_checkpoint
from workers.judges.adapters import ADAPTER_DIR, AdapterError, adapter_sha256
from workers.judges.base import JudgeRequest
from workers.judges.llava import LlavaJudge
from workers.prompts import PAIR, load_prompt
from workers.training import loop
from workers.training.checkpoints import CHECKPOINTS, TMP_MARK
from workers.training.examples import QueryLabels, pair_examples

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> Path:
    return tiny_checkpoint("llava", tmp_path_factory.getbasetemp() / "tiny-vlms")


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> list[loop.Example]:
    """Pairwise examples of a small synthetic dataset, built from its files."""
    root = synthetic_dataset(tmp_path_factory.mktemp("train") / "VIGOR", n_queries=12)
    data = read_vigor(root, "cross-area")
    tiles = {t.name: i for i, t in enumerate(data.tiles)}
    paths = {**{("t", i): root / t.path for i, t in enumerate(data.tiles)}}
    queries = {q.name: (i, root / q.path) for i, q in enumerate(data.queries)}
    pos: dict[str, int] = {}
    semi: dict[str, set[int]] = {}
    for lb in data.labels:
        if lb.relation == "positive":
            pos[lb.query] = tiles[lb.tile]
        else:
            semi.setdefault(lb.query, set()).add(tiles[lb.tile])
    cands = candidates_from_csv(root / "candidates.csv")
    labels = [
        QueryLabels(queries[q][0], q, pos[q], frozenset(semi[q]), tuple(tiles[t] for t in cands[q]))
        for q in queries
    ]
    by_id = {i: path for i, path in queries.values()}
    prompt = load_prompt("pairwise")
    return [
        loop.Example(
            JudgeRequest(
                prompt.text,
                (by_id[e.query_id], paths[("t", e.first)], paths[("t", e.second)]),
                prompt.spec.answer_prefix,
            ),  # fmt: skip
            e.answer,
        )
        for e in pair_examples(labels, negatives=2, both_orders=True, seed=0)
    ]


class MemoryLog:
    """``loop.TrainingLog`` in memory; ``crash_at`` raises when that step is logged (a killed trainer)."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.steps: dict[int, dict] = {}
        self.checkpoints: dict[int, str] = {}
        self.crash_at = crash_at

    def step(self, step: int, **figures) -> None:
        if step == self.crash_at:
            self.crash_at = None
            raise KeyboardInterrupt("killed")
        self.steps.setdefault(step, {}).update({k: v for k, v in figures.items() if v is not None})

    def checkpoint(self, step: int, path: str) -> None:
        self.checkpoints[step] = path

    def latest_checkpoint(self):
        return max(self.checkpoints.items()) if self.checkpoints else None

    def forget_checkpoints(self, steps) -> None:
        for s in steps:
            self.checkpoints.pop(s)


# Dropout on: a resumed job must also restore the random state to match.
CONFIG = loop.TrainConfig(lora_r=4, lr=5e-3, batch_size=4, lora_dropout=0.1, train_projector=True,
                          checkpoint_every=3, eval_every=4, keep_checkpoints=2, seed=7, warmup_steps=2)  # fmt: skip
STEPS = 8


def _train(llava: Path, examples, out: Path, log: MemoryLog) -> loop.TrainResult:
    judge = loop.load_base("llava", str(llava), None, device="cpu")
    return loop.train(
        judge, "llava", CONFIG, examples[:16], examples[16:24], STEPS, out, log, {"adapter": "t"}
    )


def test_the_training_loss_reads_the_tokens_a_reranking_run_reads(llava, examples):
    """exp(answer_logprobs) of the plain path = choice_probs of the judge with its prefix caches."""
    reqs = [e.request for e in examples[:6]]
    trained_path = LlavaJudge(str(llava), device="cpu", reuse=False).answer_logprobs(reqs, PAIR).exp()
    served = LlavaJudge(str(llava), device="cpu").choice_probs(reqs, PAIR)
    assert torch.allclose(trained_path, torch.tensor([[p[c] for c in PAIR] for p in served]), atol=1e-5)


def test_a_killed_job_resumes_to_the_uninterrupted_adapter(llava, examples, tmp_path):
    whole_log = MemoryLog()
    whole = _train(llava, examples, tmp_path / "whole", whole_log)

    log = MemoryLog(crash_at=5)  # after the checkpoint of step 3: steps 4 and 5 are redone
    with pytest.raises(KeyboardInterrupt):
        _train(llava, examples, tmp_path / "killed", log)
    assert log.latest_checkpoint() == (3, f"{CHECKPOINTS}/step-00000003")
    resumed = _train(llava, examples, tmp_path / "killed", log)

    a = load_file(str(whole.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any("multi_modal_projector" in k for k in a)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    for step in range(1, STEPS + 1):
        assert log.steps[step]["loss"] == pytest.approx(whole_log.steps[step]["loss"], abs=1e-6)
        assert log.steps[step]["lr"] == pytest.approx(whole_log.steps[step]["lr"])
    assert log.steps[STEPS]["val_accuracy"] == whole_log.steps[STEPS]["val_accuracy"]
    assert 0 in log.steps and "loss" not in log.steps[0]  # validation before any training
    # The adapter differs from its initialisation: training moved it.
    assert whole_log.steps[STEPS]["loss"] != whole_log.steps[1]["loss"]
    # Only whole checkpoint folders remain, the newest two, each referenced.
    folders = sorted(p.name for p in (tmp_path / "killed" / CHECKPOINTS).iterdir())
    assert folders == ["step-00000003", "step-00000006"] and not list(tmp_path.glob(f"**/*{TMP_MARK}*"))
    assert sorted(log.checkpoints) == [3, 6]


def test_a_judge_loads_the_adapter_merged_and_names_it_in_its_revision(llava, examples, tmp_path):
    result = _train(llava, examples, tmp_path / "out", MemoryLog())
    sha = adapter_sha256(result.adapter_dir)
    assert result.sha256 == sha
    meta = json.loads((result.adapter_dir / "cvgl_adapter.json").read_text())
    assert meta["steps"] == STEPS and meta["adapter"] == "t"

    base = LlavaJudge(str(llava), device="cpu")
    tuned = LlavaJudge(str(llava), device="cpu", adapter=str(result.adapter_dir), adapter_sha256=sha)
    assert tuned.revision == f"{base.revision}+adapter-{sha[:12]}"
    reqs = [e.request for e in examples[16:24]]
    before = [p["1"] for p in base.choice_probs(reqs, PAIR)]
    after = [p["1"] for p in tuned.choice_probs(reqs, PAIR)]
    assert max(abs(x - y) for x, y in zip(before, after, strict=True)) > 1e-3
    # The merged judge answers as the trained (unmerged) model did.
    trained = loop.load_base("llava", str(llava), None, device="cpu")
    from peft import PeftModel

    trained.hf = PeftModel.from_pretrained(trained.hf, str(result.adapter_dir))
    with torch.no_grad():
        expected = trained.answer_logprobs(reqs, PAIR).exp()[:, 0].tolist()
    assert after == pytest.approx(expected, abs=1e-5)


def test_an_adapter_whose_files_changed_is_refused(llava, examples, tmp_path):
    result = _train(llava, examples, tmp_path / "out", MemoryLog())
    copy = tmp_path / ADAPTER_DIR
    shutil.copytree(result.adapter_dir, copy)
    meta = copy / "cvgl_adapter.json"
    meta.write_text(meta.read_text() + " ")
    with pytest.raises(AdapterError, match="files changed after training"):
        LlavaJudge(str(llava), device="cpu", adapter=str(copy), adapter_sha256=result.sha256)
