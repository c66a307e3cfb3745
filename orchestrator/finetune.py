"""Fine-tuning from the command line: validate and store an adapter job, send it, follow it.

``orchestrator finetune`` stores the adapter row (its settings, the training and validation
queries, the number of steps) and sends one ``cvgl.train`` task to ``train.<model>``, where a
training worker (``orchestrator worker --train``) runs ``workers.training``. Embedded (no broker),
an in-process worker trains while the command waits. ``status ADAPTER`` shows the stored steps.
Errors a user can meet are ``FinetuneError`` with one-line messages; nothing is stored then.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from db import adapters as store
from db.engine import cvgl_home
from db.leases import live_lease
from db.models import DONE, FAILED, PENDING, Adapter, AdapterQuery
from db.settings import settings
from db.upsert import insert_ignore
from db.work_items import stale
from orchestrator.progress import BarState, RunStalled, follow
from orchestrator.submit import pick_candidate_set
from workers.judges.registry import CHECKPOINT_TYPES, check_judge_name, check_model_folder, default_model
from workers.queues import train_queue_for
from workers.training.examples import QueryLabels, pair_examples, split_queries, steps_for

log = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
EMBEDDED_STALL_SECONDS = 600.0  # the in-process trainer reports when busy: a long step is not a stall


class FinetuneError(ValueError):
    """Bad input to ``finetune``, ``status`` or ``resume`` of an adapter; the message is one line."""


@dataclass
class FinetuneSpec:
    name: str
    judge: str = "llava"
    model: str | None = None
    revision: str | None = None
    candidates: str | None = None
    steps: int | None = None
    epochs: float | None = None  # neither: one epoch
    lora_r: int = 16
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lr: float = 1e-4
    batch_size: int = 8
    warmup_steps: int | None = None  # None: 3% of the steps
    both_orders: bool = False
    negatives: int = 3
    val_share: float = 0.05
    train_projector: bool = False
    checkpoint_every: int = 100
    eval_every: int = 100
    seed: int = 0
    max_attempts: int = 3
    output_dir: Path | None = None


def adapters_root() -> Path:
    """``CVGL_ADAPTERS_DIR``, else ``CVGL_HOME/adapters``."""
    configured = settings().adapters_dir
    return configured.expanduser() if configured else cvgl_home() / "adapters"


def create_adapter(s: Session, spec: FinetuneSpec) -> Adapter:
    """Validate ``spec`` and store the adapter job (not sent yet). Raises FinetuneError."""
    if not NAME.fullmatch(spec.name) or spec.name.isdigit():
        raise FinetuneError(
            f"--name {spec.name!r}: use letters, digits, '.', '_' or '-' (not only digits: those name runs)"
        )
    try:
        check_judge_name(spec.judge)
    except KeyError as exc:
        raise FinetuneError(str(exc)) from None
    if spec.judge not in CHECKPOINT_TYPES:
        raise FinetuneError(
            f"--judge {spec.judge} has no weights to fine-tune; choose {' or '.join(CHECKPOINT_TYPES)}"
        )
    model = spec.model or default_model(spec.judge)
    check_model_folder(spec.judge, model)  # a local folder of another family: one line
    for option, value, low in (("--steps", spec.steps, 1), ("--lora-r", spec.lora_r, 1),
                               ("--batch-size", spec.batch_size, 1), ("--negatives", spec.negatives, 1),
                               ("--checkpoint-every", spec.checkpoint_every, 1), ("--eval-every", spec.eval_every, 1),
                               ("--max-attempts", spec.max_attempts, 1)):  # fmt: skip
        if value is not None and value < low:
            raise FinetuneError(f"{option} must be at least {low}, got {value}")
    if spec.steps is not None and spec.epochs is not None:
        raise FinetuneError("give --steps or --epochs, not both")
    if spec.epochs is not None and spec.epochs <= 0:
        raise FinetuneError(f"--epochs must be positive, got {spec.epochs}")
    if not spec.lr > 0:
        raise FinetuneError(f"--lr must be positive, got {spec.lr}")
    if store.adapter_named(s, spec.name) is not None:
        raise FinetuneError(f"an adapter named {spec.name!r} exists; choose another --name")
    cs = pick_candidate_set(s, spec.candidates)
    labeled = store.labeled_queries(s, cs.id)
    if not labeled:
        raise FinetuneError(
            f"candidate set {cs.name!r} has no training labels: none of its queries has a positive tile "
            "(ingest the dataset's label files first)"
        )
    try:
        train_ids, val_ids = split_queries({x.name: x.query_id for x in labeled}, spec.val_share, spec.seed)
    except ValueError as exc:
        raise FinetuneError(str(exc)) from None
    labels = [QueryLabels(x.query_id, x.name, x.positive, x.semi_positives, x.candidates) for x in labeled]
    wanted = set(train_ids)
    n_examples = len(
        pair_examples(
            [x for x in labels if x.query_id in wanted], spec.negatives, spec.both_orders, spec.seed
        )
    )
    if n_examples == 0:
        raise FinetuneError(
            f"candidate set {cs.name!r} gives no training pairs: no candidate is a hard negative"
        )
    total = steps_for(n_examples, spec.batch_size, spec.steps, spec.epochs)
    warmup = spec.warmup_steps if spec.warmup_steps is not None else round(0.03 * total)
    output = (spec.output_dir or adapters_root() / spec.name).expanduser().resolve()
    if output.exists() and any(output.iterdir()):
        raise FinetuneError(f"{output} exists and is not empty; choose another --name or --output-dir")
    params: dict[str, Any] = {
        "revision": spec.revision, "lora_r": spec.lora_r, "lora_alpha": spec.lora_alpha,
        "lora_dropout": spec.lora_dropout, "lr": spec.lr, "batch_size": spec.batch_size, "warmup_steps": warmup,
        "both_orders": spec.both_orders, "negatives": spec.negatives, "val_share": spec.val_share,
        "train_projector": spec.train_projector, "checkpoint_every": spec.checkpoint_every,
        "eval_every": spec.eval_every, "seed": spec.seed, "epochs": spec.epochs, "steps": spec.steps,
    }  # fmt: skip
    adapter = Adapter(
        name=spec.name,
        judge=spec.judge,
        base_model=model,
        candidate_set_id=cs.id,
        queue=train_queue_for(model),
        params=params,
        total_steps=total,
        n_examples=n_examples,
        output_dir=str(output),
        max_attempts=spec.max_attempts,
    )
    s.add(adapter)
    s.flush()
    rows = [{"adapter_id": adapter.id, "query_id": q, "role": "train"} for q in train_ids]
    rows += [{"adapter_id": adapter.id, "query_id": q, "role": "val"} for q in val_ids]
    insert_ignore(s, AdapterQuery.__table__, rows, key=["adapter_id", "query_id"])
    return adapter


def stale_adapter(s: Session, adapter_id: int) -> bool:
    """True when the adapter's job is pending, held by no live trainer and not in the broker."""
    from workers.dispatch import queued_task_ids

    t = Adapter.__table__
    queue = s.get(Adapter, adapter_id).queue
    return bool(stale(s, t, t.c.id == adapter_id, lambda: queued_task_ids([queue])))


