"""Exact nearest-neighbour helpers: faiss ``IndexFlatL2`` (SPADE) and a pruned exact search of a fixed bank (PatchCore).

faiss returns squared L2 distances; these helpers return Euclidean distances (``sqrt`` of the squared distance,
clamped at 0 against the rounding of faiss' ``|x|^2 + |y|^2 - 2 x.y`` formulation) and int64 indices.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch

LB_SLACK = 1e-5  # lower bounds lowered by this fraction of |x|^2 + |y|^2 (float32 GEMM rounding is ~1e-7)
RESIDUAL_SLACK = 1e-4  # residual norms rounded up: r^2 + this fraction of |x|^2
TIE_MARGIN = 1e-5  # relative: upper bounds and near-ties (float32 sums of squares are exact to ~1e-7)


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


def _ptr(a: np.ndarray):
    return faiss.swig_ptr(a)


def pairwise_l2sqr(x: np.ndarray, x_rows: np.ndarray, y: np.ndarray, y_rows: np.ndarray) -> np.ndarray:
    """Squared L2 distances (n,) float32 between rows ``x[x_rows[i]]`` and ``y[y_rows[i]]``, summed from the
    differences (faiss ``pairwise_indexed_L2sqr``: no cancellation). All arrays C-contiguous, rows int64."""
    out = np.empty(len(x_rows), dtype=np.float32)
    faiss.pairwise_indexed_L2sqr(x.shape[1], len(x_rows), _ptr(x), _ptr(x_rows), _ptr(y), _ptr(y_rows), _ptr(out))
    return out


def tree_order(z: torch.Tensor, leaf: int) -> torch.Tensor:
    """Row order of ``z`` (N, k) along a principal-axis tree: each node is split at a multiple of ``leaf`` rows along
    its widest coordinate, so consecutive runs of ``leaf`` rows are close together (only the last run is shorter)."""
    out, stack = [], [torch.arange(z.shape[0])]
    while stack:
        node = stack.pop()
        if node.numel() <= leaf:
            out.append(node)
            continue
        sub = z[node]
        node = node[sub[:, int(sub.var(dim=0).argmax())].argsort()]
        left = leaf * -(-node.numel() // (2 * leaf))
        stack += [node[left:], node[:left]]
    return torch.cat(out)


class NearestBank:
    """Exact nearest row of a fixed bank (M, D) for many queries, pruned by a PCA lower bound.

    Built once: the top ``components`` principal directions ``P`` of the centred bank (float64 ``eigh`` of the
    float32 Gram matrix; any orthonormal ``P`` keeps the bound valid), each row's
    projection ``P^T y`` and an upper bound ``r_y`` of its residual norm ``|(I - P P^T) y|``; the rows are reordered
    along a principal-axis tree (``tree_order``) into runs of ``leaf`` neighbouring rows. Per block of queries:

    - lower bound of every squared distance, one GEMM of the augmented vectors ``[P^T x, r_x]``:
      ``LB = |x|^2 + |y|^2 - 2 (P^T x . P^T y + r_x r_y) <= |x - y|^2`` (Cauchy-Schwarz on the residuals; residual
      norms are rounded up by ``1e-4 |x|^2``, and ``LB`` is lowered by ``1e-5 (|x|^2 + |y|^2)``, far above the
      float32 rounding of the GEMM);
    - an upper bound ``U``: the exact distance to the row of smallest ``LB``;
    - candidates: rows with ``LB <= U (1 + 1e-5)``, found run by run (runs whose smallest ``LB`` exceeds ``U`` are
      skipped); the true nearest row is always among them;
    - exact squared distances of the candidates summed from the differences (faiss, float32, no cancellation); the
      minimum wins. Candidates within ``1e-5`` (relative) of it are re-scored in float64 and the smallest distance,
      then the smallest bank index, wins (a brute-force ``argmin``'s choice).

    Distances are relative to the float32 rows; returned distances carry the float32 rounding of a sum of squares
    (relative error ~1e-7), not the cancellation of ``|x|^2 + |y|^2 - 2 x.y``.
    """

    def __init__(self, bank: torch.Tensor, components: int = 128, leaf: int = 32, block: int = 256) -> None:
        bank = bank.detach().cpu().to(torch.float32).contiguous()
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise ValueError(f"nearest-neighbour bank must be a non-empty (M, D) matrix, got shape {tuple(bank.shape)}")
        m, d = bank.shape
        self.centre = bank.mean(dim=0, dtype=torch.float64).to(torch.float32)
        centred = bank - self.centre
        k = max(1, min(int(components), d, m))
        # any orthonormal basis keeps the bound valid: a float32 Gram matrix is precise enough to pick the directions
        _, vecs = torch.linalg.eigh((centred.T @ centred).double())
        self.basis = vecs[:, -k:].flip(1).to(torch.float32).contiguous()  # (D, k), largest variance first
        proj = centred @ self.basis
        self.order = tree_order(proj, leaf)
        self.bank = bank[self.order].contiguous()
        self._bank_np = self.bank.numpy()
        proj, sq = proj[self.order], centred[self.order].double().square_().sum(dim=1)
        del centred
        resid = self._residual_bound(sq, proj)
        runs = -(-m // leaf)
        pad = runs * leaf - m  # padding rows: LB = +inf, never candidates
        aug = torch.cat([torch.cat([proj, resid.unsqueeze(1)], dim=1), torch.zeros(pad, k + 1)])
        self.aug_t = aug.T.contiguous()  # (k + 1, runs * leaf)
        self.lb_sq = torch.cat([((1 - LB_SLACK) * sq).float(), torch.full((pad,), float("inf"))]).unsqueeze(0)
        self.leaf, self.runs, self.block = int(leaf), runs, int(block)
        self.last_candidates = 0  # candidates per query of the last search (diagnostics)

    @staticmethod
    def _residual_bound(sq: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
        """Upper bound (float32) of the residual norms from float64 squared norms and the float32 projections."""
        r2 = sq - proj.double().square().sum(dim=1) + RESIDUAL_SLACK * sq
        return r2.clamp_(min=0).sqrt_().to(torch.float32)

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared L2 distance (Q,) float64 to the nearest bank row and its index (Q,) int64."""
        q = queries.detach().cpu().to(torch.float32).contiguous()
        if q.ndim != 2 or q.shape[1] != self.bank.shape[1]:
            raise ValueError(f"queries must be (Q, {self.bank.shape[1]}), got shape {tuple(q.shape)}")
        n = q.shape[0]
        xc = q - self.centre
        sq = xc.square().sum(dim=1).double()
        proj = xc @ self.basis
        del xc
        aug = torch.cat([proj, self._residual_bound(sq, proj).unsqueeze(1)], dim=1)
        x_lb = ((1 - LB_SLACK) * sq).float()
        d2 = torch.empty(n, dtype=torch.float64)
        idx = torch.empty(n, dtype=torch.int64)
        q_np = q.numpy()
        total = 0
        for i in range(0, n, self.block):
            rows = slice(i, min(i + self.block, n))
            total += self._block(q_np, i, aug[rows], x_lb[rows], d2[rows], idx[rows])
        self.last_candidates = total / max(n, 1)
        return d2, idx

    def _block(self, q_np, start, aug, x_lb, d2_out, idx_out) -> int:
        """Nearest rows of queries ``start ..`` of ``q_np`` (see the class); writes d2 and original indices."""
        nb, leaf = aug.shape[0], self.leaf
        lb = torch.addmm(self.lb_sq, aug, self.aug_t, alpha=-2).view(nb, self.runs, leaf)  # LB minus |x|^2 terms
        run_min = lb.amin(dim=2)
        r = torch.arange(nb)
        best_run = run_min.argmin(dim=1)
        first = best_run * leaf + lb[r, best_run].argmin(dim=1)
        q_rows = (r + start).numpy()
        upper = torch.from_numpy(pairwise_l2sqr(q_np, q_rows, self._bank_np, first.numpy()))
        thr = upper.mul_(1 + TIE_MARGIN).sub_(x_lb)
        cq, cr = (run_min <= thr.unsqueeze(1)).nonzero(as_tuple=True)  # candidate runs per query
        p, s = (lb[cq, cr] <= thr[cq].unsqueeze(1)).nonzero(as_tuple=True)
        qi, cj = cq[p], cr[p] * leaf + s
        gq = (qi + start).numpy()
        dist = torch.from_numpy(pairwise_l2sqr(q_np, gq, self._bank_np, cj.numpy()))
        dmin = torch.full((nb,), float("inf")).scatter_reduce_(0, qi, dist, "amin")
        near = dist <= dmin[qi] * (1 + TIE_MARGIN)
        a, j = qi[near], cj[near]
        if a.numel() == nb:  # one candidate per query within the rounding margin: the winner
            d2_out[a] = dist[near].double()
            idx_out[a] = self.order[j]
            return qi.numel()
        dd = torch.sum((torch.from_numpy(q_np[gq[near.numpy()]]) - self.bank[j]).double().square_(), dim=1)
        best = torch.full((nb,), float("inf"), dtype=torch.float64).scatter_reduce_(0, a, dd, "amin")
        orig = torch.where(dd == best[a], self.order[j], torch.iinfo(torch.int64).max)
        d2_out.copy_(best)
        idx_out.copy_(torch.full((nb,), torch.iinfo(torch.int64).max).scatter_reduce_(0, a, orig, "amin"))
        return qi.numel()
