"""Create a rerank run: validate the choices, sample the queries, store the run's provenance."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from db.adapters import adapter_named, adapters, overlapping_queries
from db.models import DONE, FAILED, Adapter, CandidateSet, Run
from db.queries import add_run_queries, candidate_set_named, candidate_sets, query_names
from orchestrator.strategies.registry import get_strategy
from workers.judges.adapters import ADAPTER_DIR
from workers.judges.checkpoint import folder_revision
from workers.judges.registry import (
    check_judge_name,
    check_model_folder,
    default_model,
    default_revision,
    judge_option_defaults,
    load_judge,
)
from workers.judging import DECODE_MODES
from workers.prompts import SPECS, load_prompt
from workers.queues import queue_for, vlm_shards

DEFAULT_PROMPT = {"pairwise": "pairwise", "pointwise": "yesno"}
# Judgments per task. A VLM worker runs a task as forward passes of CVGL_VLM_BATCH_SIZE rows; a
# task spans many queries, so the ground-prefix and image-feature reuse find repeats.
DEFAULT_BATCH_SIZE = {"simulated": 64, "llava": 32, "qwen2.5-vl": 16}
FALLBACK_BATCH_SIZE = 16
# Queries a VLM run keeps open at once, per GPU queue: enough comparisons per round to fill the
# batches, few enough that a GPU's prefix cache holds every open query's prefixes between rounds
# (a LLaVA-7B panorama prefix is 0.3 GB of keys and values, a first-shown tile as much again).
# The simulated judge caches nothing: its runs open every query at once.
OPEN_QUERIES_PER_GPU = 64


class SubmitError(ValueError):
    pass


@dataclass
class RunSpec:
    strategy: str = "pairwise"
    prompt: str | None = None
    judge: str = "simulated"
    model: str | None = None
    revision: str | None = None
    candidates: str | None = None
    n_queries: int | None = 500  # None: every query of the candidate set
    seed: int = 0
    k: int = 20
    batch_size: int | None = None
    max_attempts: int = 3
    queue: str | None = None
    judge_options: dict[str, Any] = field(default_factory=dict)
    decode: str = "choices"  # pairwise: "choices" (one forward pass) or "generate" (the paper's way)
    strategy_options: dict[str, Any] = field(default_factory=dict)  # top, both_orders, aggregate
    reuse: bool = True  # copy judgments earlier runs stored for the same judge, model, prompt
    max_open_queries: int | None = None  # None: the default for the judge; 0: every query at once
    shards: int | None = None  # per-GPU queues per model; None: CVGL_VLM_SHARDS
    adapter: str | None = None  # a fine-tuned adapter of the judge (orchestrator finetune)
    allow_overlap: bool = False  # let the run's queries include the adapter's training queries


JUDGE_OPTIONS = ("accuracy", "position_bias", "noise", "latency_ms")  # the simulated judge's
STRATEGY_OPTIONS = ("top", "aggregate")


def spec_from_options(
    options: dict[str, Any], *, all_queries: bool = False, poison: Sequence[str] = (), embedded: bool = False
) -> RunSpec:
    """A RunSpec from the ``submit`` command's options: RunSpec's own fields, the simulated judge's
    options (``JUDGE_OPTIONS``, ``poison``) and the strategy's (``STRATEGY_OPTIONS``,
    ``both_orders``); None means not given.

    Raises:
        SubmitError: judge options for another judge, or ``poison`` in one process.
    """
    options = dict(options)
    judge_options = {name: v for name in JUDGE_OPTIONS if (v := options.pop(name, None)) is not None}
    if poison:
        if embedded:
            raise SubmitError("--poison kills the process that asks the judgment: use separate workers")
        judge_options["poison"] = list(poison)
    if judge_options and options.get("judge", "simulated") != "simulated":
        raise SubmitError("--accuracy, --position-bias, --noise and --latency-ms apply to --judge simulated only")
    strategy_options: dict[str, Any] = {
        name: v for name in STRATEGY_OPTIONS if (v := options.pop(name, None)) is not None
    }
    if options.pop("both_orders", False):
        strategy_options["both_orders"] = True
    if all_queries:
        options["n_queries"] = None
    return RunSpec(**options, judge_options=judge_options, strategy_options=strategy_options)


def pick_candidate_set(s: Session, name: str | None) -> CandidateSet:
    if name:
        cs = candidate_set_named(s, name)
        if cs is None:
            known = ", ".join(sorted(c.name for c in candidate_sets(s))) or "none"
            raise SubmitError(f"no candidate set named {name!r} (known: {known})")
        return cs
    sets = candidate_sets(s)
    if not sets:
        raise SubmitError("no candidate set stored; run `orchestrator import-candidates` first")
    if len(sets) > 1:
        raise SubmitError(
            "several candidate sets are stored; choose one with --candidates: "
            + ", ".join(c.name for c in sets)
        )
    return sets[0]


def check_adapter(
    s: Session, adapter: Adapter, spec: RunSpec, model: str, query_ids: Sequence[int]
) -> dict[str, Any]:
    """Refuse an adapter that cannot serve this run (its judge was checked before the model was
    chosen); what the run stores of it (name, hash, how many of its queries the adapter saw in
    training: 0 unless ``--allow-overlap``)."""
    name = adapter.name
    if adapter.status != DONE:
        state = "failed" if adapter.status == FAILED else "not trained yet"
        raise SubmitError(f"adapter {name!r} is {state}: see `orchestrator status {name}`")
    if not _same_base(model, adapter.base_model, adapter.base_revision):
        raise SubmitError(
            f"adapter {name!r} was trained on {adapter.base_model} (revision {adapter.base_revision}), not {model}"
        )
    seen = overlapping_queries(s, adapter.id, query_ids)
    if seen and not spec.allow_overlap:
        raise SubmitError(
            f"{len(seen)} of the run's {len(query_ids)} queries were in adapter {name!r}'s training or "
            f"validation queries (e.g. {seen[0]}): rerank held-out queries (another candidate set, the test "
            "cities) or pass --allow-overlap"
        )
    return {"name": name, "sha256": adapter.adapter_sha256, "overlap": len(seen)}


def _same_base(model: str, base: str, base_revision: str | None) -> bool:
    """``model`` is the checkpoint the adapter was trained on: the same hub id, or a folder with the
    same content (a copy elsewhere is the same base)."""
    if model == base:
        return True
    folder = Path(model).expanduser()
    if folder.is_dir() and base_revision:
        return folder_revision(folder) == base_revision
    return False


def sample_queries(names_to_ids: dict[str, int], n: int | None, seed: int) -> list[int]:
    """A reproducible sample, by query name (so the same data gives the same sample in any database)."""
    names = sorted(names_to_ids)
    if n is None or n >= len(names):
        chosen = names
    else:
        chosen = sorted(random.Random(seed).sample(names, n))
    return [names_to_ids[x] for x in chosen]


def create_run(s: Session, spec: RunSpec) -> int:
    """Store the run and its queries; the caller advances it after the commit."""
    strategy = get_strategy(spec.strategy, **spec.strategy_options)  # raises UnknownStrategy
    prompt_name = spec.prompt or DEFAULT_PROMPT[strategy.kind]
    prompt = load_prompt(prompt_name)  # raises KeyError for unknown names
    if SPECS[prompt_name].kind != strategy.kind:
        raise SubmitError(
            f"prompt {prompt_name!r} is {SPECS[prompt_name].kind}; strategy {spec.strategy!r} needs a {strategy.kind} prompt"
        )
    check_judge_name(spec.judge)
    adapter = adapter_named(s, spec.adapter) if spec.adapter else None
    if spec.adapter and adapter is None:
        known = ", ".join(a.name for a in adapters(s)) or "none"
        raise SubmitError(f"no adapter named {spec.adapter!r} (known: {known})")
    if adapter is not None and spec.judge != adapter.judge:
        raise SubmitError(
            f"adapter {adapter.name!r} is a {adapter.judge} adapter: submit with --judge {adapter.judge}"
        )
    model = spec.model or (adapter.base_model if adapter else None) or default_model(spec.judge)
    check_model_folder(spec.judge, model)  # a local folder must be a checkpoint of the judge's family
    if spec.decode not in DECODE_MODES:
        raise SubmitError(f"--decode must be one of {', '.join(DECODE_MODES)}, got {spec.decode!r}")
    if spec.decode == "generate" and strategy.kind != "pairwise":
        raise SubmitError("--decode generate answers pairwise prompts; pointwise prompts follow their own mode")
    if spec.k < 2:
        raise SubmitError("--k must be at least 2")
    if spec.n_queries is not None and spec.n_queries < 1:
        raise SubmitError("--queries must be at least 1")
    if spec.max_attempts < 1:
        raise SubmitError("--max-attempts must be at least 1")
    if spec.max_open_queries is not None and spec.max_open_queries < 0:
        raise SubmitError("--max-open-queries must be 0 (every query at once) or more")
    shards = spec.shards or vlm_shards()
    max_open = spec.max_open_queries
    if max_open is None:
        max_open = 0 if spec.judge == "simulated" else OPEN_QUERIES_PER_GPU * shards
    cs = pick_candidate_set(s, spec.candidates)
    if spec.k > cs.k:
        raise SubmitError(f"--k {spec.k} exceeds the {cs.k} candidates per query of {cs.name!r}")
    top = spec.strategy_options.get("top")
    if top is not None and top > spec.k:
        raise SubmitError(f"--top {top} exceeds --k {spec.k}")
    query_ids = sample_queries(query_names(s, cs.id), spec.n_queries, spec.seed)
    # Stored complete, defaults filled in, so a report can say what the judge ran with.
    judge_options = {**judge_option_defaults(spec.judge), **spec.judge_options}
    adapter_params = None
    if adapter is not None:
        adapter_params = check_adapter(s, adapter, spec, model, query_ids)
        # The worker merges it on load and checks its files against the hash; the hash in the
        # options also keeps judgment reuse from mixing adapters (db/reuse.py).
        judge_options.update(
            adapter=f"{adapter.output_dir}/{ADAPTER_DIR}", adapter_sha256=adapter.adapter_sha256
        )
    if spec.judge == "simulated":
        judge_options["seed"] = spec.judge_options.get("seed", spec.seed)
        load_judge(spec.judge, model, spec.revision, **judge_options)  # cheap: validates the options now
    run = Run(
        candidate_set_id=cs.id,
        strategy=spec.strategy,
        prompt_name=prompt.name,
        prompt_sha256=prompt.sha256,
        judge=spec.judge,
        model=model,
        model_revision=spec.revision or default_revision(spec.judge),
        queue=spec.queue or queue_for(model),
        seed=spec.seed,
        k=spec.k,
        n_queries=len(query_ids),
        batch_size=spec.batch_size or DEFAULT_BATCH_SIZE.get(spec.judge, FALLBACK_BATCH_SIZE),
        max_attempts=spec.max_attempts,
        params={
            "judge_options": judge_options,
            "strategy_options": dict(spec.strategy_options),
            "decode": spec.decode,
            "reuse": spec.reuse,
            "shards": shards,
            "max_open_queries": max_open or None,
            **({"adapter": adapter_params} if adapter_params else {}),
        },
    )
    s.add(run)
    s.flush()
    add_run_queries(s, run.id, query_ids)
    return run.id
