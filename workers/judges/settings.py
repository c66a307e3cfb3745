"""A VLM worker's settings: where and how it runs its model, and how much it may cache.

These belong to the GPU and the process, not to a run, so they come from the environment
(``CVGL_VLM_*``), overridable by arguments. No model here; torch only to ask for a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

DEVICE_ENV = "CVGL_VLM_DEVICE"  # "cuda", "cuda:1", "cpu"; default: cuda when available
DTYPE_ENV = "CVGL_VLM_DTYPE"  # "bfloat16", "float16", "float32"; default: bf16 on GPU, fp32 on CPU
BATCH_SIZE_ENV = "CVGL_VLM_BATCH_SIZE"  # judgments per forward pass
REUSE_ENV = "CVGL_VLM_REUSE"  # "1": feature cache + prefix key-value caches; "0": plain batches
FEATURE_CACHE_ENV = "CVGL_VLM_FEATURE_CACHE_MB"  # bound of the vision-feature cache
PREFIX_CACHE_ENV = "CVGL_VLM_PREFIX_CACHE_MB"  # bound of the prefix key-value cache
LOADER_THREADS_ENV = "CVGL_VLM_LOADER_THREADS"  # threads decoding and preprocessing images

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Forward passes of 16 rows fill a 7B model's matrix units on a GPU; 8 keep a CPU responsive.
DEFAULT_BATCH_SIZE = {"cpu": 8, "cuda": 16}
# Cache bounds in MiB when none is set. On a GPU, shares of the memory free after the model
# loaded: the rest is left to the forward passes (a batch's gathered prefixes, activations).
CPU_CACHE_MB = {"features": 2048.0, "prefix": 2048.0}
GPU_CACHE_SHARE = {"features": 0.08, "prefix": 0.55}


def _env_float(name: str) -> float | None:
    raw = os.environ.get(name, "").strip()
    if not raw or raw.lower() == "auto":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of MiB or 'auto', got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {raw!r}")
    return value


@dataclass(frozen=True)
class VLMSettings:
    """Resolved settings. ``None`` cache bounds mean "size from the device once the model is loaded"."""

    device: str
    dtype: str
    batch_size: int
    reuse: bool
    feature_cache_mb: float | None
    prefix_cache_mb: float | None
    loader_threads: int

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @classmethod
    def resolve(
        cls,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | None = None,
        reuse: bool | None = None,
        feature_cache_mb: float | None = None,
        prefix_cache_mb: float | None = None,
        loader_threads: int | None = None,
    ) -> VLMSettings:
        """Arguments win over the CVGL_VLM_* environment, which wins over the defaults."""
        device = (
            device
            or os.environ.get(DEVICE_ENV, "").strip()
            or ("cuda" if torch.cuda.is_available() else "cpu")
        )
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} asked for, but torch sees no CUDA GPU")
        on_gpu = device.startswith("cuda")
        dtype = dtype or os.environ.get(DTYPE_ENV, "").strip() or ("bfloat16" if on_gpu else "float32")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if batch_size is None:
            raw = os.environ.get(BATCH_SIZE_ENV, "").strip()
            batch_size = int(raw) if raw else DEFAULT_BATCH_SIZE["cuda" if on_gpu else "cpu"]
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        if reuse is None:
            reuse = os.environ.get(REUSE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
        if feature_cache_mb is None:
            feature_cache_mb = _env_float(FEATURE_CACHE_ENV)
        if prefix_cache_mb is None:
            prefix_cache_mb = _env_float(PREFIX_CACHE_ENV)
        if loader_threads is None:
            raw = os.environ.get(LOADER_THREADS_ENV, "").strip()
            loader_threads = int(raw) if raw else min(8, os.cpu_count() or 1)
        if loader_threads < 1:
            raise ValueError(f"loader threads must be at least 1, got {loader_threads}")
        return cls(
            device,
            dtype,
            int(batch_size),
            bool(reuse),
            feature_cache_mb,
            prefix_cache_mb,
            int(loader_threads),
        )

    def cache_bytes(self, which: str, free_bytes: int | None) -> int:
        """The bound of cache ``which`` ("features" or "prefix") in bytes.

        Set explicitly: that many MiB. Otherwise on a GPU a share of ``free_bytes`` (the memory
        free after loading the model), on the CPU a fixed size.
        """
        set_mb = self.feature_cache_mb if which == "features" else self.prefix_cache_mb
        if set_mb is not None:
            return int(set_mb * 2**20)
        if self.on_gpu and free_bytes is not None:
            return int(GPU_CACHE_SHARE[which] * free_bytes)
        return int(CPU_CACHE_MB[which] * 2**20)
