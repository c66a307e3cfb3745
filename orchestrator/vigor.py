"""Read the VIGOR layout into plain records (pure: reads files, touches no database).

Layout (``Jeff-Zilence/VIGOR``)::

    ROOT/<city>/panorama/<panoid>,<lat>,<lon>,.jpg
    ROOT/<city>/satellite/satellite_<lat>_<lon>.png
    ROOT/splits/<city>/satellite_list.txt              one tile file name per line
    ROOT/splits/<city>/pano_label_balanced.txt         cross-area labels of the city
    ROOT/splits/<city>/same_area_balanced_{train,test}.txt

A label line has 13 fields separated by single spaces: the panorama, then the positive tile and
three semi-positive tiles, each followed by its (dy, dx) offset in pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CITIES = ("Chicago", "NewYork", "SanFrancisco", "Seattle")
# Sample4Geo's test-city order; the gallery index depends on it.
CROSS_AREA_TEST_CITIES = ("Chicago", "SanFrancisco")
SPLITS = ("cross-area", "same-area")


class VigorFormatError(ValueError):
    """The dataset folder does not follow the VIGOR layout; the message names file and line."""


@dataclass(frozen=True)
class TileRecord:
    city: str
    name: str
    path: str  # relative to the dataset root
    lat: float
    lon: float


@dataclass(frozen=True)
class QueryRecord:
    city: str
    name: str
    panoid: str
    path: str
    lat: float
    lon: float


@dataclass(frozen=True)
class LabelRecord:
    query: str
    tile: str
    relation: str  # 'positive' | 'semi_positive'
    dy: float
    dx: float


@dataclass(frozen=True)
class VigorData:
    tiles: tuple[TileRecord, ...]
    queries: tuple[QueryRecord, ...]
    labels: tuple[LabelRecord, ...]
    missing_images: tuple[str, ...]


def _plain_file_name(name: str) -> None:
    """Refuse names that could point outside the dataset folder (``../``, absolute, separators)."""
    if not name or "/" in name or "\\" in name or name in (".", "..") or "\x00" in name:
        raise ValueError(f"not a plain file name: {name!r}")


def parse_satellite_name(name: str) -> tuple[float, float]:
    """``satellite_<lat>_<lon>.png`` -> (lat, lon)."""
    _plain_file_name(name)
    parts = Path(name).stem.split("_")
    if len(parts) != 3 or parts[0] != "satellite":
        raise ValueError(f"not a VIGOR satellite file name: {name!r}")
    return float(parts[1]), float(parts[2])


def parse_panorama_name(name: str) -> tuple[str, float, float]:
    """``<panoid>,<lat>,<lon>,.jpg`` -> (panoid, lat, lon)."""
    _plain_file_name(name)
    parts = name.split(",")
    if len(parts) != 4:
        raise ValueError(f"not a VIGOR panorama file name: {name!r}")
    return parts[0], float(parts[1]), float(parts[2])


def label_file(split: str, subset: str = "test") -> str:
    if split == "cross-area":
        return "pano_label_balanced.txt"
    if split == "same-area":
        return f"same_area_balanced_{subset}.txt"
    raise VigorFormatError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def default_cities(split: str) -> tuple[str, ...]:
    return CROSS_AREA_TEST_CITIES if split == "cross-area" else CITIES


def parse_label_line(line: str, where: str) -> tuple[str, list[tuple[str, float, float]]]:
    """Split one label line into the panorama name and four (tile, dy, dx) triples."""
    fields = line.rstrip("\r\n").split(" ")
    if len(fields) != 13 or any(not f for f in fields):
        raise VigorFormatError(
            f"{where}: expected 13 space-separated fields, got {len([f for f in fields if f])}"
        )
    triples = []
    for i in (1, 4, 7, 10):
        try:
            dy, dx = float(fields[i + 1]), float(fields[i + 2])
        except ValueError as exc:
            raise VigorFormatError(f"{where}: offsets of {fields[i]!r} are not numbers") from exc
        triples.append((fields[i], dy, dx))
    return fields[0], triples


def read_vigor(root: str | Path, split: str = "cross-area", cities: Sequence[str] | None = None) -> VigorData:
    """Read tiles, queries and labels of ``split`` for ``cities`` (default: the split's test cities).

    Raises:
        VigorFormatError: a missing folder or file, a malformed label line (with file and line),
            or a label naming a tile absent from the city's satellite_list.txt.
    """
    root = Path(root)
    if not root.is_dir():
        raise VigorFormatError(f"dataset root {root} does not exist or is not a folder")
    labels_name = label_file(split)
    cities = tuple(cities) if cities else default_cities(split)
    tiles: list[TileRecord] = []
    queries: list[QueryRecord] = []
    labels: list[LabelRecord] = []
    missing: list[str] = []
    for city in cities:
        split_dir = root / "splits" / city
        sat_list = split_dir / "satellite_list.txt"
        label_path = split_dir / labels_name
        for f in (sat_list, label_path):
            if not f.is_file():
                present = sorted(d.name for d in (root / "splits").glob("*") if (d / labels_name).is_file())
                hint = (
                    f"; this dataset has {', '.join(present)}: pass --cities {','.join(present)}"
                    if present and city not in present
                    else ""
                )
                raise VigorFormatError(f"{f} is missing (expected the VIGOR layout under {root}){hint}")
        city_tiles: set[str] = set()
        for lineno, line in enumerate(sat_list.read_text().splitlines(), start=1):
            name = line.strip()
            if not name:
                continue
            try:
                lat, lon = parse_satellite_name(name)
            except ValueError as exc:
                raise VigorFormatError(f"{sat_list}:{lineno}: {exc}") from exc
            rel = f"{city}/satellite/{name}"
            city_tiles.add(name)
            tiles.append(TileRecord(city, name, rel, lat, lon))
            if not (root / rel).is_file():
                missing.append(rel)
        for lineno, line in enumerate(label_path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{label_path}:{lineno}"
            pano, triples = parse_label_line(line, where)
            try:
                panoid, lat, lon = parse_panorama_name(pano)
            except ValueError as exc:
                raise VigorFormatError(f"{where}: {exc}") from exc
            rel = f"{city}/panorama/{pano}"
            queries.append(QueryRecord(city, pano, panoid, rel, lat, lon))
            if not (root / rel).is_file():
                missing.append(rel)
            for i, (tile, dy, dx) in enumerate(triples):
                if tile not in city_tiles:
                    raise VigorFormatError(f"{where}: tile {tile!r} is not in {sat_list}")
                labels.append(LabelRecord(pano, tile, "positive" if i == 0 else "semi_positive", dy, dx))
    return VigorData(tuple(tiles), tuple(queries), tuple(labels), tuple(missing))
