"""The Sample4Geo-compatible encoder: checkpoint format, strict loading, embeddings (tiny timm ConvNeXt)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.builders import synthetic_dataset
from workers.retrieval.encoder import (
    CheckpointError,
    Encoder,
    EncoderSpec,
    Sample4GeoModel,
    UnknownModel,
    build_model,
    check_model_name,
    file_sha256,
    load_sample4geo_checkpoint,
)

MODEL = "convnext_atto"  # the smallest timm ConvNeXt: same family and head as ConvNeXt-B
IMG = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, list[Path]]:
    root = synthetic_dataset(tmp_path_factory.mktemp("vigor") / "VIGOR", n_queries=4, image_size=32)
    return {
        "satellite": sorted(root.glob("*/satellite/*.png"))[:6],
        "ground": sorted(root.glob("*/panorama/*.jpg")),
    }


@pytest.fixture(scope="module")
def trained() -> Sample4GeoModel:
    """Stands in for a trained Sample4Geo model (random weights, seed 1)."""
    return build_model(MODEL, seed=1)


def _save(state: dict[str, torch.Tensor], path: Path, prefix: str = "") -> Path:
    """As Sample4Geo's train script: torch.save(model.state_dict()) (module.* under DataParallel)."""
    torch.save({prefix + k: v for k, v in state.items()}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(trained, tmp_path_factory) -> Path:
    return _save(trained.state_dict(), tmp_path_factory.mktemp("ckpt") / "weights_e40_0.6109.pth")


def _spec(checkpoint: Path | None, seed: int = 0) -> EncoderSpec:
    return EncoderSpec(
        model_name=MODEL,
        checkpoint=str(checkpoint) if checkpoint else None,
        checkpoint_sha256=file_sha256(checkpoint) if checkpoint else None,
        random_init=checkpoint is None,
        seed=seed,
        img_size=IMG,
    )


def test_checkpoint_keys_are_sample4geo_s(trained):
    keys = list(trained.state_dict())
    assert "logit_scale" in keys
    assert all(k == "logit_scale" or k.startswith("model.") for k in keys)
    assert "model.stem.0.weight" in keys and not any(k.startswith("model.head.fc") for k in keys)


def test_a_sample4geo_checkpoint_gives_the_trained_model_s_embeddings(checkpoint, trained, images):
    loaded = Encoder(_spec(checkpoint, seed=7), device="cpu")  # built from other random weights first
    original = Encoder(_spec(None, seed=1), device="cpu")
    for name, tensor in trained.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    for view, paths in images.items():
        a = loaded.embed_files(paths, view, batch_size=4, num_workers=0)
        b = original.embed_files(paths, view, batch_size=4, num_workers=0)
        assert a.embeddings.shape == (len(paths), 320) and a.embeddings.dtype == np.float16
        assert not a.errors and not np.isnan(a.embeddings).any()
        np.testing.assert_array_equal(a.embeddings, b.embeddings)
        norms = np.linalg.norm(a.embeddings.astype(np.float32), axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=2e-3)
    assert loaded.mean == pytest.approx((0.485, 0.456, 0.406))
    assert loaded.std == pytest.approx((0.229, 0.224, 0.225))
    assert loaded.dim == 320 and loaded.precision == "fp32"


def test_a_dataparallel_prefix_is_accepted(trained, tmp_path):
    path = _save(trained.state_dict(), tmp_path / "dp.pth", prefix="module.")
    model = build_model(MODEL, seed=5)
    load_sample4geo_checkpoint(model, path, MODEL)
    assert torch.equal(model.model.stem[0].weight, trained.model.stem[0].weight)


def test_a_renamed_key_fails_loudly_and_loads_nothing(trained, tmp_path):
    state = dict(trained.state_dict())
    state["model.stem.0.weights"] = state.pop("model.stem.0.weight")
    path = _save(state, tmp_path / "bad.pth")
    model = build_model(MODEL, seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_sample4geo_checkpoint(model, path, MODEL)
    msg = str(err.value)
    assert "1 missing keys (model.stem.0.weight)" in msg
    assert "1 unexpected keys (model.stem.0.weights)" in msg
    assert "\n" not in msg
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_bare_timm_state_dict_is_refused_with_a_hint(trained, tmp_path):
    bare = {k.removeprefix("model."): v for k, v in trained.state_dict().items() if k != "logit_scale"}
    path = _save(bare, tmp_path / "timm.pth")
    with pytest.raises(CheckpointError, match="bare timm state dict"):
        load_sample4geo_checkpoint(build_model(MODEL), path, MODEL)


def test_another_architecture_with_the_same_keys_fails_on_shapes(trained, tmp_path):
    path = _save(build_model("convnext_femto").state_dict(), tmp_path / "femto.pth")
    with pytest.raises(
        CheckpointError, match=r"differ in shape .*model\.stem\.0\.weight \(48, 3, 4, 4\) vs \(40, 3, 4, 4\)"
    ):
        load_sample4geo_checkpoint(build_model(MODEL), path, MODEL)


def test_files_that_are_not_state_dicts_are_refused(trained, tmp_path):
    model = build_model(MODEL)
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch state dict"):
        load_sample4geo_checkpoint(model, tmp_path / "text.pth")
    torch.save({"epoch": 40, "state_dict": trained.state_dict()}, tmp_path / "train.pth")
    with pytest.raises(CheckpointError, match="training-state dict"):
        load_sample4geo_checkpoint(model, tmp_path / "train.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_sample4geo_checkpoint(model, tmp_path / "nope.pth")


def test_a_checkpoint_changed_after_the_run_was_created_is_refused(trained, tmp_path):
    path = _save(trained.state_dict(), tmp_path / "w.pth")
    spec = _spec(path)
    state = dict(trained.state_dict())
    state["logit_scale"] = state["logit_scale"] + 1
    _save(state, path)
    with pytest.raises(CheckpointError, match="changed since the run was created"):
        Encoder(spec, device="cpu")


def test_random_init_is_deterministic_per_seed(trained):
    again, other = build_model(MODEL, seed=1), build_model(MODEL, seed=2)
    assert torch.equal(again.model.stem[0].weight, trained.model.stem[0].weight)
    assert not torch.equal(other.model.stem[0].weight, trained.model.stem[0].weight)


def test_an_unknown_model_name_suggests_the_family():
    with pytest.raises(UnknownModel, match="convnext_atto"):
        check_model_name("convnext_atoo")
