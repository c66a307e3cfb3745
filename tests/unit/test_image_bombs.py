"""Decompression bombs: small PNG files that decode to gigabytes are refused from their header, as
bad images naming the file, without the memory their pixels would take."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from db.models import DONE, FAILED
from workers import judging
from workers.judges.base import JudgeRequest
from workers.judges.images import BadImage, load_image
from workers.judges.simulated import SimulatedJudge
from workers.prompts import load_prompt

REPO = Path(__file__).resolve().parents[2]


def png_bomb(path: Path, width: int, height: int, *, bit_depth: int, color_type: int) -> Path:
    """A valid PNG of zero pixels, written a block of rows at a time (never whole in memory)."""
    channels = {0: 1, 2: 3}[color_type]
    row = b"\0" + bytes(width * channels * bit_depth // 8)  # filter byte, then the pixels

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    block = row * 100
    idat = (
        b"".join(z.compress(block) for _ in range(height // 100))
        + z.compress(row * (height % 100))
        + z.flush()
    )
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bombs")
    return {
        # The two of the issue: 367 KB and 545 KB files of 16384x10900 pixels (2.4 and 1.4 GB decoded).
        "gray16": png_bomb(d / "gray16.png", 16384, 10900, bit_depth=16, color_type=0),
        "rgb": png_bomb(d / "rgb.png", 16384, 10900, bit_depth=8, color_type=2),
        # Past Pillow's own bomb limit: its DecompressionBombError must read as a bad image too.
        "huge": png_bomb(d / "huge.png", 16384, 16384, bit_depth=8, color_type=0),
    }


def test_bombs_are_small_files_that_pillow_would_decode(bombs):
    assert bombs["gray16"].stat().st_size < 600_000 and bombs["rgb"].stat().st_size < 900_000
    with Image.open(bombs["gray16"]) as im:
        assert im.size == (16384, 10900) and im.mode.startswith("I;16")


@pytest.mark.parametrize("name", ["gray16", "rgb", "huge"])
def test_a_bomb_is_a_bad_image_naming_the_file(bombs, name):
    with pytest.raises(BadImage, match=rf"{name}\.png.*megapixels"):
        load_image(bombs[name])


def test_the_limits_are_settings(bombs, tmp_path, monkeypatch):
    Image.new("RGB", (400, 300)).save(tmp_path / "ok.png")
    monkeypatch.setenv("CVGL_MAX_IMAGE_PIXELS", "100000")
    with pytest.raises(BadImage, match="ok.png is 400x300 .* at most 0.1 megapixels"):
        load_image(tmp_path / "ok.png")
    monkeypatch.setenv("CVGL_MAX_IMAGE_PIXELS", "1000000")
    monkeypatch.setenv("CVGL_MAX_IMAGE_MB", "0.3")  # RGB is held in 4 bytes a pixel: 0.46 MB
    with pytest.raises(
        BadImage, match=r"ok.png \(RGB, 400x300\) would take 0.5 MB decoded; judges decode at most 0.3 MB"
    ):
        load_image(tmp_path / "ok.png")


def test_refusing_a_bomb_takes_no_memory(bombs):
    """In a fresh process: peak memory before and after trying both bombs."""
    script = (
        "import json, resource, sys\n"
        "from workers.judges.images import BadImage, load_image\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        load_image(p)\n"
        "    except BadImage:\n"
        "        pass\n"
        "print(json.dumps([before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(bombs["gray16"]), str(bombs["rgb"])],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    before_kb, after_kb = json.loads(out.stdout)
    assert after_kb - before_kb < 32 * 1024  # KB: decoding either would take over 1.4 GB


def test_a_batch_with_bombs_fails_them_alone(bombs, tmp_path):
    good = tmp_path / "g.jpg"
    Image.new("RGB", (64, 32), (90, 120, 150)).save(good)
    tile = tmp_path / "t.png"
    Image.new("RGB", (32, 32), (10, 200, 30)).save(tile)
    p = load_prompt("yesno")
    context = {"query": "q", "tiles": ("t",), "positive": (True,), "stage1_rank": (2,)}
    reqs = [JudgeRequest(p.text, (good, tile), context=context)]
    reqs += [JudgeRequest(p.text, (good, bombs[n]), context=reqs[0].context) for n in ("gray16", "rgb")]
    out = judging.run_batch(SimulatedJudge(seed=0), p, [judging.Item(i + 1, r) for i, r in enumerate(reqs)])
    assert [o.status for o in out] == [DONE, FAILED, FAILED]
    assert "gray16.png" in out[1].error and "megapixels" in out[1].error
    assert "rgb.png" in out[2].error
