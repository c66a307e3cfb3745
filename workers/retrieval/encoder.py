"""A Sample4Geo-compatible encoder: one timm backbone with ``num_classes=0`` for both views.

Sample4Geo's ``TimmModel`` holds ``self.model = timm.create_model(name, num_classes=0)`` and a
``logit_scale`` parameter, and runs the same backbone on panoramas and satellite tiles; its
checkpoints are that module's ``state_dict()``: keys ``model.<timm name>`` plus ``logit_scale``
(a ``module.`` prefix when saved from DataParallel). Upstream loads them with ``strict=False``
over ImageNet weights, so a file with other key names loads nothing, silently (Sample4Geo issue
#45). Here the model is built with ``pretrained=False`` (no hub) and every key is checked: a
missing, unexpected or mis-shaped key is a :class:`CheckpointError`. Features are the pooled,
L2-normalised pre-logits (1024-d for ConvNeXt-B), computed in bf16 on a GPU and fp32 on a CPU.

Imported only by retrieval workers, tests and benchmarks (torch and timm live here).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import threading
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from db.settings import settings
from workers.retrieval.data import child_processes_allowed, make_loader, normalize
from workers.retrieval.store import file_sha256

log = logging.getLogger(__name__)

# Named in errors; read through db.settings (auto, cpu, cuda, cuda:1 / bf16, fp16, fp32).
DEVICE_ENV = "CVGL_RETRIEVAL_DEVICE"
PRECISION_ENV = "CVGL_RETRIEVAL_PRECISION"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose keys or shapes do not fit the model."""


class UnknownModel(ValueError):
    pass


class Sample4GeoModel(nn.Module):
    """Sample4Geo's ``TimmModel`` at inference: attribute names match its checkpoints."""

    def __init__(self, model_name: str) -> None:
        super().__init__()
        self.model = timm.create_model(model_name, pretrained=False, num_classes=0)
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def check_model_name(model_name: str) -> None:
    if not timm.is_model(model_name):
        family = model_name.split(".", 1)[0].split("_", 1)[0]
        near = timm.list_models(f"{family}*")[:8]
        hint = f" Did you mean one of: {', '.join(near)}?" if near else ""
        raise UnknownModel(f"timm has no model {model_name!r}.{hint}")


def build_model(model_name: str, seed: int = 0) -> Sample4GeoModel:
    """The model with deterministic random weights: every worker building it gets the same ones."""
    check_model_name(model_name)
    # Several processes embed shards of one run; with --random-init they must agree on the weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Sample4GeoModel(model_name)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a Sample4Geo checkpoint on the CPU with ``weights_only=True``; drop a ``module.`` prefix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        # map_location: a file saved from CUDA must load on a CPU-only host too.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} is not a PyTorch state dict loadable with weights_only=True: {first}"
        ) from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        raise CheckpointError(
            f"checkpoint {path} is a training-state dict (keys {sorted(obj)[:5]}), not Sample4Geo's "
            "model.state_dict(); save model.state_dict() instead"
        )
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(
            f"checkpoint {path} is not a state dict of named tensors ({type(obj).__name__})"
        )
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):  # saved from nn.DataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _examples(keys: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_sample4geo_checkpoint(model: Sample4GeoModel, path: str | Path, model_name: str = "") -> None:
    """Load every tensor of a Sample4Geo checkpoint into ``model``, or raise :class:`CheckpointError`."""
    state = read_state_dict(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    what = f"checkpoint {path} does not fit {model_name or 'the model'}"
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_examples(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_examples(unexpected)})")
        hint = ""
        if state and not any(k.startswith("model.") for k in state):
            hint = (
                "; Sample4Geo checkpoints name the backbone's tensors 'model.<timm name>' plus "
                "'logit_scale' (this file has no 'model.' keys: a bare timm state dict?)"
            )
        raise CheckpointError(f"{what}: {' and '.join(parts)}{hint}")
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if shapes:
        raise CheckpointError(
            f"{what}: {len(shapes)} tensors differ in shape (file vs model: {_examples(shapes)})"
        )
    model.load_state_dict(state, strict=True)


def pick_device(requested: str | None = None) -> torch.device:
    name = (requested or settings().retrieval_device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{DEVICE_ENV}={name} but CUDA is not available on this host")
    return device


def loader_workers(requested: int | None = None) -> int:
    """Decode processes per shard: ``CVGL_RETRIEVAL_LOADER_WORKERS``, else all cores but one (max 16)."""
    if requested is not None:
        return max(0, requested)
    configured = settings().retrieval_loader_workers
    if configured is not None:
        return configured
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(16, cores - 1))


@dataclass(frozen=True)
class EncoderSpec:
    """What fixes the embeddings of a retrieval run (the worker's device does not, beyond rounding)."""

    model_name: str
    checkpoint: str | None
    checkpoint_sha256: str | None
    random_init: bool
    seed: int
    img_size: int


