"""Pairwise examples per second of one LoRA training step of the LLaVA judge, and its peak memory.

    benchmarks/gpu/run.sh --train-only [--wheels DIR] [--out FILE]   # this benchmark alone, on a GPU host
    benchmarks/gpu/run.sh --train-only --cpu-smoke                   # tiny shapes, small images, CPU, seconds

``measure.py`` runs it too, as its ``train`` section (``--skip-train`` leaves it out).

LLaVA-1.5-7b shapes with random weights (time and memory depend on shapes, not weights), bf16,
wrapped as the judge (``LlavaJudge.from_loaded``, plain path) and adapted as a fine-tune adapts it
(``workers.training.loop.adapt``: LoRA r=16 on the language model's attention and MLP projections,
gradient checkpointing on a GPU), on pairwise examples (positive against each other tile, both
orders) whose images have VIGOR's sizes (2048x1024 JPEG panoramas, 640x640 PNG tiles), decoded
from disk at every step as the loop does. A step is the loop's (``loop.train``): ``answer_loss``
(images, processor, forward), backward, gradient clipping, AdamW over the trainable parameters.

Per batch size: warm-up steps, then timed steps (each synchronised, split into forward, backward
and optimizer), the median examples per second, the peak memory (reset per size), the projected
hours per epoch of 20,000 examples (10,000 pairs, both orders; the aim is under an hour, 6 examples
per second on one H200), and what decoding and preprocessing one batch's images costs on its own
(part of every step: the loop does it on the CPU, before the forward pass). A size that runs out of
GPU memory is recorded and no larger size is tried.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import micro  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from tests.tiny_vlms import build_model  # noqa: E402
from workers.judges.base import JudgeRequest  # noqa: E402
from workers.judges.llava import LlavaJudge  # noqa: E402
from workers.prompts import PAIR, load_prompt  # noqa: E402
from workers.training.examples import batch_indices  # noqa: E402
from workers.training.loop import Example, TrainConfig, adapt, answer_loss  # noqa: E402

EPOCH_EXAMPLES = 20_000  # 10,000 pairs, both orders
AIM_EXAMPLES_PER_S = 6.0  # an epoch in under an hour (5.6 examples/s), with a margin
LORA_R = 16
BATCH_SIZES = (1, 4, 8)

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", flush=True)


def pair_examples(images: dict[str, list[Path]]) -> list[Example]:
    """Per query (panorama, positive tile, other tiles): the positive against every other tile, in
    both orders; the answer is the position of the positive (0: first, 1: second)."""
    prompt = load_prompt("pairwise")
    out = []
    for pano, positive, *others in images.values():
        for other in others:
            for pair, answer in (((positive, other), 0), ((other, positive), 1)):
                out.append(
                    Example(JudgeRequest(prompt.text, (pano, *pair), prompt.spec.answer_prefix), answer)
                )
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step(
    judge: Any, optimizer: torch.optim.Optimizer, params: list, batch: Sequence[Example], config: TrainConfig
) -> dict[str, float]:
    """One optimizer step as ``loop.train`` takes it (no scheduler), timed by phase (seconds)."""
    device = str(judge.device)
    judge.hf.train()
    sync(device)
    t0 = time.perf_counter()
    loss, _ = answer_loss(judge, batch)
    sync(device)
    t1 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    sync(device)
    t2 = time.perf_counter()
    if config.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    optimizer.step()
    sync(device)
    t3 = time.perf_counter()
    return {
        "forward_s": t1 - t0,
        "backward_s": t2 - t1,
        "optimizer_s": t3 - t2,
        "step_s": t3 - t0,
        "loss": float(loss.detach()),
    }


def peak_memory(device: str) -> tuple[float, str]:
    """(GiB, what it is): the CUDA allocator's peak since the last reset, or the process's peak RSS."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**30, "cuda max_memory_allocated"
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss_kib / 2**20, "process peak RSS (CPU; not reset per batch size)"


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def bench_train(
    shapes: str,
    device: str,
    images: dict[str, list[Path]],
    *,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    warmup: int,
    steps: int,
    seed: int,
    log: Callable[[str], None] = log,
    out: dict[str, Any] | None = None,
    save: Callable[[], None] | None = None,
    keep_activations: bool = False,
) -> dict[str, Any]:
    """Measure the training step at each batch size; fills ``out`` (returned) as it goes and calls
    ``save`` after each size, so a run stopped part-way keeps what it measured.
    ``keep_activations``: turn off the gradient checkpointing ``adapt`` turns on on a GPU (what
    the step would cost if the loop kept every activation instead of recomputing them)."""
    results: dict[str, Any] = out if out is not None else {}
    dtype = "float32" if device == "cpu" else "bfloat16"
    t0 = time.perf_counter()
    model, processor = build_model("llava", shapes, seed, device, getattr(torch, dtype))
    judge = LlavaJudge.from_loaded(
        model, processor, f"random-{shapes}", "random", device=device, dtype=dtype, reuse=False
    )
    config = TrainConfig(lora_r=LORA_R, seed=seed)
    peft_model = adapt(judge, "llava", config)
    if keep_activations:
        base = peft_model.get_base_model()
        (getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable)()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    build_s = time.perf_counter() - t0
    examples = pair_examples(images)
    first = examples[0].request
    one = judge._processor_inputs([judge._row(first, PAIR)])
    with Image.open(first.images[0]) as pano, Image.open(first.images[1]) as tile:
        sizes = {"panorama": list(pano.size), "tile": list(tile.size)}
    results.update(
        {
            "family": "llava",
            "shapes": shapes,
            "dtype": dtype,
            "device": device if device == "cpu" else torch.cuda.get_device_name(torch.device(device)),
            "build_s": build_s,
            "lora_r": config.lora_r,
            "lora_alpha": config.lora_alpha if config.lora_alpha is not None else 2 * config.lora_r,
            "trainable_params": sum(p.numel() for p in params),
            "trainable_dtype": str(params[0].dtype).removeprefix("torch."),
            "params": sum(p.numel() for p in peft_model.parameters()),
            "language_model_params": sum(p.numel() for p in judge.language_model.parameters()),
            # Any layer set to recompute its activations (the property's name varies by version).
            "gradient_checkpointing": any(
                getattr(m, "gradient_checkpointing", False) is True for m in peft_model.modules()
            ),
            "image_sizes": sizes,
            "tokens_per_example": int(one["input_ids"].shape[1]),
            "examples": len(examples),
            "warmup_steps": warmup,
            "timed_steps": steps,
            "epoch_examples": EPOCH_EXAMPLES,
            "aim_examples_per_second": AIM_EXAMPLES_PER_S,
            "sizes": [],
        }
    )
    if device.startswith("cuda"):
        results["weights_and_adapter_gib"] = torch.cuda.memory_allocated(torch.device(device)) / 2**30
    log(
        f"train: built {shapes} LLaVA with LoRA r={config.lora_r} in {build_s:.1f} s: "
        f"{results['trainable_params'] / 1e6:.1f} M trainable parameters ({results['trainable_dtype']}), "
        f"{results['tokens_per_example']} tokens per example, gradient checkpointing "
        f"{'on' if results['gradient_checkpointing'] else 'off'}"
    )
    if save:
        save()

    step_index = 0  # across sizes: every step takes the next examples of the loop's seeded order
    for b in batch_sizes:
        entry: dict[str, Any] = {"batch_size": b}
        results["sizes"].append(entry)
        free(device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(torch.device(device))
        timed: list[dict[str, float]] = []
        oom = None
        try:
            for i in range(warmup + steps):
                batch = [examples[j] for j in batch_indices(len(examples), b, step_index, seed)]
                step_index += 1
                phases = train_step(judge, optimizer, params, batch, config)
                if i >= warmup:
                    timed.append(phases)
            rows = [judge._row(e.request, PAIR) for e in batch]
            t = time.perf_counter()
            judge._processor_inputs(rows)  # decode and preprocess one batch's images, on its own
            inputs_s = time.perf_counter() - t
        except torch.OutOfMemoryError as exc:
            oom = str(exc).splitlines()[0][:300]
        if oom is not None:  # out of the except block: its traceback no longer holds the step's tensors
            entry.update(out_of_memory=True, error=oom)
            entry["peak_memory_gib"], entry["peak_memory_kind"] = peak_memory(device)
            optimizer.zero_grad(set_to_none=True)
            free(device)
            log(f"train: batch {b}: out of GPU memory; larger batch sizes not tried")
            if save:
                save()
            break
        step_s = statistics.median(p["step_s"] for p in timed)
        eps = b / step_s
        entry.update(
            {
                "step_s": [p["step_s"] for p in timed],
                "median_step_s": step_s,
                "median_forward_s": statistics.median(p["forward_s"] for p in timed),
                "median_backward_s": statistics.median(p["backward_s"] for p in timed),
                "median_optimizer_s": statistics.median(p["optimizer_s"] for p in timed),
                "inputs_s": inputs_s,
                "inputs_share_of_step": inputs_s / step_s,
                "examples_per_second": eps,
                "epoch_hours": EPOCH_EXAMPLES / eps / 3600,
                "meets_aim": eps >= AIM_EXAMPLES_PER_S,
                "losses": [p["loss"] for p in timed],
                "loss_finite": all(p["loss"] == p["loss"] and abs(p["loss"]) != float("inf") for p in timed),
            }
        )
        entry["peak_memory_gib"], entry["peak_memory_kind"] = peak_memory(device)
        log(
            f"train: batch {b}: {eps:.2f} examples/s (median step {step_s:.3f} s: forward {entry['median_forward_s']:.3f}, "
            f"backward {entry['median_backward_s']:.3f}, optimizer {entry['median_optimizer_s']:.3f}; the batch's "
            f"images alone {inputs_s:.3f} s), peak {entry['peak_memory_gib']:.1f} GiB, "
            f"epoch of {EPOCH_EXAMPLES:,} examples {entry['epoch_hours']:.2f} h"
        )
        if save:
            save()

    measured = [e for e in results["sizes"] if "examples_per_second" in e]
    if measured:
        best = max(measured, key=lambda e: e["examples_per_second"])
        results.update(
            best_batch_size=best["batch_size"],
            best_examples_per_second=best["examples_per_second"],
            best_epoch_hours=best["epoch_hours"],
            meets_aim=best["meets_aim"],
        )
    del judge, peft_model, model, optimizer, params
    free(device)
    return results


def summary_line(r: dict[str, Any]) -> str:
    """One line answering the issue's aim."""
    if "lora_r" not in r:
        return "train: no figures (the section failed before its first step; see the JSON's errors)"
    per = ", ".join(
        f"batch {e['batch_size']} out of memory"
        if e.get("out_of_memory")
        else f"batch {e['batch_size']} {e['examples_per_second']:.2f}/s ({e['peak_memory_gib']:.1f} GiB)"
        for e in r.get("sizes", [])
    )
    line = (
        f"train: LoRA r={r.get('lora_r')} {r.get('shapes')} {r.get('dtype')}, examples/s (peak memory): {per}"
    )
    if "best_examples_per_second" in r:
        line += (
            f"; best {r['best_examples_per_second']:.2f}/s at batch {r['best_batch_size']}: an epoch of "
            f"{EPOCH_EXAMPLES:,} examples in {r['best_epoch_hours']:.2f} h "
            + (
                f"(aim {AIM_EXAMPLES_PER_S:g}/s: {'met' if r['meets_aim'] else 'not met'})"
                if r.get("shapes") == "7b"
                else f"(the aim, {AIM_EXAMPLES_PER_S:g}/s, is for 7b shapes)"
            )
        )
    return line


def parse_sizes(raw: str) -> list[int]:
    sizes = [int(s) for s in raw.split(",") if s.strip()]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {raw!r}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    micro.add_run_options(parser, Path("gpu-train.json"))
    parser.add_argument(
        "--batch-sizes", type=parse_sizes, default=list(BATCH_SIZES), help="comma-separated (default 1,4,8)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per batch size (2; smoke 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per batch size (5; smoke 2)")
    parser.add_argument("--queries", type=int, default=None, help="panoramas of 20 tiles each (4; smoke 2)")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads on the CPU (default min(2, cores))"
    )
    parser.add_argument(
        "--keep-activations",
        action="store_true",
        help="turn off the gradient checkpointing the loop uses on a GPU (a what-if: faster, more memory)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    smoke = args.cpu_smoke
    device = args.device or ("cpu" if smoke else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA GPU visible; use --cpu-smoke for the CPU path")
    shapes = args.shapes or ("tiny" if smoke else "7b")
    image_sizes = args.image_sizes or ("small" if smoke else "real")
    if shapes == "7b" and device == "cpu":
        parser.error("7b shapes need a GPU")
    if device == "cpu":
        torch.set_num_threads(args.threads or min(2, os.cpu_count() or 1))
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "mode": "cpu-smoke" if smoke else "measure",
        "shapes": shapes,
        "image_sizes": image_sizes,
        "train": {},
    }

    def save() -> None:
        results["elapsed_s"] = time.perf_counter() - T0
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2, default=str))
        tmp.replace(args.out)

    work = Path(tempfile.mkdtemp(prefix="cvgl-train-"))
    try:
        queries = args.queries or (2 if smoke else 4)
        log(f"writing images for {queries} queries x 20 candidates ({image_sizes} sizes)")
        images = micro.write_images(work, queries, 20, image_sizes, args.seed)
        bench_train(
            shapes,
            device,
            images,
            batch_sizes=args.batch_sizes,
            warmup=args.warmup if args.warmup is not None else (1 if smoke else 2),
            steps=args.steps or (2 if smoke else 5),
            seed=args.seed,
            out=results["train"],
            save=save,
            keep_activations=args.keep_activations,
        )
    except Exception as exc:  # recorded in the JSON, as measure.py records a failed section
        log(f"train FAILED: {type(exc).__name__}: {exc}")
        results.setdefault("errors", {})["train"] = traceback.format_exc()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save()
    log(f"done in {time.perf_counter() - T0:.1f} s; results in {args.out}")
    print(summary_line(results["train"]), flush=True)
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
