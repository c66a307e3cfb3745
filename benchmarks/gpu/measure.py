"""Measure GPU judging on this host, in one command: micro-benchmarks per family, then Table 1 end to end.

    benchmarks/gpu/run.sh [--wheels DIR] [--out FILE]     # on a GPU host (see docs/performance.md, "GPU hosts")
    benchmarks/gpu/run.sh --cpu-smoke                    # the same path, tiny shapes, CPU, < 1 minute

1. Environment: versions, the device, a bf16 matrix-product rate.
2. For LLaVA-1.5-7b and Qwen2.5-VL-7B shapes (random weights, bf16) at VIGOR's sizes (2048x1024
   panoramas, 640x640 tiles): ms per pairwise and pointwise judgment the paper's way, batched, and
   with every reuse on (``micro.py``); Qwen's vision tower with and without batched windows.
3. Table 1 end to end on the embedded default with a LLaVA checkpoint loaded by hub id from a local
   cache (``table1.py``), sized to the time left (``--budget``) and extrapolated to 500 queries.
4. The LoRA training step of the LLaVA-1.5-7b-shaped judge (r=16, bf16) on the same images:
   pairwise examples per second and peak memory per batch size (``train_step.py``).

Prints as it goes (run it unbuffered) and rewrites ``--out`` (JSON) after every section, so a run
stopped at a time limit still leaves what it measured. A section that fails is recorded with its
error and the next one runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import micro  # noqa: E402
import table1  # noqa: E402
import torch  # noqa: E402
import train_step  # noqa: E402
import transformers  # noqa: E402

T0 = time.perf_counter()
QWEN_RESERVE_S = 130.0  # what Qwen2.5-VL-7B's micro-benchmark takes on one H200, with a margin
# The training step at batch sizes 1, 4 and 8 (2 warm-up and 5 timed steps each) and building its
# model: an estimate for one H200 (not measured there yet), with a margin.
TRAIN_RESERVE_S = 90.0


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", flush=True)


def environment(device: str) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "cpu_count": os.cpu_count(),
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
        env["gpu_memory_gib"] = torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            a @ a
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
        env["bf16_matmul_tflops"] = 10 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12
        del a
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    micro.add_run_options(parser, Path("gpu-measure.json"))
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds for the whole run (default 450; smoke 50)"
    )
    parser.add_argument("--families", default="llava,qwen2.5-vl")
    parser.add_argument("--micro-queries", type=int, default=None, help="queries of the micro-benchmarks")
    parser.add_argument("--table1-queries", type=int, default=None, help="fix the end-to-end query count")
    parser.add_argument("--skip-table1", action="store_true")
    parser.add_argument("--skip-train", action="store_true", help="leave out the LoRA training step")
    parser.add_argument(
        "--train-batch-sizes",
        type=train_step.parse_sizes,
        default=list(train_step.BATCH_SIZES),
        help="training step: comma-separated batch sizes (default 1,4,8)",
    )
    parser.add_argument(
        "--train-steps", type=int, default=None, help="training step: timed steps per batch size (5; smoke 2)"
    )
    parser.add_argument(
        "--max-open-queries",
        type=int,
        default=None,
        help="end to end: submit's --max-open-queries (default: submit's)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--keep-files",
        action="store_true",
        help="keep the working folder (images, checkpoint, database, logs)",
    )
    args = parser.parse_args()

    smoke = args.cpu_smoke
    device = args.device or ("cpu" if smoke else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA GPU visible; use --cpu-smoke for the CPU path")
    shapes = args.shapes or ("tiny" if smoke else "7b")
    image_sizes = args.image_sizes or ("small" if smoke else "real")
    if shapes == "7b" and device == "cpu":
        parser.error("7b shapes need a GPU (a 7B model in a CPU benchmark takes hours)")
    budget = args.budget or (50.0 if smoke else 450.0)
    deadline = T0 + budget
    if device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    families = [f for f in args.families.split(",") if f]
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "mode": "cpu-smoke" if smoke else "measure",
        "shapes": shapes,
        "image_sizes": image_sizes,
        "budget_s": budget,
    }

    def save() -> None:
        results["elapsed_s"] = time.perf_counter() - T0
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2, default=str))
        tmp.replace(args.out)

    def section(name: str, fn) -> Any:
        try:
            value = fn()
        except Exception as exc:  # record and go on: the other sections still measure
            log(f"{name} FAILED: {type(exc).__name__}: {exc}")
            results.setdefault("errors", {})[name] = traceback.format_exc()
            value = None
        save()
        return value

    results["environment"] = section("environment", lambda: environment(device))
    log(f"environment: {json.dumps(results['environment'])}")

    work = Path(tempfile.mkdtemp(prefix="cvgl-measure-"))
    queries = args.micro_queries or (3 if smoke else 8)
    log(f"writing images for {queries} queries x 20 candidates ({image_sizes} sizes)")
    (work / "images").mkdir()
    images = micro.write_images(work / "images", queries, 20, image_sizes, args.seed)
    results["micro"] = {}

    def micro_family(family: str) -> Any:
        knobs: dict[str, Any] = dict(
            paper_sample=4 if smoke else 16,
            batched_sample=16 if smoke else 64,
            gen_tokens=8,
            seed=args.seed,
            batch_size=None,
            log=log,
            keep_model=family == "llava" and not args.skip_table1,
        )
        family_images = images
        if family == "qwen2.5-vl" and shapes == "7b":
            # Its plain path re-encodes 3 images per judgment at native sizes: fewer queries, samples.
            family_images = dict(list(images.items())[: max(2, queries // 2)])
            knobs.update(paper_sample=8, batched_sample=32)
        got = section(
            f"micro:{family}", lambda: micro.bench_family(family, shapes, device, family_images, **knobs)
        )
        kept = None
        if got is not None:
            results["micro"][family], kept = got
        save()
        return kept

    def free() -> None:
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    # LLaVA first: its model is saved as the end-to-end checkpoint, then Table 1 runs while the
    # budget is fresh (the headline figure), leaving QWEN_RESERVE_S for Qwen's micro-benchmark.
    repo_id = None
    if "llava" in families:
        kept = micro_family("llava")
        if kept is not None:
            t = time.perf_counter()
            repo_id = section(
                "table1:save", lambda: table1.save_hub_checkpoint(*kept, work / "table1" / "hf", shapes)
            )
            results["table1_checkpoint_save_s"] = time.perf_counter() - t
            log(f"table1: saved checkpoint {repo_id} in {results['table1_checkpoint_save_s']:.1f} s")
        del kept
        free()
    if repo_id is not None:
        reserve = QWEN_RESERVE_S if "qwen2.5-vl" in families and shapes == "7b" else 0.0
        reserve += TRAIN_RESERVE_S if not args.skip_train and shapes == "7b" else 0.0
        left = deadline - time.perf_counter() - reserve
        ms = (results["micro"].get("llava") or {}).get("reuse_pairwise_ms", 30.0)
        n = args.table1_queries or (
            6 if smoke else table1.plan_queries(left, ms, overhead_s=75.0, cap=table1.TARGET_QUERIES)
        )
        log(f"table1: {n} queries ({left:.0f} s of the {budget:.0f} s budget for it)")
        results["table1"] = section(
            "table1",
            lambda: table1.run_table1(
                work / "table1",
                repo_id,
                shapes,
                n,
                device=device,
                image_sizes=image_sizes,
                log=log,
                deadline=deadline,
                max_open_queries=args.max_open_queries,
            ),
        )
        free()
    if not args.skip_train:
        # After Table 1 (its own processes, the GPU free again): a fresh model, adapted in place.
        results["train"] = {}
        section(
            "train",
            lambda: train_step.bench_train(
                shapes,
                device,
                images,
                batch_sizes=args.train_batch_sizes,
                warmup=1 if smoke else 2,
                steps=args.train_steps or (2 if smoke else 5),
                seed=args.seed,
                log=log,
                out=results["train"],
                save=save,
            ),
        )
        free()
    for family in families:
        if family != "llava":
            micro_family(family)
            free()
    log(f"done in {time.perf_counter() - T0:.1f} s; results in {args.out}")
    save()
    summary(results)
    if args.keep_files:
        print(f"working folder kept: {work}", flush=True)
    else:  # a 7B checkpoint is 14 GB
        shutil.rmtree(work, ignore_errors=True)
    return 1 if results.get("errors") else 0


def summary(results: dict[str, Any]) -> None:
    """The figures that answer the issue's aims, one line each."""
    for family, r in results.get("micro", {}).items():
        print(
            f"{family}: pairwise paper {r['paper_pairwise_ms']:.1f} ms, batched {r['batched_pairwise_ms']:.1f} ms, "
            f"reuse {r['reuse_pairwise_ms']:.1f} ms ({r['speedup_pairwise_reuse']:.1f}x); pointwise paper "
            f"{r['paper_pointwise_ms']:.1f} ms, batched {r['batched_pointwise_ms']:.1f} ms, reuse {r['reuse_pointwise_ms']:.1f} ms "
            f"({r['speedup_pointwise_reuse']:.1f}x)",
            flush=True,
        )
        vision = r.get("vision_tower")
        print(
            f"{family}: exactness, reuse against the plain path ({r['dtype']}), largest difference of a "
            f"renormalised probability: pairwise (levels 1 and 2, kept across rounds) "
            f"{r['reuse_pairwise_max_abs_diff_vs_batched']:.1e}, pointwise (level 1) "
            f"{r['reuse_pointwise_max_abs_diff_vs_batched']:.1e}"
            + (
                f"; batched window attention against the loop, largest feature difference "
                f"{max(vision['panorama_max_abs_diff'], vision['tile_max_abs_diff']):.1e}"
                if vision
                else ""
            ),
            flush=True,
        )
    t = results.get("table1")
    if t:
        pw = t["runs"]["pairwise"]
        line = f"table1: pairwise on {t['queries']} queries: run {pw.get('run_wall_s', 0):.1f} s"
        if "pairwise_500_extrapolated_s" in t:
            line += f"; 500 queries extrapolated: {t['pairwise_500_extrapolated_s'] / 60:.1f} min"
        print(line, flush=True)
    if results.get("train"):
        print(train_step.summary_line(results["train"]), flush=True)


if __name__ == "__main__":
    sys.exit(main())
