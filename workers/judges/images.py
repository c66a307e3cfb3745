"""Decode the images a judge is shown: any mode to RGB, sizes checked, many files at once.

No model here. Decoding runs in a thread pool: Pillow releases the GIL while it decodes, and a
batch's images are independent, so a worker keeps the GPU fed instead of decoding one by one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

# Images are converted to RGB whatever their mode; the processors then resize them (LLaVA-1.5:
# shortest side 336 and a 336x336 centre crop; Qwen2.5-VL: aspect kept, sides rounded to
# multiples of 28 within its pixel budget). Outside these bounds an image is refused.
MIN_IMAGE_SIDE = 8
MAX_IMAGE_SIDE = 16384
MAX_ASPECT_RATIO = 20.0

T = TypeVar("T")


class BadImage(ValueError):
    """An image that cannot be judged: missing, unreadable, or of an unusable size."""


def load_image(path: Path) -> Image.Image:
    """Decode an image fully and convert it to RGB; a clear BadImage otherwise."""
    try:
        with Image.open(path) as img:
            img.load()
            rgb = to_rgb(img)
    except FileNotFoundError as exc:
        raise BadImage(f"image not found: {path}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"image {path} is corrupt or not an image: {exc}") from exc
    w, h = rgb.size
    if min(w, h) < MIN_IMAGE_SIDE or max(w, h) > MAX_IMAGE_SIDE or max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise BadImage(
            f"image {path} is {w}x{h}; judges accept sides of {MIN_IMAGE_SIDE}-{MAX_IMAGE_SIDE} px "
            f"and an aspect ratio up to {MAX_ASPECT_RATIO:g}"
        )
    return rgb


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB of any mode. PIL's own conversion clips 16-bit and float pixels to 255, so those are
    scaled first: 16-bit by 1/257, 32-bit integer and float by their own range."""
    if img.mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float32) / 257.0
    elif img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    else:
        return img.convert("RGB")
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")


def image_key(path: Path) -> tuple[str, int, int]:
    """Cache key of an image file: a rewritten file gets a new key."""
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise BadImage(f"image not found: {path}") from exc
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def map_images(fn: Callable[[Path], T], paths: Sequence[Path], threads: int) -> list[T]:
    """``fn`` over ``paths`` in up to ``threads`` threads, results in order; the first error raises."""
    if threads <= 1 or len(paths) <= 1:
        return [fn(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(threads, len(paths)), thread_name_prefix="cvgl-images") as pool:
        return list(pool.map(fn, paths))