@dataclass(frozen=True)
class TrainingProgress:
    name: str
    status: str  # 'queued', 'training', 'interrupted' (its trainer died), 'done', 'failed'
    step: int
    total: int
    loss: float | None
    val_accuracy: float | None
    attempts: int
    error: str | None

    @property
    def finished(self) -> bool:
        return self.status in (DONE, FAILED)


def training_progress(s: Session, adapter: Adapter) -> TrainingProgress:
    steps = store.training_steps(s, adapter.id)
    last = steps[-1] if steps else None
    losses = [r.loss for r in steps if r.loss is not None]
    accuracy = [r.val_accuracy for r in steps if r.val_accuracy is not None]
    status = adapter.status
    if status not in (DONE, FAILED):
        # A lease that lapsed (or whose process is gone): the trainer died; redelivery or
        # `resume NAME` continues from the newest checkpoint.
        if adapter.leased_by is None:
            status = "queued"
        else:
            status = "training" if live_lease(adapter.leased_by, adapter.lease_until) else "interrupted"
    return TrainingProgress(
        adapter.name, status, last.step if last else 0, adapter.total_steps,
        losses[-1] if losses else None, accuracy[-1] if accuracy else None, adapter.attempts, adapter.error,
    )  # fmt: skip


def follow_training(
    sf: sessionmaker[Session], name: str, stall_seconds: float, busy: Any = None
) -> TrainingProgress:
    """Poll the adapter's steps with a progress bar until it is done or failed.

    Raises:
        RunStalled: nothing moved for ``stall_seconds`` and the job is stale (no trainer holds it,
            no message waits for one).
    """

    def read() -> TrainingProgress:
        with sf() as s:
            adapter = store.adapter_named(s, name)
            assert adapter is not None
            return training_progress(s, adapter)

    warned: list[bool] = []

    def on_stall() -> None:
        with sf() as s:
            adapter = store.adapter_named(s, name)
            if adapter is None:
                return
            if stale_adapter(s, adapter.id):
                raise RunStalled(
                    f"adapter {name} made no progress and no trainer holds it: is a worker consuming "
                    f"{adapter.queue}? `orchestrator resume {name}` sends it again"
                )
            if adapter.leased_by is None and not warned:  # its message waits: no trainer has taken it
                warned.append(True)
                log.warning(
                    "adapter %s is still queued on %s: is a training worker running? "
                    "(orchestrator worker --train --model %s)",
                    name,
                    adapter.queue,
                    adapter.base_model,
                )

    return follow(
        read,
        finished=lambda p: p.finished,
        fingerprint=lambda p: (p.status, p.step, p.attempts),
        bar_state=lambda p: BarState(
            total=p.total,
            done=p.step,
            postfix={"loss": _num(p.loss), "val acc": _num(p.val_accuracy)},
            label=f"adapter {name} ({p.status})",
        ),  # fmt: skip
        desc=f"adapter {name}",
        unit="step",
        on_stall=on_stall,
        stall_seconds=stall_seconds,
        poll=0.5,
        busy=busy,
    )


