"""Sample4Geo's evaluation preprocessing, and bad images becoming errors that name the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests.builders import synthetic_dataset
from workers.retrieval.data import load_image, make_loader, normalize, view_size

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return synthetic_dataset(tmp_path_factory.mktemp("vigor") / "VIGOR", n_queries=4, image_size=48)


def _sample4geo_reference(path: Path, size: tuple[int, int]) -> np.ndarray:
    """VigorDatasetEval + get_transforms_val: cv2.imread, BGR2RGB, A.Resize(INTER_LINEAR_EXACT),
    A.Normalize (pixel/255 - mean)/std, ToTensorV2 (HWC -> CHW)."""
    img = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR_EXACT)
    x = (img.astype(np.float32) / 255.0 - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return x.transpose(2, 0, 1)


def test_view_sizes_are_sample4geo_s():
    assert view_size("satellite", 384) == (384, 384)
    assert view_size("ground", 384) == (384, 768)
    with pytest.raises(ValueError, match="unknown view"):
        view_size("aerial", 384)


@pytest.mark.parametrize("view,pattern", [("satellite", "*/satellite/*.png"), ("ground", "*/panorama/*.jpg")])
def test_preprocessing_matches_sample4geo(root, view, pattern):
    path = sorted(root.glob(pattern))[0]
    size = view_size(view, 64)
    ours = normalize(torch.from_numpy(load_image(path, view, 64))[None], MEAN, STD)[0].numpy()
    ref = _sample4geo_reference(path, size)
    assert ours.shape == ref.shape == (3, *size)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_bad_images_are_errors_naming_the_file_and_the_rest_goes_on(root, tmp_path):
    good = sorted(root.glob("*/satellite/*.png"))[:3]
    corrupt = tmp_path / "satellite_1.0_2.0.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.png"
    paths = [good[0], corrupt, good[1], missing, empty, good[2]]
    batches = list(make_loader(paths, "satellite", 32, batch_size=4, num_workers=1))
    index = torch.cat([b.index for b in batches]).tolist()
    errors = dict(e for b in batches for e in b.errors)
    assert index == [0, 2, 5]
    assert sorted(errors) == [1, 3, 4]
    assert str(corrupt) in errors[1] and "not a decodable image" in errors[1]
    assert str(missing) in errors[3] and "file not found" in errors[3]
    assert str(empty) in errors[4] and "empty file" in errors[4]
    pixels = torch.cat([b.pixels for b in batches if len(b.index)])
    assert pixels.shape == (3, 32, 32, 3) and pixels.dtype == torch.uint8
    np.testing.assert_array_equal(pixels[1].numpy(), load_image(good[1], "satellite", 32))


def test_loader_workers_start_after_this_process_resized_images(root):
    """OpenCV's thread pool does not survive fork: a loader forked after a resize here used to hang."""
    script = (
        "import sys\n"
        "from workers.retrieval.data import load_image, make_loader\n"
        "paths = sys.argv[1:]\n"
        "load_image(paths[0], 'ground', 384)  # OpenCV work in the parent first\n"
        "n = sum(len(b.index) for b in make_loader(paths, 'ground', 384, 2, num_workers=1))\n"
        "print(n)\n"
    )
    paths = [str(p) for p in sorted(root.glob("*/panorama/*.jpg"))]
    out = subprocess.run(
        [sys.executable, "-c", script, *paths], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(len(paths))]
