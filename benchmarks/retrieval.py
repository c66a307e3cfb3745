"""Stage-1 retriever throughput: decode + preprocess + embed, images per second, and the top-K.

    python benchmarks/retrieval.py                       # tiny model, small counts, CPU (minutes on 2 cores)
    python benchmarks/retrieval.py --model convnext_base.fb_in22k_ft_in1k_384 --device cuda \\
        --batch-size 128 --bf16 --n-images 2048 --gallery 46563 --queries 52000   # a GPU machine

Writes synthetic images at VIGOR's native sizes (satellite 640x640 PNG, panorama 2048x1024 JPEG)
and times, per view, with the worker's own code (``Encoder.embed_files``: DataLoader decode
processes, uint8 batches, normalisation and the model on the device):

* ``decode``: the loader alone (cv2 decode + INTER_LINEAR_EXACT resize), the CPU ceiling;
* ``compute``: the model alone on ready uint8 batches already on the device;
* ``pipeline``: decode + preprocess + embed, as a shard is embedded (loader start-up included).

Then ``rank_gallery`` (chunked top-K plus positive ranks) on random unit vectors of the given sizes.
Every figure is the median of ``--repeats``; random weights (no checkpoint needed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from workers.retrieval.data import make_loader, view_size  # noqa: E402
from workers.retrieval.encoder import Encoder, EncoderSpec, loader_workers  # noqa: E402
from workers.retrieval.topk import rank_gallery  # noqa: E402

NATIVE = {"satellite": (640, 640), "ground": (1024, 2048)}  # VIGOR (H, W)


def write_images(folder: Path, n: int, seed: int = 0) -> dict[str, list[Path]]:
    """Photo-like images (smooth fields plus noise) so decoding costs what VIGOR's files cost."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[Path]] = {"satellite": [], "ground": []}
    for view, (h, w) in NATIVE.items():
        for i in range(n):
            base = cv2.resize(rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8), (w, h))
            img = np.clip(base.astype(np.int16) + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
            path = folder / (f"satellite_{i}.png" if view == "satellite" else f"pano{i},0,0,.jpg")
            cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 95] if view == "ground" else [])
            out[view].append(path)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_rate(fn, n_items: int, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        rates.append(n_items / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="convnext_atto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--img-size", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--n-images", type=int, default=48, help="images per view (written once, embedded per repeat)"
    )
    ap.add_argument("--loader-workers", type=int, default=None, help="default: all cores but one (max 16)")
    ap.add_argument("--bf16", action="store_true", help="autocast in bf16 (CUDA; CPU stays fp32)")
    ap.add_argument("--no-channels-last", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--gallery", type=int, default=4_656, help="top-K: gallery rows (VIGOR cross-area: 46,563)"
    )
    ap.add_argument("--queries", type=int, default=2_000, help="top-K: query rows (cross-area test: ~52,000)")
    ap.add_argument("--k", type=int, default=20)
    args = ap.parse_args()

    device = torch.device(args.device)
    encoder = Encoder(
        EncoderSpec(args.model, None, None, True, 0, args.img_size),
        device=device,
        precision="bf16" if args.bf16 else "fp32",
        channels_last=not args.no_channels_last,
    )
    workers = loader_workers(args.loader_workers)
    print(
        f"model {args.model} ({encoder.dim}-d) on {encoder.device_label}, batch {args.batch_size}, "
        f"channels_last {not args.no_channels_last}, {workers} loader workers, torch threads "
        f"{torch.get_num_threads()}, {args.n_images} images per view, median of {args.repeats}"
    )
    with tempfile.TemporaryDirectory(prefix="cvgl-bench-retrieval-") as tmp:
        images = write_images(Path(tmp), args.n_images)
        for view, paths in images.items():
            h, w = view_size(view, args.img_size)
            ready = torch.randint(0, 256, (args.batch_size, h, w, 3), dtype=torch.uint8, device=device)
            encoder.embed_pixels(ready)  # warm-up (cuDNN autotune, allocator)
            sync(device)
            n_batches = max(1, args.n_images // args.batch_size)

            def compute(ready=ready, n_batches=n_batches) -> None:
                for _ in range(n_batches):
                    encoder.embed_pixels(ready)
                sync(device)

            def decode(paths=paths, view=view) -> None:
                for _ in make_loader(paths, view, args.img_size, args.batch_size, workers):
                    pass

            def pipeline(paths=paths, view=view) -> None:
                result = encoder.embed_files(paths, view, args.batch_size, workers)
                assert not result.errors, result.errors

            rates = {
                "decode": median_rate(decode, len(paths), args.repeats),
                "compute": median_rate(compute, n_batches * args.batch_size, args.repeats),
                "pipeline": median_rate(pipeline, len(paths), args.repeats),
            }
            print(
                f"{view:9} {h}x{w}: decode {rates['decode']:8.1f} img/s   compute {rates['compute']:8.1f} img/s   "
                f"pipeline {rates['pipeline']:8.1f} img/s ({100 * rates['pipeline'] / rates['compute']:.0f}% of compute)"
            )

    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((args.gallery, encoder.dim)).astype(np.float32)
    gallery = (gallery / np.linalg.norm(gallery, axis=1, keepdims=True)).astype(np.float16)
    queries = rng.standard_normal((args.queries, encoder.dim)).astype(np.float32)
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float16)
    positives = rng.integers(0, args.gallery, args.queries)
    semi = rng.integers(0, args.gallery, (args.queries, 3))
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        rank_gallery(queries, gallery, args.k, positives, semi, device=device)
        seconds.append(time.perf_counter() - start)
    t = statistics.median(seconds)
    print(
        f"top-{args.k}: {args.queries} queries x {args.gallery} tiles x {encoder.dim}-d in {t:.2f} s "
        f"({args.queries / t:.0f} queries/s) on {device}"
    )


if __name__ == "__main__":
    main()
