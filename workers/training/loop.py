"""The LoRA fine-tune of a pairwise judge: load the base judge, adapt it, step, validate, checkpoint.

The model is the judge itself (``HFVisionJudge``: the same checkpoint loading, chat template,
forced ``{"preference": "`` prefix and answer tokens as a reranking run), wrapped by peft. The
loss is the cross-entropy of the right answer token ("1" or "2") at the position after the
prefix, over the whole vocabulary: nothing else of the sequence is a target. The base weights are
frozen; the projector trains too when asked. bf16 with gradient checkpointing on a GPU, fp32 on
the CPU. Seeded: the LoRA initialisation, the data order (``examples.batch_indices``) and the
random states saved in every checkpoint make a resumed job end with the adapter of an
uninterrupted one. The database is reached only through ``TrainingLog`` (``tasks.py``).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from workers.judges.adapters import ADAPTER_DIR, METADATA_FILE, adapter_sha256, lora_config
from workers.judges.base import JudgeRequest
from workers.judges.registry import judge_class
from workers.prompts import PAIR
from workers.training.checkpoints import (
    checkpoint_path,
    load_checkpoint,
    remove_partial,
    save_checkpoint,
    write_atomically,
)
from workers.training.examples import batch_indices

log = logging.getLogger(__name__)

EVAL_BATCH = 16


@dataclass(frozen=True)
class TrainConfig:
    """One job's settings (stored as the adapter's ``params``, plus what the job itself knows)."""

    lora_r: int = 16
    lora_alpha: float | None = None  # None: 2 * r
    lora_dropout: float = 0.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    batch_size: int = 8
    max_grad_norm: float = 1.0
    train_projector: bool = False
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    eval_every: int = 100
    seed: int = 0

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TrainConfig:
        return cls(**{k: v for k, v in params.items() if k in cls.__dataclass_fields__})


class TrainingLog(Protocol):
    """Where a job's progress goes (the database, in ``tasks.py``)."""

    def step(self, step: int, **figures: float | None) -> None: ...

    def checkpoint(self, step: int, path: str) -> None: ...

    def latest_checkpoint(self) -> tuple[int, str] | None: ...

    def forget_checkpoints(self, steps: Sequence[int]) -> None: ...


@dataclass(frozen=True)
class Example:
    request: JudgeRequest
    answer: int  # index into PAIR


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    sha256: str
    base_revision: str
    val_accuracy: float | None


def load_base(judge_name: str, model: str, revision: str | None, device: str | None = None) -> Any:
    """The base judge, as a reranking worker would load it (plain batches: training runs whole
    sequences; bf16 on a GPU, fp32 on the CPU)."""
    return judge_class(judge_name)(model, revision, device=device, reuse=False)


def answer_loss(
    judge: Any, examples: Sequence[Example], prepared: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy of the right answers, [examples] True where the right answer is the
    likelier). ``prepared``: the examples' ``judge.answer_inputs``, when made ahead."""
    logprobs = judge.answer_logprobs([e.request for e in examples], PAIR, prepared)
    answers = torch.tensor([e.answer for e in examples], device=logprobs.device)
    right = logprobs.gather(1, answers[:, None])[:, 0]
    wrong = logprobs.gather(1, (1 - answers)[:, None])[:, 0]
    return -right.mean(), right > wrong


def evaluate(judge: Any, examples: Sequence[Example]) -> tuple[float, float]:
    """(pairwise accuracy, mean loss) on ``examples``, in eval mode, no gradients."""
    if not examples:
        return math.nan, math.nan
    judge.hf.eval()
    correct, total_loss = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(examples), EVAL_BATCH):
            part = examples[start : start + EVAL_BATCH]
            loss, good = answer_loss(judge, part)
            correct += int(good.sum())
            total_loss += float(loss) * len(part)
    return correct / len(examples), total_loss / len(examples)


def adapt(judge: Any, judge_name: str, config: TrainConfig) -> Any:
    """Wrap the judge's model with a fresh, seeded LoRA adapter (base weights frozen)."""
    from peft import get_peft_model

    model = judge.hf
    if judge.device.type == "cuda":
        # Activations of a 7B model over ~2,000 tokens: recomputed in the backward pass instead of kept.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(config.seed)
    lora = lora_config(
        judge_name, config.lora_r, config.lora_alpha, config.lora_dropout, config.train_projector
    )
    judge.hf = get_peft_model(model, lora)
    return judge.hf


