"""Exact nearest-neighbour helpers on faiss (``IndexFlatL2``) shared by SPADE and PatchCore.

faiss returns squared L2 distances; these helpers return Euclidean distances (``sqrt`` of the squared distance,
clamped at 0 against the rounding of faiss' ``|x|^2 + |y|^2 - 2 x.y`` formulation) and int64 indices.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch


def as_f32(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """C-contiguous float32 numpy view/copy of a 2-D tensor or array (what faiss accepts)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float32).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def flat_l2_index(base: torch.Tensor | np.ndarray) -> faiss.IndexFlatL2:
    """Exact L2 index holding the rows of ``base`` (N, D)."""
    base = as_f32(base)
    if base.ndim != 2 or base.shape[0] == 0:
        raise ValueError(f"nearest-neighbour base must be a non-empty (N, D) matrix, got shape {base.shape}")
    index = faiss.IndexFlatL2(base.shape[1])
    index.add(base)
    return index


def search(index: faiss.Index, queries: torch.Tensor | np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``k`` nearest rows of ``index`` for each query: Euclidean distances (Q, k) float32 and indices (Q, k) int64,
    nearest first."""
    q = as_f32(queries)
    if q.ndim != 2 or q.shape[1] != index.d:
        raise ValueError(f"queries must be (Q, {index.d}), got shape {q.shape}")
    k = int(k)
    if not 1 <= k <= index.ntotal:
        raise ValueError(f"k={k} must be between 1 and the number of indexed rows ({index.ntotal})")
    d2, idx = index.search(q, k)
    return np.sqrt(np.maximum(d2, 0.0)), idx.astype(np.int64, copy=False)


def knn(base: torch.Tensor | np.ndarray, queries: torch.Tensor | np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One-shot exact search: build an ``IndexFlatL2`` on ``base`` and query it (see ``search``)."""
    return search(flat_l2_index(base), queries, k)
