"""Shared feature helpers: fusing per-layer maps into one embedding and random channel selection (Rd)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

DEFAULT_RD_SEED = 1024
RD_SCHEMES = ("reference", "torch")  # how rd_indices draws channels; see its docstring
DEFAULT_RD_SCHEME = "reference"


@dataclass(frozen=True)
class LayerInfo:
    """One feature layer as the extractor returns it for a given input size: module name, channels, stride and the
    (h, w) grid of its map. Built once by the extractor; methods receive these records with the maps."""

    name: str
    channels: int
    stride: int | None
    grid: tuple[int, int]

    def as_dict(self) -> dict:
        return {**asdict(self), "grid": list(self.grid)}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerInfo":
        return cls(str(d["name"]), int(d["channels"]), None if d.get("stride") is None else int(d["stride"]),
                   (int(d["grid"][0]), int(d["grid"][1])))


def describe_maps(maps: Sequence[torch.Tensor], names: Sequence[str] | None = None) -> tuple[LayerInfo, ...]:
    """Layer records read off one batch of maps (B, C, h, w) when no extractor described them (stride unknown)."""
    if not maps:
        raise ValueError("feature batch holds no layer")
    out = []
    for i, m in enumerate(maps):
        if m.ndim != 4:
            raise ValueError(f"feature map {i}: expected (B, C, h, w), got shape {tuple(m.shape)}")
        out.append(LayerInfo(names[i] if names else f"layer{i}", int(m.shape[1]), None,
                             (int(m.shape[2]), int(m.shape[3]))))
    return tuple(out)


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


def rd_indices(total: int, d: int | None, seed: int = DEFAULT_RD_SEED,
               scheme: str = DEFAULT_RD_SCHEME) -> torch.Tensor | None:
    """Indices (LongTensor) of ``d`` of ``total`` channels drawn without replacement with ``seed``.

    ``scheme="reference"``: the PaDiM reference code's draw, ``random.seed(seed); random.sample(range(total), d)``,
    in its order (unsorted), from a private ``random.Random`` (the global random state is left alone).
    ``scheme="torch"``: ``torch.randperm`` with a seeded generator, first ``d``, sorted (adspine's earlier draw).
    Returns None when no reduction applies (``d`` is None or >= ``total``), so callers keep every channel.
    """
    if scheme not in RD_SCHEMES:
        raise ValueError(f"Rd scheme {scheme!r} is unknown; valid schemes: {', '.join(RD_SCHEMES)}")
    if d is None or d >= total:
        return None
    if d <= 0:
        raise ValueError(f"Rd dimension must be positive, got d={d}")
    if scheme == "reference":
        return torch.tensor(random.Random(int(seed)).sample(range(total), d), dtype=torch.long)
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(total, generator=gen)[:d].sort().values