@dataclass(frozen=True)
class EmbedResult:
    embeddings: np.ndarray  # (n, dim) float16, L2-normalised; NaN rows for images that failed
    errors: dict[int, str]  # row -> message naming the file
    seconds: float

    @property
    def n_embedded(self) -> int:
        return len(self.embeddings) - len(self.errors)


class Encoder:
    """The loaded model on its device, with its normalisation; embeds image files in batches."""

    def __init__(
        self,
        spec: EncoderSpec,
        device: str | torch.device | None = None,
        precision: str | None = None,
        channels_last: bool = True,
    ) -> None:
        if not spec.random_init and not spec.checkpoint:
            raise CheckpointError("no checkpoint given and random_init is off")
        self.spec = spec
        self.device = device if isinstance(device, torch.device) else pick_device(device)
        if spec.checkpoint and spec.checkpoint_sha256 and Path(spec.checkpoint).is_file():
            actual = file_sha256(spec.checkpoint)
            if actual != spec.checkpoint_sha256:
                raise CheckpointError(
                    f"checkpoint {spec.checkpoint} changed since the run was created (sha256 {actual[:12]}, "
                    f"expected {spec.checkpoint_sha256[:12]}): shards must not mix weights"
                )
        model = build_model(spec.model_name, spec.seed)
        if spec.checkpoint:
            load_sample4geo_checkpoint(model, spec.checkpoint, spec.model_name)
        config = timm.data.resolve_model_data_config(model.model)
        # Only mean/std: Sample4Geo ignores timm's input_size and crop_pct.
        self.mean = tuple(float(v) for v in config["mean"])
        self.std = tuple(float(v) for v in config["std"])
        self.dim = int(model.model.num_features)
        self.channels_last = channels_last
        model.eval().to(self.device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        name = (precision or settings().retrieval_precision).strip().lower()
        if name not in _DTYPES:
            raise ValueError(f"{PRECISION_ENV}={name!r}; choose one of {', '.join(_DTYPES)}")
        # CPU autocast in bf16 is slow on most CPUs and changes the numbers: fp32 there.
        self.autocast_dtype = _DTYPES[name] if self.device.type == "cuda" else None
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    @property
    def precision(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[self.autocast_dtype]

    @property
    def device_label(self) -> str:
        label = str(self.device)
        if self.device.type == "cuda":
            label = torch.cuda.get_device_name(self.device)[:40]
        return f"{label} {self.precision}"

    @torch.inference_mode()
    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 on any device -> (B, dim) float32 L2-normalised features on the device."""
        x = normalize(pixels.to(self.device, non_blocking=True), self.mean, self.std)
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        if self.autocast_dtype is not None:
            with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype):
                feats = self.model(x)
        else:
            feats = self.model(x)
        # Sample4Geo normalises in fp32 (normalize_features=True).
        return F.normalize(feats.float(), dim=-1)

    def embed_files(
        self,
        paths: Sequence[str | Path],
        view: str,
        batch_size: int = 128,
        num_workers: int | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> EmbedResult:
        """Embed image files in order; unreadable ones become NaN rows plus an error naming the file."""
        start = time.perf_counter()
        loader = make_loader(
            paths,
            view,
            self.spec.img_size,
            batch_size,
            loader_workers(num_workers),
            pin_memory=self.device.type == "cuda",
        )
        index_parts: list[torch.Tensor] = []
        feature_parts: list[torch.Tensor] = []
        errors: dict[int, str] = {}
        with child_processes_allowed():
            batches = iter(loader)  # starts the loader's worker processes
        for batch in batches:
            errors.update(batch.errors)
            if len(batch.index):
                feature_parts.append(self.embed_pixels(batch.pixels))
                index_parts.append(batch.index)
            if on_batch is not None:
                on_batch(len(batch.index) + len(batch.errors))
        out = np.full((len(paths), self.dim), np.nan, dtype=np.float16)
        if feature_parts:
            # One device-to-host copy per shard: the GPU never waits on a per-batch sync.
            feats = torch.cat(feature_parts).to(torch.float16).cpu().numpy()
            out[torch.cat(index_parts).numpy()] = feats
        return EmbedResult(out, errors, time.perf_counter() - start)


_lock = threading.Lock()
_loaded: dict[EncoderSpec, Encoder] = {}


def get_encoder(spec: EncoderSpec) -> Encoder:
    """The process's encoder for ``spec``, built on first use; one model per process (GPU memory)."""
    with _lock:
        encoder = _loaded.get(spec)
        if encoder is None:
            if _loaded:
                log.info("unloading %d encoder(s) to load %s", len(_loaded), spec.model_name)
                _loaded.clear()
            log.info("loading retrieval encoder %s (checkpoint %s)", spec.model_name, spec.checkpoint)
            encoder = _loaded[spec] = Encoder(spec)
        return encoder
