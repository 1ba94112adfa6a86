"""Exact nearest-neighbour helpers: faiss ``IndexFlatL2`` (SPADE) and a torch GEMM search of a fixed bank (PatchCore).

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


class NearestBank:
    """Exact nearest row of a fixed bank (M, D) for many queries, in torch: one GEMM per block of queries against the
    centred bank (``|b|^2 - 2 q.b``) and an argmin, then the winner's squared distance recomputed from the difference
    ``q - b`` (float64 sum), so scores carry no cancellation error of the GEMM formulation."""

    def __init__(self, bank: torch.Tensor, block: int = 512) -> None:
        self.bank = bank.detach().to(torch.float32).contiguous()
        self.centre = self.bank.mean(dim=0)
        self.centred = (self.bank - self.centre).contiguous()
        self.sq_norms = self.centred.square().sum(dim=1)
        self.block = int(block)

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared L2 distance (Q,) float64 to the nearest bank row and its index (Q,) int64."""
        q = queries.detach().to(torch.float32)
        if q.ndim != 2 or q.shape[1] != self.bank.shape[1]:
            raise ValueError(f"queries must be (Q, {self.bank.shape[1]}), got shape {tuple(q.shape)}")
        n = q.shape[0]
        idx = torch.empty(n, dtype=torch.int64)
        d2 = torch.empty(n, dtype=torch.float64)
        scores = torch.empty(min(self.block, n), self.bank.shape[0])
        for i in range(0, n, self.block):
            rows = q[i : i + self.block]
            out = scores[: rows.shape[0]]
            torch.addmm(self.sq_norms.unsqueeze(0), rows - self.centre, self.centred.T, alpha=-2, out=out)
            torch.argmin(out, dim=1, out=idx[i : i + rows.shape[0]])
            diff = rows - self.bank[idx[i : i + rows.shape[0]]]
            torch.sum(diff.double().square_(), dim=1, out=d2[i : i + rows.shape[0]])
        return d2, idx
