"""Exact nearest-neighbour helpers: faiss ``IndexFlatL2`` (SPADE) and a pruned exact search of a fixed bank (PatchCore).

faiss returns squared L2 distances; these helpers return Euclidean distances (``sqrt`` of the squared distance,
clamped at 0 against the rounding of faiss' ``|x|^2 + |y|^2 - 2 x.y`` formulation) and int64 indices.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from adspine.methods import screen as screening
from adspine.methods.threads import map_one_thread_each

PRECISIONS = ("float32", "bfloat16")  # of NearestBank's lower-bound GEMM
BF16_WIDTH = 256  # bfloat16 rows: components + 4 (ResNet-18's 1024-d bank: 256 beat 128, 192 and 320)
BLOCK_BYTES = 32 * 2**20  # queries per block: as many as keep a block's bound GEMM output under this (ResNet-18's
# 3,136-row bank: bfloat16 5,040 queries, 4,096 ran 1.2x faster than 1,024; float32 2,650, 2,048 1.25x faster than 256)
BAND = 256  # bfloat16 mode: rows sorted by norm share the bound's max |y| in bands of this many (whole tiles)
BANK_REL = 2.0**-30  # the bank's float64 projection and residuals: error below this times |y|^2 (D sqrt(k) < 2^20)
FALLBACK_ROWS = 4096  # bank rows per chunk of the exact float64 search (queries the bound did not certify)


def proj_error(width: int, k: int, norm):
    """Worst-case error norm of a float32 product ``v @ basis`` (``width`` terms per entry; ``basis``: ``k``
    float32-rounded orthonormal columns) against the exact orthonormal projection, for ``|v| <= norm``: each entry
    errs by ``gamma_width sum_i |v_i| |P_ij|`` (Higham) and the rounded basis by ``2^-24 |P_ij|``; the norm of
    ``|v| |P|`` is at most ``|v| |P|_F = |v| sqrt(k)``."""
    return (screening.gamma(width) + screening.U32) * k**0.5 * (1 + screening.U32) * norm


def distance_rel(d: int) -> float:
    """Relative error bound of a float32 squared distance summed from the differences of ``d`` coordinates (faiss
    ``pairwise_indexed_L2sqr``): one rounding of each difference, one of each square, ``d - 1`` additions."""
    return screening.gamma(d + 2)


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

    Built once: the top ``components`` principal directions ``Q`` of the centred bank (float64 ``eigh`` of the
    float32 Gram matrix; any orthonormal ``Q`` keeps the bound valid), each row's projection ``Q^T y`` and an upper
    bound ``r_y`` of its residual norm ``|(I - Q Q^T) y|``, both in float64 (float32 only at the end). For a block of
    queries, the lower bound of every squared distance comes from one GEMM of the augmented vectors ``[p_x, r_x]``:
    ``LB = |x|^2 + |y|^2 - 2 (Q^T x . Q^T y + r_x r_y) <= |x - y|^2`` (Cauchy-Schwarz on the residuals; ``x``, ``y``
    centred). Every rounding is bounded worst-case, none is a margin (derivation: docs/methods.md, "Error bounds of
    the searches"): the queries' float32 projection ``p_x`` errs by at most ``gamma_x`` (``proj_error``), which
    raises ``r_x`` and widens the bound by ``2 gamma_x |p_y|``; the float32 sums of squares by ``distance_rel``;
    the GEMM as in ``screen.bound_coefficients``. Then:

    - an upper bound ``U``: the exact distance to the row of smallest ``LB``, raised by its rounding bound;
    - candidates: rows whose lowered ``LB`` is at most ``U``; the true nearest row is always among them;
    - exact squared distances of the candidates summed from the differences (faiss, float32, no cancellation); the
      minimum wins. Candidates within the float32 rounding bound of it are re-scored in float64 and the smallest
      distance, then the smallest bank index, wins (a brute-force ``argmin``'s choice).
    - a query the bound does not certify (no candidate, or a winner farther than ``U``: impossible while the bounds
      hold) is searched exactly in float64 over the whole bank (``last_fallback`` counts them).

    Non-finite queries are not searched: their distance is +inf (NaN where a coordinate is NaN) and their index 0,
    as a float64 brute force gives, and other queries are unaffected. A bank with NaN or inf raises ``ValueError``.
    float64 banks and queries are cast to float32 (recorded in ``cast``): distances are those of the float32 rows.

    Two ways to compute ``LB`` (``precision``; ``"auto"``: bfloat16 where ``screen.fast_bf16()``):

    - ``"float32"``: 128 components by default; rows ordered along a principal-axis tree (``tree_order``) into runs
      of ``leaf`` neighbouring rows, runs whose smallest ``LB`` exceeds ``U`` are skipped. The GEMM's own rounding
      and the projection terms enter through one more column (``[p_x, r_x, c_x] . [p_y, r_y, |a_y|]``).
    - ``"bfloat16"`` (AMX): ``BF16_WIDTH - 4`` components by default, the GEMM in bfloat16 as in
      ``screen.GalleryScreen`` (rows ``[-2 p_y, -2 r_y, |y|^2_hi, |y|^2_lo, 1]``, queries
      ``[p_x, r_x, 1, 1, |x|^2_hi]``), its rounding bounded by ``u |D| + E`` (``screen.bound_coefficients``, with
      the maxima of ``|y|`` over bands of ~``BAND`` rows sorted by norm); ``U`` comes from the row of smallest ``D``,
      tiles of ``leaf`` rows whose smallest ``D`` is too large are skipped, and rows with ``D - u |D| - E <= U`` are
      the candidates. bfloat16 GEMMs run ~4x faster than float32 ones on AMX, so more components are affordable
      and fewer candidates remain. Here the projection is one uncentred GEMM ``x P - centre P`` (or the caller's,
      e.g. computed per layer at a coarser grid: ``search(..., proj=, proj_err=)`` with ``proj_err`` a worst-case
      bound of each row's error norm).
    """

    def __init__(self, bank: torch.Tensor, components: int | None = None, leaf: int = 32, block: int | None = None,
                 precision: str = "auto") -> None:
        self.cast = "float64 -> float32" if bank.dtype == torch.float64 else None
        bank = bank.detach().cpu().to(torch.float32).contiguous()
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise ValueError(f"nearest-neighbour bank must be a non-empty (M, D) matrix, got shape {tuple(bank.shape)}")
        bad = (~torch.isfinite(bank).all(dim=1)).nonzero()
        if bad.numel():
            raise ValueError(f"nearest-neighbour bank row {int(bad[0])} holds NaN or inf")
        if precision not in ("auto", *PRECISIONS):
            raise ValueError(f"precision must be auto, {' or '.join(PRECISIONS)}, got {precision!r}")
        if precision == "auto":
            precision = "bfloat16" if screening.fast_bf16() else "float32"
        self.precision = precision
        bf16 = precision == "bfloat16"
        m, d = bank.shape
        self.leaf = int(leaf)
        out_bytes = 2 * (m + BAND) if bf16 else 4 * (m + leaf)  # GEMM output per query: int16 or float32 per row
        self.block = int(block or max(256, BLOCK_BYTES // out_bytes))
        self.centre = bank.mean(dim=0, dtype=torch.float64).to(torch.float32)
        centred = bank.double() - self.centre.double()  # exact in float64
        if components is None:
            components = BF16_WIDTH - 4 if bf16 else 128
        k = max(1, min(int(components), d, m))
        # any orthonormal basis keeps the bound valid: a float32 Gram matrix is precise enough to pick the directions
        c32 = centred.float()
        _, vecs = torch.linalg.eigh((c32.T @ c32).double())
        del c32
        q64 = vecs[:, -k:].flip(1).contiguous()  # (D, k) orthonormal in float64, largest variance first
        self.basis = q64.to(torch.float32)  # what the queries are multiplied by (its rounding: in ``proj_error``)
        proj64 = centred @ q64
        sq = centred.square_().sum(dim=1)
        del centred
        r2 = (sq - proj64.square().sum(dim=1)).clamp_(min=0) + BANK_REL * sq
        resid = _round_up(r2.sqrt_())
        proj = proj64.to(torch.float32)  # errs by 2^-24 |p_y| (rho of the bank's side)
        self.order = sq.argsort() if bf16 else tree_order(proj, leaf)
        self.bank = bank[self.order].contiguous()
        self._bank_np = self.bank.numpy()
        self._centre_np = self.centre.view(1, -1).numpy()
        self.centre_proj = self.centre @ self.basis  # (k,): the uncentred projection's offset
        self.centre_norm = float(self.centre.double().norm())
        self.rho_bank = screening.U32 + BANK_REL
        self.eta = distance_rel(d)  # relative error of a float32 squared distance (faiss, from differences)
        proj, sq, resid = proj[self.order], sq[self.order], resid[self.order]
        self.last_candidates = 0.0  # candidates per query of the last search (diagnostics)
        self.last_fallback = 0  # queries of the last search that went to the exact float64 search
        if bf16:
            self._init_bf16(proj, resid, sq)
            return
        runs = -(-m // leaf)
        pad = runs * leaf - m  # padding rows: LB = +inf, never candidates
        norm = _round_up((proj.double().square().sum(dim=1) + resid.double().square()).sqrt() * (1 + BANK_REL))
        aug = torch.cat([torch.cat([proj, resid.unsqueeze(1), norm.unsqueeze(1)], dim=1), torch.zeros(pad, k + 2)])
        self.aug_t = aug.T.contiguous()  # (k + 2, runs * leaf): [p_y, r_y, |a_y|]
        self.acc = screening.gamma(k + 3)  # the bound GEMM: k + 2 products and |y|^2
        lb_sq = _round_down(sq * (1 - self.acc))
        self.lb_sq = torch.cat([lb_sq, torch.full((pad,), float("inf"))]).unsqueeze(0)
        self.runs = runs

    def _init_bf16(self, proj: torch.Tensor, resid: torch.Tensor, sq: torch.Tensor) -> None:
        """bfloat16 rows ``[-2 P^T y, -2 r_y, |y|^2_hi, |y|^2_lo, 1]`` (rows sorted by norm) and per-band maxima."""
        m, k = proj.shape
        self.width = 32 * -(-(k + 4) // 32)
        self.band = self.leaf * max(1, BAND // self.leaf)  # whole tiles of ``leaf`` rows
        self.bands = -(-m // self.band)
        pad = self.bands * self.band - m
        aug = torch.zeros(self.bands * self.band, self.width, dtype=torch.bfloat16)
        aug[:m, :k] = (-2.0 * proj).to(torch.bfloat16)
        aug[:m, k] = (-2.0 * resid).to(torch.bfloat16)
        hi, lo = screening.split_bf16(sq)
        aug[:m, k + 1], aug[:m, k + 2], aug[:m, k + 3] = hi, lo, 1.0
        aug[m:, k + 1] = 1e30  # padding rows: D = 1e30, never a candidate
        self.aug = aug  # (bands * band, width)
        norm = (proj.double().square().sum(dim=1) + resid.double().square()).sqrt()  # |[p_y, r_y]|
        self.band_norm = F.pad(norm, (0, pad)).view(self.bands, self.band).amax(dim=1) * (1 + BANK_REL)
        self.band_sq = F.pad(sq, (0, pad)).view(self.bands, self.band).amax(dim=1)

    @staticmethod
    def _residual_bound(sq: torch.Tensor, proj_sq: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """Upper bound (float32, rounded up) of the queries' residual norms from an upper bound ``sq`` of their
        squared norms, their float32 projections' squared norms (float64 sums) and each projection's error bound
        ``gamma``: ``|Q^T x| >= |p| - gamma``, so ``r^2 <= sq - |p|^2 + gamma (2 |p| + gamma)``."""
        r2 = sq - proj_sq * (1 - screening.F64_REL) + gamma * (2 * proj_sq.sqrt() + gamma)
        return _round_up(r2.clamp_(min=0).sqrt_())

    def search(self, queries: torch.Tensor, proj: torch.Tensor | None = None,
               proj_err: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared L2 distance (Q,) float64 to the nearest bank row and its index (Q,) int64.

        ``proj`` (Q, k), optional: the caller's ``(queries - centre) @ basis`` with ``proj_err`` a worst-case bound
        of each row's error norm against the exact orthonormal projection (bfloat16 mode uses it; float32 mode
        projects itself)."""
        q = queries.detach().cpu().to(torch.float32).contiguous()
        if q.ndim != 2 or q.shape[1] != self.bank.shape[1]:
            raise ValueError(f"queries must be (Q, {self.bank.shape[1]}), got shape {tuple(q.shape)}")
        n = q.shape[0]
        if proj is not None and tuple(proj.shape) != (n, self.basis.shape[1]):
            raise ValueError(f"proj must be ({n}, {self.basis.shape[1]}), got shape {tuple(proj.shape)}")
        finite = torch.isfinite(q).all(dim=1)
        if not bool(finite.all()):  # searched without the others: +inf (NaN with a NaN coordinate), index 0
            keep = finite.nonzero().flatten()
            d2 = torch.where(q.isnan().any(dim=1), float("nan"), float("inf")).double()
            idx = torch.zeros(n, dtype=torch.int64)
            if keep.numel():
                d2[keep], idx[keep] = self.search(q[keep], None if proj is None else proj[keep], proj_err)
            return d2, idx
        d2 = torch.full((n,), float("nan"), dtype=torch.float64)  # written for every query below
        idx = torch.full((n,), -1, dtype=torch.int64)
        upper = torch.full((n,), float("inf"), dtype=torch.float64)  # each query's certified upper bound
        q_np = q.numpy()
        if self.precision == "bfloat16":
            given = None if proj is None else (proj.detach().to(torch.float32), float(proj_err))
            total = self._search_bf16(q, q_np, d2, idx, upper, given)
        else:
            total = 0
            for i in range(0, n, self.block):  # on the caller's torch threads (Python threads measured no faster)
                j = min(i + self.block, n)
                qi, cj, up = self._candidates_f32(q_np, q[i:j], i)
                upper[i:j] = up
                total += self._exact(q_np, i, qi, cj, d2[i:j], idx[i:j])
        self.last_candidates = total / max(n, 1)
        # certified: the winner is no farther than the upper bound its candidates were screened against
        uncertified = ((idx < 0) | ~(d2 <= upper)).nonzero().flatten()
        self.last_fallback = int(uncertified.numel())
        if self.last_fallback:
            d2[uncertified], idx[uncertified] = self._exhaustive(q[uncertified])
        return d2, idx

    def _exhaustive(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact float64 nearest row (smallest distance, then smallest index) over the whole bank, by chunks."""
        x = q.double()
        best = torch.full((x.shape[0],), float("inf"), dtype=torch.float64)
        arg = torch.zeros(x.shape[0], dtype=torch.int64)
        rank = torch.empty_like(self.order)
        rank[self.order] = torch.arange(self.order.numel())
        for a in range(0, self.bank.shape[0], FALLBACK_ROWS):  # original row order: first index wins ties
            rows = self.order.new_tensor(range(a, min(a + FALLBACK_ROWS, self.bank.shape[0])))
            y = self.bank[rank[rows]].double()
            d2 = (x.square().sum(dim=1, keepdim=True) - 2 * x @ y.T + y.square().sum(dim=1)).clamp_(min=0)
            near = d2 <= d2.amin(dim=1, keepdim=True) * (1 + 1e-9) + 1e-300  # float64 expansion: re-score exactly
            for r in near.any(dim=0).nonzero().flatten().tolist():
                sel = near[:, r].nonzero().flatten()
                exact = (x[sel] - y[r]).square_().sum(dim=1)
                better = exact < best[sel]
                best[sel[better]], arg[sel[better]] = exact[better], a + r
        return best, arg

    def _search_bf16(self, q, q_np, d2, idx, upper, given) -> int:
        """bfloat16 mode of ``search`` (writes ``d2``, ``idx``, ``upper``; returns the number of candidates): blocks
        of queries spread over Python threads that each run single-threaded (measured ~10 % faster than one thread
        pool splitting every op: most ops here are too small to split)."""
        n, threads = q.shape[0], torch.get_num_threads()
        parts = threads * -(-n // (threads * self.block))  # blocks of at most ``block``, a multiple of the threads
        step = -(-n // parts)
        starts = list(range(0, n, step))

        def run(i: int) -> int:
            j = min(i + step, n)
            qi, cj, up = self._candidates_bf16(q_np, q[i:j], i, None if given is None else (given[0][i:j], given[1]))
            upper[i:j] = up
            return self._exact(q_np, i, qi, cj, d2[i:j], idx[i:j])

        if threads == 1 or len(starts) == 1:
            return sum(run(i) for i in starts)
        return sum(map_one_thread_each(run, starts, workers=threads))

    def _upper(self, q_np: np.ndarray, start: int, rows: torch.Tensor) -> torch.Tensor:
        """Upper bounds (float64) of the true squared distances of queries ``start ..`` to the given bank rows (one
        per query): float32 sums of squared differences raised by their rounding bound."""
        d = pairwise_l2sqr(q_np, np.arange(start, start + rows.numel()), self._bank_np, rows.numpy())
        return torch.from_numpy(d).double() * ((1 + self.eta) / (1 - self.eta))

    def _query_terms(self, q_np, q, start, given) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per query: float32 projection ``p_x``, its error bound ``gamma_x``, an upper bound of ``|x - c|^2``
        (float64) and the residual bound ``r_x`` (float32)."""
        nb = q.shape[0]
        sq = torch.from_numpy(pairwise_l2sqr(q_np, np.arange(start, start + nb), self._centre_np,
                                             np.zeros(nb, dtype=np.int64))).double() * (1 + self.eta)
        if given is None:
            proj = torch.addmm(self.centre_proj, q, self.basis, alpha=1, beta=-1)  # x P - c P
            norm = sq.sqrt() + self.centre_norm  # |x| <= |x - c| + |c|
            d = q.shape[1]
            gamma = (proj_error(d, proj.shape[1], norm + self.centre_norm)  # x P and c P
                     + screening.U32 * (sq.sqrt() + proj_error(d, proj.shape[1], norm + self.centre_norm)))
        else:
            proj, gamma = given[0], torch.full((nb,), given[1], dtype=torch.float64)
        proj_sq = proj.double().square().sum(dim=1)
        return proj, gamma, sq, self._residual_bound(sq, proj_sq, gamma)

    def _candidates_f32(self, q_np, q, start) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(block query, bank row) candidate pairs from the float32 bound, run by run, and each query's ``U``."""
        nb, leaf = q.shape[0], self.leaf
        proj, gamma, sq, resid = self._query_terms(q_np, q, start, None)
        a_x = (proj.double().square().sum(dim=1) + resid.double().square()).sqrt()  # |[p_x, r_x]|
        # the GEMM's rounding (gamma |a_x| |a_y|) and the projections' errors, as a third column times |a_y|
        c_x = ((self.acc + self.rho_bank) * a_x + gamma * (1 + self.rho_bank)) / (1 - self.acc)
        aug = torch.cat([proj, resid.unsqueeze(1), _round_up(c_x * screening.inflation(1)).unsqueeze(1)], dim=1)
        lb = torch.addmm(self.lb_sq, aug, self.aug_t, alpha=-2).view(nb, self.runs, leaf)  # LB minus |x|^2 terms
        run_min = lb.amin(dim=2)
        r = torch.arange(nb)
        best_run = run_min.argmin(dim=1)
        upper = self._upper(q_np, start, best_run * leaf + lb[r, best_run].argmin(dim=1))
        thr = _round_up(upper - sq * (1 - 2 * self.eta))  # sq was raised by eta: its lower bound
        cq, cr = (run_min <= thr.unsqueeze(1)).nonzero(as_tuple=True)  # candidate runs per query
        p, s = (lb[cq, cr] <= thr[cq].unsqueeze(1)).nonzero(as_tuple=True)
        return cq[p], cr[p] * leaf + s, upper

    def _candidates_bf16(self, q_np, q, start, given) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(block query, bank row) candidate pairs from the bfloat16 bound (see the class) and each query's ``U``."""
        nb = q.shape[0]
        proj, gamma, sq, resid = self._query_terms(q_np, q, start, given)
        k, rows = proj.shape[1], screening.shape_step(nb)  # queries padded: few GEMM shapes (oneDNN caches each)
        sq32 = sq.to(torch.float32)
        hi = sq32.to(torch.bfloat16)
        aug = torch.zeros(rows, self.width, dtype=torch.bfloat16)
        aug[:nb, :k] = proj
        aug[:nb, k] = resid
        aug[:nb, k + 1 : k + 3] = 1.0
        aug[:nb, k + 3] = hi
        # D + delta_x as (rows, queries), read as int16 (order kept for D >= 0): minima over tiles of ``leaf`` rows
        # then run along the rows' axis, which vectorises (an int16 or bfloat16 minimum along the last axis does not)
        leaf, r = self.leaf, torch.arange(nb)
        tiles = torch.mm(self.aug, aug.T).view(torch.int16).view(-1, leaf, rows)  # (tiles, leaf, padded queries)
        tile_min = tiles.amin(dim=1)[:, :nb]  # (tiles, Q)
        best = tile_min.argmin(dim=0)
        upper = self._upper(q_np, start, best * leaf + tiles[best, :, r].argmin(dim=1))  # any row will do
        norm = (proj.double().square().sum(dim=1) + resid.double().square()).sqrt()  # |[p_x, r_x]|
        c_qg, c_sq, c_q = screening.bound_coefficients(k + 1, self.width, rho=self.rho_bank, sq_terms=q.shape[1] + 2)
        f = screening.inflation(k + 1)
        err = ((c_qg * norm + 2 * f * gamma).unsqueeze(1) * self.band_norm + (c_sq + BANK_REL) * self.band_sq
               + (c_q * sq).unsqueeze(1) + 1e-30)  # (nb, bands); 2 gamma |p_y|: the projection's error
        # a row is a candidate when D (1 - u) <= U + E + delta_x (D >= 0; a negative D always passes: lim >= 0)
        lim = ((upper + hi.double() - sq * (1 - self.eta)).unsqueeze(1) + err) / (1 - screening.U)
        lim = screening.bf16_at_least(lim.clamp_(min=0)).view(torch.int16)  # (Q, bands)
        per_band = self.band // leaf
        band, sub, cq = (tile_min.view(self.bands, per_band, nb) <= lim.T.unsqueeze(1)).nonzero(as_tuple=True)
        ct = band * per_band + sub  # tiles that may hold the nearest row
        p, row = (tiles[ct, :, cq] <= lim[cq, band].unsqueeze(1)).nonzero(as_tuple=True)
        qi, cj = cq[p], ct[p] * leaf + row
        real = cj < self.bank.shape[0]  # padding rows pass only against absurd bounds (norms near 1e15)
        return ((qi, cj) if bool(real.all()) else (qi[real], cj[real])) + (upper,)

    def _exact(self, q_np, start, qi, cj, d2_out, idx_out) -> int:
        """Exact nearest rows of block queries ``start ..`` among the candidate pairs (``qi``, ``cj``); writes d2 and
        original indices (queries without a candidate are left as they were); returns the number of candidates."""
        nb = d2_out.numel()
        gq = (qi + start).numpy()
        dist = torch.from_numpy(pairwise_l2sqr(q_np, gq, self._bank_np, cj.numpy()))
        dmin = torch.full((nb,), float("inf")).scatter_reduce_(0, qi, dist, "amin")
        # within twice the float32 rounding bound of the minimum: either may be the nearest, re-scored in float64
        near = dist.double() <= dmin[qi].double() * ((1 + self.eta) / (1 - self.eta))
        a, j, dn = qi[near], cj[near], dist[near]
        if a.numel() > a.unique().numel():  # some queries have several candidates within the margin: re-scored
            tie = torch.bincount(a, minlength=nb)[a] > 1
            one = ~tie
            d2_out[a[one]], idx_out[a[one]] = dn[one].double(), self.order[j[one]]
            a, j = a[tie], j[tie]
            dd = torch.sum((torch.from_numpy(q_np[a.numpy() + start]) - self.bank[j]).double().square_(), dim=1)
            best = torch.full((nb,), float("inf"), dtype=torch.float64).scatter_reduce_(0, a, dd, "amin")
            orig = torch.where(dd == best[a], self.order[j], torch.iinfo(torch.int64).max)
            first = torch.full((nb,), torch.iinfo(torch.int64).max).scatter_reduce_(0, a, orig, "amin")
            d2_out[a], idx_out[a] = best[a], first[a]
        else:  # one candidate per query within the margin: the winner
            d2_out[a], idx_out[a] = dn.double(), self.order[j]
        return qi.numel()


def _round_up(x: torch.Tensor) -> torch.Tensor:
    """float64 -> the smallest float32 >= each value."""
    y = x.to(torch.float32)
    return torch.where(y.double() < x, torch.nextafter(y, torch.tensor(float("inf"))), y)


def _round_down(x: torch.Tensor) -> torch.Tensor:
    """float64 -> the largest float32 <= each value."""
    y = x.to(torch.float32)
    return torch.where(y.double() > x, torch.nextafter(y, torch.tensor(float("-inf"))), y)
