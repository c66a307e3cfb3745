"""Sample4Geo's evaluation preprocessing, run in DataLoader worker processes next to the model.

Sample4Geo (``get_transforms_val``, ``VigorDatasetEval``) reads with ``cv2.imread`` and converts
BGR to RGB, resizes satellite tiles to (S, S) and panoramas to (S, 2S) with
``cv2.INTER_LINEAR_EXACT``, then normalises ``(pixel/255 - mean) / std``. Here the loader workers
decode and resize (the CPU-heavy part) and hand over uint8 batches; the normalisation runs on the
model's device (:func:`normalize`), which moves a quarter of the bytes. A file that is missing or
cannot be decoded becomes an error naming it, never an exception that stops the shard.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

SATELLITE, GROUND = "satellite", "ground"
VIEWS = (SATELLITE, GROUND)

# OpenCV's thread pool does not survive fork: a DataLoader worker forked after this process
# resized an image with it hangs on its first resize. The loader processes are the parallelism.
cv2.setNumThreads(1)


def view_size(view: str, img_size: int) -> tuple[int, int]:
    """(height, width) of a preprocessed image: satellite S x S, panorama S x 2S (VIGOR, no cutting)."""
    if view == SATELLITE:
        return img_size, img_size
    if view == GROUND:
        # Sample4Geo: int(((1024 - 2 * ground_cutting) / 2048) * 2S) with ground_cutting = 0.
        return img_size, 2 * img_size
    raise ValueError(f"unknown view {view!r}; choose one of {', '.join(VIEWS)}")


class ImageReadError(ValueError):
    pass


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to RGB uint8 (H, W, 3) as ``cv2.imread`` + BGR2RGB does.

    Raises:
        ImageReadError: the file is missing, unreadable, or not a decodable image (names the file).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not data:
        raise ImageReadError(f"{path}: empty file")
    # imdecode is imread's decoder; reading the bytes first tells a missing file from a corrupt one.
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageReadError(f"{path}: not a decodable image ({len(data)} bytes)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """albumentations ``A.Resize(h, w, interpolation=cv2.INTER_LINEAR_EXACT)`` on uint8."""
    h, w = size
    if rgb.shape[:2] == (h, w):
        return rgb
    return cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR_EXACT)


def load_image(path: str | Path, view: str, img_size: int) -> np.ndarray:
    """Decode and resize one image: uint8 (H, W, 3), RGB."""
    return resize(read_rgb(path), view_size(view, img_size))


def normalize(batch_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32, as albumentations ``Normalize`` + ``ToTensorV2``.

    albumentations computes ``(img - mean*255) * (1 / (std*255))`` in float32; so does this, on
    whatever device the batch is on. The result is channels-last in memory (a free permute).
    """
    x = batch_uint8.permute(0, 3, 1, 2).to(torch.float32)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1) * 255.0
    inv = 1.0 / (torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1) * 255.0)
    return (x - m) * inv


@dataclass(frozen=True)
class Batch:
    """A loader batch: the rows that decoded (``pixels``, ``index``) and the ones that did not."""

    pixels: torch.Tensor  # (n_ok, H, W, 3) uint8
    index: torch.Tensor  # (n_ok,) positions in the shard
    errors: tuple[tuple[int, str], ...]  # (position, message naming the file)

    def pin_memory(self) -> Batch:  # DataLoader(pin_memory=True) calls this on custom batches
        return Batch(self.pixels.pin_memory(), self.index.pin_memory(), self.errors)


class ImageFiles(Dataset):
    """The images of one shard, decoded and resized in whichever process asks (loader workers)."""

    def __init__(self, paths: Sequence[str | Path], view: str, img_size: int) -> None:
        view_size(view, img_size)  # validates the view
        self.paths = [str(p) for p in paths]
        self.view = view
        self.img_size = img_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str | None]:
        try:
            return i, load_image(self.paths[i], self.view, self.img_size), None
        except ImageReadError as exc:
            return i, None, str(exc)
        except cv2.error as exc:  # e.g. an image too large for the decoder's limits
            return i, None, f"{self.paths[i]}: cannot decode ({str(exc).strip().splitlines()[-1]})"


def collate(items: list[tuple[int, np.ndarray | None, str | None]]) -> Batch:
    ok = [(i, a) for i, a, _ in items if a is not None]
    errors = tuple((i, e) for i, a, e in items if a is None and e is not None)
    if ok:
        pixels = torch.from_numpy(np.stack([a for _, a in ok]))
        index = torch.tensor([i for i, _ in ok], dtype=torch.long)
    else:
        pixels = torch.empty((0, 0, 0, 3), dtype=torch.uint8)
        index = torch.empty((0,), dtype=torch.long)
    return Batch(pixels, index, errors)


def _init_loader_worker(_worker_id: int) -> None:
    # One decode per process; OpenCV's own thread pool would oversubscribe the cores.
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


@contextmanager
def child_processes_allowed() -> Iterator[None]:
    """Let a daemonic process start DataLoader workers (Celery's prefork pool children are daemonic).

    multiprocessing refuses children of a daemon so that none outlive it; DataLoader workers
    already exit when their parent dies (torch's worker watchdog), so the flag is lifted while
    the loader starts them.
    """
    process = multiprocessing.current_process()
    daemon = process._config.get("daemon")
    process._config["daemon"] = False
    try:
        yield
    finally:
        if daemon is None:
            process._config.pop("daemon", None)
        else:
            process._config["daemon"] = daemon


def make_loader(
    paths: Sequence[str | Path],
    view: str,
    img_size: int,
    batch_size: int,
    num_workers: int,
    pin_memory: bool = False,
) -> DataLoader:
    """Batches of uint8 images in shard order; ``num_workers`` processes decode ahead of the model."""
    return DataLoader(
        ImageFiles(paths, view, img_size),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        worker_init_fn=_init_loader_worker if num_workers > 0 else None,
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
    )
