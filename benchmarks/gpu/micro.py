"""Milliseconds per judgment of one judge family: the paper's way, our batched forward, and reuse.

The workload is what the coordinator produces: ``queries`` queries of ``k`` candidates, sorted by
merge sort and replayed round by round (a round's comparisons over all queries go out in tasks of
submit's size, query by query); pointwise, Yes/No for every candidate. Outcomes are drawn at random
(a judgment's time does not depend on its answer). Modes, on the same model in the same process:

- paper: one ``generate`` per judgment at batch 1 (pairwise: exactly ``gen_tokens`` new tokens,
  no forced prefix; pointwise: one token, as the paper's code reads Yes/No), with transformers'
  own attention everywhere;
- batched: ``choice_probs`` on the plain path (processor, left-padded forward passes), on the first
  ``batched_sample`` judgments (without reuse a judgment costs the same in any round);
- reuse: ``choice_probs`` with every reuse on (feature cache, two prefix levels kept across tasks
  and rounds, batched vision attention), over the whole workload, caches empty at the start.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from orchestrator.strategies.base import Done
from orchestrator.strategies.mergesort import MergeSort
from tests.tiny_vlms import build_model
from workers import scoring
from workers.judges import segment_attention
from workers.judges.base import JudgeRequest
from workers.judges.hf_vlm import HFVisionJudge
from workers.judges.llava import LlavaJudge
from workers.judges.qwen_vl import QwenVLJudge
from workers.prompts import PAIR, YES_NO, load_prompt

JUDGE_CLASSES: dict[str, type[HFVisionJudge]] = {"llava": LlavaJudge, "qwen2.5-vl": QwenVLJudge}
# Judgments per task, as submit cuts them (orchestrator/submit.py DEFAULT_BATCH_SIZE; not imported:
# that module needs the database packages).
TASK_SIZE = {"llava": 32, "qwen2.5-vl": 16}
# (panorama width, height), tile side: VIGOR's real sizes, or small ones for the tiny smoke test.
SIZES = {"small": ((64, 32), 32), "real": ((2048, 1024), 640)}


def write_images(root: Path, queries: int, k: int, sizes: str, seed: int) -> dict[str, list[Path]]:
    """query -> [panorama, its k candidate tiles]: smooth random JPEG panoramas and PNG tiles."""
    (pw, ph), side = SIZES[sizes]
    jobs = []
    for q in range(queries):
        jobs.append((root / f"q{q}.jpg", pw, ph, seed * 100_003 + q))
        jobs += [
            (root / f"q{q}_t{t}.png", side, side, seed * 100_003 + 1_000 * (q + 1) + t) for t in range(k)
        ]

    def write(job: tuple[Path, int, int, int]) -> None:
        path, w, h, s = job
        rng = np.random.default_rng(s)
        coarse = rng.integers(0, 255, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((w, h), Image.BILINEAR).save(
            path, **({"quality": 90} if path.suffix == ".jpg" else {})
        )

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(write, jobs))
    return {
        f"q{q}": [root / f"q{q}.jpg", *(root / f"q{q}_t{t}.png" for t in range(k))] for q in range(queries)
    }


def merge_sort_rounds(queries: dict[str, list[Path]], seed: int) -> list[list[tuple[str, Path, Path]]]:
    """The comparisons a replay exposes, round by round, over all queries."""
    rng = random.Random(seed)
    strategy = MergeSort()
    outcomes: dict[str, dict] = {q: {} for q in queries}
    rounds = []
    while True:
        needs = []
        for q, (_, *tiles) in queries.items():
            step = strategy.replay(tiles, outcomes[q])
            if not isinstance(step, Done):
                needs.extend((q, a, b) for a, b in step.items)
        if not needs:
            return rounds
        rounds.append(needs)
        for q, a, b in needs:
            outcomes[q][(a, b)] = rng.random() < 0.5


def tasks_of(requests: list[JudgeRequest], size: int) -> list[list[JudgeRequest]]:
    return [requests[i : i + size] for i in range(0, len(requests), size)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn: Callable[[], Any]) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def paper_way(judge: HFVisionJudge, requests: list[JudgeRequest], new_tokens: int) -> None:
    """One processor call and one greedy ``generate`` per judgment, batch 1, exactly ``new_tokens``."""
    for req in requests:
        # The paper's code decodes the whole answer: no forced JSON prefix.
        inputs = judge._processor_inputs([judge._row(replace(req, answer_prefix=""), None)])
        with torch.inference_mode():
            judge.hf.generate(
                **inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=judge.pad_token_id,
            )


def first_choice(probs: list[dict], choices) -> list[float]:
    return [scoring.normalize(p, choices)[choices[0]] for p in probs]


def vision_tower(judge: HFVisionJudge, images: dict[str, list[Path]], device: str, repeats: int) -> dict:
    """Qwen2.5-VL: ms to encode one panorama and one tile with transformers' per-window loop and
    with the batched segment attention, and the largest difference of their features."""
    from workers.judges.images import load_image

    pano, tile = next(iter(images.values()))[:2]
    prepared = {
        name: judge.preprocess(load_image(path)) for name, path in (("panorama", pano), ("tile", tile))
    }
    out: dict[str, Any] = {}
    visual = judge.hf.model.visual
    for name, prep in prepared.items():
        feats = {}
        for mode in ("loop", "batched"):
            if mode == "loop":
                segment_attention.uninstall(visual)
            else:
                segment_attention.install(visual)
            with torch.inference_mode():
                judge.encode([prep])  # warm-up
                runs = [timed(device, lambda p=prep: judge.encode([p])) for _ in range(repeats)]
                feats[mode] = judge.encode([prep])[0].embeds.float()
            out[f"{name}_{mode}_ms"] = statistics.median(runs) * 1000
        out[f"{name}_tokens"] = int(feats["batched"].shape[0])
        out[f"{name}_max_abs_diff"] = (feats["loop"] - feats["batched"]).abs().max().item()
        out[f"{name}_speedup"] = out[f"{name}_loop_ms"] / out[f"{name}_batched_ms"]
    segment_attention.install(visual)
    return out


def bench_family(
    family: str,
    shapes: str,
    device: str,
    images: dict[str, list[Path]],
    *,
    paper_sample: int,
    batched_sample: int,
    gen_tokens: int,
    seed: int,
    batch_size: int | None,
    log: Callable[[str], None],
    keep_model: bool = False,
) -> tuple[dict, Any]:
    """Measure one family; returns (figures, (model, processor) if keep_model else None)."""
    dtype = "float32" if device == "cpu" else "bfloat16"
    t0 = time.perf_counter()
    model, processor = build_model(family, shapes, seed, device, getattr(torch, dtype))
    cls = JUDGE_CLASSES[family]
    common: dict[str, Any] = dict(device=device, dtype=dtype, batch_size=batch_size)
    plain = cls.from_loaded(model, processor, f"random-{shapes}", "random", reuse=False, **common)
    reuse = cls.from_loaded(model, processor, f"random-{shapes}", "random", reuse=True, **common)
    build_s = time.perf_counter() - t0
    log(f"{family}: built {shapes} model in {build_s:.1f} s")

    pair_prompt, point_prompt = load_prompt("pairwise"), load_prompt("yesno")
    task_size = TASK_SIZE[family]
    rounds = merge_sort_rounds(images, seed)
    pair_rounds = [
        tasks_of(
            [
                JudgeRequest(pair_prompt.text, (images[q][0], a, b), pair_prompt.spec.answer_prefix)
                for q, a, b in needs
            ],
            task_size,
        )
        for needs in rounds
    ]
    point_reqs = [
        JudgeRequest(point_prompt.text, (pano, t)) for pano, *tiles in images.values() for t in tiles
    ]
    point_rounds = [tasks_of(point_reqs, task_size)]
    pair_reqs = [r for tasks in pair_rounds for task in tasks for r in task]

    one = plain._processor_inputs([plain._row(pair_reqs[0], PAIR)])
    tokens = int(one["input_ids"].shape[1])
    image_tokens = int((one["input_ids"] == plain.image_token_id).sum())

    # Warm-up: kernels and allocator, on images the workload does not use first.
    plain.choice_probs(pair_reqs[-2:], PAIR)
    reuse.choice_probs(pair_reqs[-2:], PAIR)
    reuse.features.clear()
    reuse.prefixes.clear()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    results: dict[str, Any] = {
        "family": family,
        "shapes": shapes,
        "dtype": dtype,
        "device": device if device == "cpu" else torch.cuda.get_device_name(torch.device(device)),
        "build_s": build_s,
        "pairwise_tokens": tokens,
        "pairwise_image_tokens": image_tokens,
        "queries": len(images),
        "pairwise_judgments": len(pair_reqs),
        "merge_rounds": len(pair_rounds),
        "pointwise_judgments": len(point_reqs),
        "task_size": task_size,
        "batch_size": reuse.settings.batch_size,
        "language_model_params": sum(p.numel() for p in reuse.language_model.parameters()),
    }

    # The paper's way: transformers' own attention in the vision tower (Qwen), batch 1.
    if family == "qwen2.5-vl":
        segment_attention.uninstall(model.model.visual)
    paper_way(plain, pair_reqs[:1], 2)
    for kind, reqs, new in (("pairwise", pair_reqs, gen_tokens), ("pointwise", point_reqs, 1)):
        sample = reqs[:paper_sample]
        seconds = timed(device, lambda s=sample, n=new: paper_way(plain, s, n))
        results[f"paper_{kind}_ms"] = seconds * 1000 / len(sample)
        log(
            f"{family}: paper's way, {kind}: {results[f'paper_{kind}_ms']:.1f} ms/judgment ({len(sample)} judgments)"
        )
    if family == "qwen2.5-vl":
        segment_attention.install(model.model.visual)

    # Batched forward, no reuse, on a sample; keep its answers to compare with reuse.
    batched_probs = {}
    for kind, reqs, choices in (("pairwise", pair_reqs, PAIR), ("pointwise", point_reqs, YES_NO)):
        sample = reqs[:batched_sample]
        got: list = []
        seconds = timed(
            device,
            lambda s=sample, c=choices, g=got: [
                g.extend(plain.choice_probs(t, c)) for t in tasks_of(s, task_size)
            ],
        )
        batched_probs[kind] = got
        results[f"batched_{kind}_ms"] = seconds * 1000 / len(sample)
        log(
            f"{family}: batched forward, {kind}: {results[f'batched_{kind}_ms']:.1f} ms/judgment ({len(sample)} judgments)"
        )

    # Every reuse on, over the whole workload in the coordinator's order, caches cold.
    for kind, task_rounds, choices in (("pairwise", pair_rounds, PAIR), ("pointwise", point_rounds, YES_NO)):
        reuse.features.clear()
        reuse.prefixes.clear()
        before = {"features": dict(reuse.features.stats()), "prefixes": dict(reuse.prefixes.stats())}
        work_before = dict(reuse.counters)
        got = []
        task_ms = []

        def run(rounds=task_rounds, c=choices, g=got, ms=task_ms) -> None:
            for tasks in rounds:
                for task in tasks:
                    t = time.perf_counter()
                    g.extend(reuse.choice_probs(task, c))
                    sync(device)
                    ms.append((time.perf_counter() - t) * 1000 / len(task))

        n = sum(len(t) for tasks in task_rounds for t in tasks)
        seconds = timed(device, run)
        results[f"reuse_{kind}_ms"] = seconds * 1000 / n
        results[f"reuse_{kind}_task_median_ms"] = statistics.median(task_ms)
        stats = reuse.stats()
        for cache in ("features", "prefixes"):
            hits = stats[cache]["hits"] - before[cache]["hits"]
            misses = stats[cache]["misses"] - before[cache]["misses"]
            results[f"reuse_{kind}_{cache}_hit_rate"] = hits / max(1, hits + misses)
        results[f"reuse_{kind}_prefix_cache_gib"] = stats["prefixes"]["bytes"] / 2**30
        work = {k: v - work_before.get(k, 0) for k, v in reuse.counters.items()}
        results[f"reuse_{kind}_work"] = work
        tokens = sum(v for k, v in work.items() if k.endswith("_tokens"))
        results[f"reuse_{kind}_tokens_per_judgment"] = tokens / n
        # Matrix arithmetic of the language model alone (2 FLOP per parameter and token).
        results[f"reuse_{kind}_lm_tflops"] = 2 * results["language_model_params"] * tokens / seconds / 1e12
        # Agreement with the batched path on the judgments both answered (bf16 on a GPU: rounding).
        sample = batched_probs[kind]
        ref = {
            id(r): p
            for r, p in zip(
                (pair_reqs if kind == "pairwise" else point_reqs)[: len(sample)], sample, strict=True
            )
        }
        flat = [r for tasks in task_rounds for t in tasks for r in t]
        pairs = [(ref[id(r)], p) for r, p in zip(flat, got, strict=True) if id(r) in ref]
        results[f"reuse_{kind}_max_abs_diff_vs_batched"] = max(
            abs(a - b)
            for a, b in zip(
                first_choice([x for x, _ in pairs], choices),
                first_choice([y for _, y in pairs], choices),
                strict=True,
            )
        )
        log(
            f"{family}: reuse, {kind}: {results[f'reuse_{kind}_ms']:.1f} ms/judgment over {n} "
            f"(prefix hit rate {results[f'reuse_{kind}_prefixes_hit_rate']:.2f}, "
            f"feature hit rate {results[f'reuse_{kind}_features_hit_rate']:.2f})"
        )
    for kind in ("pairwise", "pointwise"):
        results[f"speedup_{kind}_batched"] = results[f"paper_{kind}_ms"] / results[f"batched_{kind}_ms"]
        results[f"speedup_{kind}_reuse"] = results[f"paper_{kind}_ms"] / results[f"reuse_{kind}_ms"]
    results["oom_splits"] = reuse.oom_splits
    if device.startswith("cuda"):
        results["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if family == "qwen2.5-vl":
        results["vision_tower"] = vision_tower(reuse, images, device, repeats=3)
        vt = results["vision_tower"]
        log(
            f"{family}: vision tower, panorama ({vt['panorama_tokens']} tokens): loop {vt['panorama_loop_ms']:.1f} ms, "
            f"batched {vt['panorama_batched_ms']:.1f} ms; tile: loop {vt['tile_loop_ms']:.1f} ms, batched {vt['tile_batched_ms']:.1f} ms"
        )
    return results, ((model, processor) if keep_model else None)


def add_run_options(parser: argparse.ArgumentParser, out: Path) -> None:
    """The options every GPU measurement script takes: the CPU smoke, shapes, device, image sizes, output."""
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny shapes, small images, on the CPU: the same path"
    )
    parser.add_argument(
        "--shapes", choices=["tiny", "7b"], default=None, help="model shapes (default 7b; smoke: tiny)"
    )
    parser.add_argument("--device", default=None, help="default cuda; smoke: cpu")
    parser.add_argument(
        "--image-sizes", choices=["small", "real"], default=None, help="default real (VIGOR's); smoke: small"
    )
    parser.add_argument("--out", type=Path, default=out, help="JSON results")
