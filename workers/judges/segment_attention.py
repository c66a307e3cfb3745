"""Attention within segments of one long sequence, as one batched call per segment length.

Qwen2.5-VL's vision tower attends within windows (and, in four blocks, within whole images): in
transformers, without flash-attention, that is a Python loop of one attention call per window,
about 170 calls per block for a 2048x1024 panorama. Segments of equal length are gathered into
one batch instead (windows of an image are mostly of one size), so a block makes one call per
distinct length, with no padding and so no masking: the same arithmetic, in a few large kernels.
``install`` puts this into a loaded Qwen2.5-VL vision tower; ``uninstall`` restores the original.
"""

from __future__ import annotations

import functools
import sys
import weakref
from typing import Any

import torch
import torch.nn.functional as F

# One vision-tower pass hands the same boundary tensor to its 28 windowed blocks (and another to its
# 4 full-attention ones): the grouping is worked out once per tensor, not once per block (each
# costs a device-to-host copy that stalls the GPU). Entries go with their tensor (a weak reference).
_GROUPS: dict[int, tuple[weakref.ref, list[tuple[int, int, torch.Tensor]]]] = {}


def _forget(ref: weakref.ref, key: int) -> None:
    if _GROUPS.get(key, (None,))[0] is ref:
        del _GROUPS[key]


def segment_groups(cu_seqlens: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
    """``(segments, length, token index)`` per distinct segment length of ``cu_seqlens``."""
    key = id(cu_seqlens)
    entry = _GROUPS.get(key)
    if entry is not None and entry[0]() is cu_seqlens:
        return entry[1]
    bounds = cu_seqlens.tolist()
    by_length: dict[int, list[int]] = {}
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end > start:
            by_length.setdefault(end - start, []).append(start)
    device = cu_seqlens.device
    groups = [
        (
            len(starts),
            length,
            (torch.tensor(starts, device=device)[:, None] + torch.arange(length, device=device)).reshape(-1),
        )
        for length, starts in by_length.items()
    ]
    _GROUPS[key] = (weakref.ref(cu_seqlens, lambda ref, key=key: _forget(ref, key)), groups)
    return groups


def segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
) -> torch.Tensor:
    """Bidirectional attention within each segment ``cu_seqlens[i]:cu_seqlens[i+1]``.

    Args:
        q, k, v: [tokens, heads, head_dim].
        cu_seqlens: cumulative segment boundaries, starting at 0 and ending at ``tokens``.
    Returns:
        [tokens, heads, head_dim]: each token attends to the tokens of its own segment only.
    """
    out = torch.empty_like(q)
    for n, length, flat in segment_groups(cu_seqlens):
        # [segments, heads, length, head_dim] per tensor: one attention call for the group.
        gather = [t.index_select(0, flat).view(n, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v)]
        res = F.scaled_dot_product_attention(*gather, scale=scale)
        out.index_copy_(0, flat, res.transpose(1, 2).reshape(n * length, *q.shape[1:]))
    return out


def _forward(attn: Any, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, *args: Any, **kwargs: Any):
    """Qwen2_5_VLVisionAttention.forward with the per-window loop replaced (same signature)."""
    module = sys.modules[type(attn).__module__]
    position_embeddings = kwargs.get("position_embeddings")
    if position_embeddings is None:  # the third positional argument in transformers 5.x
        position_embeddings = args[0]
    n = hidden_states.shape[0]
    q, k, v = attn.qkv(hidden_states).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = module.apply_rotary_pos_emb_vision(q, k, cos, sin)
    out = segment_attention(q, k, v, cu_seqlens, attn.scaling)
    return attn.proj(out.reshape(n, -1))


def install(visual: Any) -> bool:
    """Batch the window attention of every block of a Qwen2.5-VL vision tower.

    Returns False (and changes nothing) where the tower already runs variable-length
    flash-attention, which needs no loop.
    """
    impl = getattr(visual.config, "_attn_implementation", None) or ""
    if "flash" in impl:
        return False
    for block in visual.blocks:
        block.attn.forward = functools.partial(_forward, block.attn)
    return True


def uninstall(visual: Any) -> None:
    """Back to transformers' own attention (the benchmarks time the paper's way with it)."""
    for block in visual.blocks:
        block.attn.__dict__.pop("forward", None)


def installed(visual: Any) -> bool:
    return all("forward" in block.attn.__dict__ for block in visual.blocks)