def train(
    judge: Any,
    judge_name: str,
    config: TrainConfig,
    train_examples: Sequence[Example],
    val_examples: Sequence[Example],
    total_steps: int,
    output_dir: Path,
    training_log: TrainingLog,
    metadata: dict[str, Any],
) -> TrainResult:
    """Run (or resume) the job to ``total_steps``; write the final adapter under ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_partial(output_dir)
    model = adapt(judge, judge_name, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = _linear_schedule(optimizer, config.warmup_steps, total_steps)

    start = 0
    latest = training_log.latest_checkpoint()
    if latest is not None and (output_dir / latest[1]).is_dir():
        start = load_checkpoint(output_dir / latest[1], model, optimizer, scheduler)
        log.info("resuming at step %d of %d from %s", start, total_steps, latest[1])
    else:
        accuracy, loss = evaluate(judge, val_examples)
        training_log.step(0, val_accuracy=_finite(accuracy), val_loss=_finite(loss))
        log.info("step 0: validation accuracy %.3f", accuracy)

    def prepare(step: int) -> tuple[list[Example], Any]:
        batch = [
            train_examples[i]
            for i in batch_indices(len(train_examples), config.batch_size, step, config.seed)
        ]
        return batch, judge.answer_inputs([e.request for e in batch], PAIR)

    accuracy = None
    kept: list[int] = [latest[0]] if latest else []
    # The next batch's images are decoded and preprocessed in a thread while this one trains (at
    # VIGOR's sizes that is tens of milliseconds an example, on the CPU).
    with ThreadPoolExecutor(1, thread_name_prefix="cvgl-next-batch") as pool:
        pending = pool.submit(prepare, start) if start < total_steps else None
        for step in range(start, total_steps):
            t0 = time.perf_counter()
            assert pending is not None
            batch, prepared = pending.result()
            pending = pool.submit(prepare, step + 1) if step + 1 < total_steps else None
            model.train()
            lr = scheduler.get_last_lr()[0]
            loss, _ = answer_loss(judge, batch, prepared)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            done = step + 1
            loss_value = loss.item()
            figures: dict[str, float | None] = {
                "loss": loss_value,
                "lr": lr,
                "seconds": time.perf_counter() - t0,
            }
            if done % config.eval_every == 0 or done == total_steps:
                if pending is not None:
                    pending.result()  # the tokenizer is not shared between threads
                accuracy, val_loss = evaluate(judge, val_examples)
                figures.update(val_accuracy=_finite(accuracy), val_loss=_finite(val_loss))
                log.info("step %d: loss %.4f, validation accuracy %.3f", done, loss_value, accuracy)
            training_log.step(done, **figures)
            if done % config.checkpoint_every == 0 and done < total_steps:
                training_log.checkpoint(done, save_checkpoint(output_dir, done, model, optimizer, scheduler))
                kept.append(done)
                _prune(output_dir, kept, config.keep_checkpoints, training_log)

    adapter_dir = output_dir / ADAPTER_DIR

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        info = {**metadata, "base_revision": judge.revision, "steps": total_steps, "config": asdict(config)}
        (folder / METADATA_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

    write_atomically(adapter_dir, write)
    return TrainResult(
        adapter_dir,
        adapter_sha256(adapter_dir),
        judge.revision,
        _finite(accuracy) if accuracy is not None else None,
    )


def _linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> Any:
    """Linear warm-up to the learning rate, then linear decay to zero at the last step."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _prune(output_dir: Path, kept: list[int], keep: int, training_log: TrainingLog) -> None:
    """Keep the newest ``keep`` checkpoints: forget the rows first, then delete the folders."""
    old = kept[:-keep] if keep > 0 else []
    if not old:
        return
    training_log.forget_checkpoints(old)
    for step in old:
        shutil.rmtree(output_dir / checkpoint_path(step), ignore_errors=True)
    del kept[: len(old)]


def _finite(value: float) -> float | None:
    return value if value == value and math.isfinite(value) else None