def summary(p: TrainingProgress) -> str:
    if p.status == FAILED:
        return f"adapter {p.name} failed: {p.error}"
    return f"adapter {p.name} {p.status}: {p.step}/{p.total} steps, loss {_num(p.loss)}, validation accuracy {_num(p.val_accuracy)}"


def check_target(target: str) -> str:
    """``status`` / ``resume`` take a run id or an adapter name; anything else is refused here."""
    if not (target.isdigit() or NAME.fullmatch(target)):
        raise FinetuneError(f"{target!r} is neither a run id nor an adapter name")
    return target


def status_lines(s: Session, name: str) -> list[str]:
    """``orchestrator status ADAPTER``: the job, then its steps (loss, learning rate, validation)."""
    adapter = store.adapter_named(s, name)
    if adapter is None:
        known = ", ".join(a.name for a in store.adapters(s)) or "none"
        raise FinetuneError(f"no adapter named {name!r} (known: {known})")
    p = training_progress(s, adapter)
    train = len(store.adapter_query_ids(s, adapter.id, "train"))
    val = len(store.adapter_query_ids(s, adapter.id, "val"))
    width = 30
    filled = round(width * p.step / max(1, p.total))
    lines = [
        f"adapter {adapter.name}: {p.status} (attempt {adapter.attempts}/{adapter.max_attempts}), "
        f"{adapter.judge} on {adapter.base_model}",
        f"  trained on {train} queries ({val} held out for validation), {adapter.n_examples} pairwise examples, "
        f"LoRA r={adapter.params.get('lora_r')}, lr {adapter.params.get('lr')}, batch {adapter.params.get('batch_size')}",
        f"  [{'#' * filled}{'.' * (width - filled)}] step {p.step}/{p.total}",
    ]
    if adapter.error:
        lines.append(f"  error: {adapter.error}")
    if adapter.status == DONE:
        lines.append(f"  adapter: {adapter.output_dir}/adapter (sha256 {adapter.adapter_sha256[:12]})")
    rows = store.training_steps(s, adapter.id)
    if rows:
        lines.append(f"  {'step':>6}  {'loss':>8}  {'lr':>9}  {'val acc':>7}  {'val loss':>8}")
        for r in _thin(rows, 30):
            lines.append(
                f"  {r.step:>6}  {_num(r.loss, 4):>8}  {_num(r.lr, sci=True):>9}  "
                f"{_num(r.val_accuracy):>7}  {_num(r.val_loss, 4):>8}"
            )
    return lines


