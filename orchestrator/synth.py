"""Write a small synthetic dataset in the exact VIGOR layout, plus stage-1 candidates.

Tiles lie on a lattice with 50% overlap (stride = half a tile), as VIGOR's do, so every panorama
lies in four tiles: the one whose centre is nearest is the positive, the other three are the
semi-positives. ``candidates.csv`` imitates a Sample4Geo top-K: the positive's stage-1 rank is
drawn, stratified, so that R@1/3/5/10/20 match the paper's baseline (61.2 / 73.8 / 82.4 / 88 /
92 %); the remaining slots hold semi-positives and nearby tiles, the retriever's usual confusions.
"""

from __future__ import annotations

import csv
import math
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from orchestrator.vigor import CROSS_AREA_TEST_CITIES

CITY_CENTRES = {
    "Chicago": (41.8781, -87.6298),
    "NewYork": (40.7306, -73.9866),
    "SanFrancisco": (37.7749, -122.4194),
    "Seattle": (47.6062, -122.3321),
}
METRES_PER_PIXEL = 0.114  # VIGOR's ground sampling distance
TILE_PIXELS = 640
STRIDE_PIXELS = 320  # 50% overlap
METRES_PER_DEGREE_LAT = 111_320.0
# Cumulative share of queries whose positive is within the top k (paper's Table 1 baseline,
# R@10 "about 88", R@20 above 90).
BASELINE_RECALL = ((1, 0.612), (3, 0.738), (5, 0.824), (10, 0.88), (20, 0.92))
PANOID_ALPHABET = string.ascii_letters + string.digits + "-_"


@dataclass(frozen=True)
class SynthSummary:
    root: Path
    cities: tuple[str, ...]
    n_tiles: int
    n_queries: int
    candidates_csv: Path


def positive_ranks(n: int, k: int, rng: random.Random) -> list[int | None]:
    """Stage-1 rank of the positive per query (None = not in the top k), stratified to the targets."""
    ranks: list[int | None] = []
    prev_cut, prev_count = 0, 0
    for cut, share in BASELINE_RECALL:
        count = round(n * share)
        for _ in range(count - prev_count):
            lo, hi = prev_cut + 1, cut
            r = rng.randint(lo, hi)
            ranks.append(r if r <= k else None)
        prev_cut, prev_count = cut, count
    ranks.extend([None] * (n - len(ranks)))
    rng.shuffle(ranks)
    return ranks


def _panoid(rng: random.Random) -> str:
    return "".join(rng.choice(PANOID_ALPHABET) for _ in range(22))


