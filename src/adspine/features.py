"""Shared feature helpers: fusing per-layer maps into one embedding and random channel selection (Rd)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

DEFAULT_RD_SEED = 1024


def fuse(maps: Sequence[torch.Tensor], mode: str = "nearest") -> torch.Tensor:
    """Upsample every map to the first map's grid and concatenate along channels.

    ``maps`` are (B, C_i, H_i, W_i) tensors ordered shallow to deep; the result is (B, sum C_i, H_0, W_0).
    """
    if not maps:
        raise ValueError("fuse() needs at least one feature map")
    size = maps[0].shape[-2:]
    out = [maps[0]]
    for m in maps[1:]:
        if m.shape[-2:] != size:
            kwargs = {} if mode == "nearest" else {"align_corners": False}
            m = F.interpolate(m, size=size, mode=mode, **kwargs)
        out.append(m)
    return torch.cat(out, dim=1)


def rd_indices(total: int, d: int | None, seed: int = DEFAULT_RD_SEED) -> torch.Tensor | None:
    """Indices of ``d`` channels drawn without replacement from ``total`` with ``seed`` (sorted).

    Returns None when no reduction applies (``d`` is None or >= ``total``), so callers keep every channel.
    """
    if d is None or d >= total:
        return None
    if d <= 0:
        raise ValueError(f"Rd dimension must be positive, got d={d}")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(total, generator=gen)[:d].sort().values