def _thin(rows: list[Any], most: int) -> list[Any]:
    """At most about ``most`` rows: every validation row, the first and last, evenly spaced others."""
    if len(rows) <= most:
        return rows
    every = max(1, len(rows) // most)
    return [
        r for i, r in enumerate(rows) if i % every == 0 or r.val_accuracy is not None or i == len(rows) - 1
    ]


def _num(value: float | None, digits: int = 3, sci: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:.2e}" if sci else f"{value:.{digits}f}"


def start_finetune(sf: sessionmaker[Session], spec: FinetuneSpec, wait: bool) -> TrainingProgress | None:
    """Store the job and send it; with ``wait`` (always, embedded) follow it until it ends."""
    from orchestrator.drive import check_broker
    from workers.app import is_embedded

    if not is_embedded():
        check_broker()
    with sf.begin() as s:
        adapter = create_adapter(s, spec)
        adapter_id, queue = adapter.id, adapter.queue
    return _drive(sf, spec.name, adapter_id, queue, wait, resend=True)


def resume_finetune(sf: sessionmaker[Session], name: str, wait: bool) -> tuple[bool, TrainingProgress | None]:
    """Send a stale job again (its trainer died and no message is left); (sent, progress)."""
    from orchestrator.drive import check_broker
    from workers.app import is_embedded

    with sf() as s:
        adapter = store.adapter_named(s, name)
        if adapter is None:
            raise FinetuneError(f"no adapter named {name!r}")
        if adapter.status != PENDING:
            raise FinetuneError(f"adapter {name} is {adapter.status}; there is nothing to resume")
        adapter_id, queue = adapter.id, adapter.queue
        resend = stale_adapter(s, adapter_id)
    if not is_embedded():
        check_broker()
    return resend, _drive(sf, name, adapter_id, queue, wait, resend=resend)


def _drive(
    sf: sessionmaker[Session], name: str, adapter_id: int, queue: str, wait: bool, resend: bool
) -> TrainingProgress | None:
    from orchestrator.drive import stall_seconds
    from workers.app import is_embedded
    from workers.training.tasks import send_training

    if resend:
        send_training(adapter_id, queue, sessions=sf)
    if is_embedded():
        from orchestrator.embedded import embedded_worker, worker_busy

        with embedded_worker([queue]):
            return follow_training(sf, name, EMBEDDED_STALL_SECONDS, busy=worker_busy)
    if not wait:
        return None
    return follow_training(sf, name, stall_seconds())


def adapters_lines(s: Session, after_runs: bool = False) -> list[str]:
    """Every adapter in one line each, for ``orchestrator status`` (no lines: none)."""
    rows = store.adapters(s)
    if not rows:
        return []
    lines = [""] if after_runs else []
    lines += [f"{'adapter':24}  {'status':9}  {'steps':>11}  {'val acc':>7}  base model"]
    for a in rows:
        p = training_progress(s, a)
        lines.append(
            f"{a.name[:24]:24}  {p.status:9}  {f'{p.step}/{p.total}':>11}  {_num(p.val_accuracy):>7}  {a.base_model}"
        )
    return lines