def _tile_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A plausible-looking aerial tile (ground colour, a road cross and a few roofs) and its ground
    colour, the palette its panoramas share."""
    img = np.empty((size, size, 3), dtype=np.uint8)
    ground = rng.integers(60, 140, size=3)
    img[:] = ground
    road = max(2, size // 12)
    r0, c0 = rng.integers(size // 4, 3 * size // 4, size=2)
    img[r0 : r0 + road, :] = (90, 90, 95)
    img[:, c0 : c0 + road] = (90, 90, 95)
    for _ in range(6):
        h, w = rng.integers(size // 10, size // 4, size=2)
        y, x = rng.integers(0, size - h), rng.integers(0, size - w)
        img[y : y + h, x : x + w] = rng.integers(120, 240, size=3)
    return img, ground


def _pano_image(rng: np.random.Generator, size: int, palette: np.ndarray) -> np.ndarray:
    """A 2:1 panorama: sky, facades in the positive tile's ground colour (shades of it), road.

    The shared palette is the signal a judge can learn from (``orchestrator finetune``'s tests);
    hard negatives have other ground colours."""
    h, w = size, 2 * size
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[: h // 3] = (150, 185, 225)
    img[h // 3 : 3 * h // 4] = palette
    img[3 * h // 4 :] = (80, 80, 85)
    for _ in range(8):
        x = int(rng.integers(0, w - w // 10))
        top = int(rng.integers(h // 8, h // 2))
        shade = np.clip(palette.astype(int) + rng.integers(-25, 26, size=3), 0, 255)
        img[top : 3 * h // 4, x : x + w // 12] = shade
    return img


def write_synthetic_vigor(
    root: str | Path,
    n_queries: int,
    k: int = 20,
    seed: int = 0,
    cities: Sequence[str] = CROSS_AREA_TEST_CITIES,
    image_size: int = 64,
    panorama_height: int | None = None,
) -> SynthSummary:
    """Write the dataset under ``root`` and return what was written.

    Args:
        root: output folder (created; existing files of the same names are overwritten).
        n_queries: panoramas in total, spread over ``cities``.
        k: candidates per query in candidates.csv.
        seed: makes the whole dataset reproducible.
        cities: VIGOR city names (their real centres give realistic GPS in the file names).
        image_size: tile side in pixels; VIGOR's are 640.
        panorama_height: panoramas are twice as wide as high (default: ``image_size`` high);
            VIGOR's are 2048x1024, so ``image_size=640, panorama_height=1024`` gives its real sizes.
    """
    if n_queries < 1:
        raise ValueError("--queries must be at least 1")
    if k < 1:
        raise ValueError("--k must be at least 1")
    unknown = [c for c in cities if c not in CITY_CENTRES]
    if unknown:
        raise ValueError(f"unknown VIGOR cities {unknown}; choose from {', '.join(CITY_CENTRES)}")
    pano_height = panorama_height or image_size
    root = Path(root)
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    per_city = [
        n_queries // len(cities) + (1 if i < n_queries % len(cities) else 0) for i in range(len(cities))
    ]
    stride_m = STRIDE_PIXELS * METRES_PER_PIXEL
    query_names: list[tuple[str, str, str, list[str]]] = []
    n_tiles = 0
    for city, n_city in zip(cities, per_city, strict=True):
        lat0, lon0 = CITY_CENTRES[city]
        m_per_deg_lon = METRES_PER_DEGREE_LAT * math.cos(math.radians(lat0))
        side = max(4, math.ceil(math.sqrt(max(n_city, 2 * k))) + 2)
        for sub in ("panorama", "satellite"):
            (root / city / sub).mkdir(parents=True, exist_ok=True)
        split_dir = root / "splits" / city
        split_dir.mkdir(parents=True, exist_ok=True)

        def centre(i: int, j: int, lat0=lat0, lon0=lon0, m_per_deg_lon=m_per_deg_lon) -> tuple[float, float]:
            return lat0 + i * stride_m / METRES_PER_DEGREE_LAT, lon0 + j * stride_m / m_per_deg_lon

        grid: dict[tuple[int, int], str] = {}
        palettes: dict[str, np.ndarray] = {}
        for i in range(side):
            for j in range(side):
                lat, lon = centre(i, j)
                name = f"satellite_{lat!r}_{lon!r}.png"
                grid[(i, j)] = name
                img, palettes[name] = _tile_image(nrng, image_size)
                Image.fromarray(img).save(root / city / "satellite" / name)
        n_tiles += len(grid)
        (split_dir / "satellite_list.txt").write_text(
            "".join(f"{grid[(i, j)]}\n" for i in range(side) for j in range(side))
        )

        label_lines: list[str] = []
        for _ in range(n_city):
            # A point strictly inside the lattice, so all four covering tiles exist.
            fi, fj = rng.uniform(0.05, side - 1.05), rng.uniform(0.05, side - 1.05)
            qlat, qlon = centre(fi, fj)  # type: ignore[arg-type]
            corners = [(math.floor(fi) + a, math.floor(fj) + b) for a in (0, 1) for b in (0, 1)]
            corners.sort(key=lambda c: (c[0] - fi) ** 2 + (c[1] - fj) ** 2)
            fields = []
            covering = []
            for ci, cj in corners:
                tlat, tlon = centre(ci, cj)
                dy = (tlat - qlat) * METRES_PER_DEGREE_LAT / METRES_PER_PIXEL
                dx = (tlon - qlon) * m_per_deg_lon / METRES_PER_PIXEL
                fields += [grid[(ci, cj)], f"{dy:.1f}", f"{dx:.1f}"]
                covering.append(grid[(ci, cj)])
            pano = f"{_panoid(rng)},{qlat!r},{qlon!r},.jpg"
            Image.fromarray(_pano_image(nrng, pano_height, palettes[covering[0]])).save(
                root / city / "panorama" / pano, quality=90
            )
            label_lines.append(" ".join([pano, *fields]))
            # Distractors: nearest other tiles (the semi-positives come first).
            others = sorted(
                (g for g in grid if grid[g] != covering[0]),
                key=lambda c: (c[0] - fi) ** 2 + (c[1] - fj) ** 2,
            )
            query_names.append((city, pano, covering[0], [grid[c] for c in others[: k + 5]]))
        (split_dir / "pano_label_balanced.txt").write_text("".join(f"{ln}\n" for ln in label_lines))
        half = len(label_lines) // 2
        (split_dir / "same_area_balanced_test.txt").write_text(
            "".join(f"{ln}\n" for ln in label_lines[:half])
        )
        (split_dir / "same_area_balanced_train.txt").write_text(
            "".join(f"{ln}\n" for ln in label_lines[half:])
        )

    ranks = positive_ranks(len(query_names), k, rng)
    out = root / "candidates.csv"
    with out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["query", "tile", "rank", "score"])
        for (_city, pano, positive, near), rank in zip(query_names, ranks, strict=True):
            pool = near[:]
            # Mild shuffle: a retriever mostly, not always, ranks nearer tiles higher.
            pool = sorted(pool, key=lambda t, pool=pool: pool.index(t) + rng.uniform(0, 4))
            listing = pool[: k - 1] if rank is not None else pool[:k]
            if rank is not None:
                listing.insert(rank - 1, positive)
            score = 0.78 + rng.uniform(0, 0.05)
            for r, tile in enumerate(listing, start=1):
                writer.writerow([pano, tile, r, f"{score:.5f}"])
                score -= rng.uniform(0.002, 0.02)
    return SynthSummary(root, tuple(cities), n_tiles, len(query_names), out)
