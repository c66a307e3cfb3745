"""Decode the images a judge is shown: sizes checked before decoding, any mode to RGB, many at once.

No model here. A file is opened (its header read) and refused before any pixel is decoded when it
has more than ``CVGL_MAX_IMAGE_PIXELS`` pixels or would take more than ``CVGL_MAX_IMAGE_MB`` to hold
decoded: a PNG of a few hundred kilobytes can decode to gigabytes. Every decoder error, Pillow's
decompression-bomb error included, is a ``BadImage`` naming the file. Decoding runs in a thread
pool: Pillow releases the GIL while it decodes, so a worker keeps the GPU fed.
"""

from __future__ import annotations

import os
import warnings
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
MAX_PIXELS_ENV = "CVGL_MAX_IMAGE_PIXELS"
MAX_MB_ENV = "CVGL_MAX_IMAGE_MB"
DEFAULT_MAX_PIXELS = 25_000_000  # VIGOR's panoramas are 2.1 megapixels, its tiles 0.4
DEFAULT_MAX_MB = 200.0

T = TypeVar("T")


class BadImage(ValueError):
    """An image that cannot be judged; ``reason``: missing, corrupt, too large or bad size."""

    def __init__(self, message: str, reason: str = "bad image") -> None:
        super().__init__(message)
        self.reason = reason


def max_pixels() -> int:
    return int(float(os.environ.get(MAX_PIXELS_ENV, "") or DEFAULT_MAX_PIXELS))


def max_decoded_mb() -> float:
    return float(os.environ.get(MAX_MB_ENV, "") or DEFAULT_MAX_MB)


def bytes_per_pixel(mode: str) -> int:
    """What Pillow holds per pixel once decoded (RGB is stored in 4 bytes)."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


def check_header(img: Image.Image, path: Path) -> None:
    """Refuse an opened, not yet decoded image that would be too large or is of an unusable shape."""
    w, h = img.size
    if w * h > max_pixels():
        raise BadImage(
            f"image {path} is {w}x{h} ({w * h / 1e6:.0f} megapixels); judges decode at most "
            f"{max_pixels() / 1e6:g} megapixels ({MAX_PIXELS_ENV})",
            "too large",
        )
    decoded_mb = w * h * bytes_per_pixel(img.mode) / 2**20
    if decoded_mb > max_decoded_mb():
        raise BadImage(
            f"image {path} ({img.mode}, {w}x{h}) would take {decoded_mb:.1f} MB decoded; judges "
            f"decode at most {max_decoded_mb():g} MB ({MAX_MB_ENV})",
            "too large",
        )
    if min(w, h) < MIN_IMAGE_SIDE or max(w, h) > MAX_IMAGE_SIDE or max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise BadImage(
            f"image {path} is {w}x{h}; judges accept sides of {MIN_IMAGE_SIDE}-{MAX_IMAGE_SIDE} px "
            f"and an aspect ratio up to {MAX_ASPECT_RATIO:g}",
            "bad size",
        )


def open_checked(path: Path) -> Image.Image:
    """Open an image and check its header (nothing decoded yet); BadImage otherwise. Close it after."""
    try:
        with warnings.catch_warnings():  # the size is checked below, against our own limits
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except FileNotFoundError as exc:
        raise BadImage(f"image not found: {path}", "missing") from exc
    except Image.DecompressionBombError as exc:
        raise BadImage(
            f"image {path} is too large to decode ({exc}); judges decode at most {max_pixels() / 1e6:g} megapixels",
            "too large",
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"image {path} is corrupt or not an image: {exc}", "corrupt") from exc
    try:
        check_header(img, path)
    except BadImage:
        img.close()
        raise
    return img


def load_image(path: Path) -> Image.Image:
    """Decode an image fully (after its header passed ``check_header``) and convert it to RGB."""
    with open_checked(path) as img:
        try:
            img.load()
            return to_rgb(img)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, MemoryError) as exc:
            raise BadImage(f"image {path} is corrupt or not an image: {exc}", "corrupt") from exc


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
        raise BadImage(f"image not found: {path}", "missing") from exc
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def map_images(fn: Callable[[Path], T], paths: Sequence[Path], threads: int) -> list[T]:
    """``fn`` over ``paths`` in up to ``threads`` threads, results in order; the first error raises."""
    if threads <= 1 or len(paths) <= 1:
        return [fn(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(threads, len(paths)), thread_name_prefix="cvgl-images") as pool:
        return list(pool.map(fn, paths))
