"""Milliseconds per judgment of the VLM judges: the paper's way against our batched forward and reuse.

    python benchmarks/gpu_judge.py                                  # tiny shapes on the CPU (seconds)
    python benchmarks/gpu_judge.py --shapes 7b --device cuda        # LLaVA-1.5-7b and Qwen2.5-VL-7B shapes

Builds the judges with random weights in memory (time depends on shapes, not on weights): ``tiny``
(the test checkpoints' shapes) or ``7b`` (llava-1.5-7b-hf: CLIP ViT-L/14-336 + Llama-7B, 7.06 B
parameters; Qwen2.5-VL-7B-Instruct: 32-block windowed vision tower + 28-layer text model, 8.29 B),
bf16 on a GPU. The tokenizer is the tests' word-level one over the prompt words (about as many text
tokens as the real ones). Images: VIGOR-like, a 1024x512 panorama (Qwen sees 1036x504, 666 tokens;
LLaVA a 336 crop, 576) and 640x640 tiles (Qwen 529 tokens) for ``7b``; 64x32 / 32x32 for ``tiny``.

Workload, as the coordinator produces it: ``--queries`` queries of ``--k`` candidates, each sorted by
merge sort, replayed round by round; a round's comparisons over all queries go out in tasks of
``--task-size`` judgments (submit's default per judge), query by query. Pointwise: Yes/No for every
candidate, in tasks likewise. Modes, in ms per judgment (median over ``--repeats``):

- paper: one ``generate`` per judgment at batch 1 on the first ``--paper-sample`` judgments (pairwise:
  exactly ``--gen-tokens`` new tokens; pointwise: 1 token, as the paper's code reads Yes/No);
- batched: ``choice_probs`` with reuse off: left-padded forward passes of ``--batch-size`` rows;
- reuse: ``choice_probs`` with the image-feature cache (empty at the start of each repeat) and the
  ground-prefix key-value cache.

It also prints the largest difference of a renormalised probability between batched and reuse
(at the dtype used) and how many vision encodes the reuse mode needed per judgment.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from orchestrator.strategies.base import Done  # noqa: E402
from orchestrator.strategies.mergesort import MergeSort  # noqa: E402
from orchestrator.submit import DEFAULT_BATCH_SIZE  # noqa: E402
from tests.tiny_vlms import build_model  # noqa: E402
from workers import scoring  # noqa: E402
from workers.judges.base import JudgeRequest  # noqa: E402
from workers.judges.hf_vlm import FeatureCache, HFVisionJudge  # noqa: E402
from workers.judges.llava import LlavaJudge  # noqa: E402
from workers.judges.qwen_vl import QwenVLJudge  # noqa: E402
from workers.prompts import PAIR, YES_NO, load_prompt  # noqa: E402

JUDGE_CLASSES: dict[str, type[HFVisionJudge]] = {"llava": LlavaJudge, "qwen2.5-vl": QwenVLJudge}
SIZES = {"tiny": ((64, 32), 32), "7b": ((1024, 512), 640)}  # panorama (w, h), tile side


def write_images(root: Path, queries: int, k: int, shapes: str, seed: int) -> dict[str, list[Path]]:
    """query -> [panorama, its k candidate tiles], smooth random images (JPEG panoramas, PNG tiles)."""
    rng = np.random.default_rng(seed)
    (pw, ph), side = SIZES[shapes]

    def picture(w: int, h: int) -> Image.Image:
        coarse = rng.integers(0, 255, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
        return Image.fromarray(coarse).resize((w, h), Image.BILINEAR)

    out = {}
    for q in range(queries):
        pano = root / f"q{q}.jpg"
        picture(pw, ph).save(pano, quality=90)
        tiles = []
        for t in range(k):
            tiles.append(root / f"q{q}_t{t}.png")
            picture(side, side).save(tiles[-1])
        out[f"q{q}"] = [pano, *tiles]
    return out


def merge_sort_rounds(queries: dict[str, list[Path]], seed: int) -> list[list[tuple[str, Path, Path]]]:
    """The comparisons a replay exposes, round by round, over all queries (outcomes drawn at random:
    the time of a judgment does not depend on its answer)."""
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


def timed(device: str, fn) -> float:
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


def run_tasks(judge: HFVisionJudge, rounds: list[list[list[JudgeRequest]]], choices) -> list[dict]:
    out = []
    for tasks in rounds:
        for task in tasks:
            out.extend(judge.choice_probs(task, choices))
    return out


def bench_family(family: str, args: argparse.Namespace, images: dict[str, list[Path]]) -> None:
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    t0 = time.perf_counter()
    model, processor = build_model(family, args.shapes, args.seed, args.device, getattr(torch, dtype))
    cls = JUDGE_CLASSES[family]
    common = dict(device=args.device, dtype=dtype, batch_size=args.batch_size)
    plain = cls.from_loaded(model, processor, f"random-{args.shapes}", "random", reuse=False, **common)
    reuse = cls.from_loaded(model, processor, f"random-{args.shapes}", "random", reuse=True, **common)
    build_s = time.perf_counter() - t0

    pair_prompt, point_prompt = load_prompt("pairwise"), load_prompt("yesno")
    task_size = args.task_size or DEFAULT_BATCH_SIZE[family]
    rounds = merge_sort_rounds(images, args.seed)
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
    point_rounds = [
        tasks_of(
            [JudgeRequest(point_prompt.text, (pano, t)) for pano, *tiles in images.values() for t in tiles],
            task_size,
        )
    ]
    pair_reqs = [r for tasks in pair_rounds for task in tasks for r in task]
    point_reqs = [r for tasks in point_rounds for task in tasks for r in task]

    # Shapes of one judgment, from the real inputs.
    one = plain._processor_inputs([plain._row(pair_reqs[0], PAIR)])
    tokens = int(one["input_ids"].shape[1])
    image_tokens = int((one["input_ids"] == plain.image_token_id).sum())

    # Warm-up (kernels, allocator), then the timed repeats; the feature cache starts empty each time.
    run_tasks(plain, [[pair_rounds[0][0][:2]]], PAIR)
    run_tasks(reuse, [[pair_rounds[0][0][:2]]], PAIR)
    paper_way(plain, pair_reqs[:1], 2)

    sample = args.paper_sample

    def measure(mode: str, kind: str) -> None:
        if mode == "paper":
            reqs = (pair_reqs if kind == "pairwise" else point_reqs)[:sample]
            paper_way(plain, reqs, args.gen_tokens if kind == "pairwise" else 1)
            return
        judge = plain if mode == "batched" else reuse
        judge.features = FeatureCache(judge.features.max_bytes)  # reuse starts cold every repeat
        run_tasks(
            judge, pair_rounds if kind == "pairwise" else point_rounds, PAIR if kind == "pairwise" else YES_NO
        )

    results: dict[str, dict[str, float]] = {}
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for mode in ("paper", "batched", "reuse"):
        results[mode] = {}
        for kind, reqs in (("pairwise", pair_reqs), ("pointwise", point_reqs)):
            n = min(sample, len(reqs)) if mode == "paper" else len(reqs)
            runs = [timed(args.device, lambda m=mode, k=kind: measure(m, k)) for _ in range(args.repeats)]
            results[mode][kind] = statistics.median(runs) * 1000 / n

    # Agreement of the two scoring paths, and what reuse saved, on one more pass.
    reuse.features = FeatureCache(reuse.features.max_bytes)
    a = [scoring.normalize(p, PAIR)["1"] for p in run_tasks(plain, pair_rounds, PAIR)]
    b = [scoring.normalize(p, PAIR)["1"] for p in run_tasks(reuse, pair_rounds, PAIR)]
    encodes = reuse.features.misses
    diff = max(abs(x - y) for x, y in zip(a, b, strict=True))

    threads = torch.get_num_threads()
    where = args.device if args.device == "cpu" else torch.cuda.get_device_name(torch.device(args.device))
    print(
        f"\n{family}, {args.shapes} shapes, random weights, {where}, {dtype}"
        + (f", {threads} CPU thread(s)" if args.device == "cpu" else "")
    )
    print(
        f"  pairwise judgment: {tokens} tokens, {image_tokens} of them image tokens (3 images); "
        f"built in {build_s:.1f} s"
    )
    print(
        f"  workload: {len(images)} queries x {args.k} candidates; merge sort {len(pair_reqs)} comparisons "
        f"in {len(pair_rounds)} rounds; pointwise {len(point_reqs)}; tasks of {task_size}, forward batches of {args.batch_size}"
    )
    print(f"  {'mode':<34}{'pairwise ms':>12}{'pointwise ms':>14}{'x paper':>9}")
    labels = {
        "paper": f"paper: generate, batch 1 ({args.gen_tokens} tok)",
        "batched": "batched forward",
        "reuse": "batched forward + reuse",
    }
    for mode, r in results.items():
        speedup = results["paper"]["pairwise"] / r["pairwise"]
        print(f"  {labels[mode]:<34}{r['pairwise']:>12.2f}{r['pointwise']:>14.2f}{speedup:>8.1f}x")
    print(
        f"  reuse vs batched: max |dP(first)| = {diff:.2e}; vision encodes per pairwise judgment "
        f"{encodes / len(pair_reqs):.2f} (batched: 3)"
    )
    if args.device.startswith("cuda"):
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=["llava", "qwen2.5-vl", "all"], default="all")
    parser.add_argument("--shapes", choices=["tiny", "7b"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--task-size", type=int, default=None, help="judgments per task (default: submit's)")
    parser.add_argument("--batch-size", type=int, default=8, help="judgments per forward pass")
    parser.add_argument("--paper-sample", type=int, default=16)
    parser.add_argument("--gen-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.shapes == "7b" and not args.device.startswith("cuda"):
        parser.error("7b shapes need --device cuda (a 7B model in a CPU benchmark takes hours)")
    if args.threads:
        torch.set_num_threads(args.threads)
    families = ["llava", "qwen2.5-vl"] if args.family == "all" else [args.family]
    with tempfile.TemporaryDirectory() as tmp:
        images = write_images(Path(tmp), args.queries, args.k, args.shapes, args.seed)
        for family in families:
            bench_family(family, args, images)  # its model is freed on return
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
