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

LB_SLACK = 1e-5  # lower bounds lowered by this fraction of |x|^2 + |y|^2 (float32 GEMM rounding is ~1e-7)
RESIDUAL_SLACK = 1e-4  # residual norms rounded up: r^2 + this fraction of |x|^2
TIE_MARGIN = 1e-5  # relative: upper bounds and near-ties (float32 sums of squares are exact to ~1e-7)
PRECISIONS = ("float32", "bfloat16")  # of NearestBank's lower-bound GEMM
BF16_WIDTH = 256  # bfloat16 rows: components + 4 (ResNet-18's 1024-d bank: 256 beat 128, 192 and 320)
BLOCK_BYTES = 32 * 2**20  # queries per block: as many as keep a block's bound GEMM output under this (ResNet-18's
# 3,136-row bank: bfloat16 5,040 queries, 4,096 ran 1.2x faster than 1,024; float32 2,650, 2,048 1.25x faster than 256)
BAND = 256  # bfloat16 mode: rows sorted by norm share the bound's max |y| in bands of this many (whole tiles)
PROJ_REL = 2.0**-14  # bfloat16 mode: float32 projections' error allowance, relative to |x| + |centre| (a rounding
# margin like LB_SLACK, ~300x the error measured on ResNet-18; a worst-case bound, d sqrt(k) 2^-24, would be 16x this)


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
    float32 Gram matrix; any orthonormal ``P`` keeps the bound valid), each row's projection ``P^T y`` and an upper
    bound ``r_y`` of its residual norm ``|(I - P P^T) y|``. For a block of queries, the lower bound of every squared
    distance comes from one GEMM of the augmented vectors ``[P^T x, r_x]``:
    ``LB = |x|^2 + |y|^2 - 2 (P^T x . P^T y + r_x r_y) <= |x - y|^2`` (Cauchy-Schwarz on the residuals; residual
    norms are rounded up by ``1e-4 |x|^2``, and ``LB`` is lowered by ``1e-5 (|x|^2 + |y|^2)``, far above the float32
    rounding of the projections). Then:

    - an upper bound ``U``: the exact distance to the row of smallest ``LB``;
    - candidates: rows with ``LB <= U (1 + 1e-5)``; the true nearest row is always among them;
    - exact squared distances of the candidates summed from the differences (faiss, float32, no cancellation); the
      minimum wins. Candidates within ``1e-5`` (relative) of it are re-scored in float64 and the smallest distance,
      then the smallest bank index, wins (a brute-force ``argmin``'s choice).

    Two ways to compute ``LB`` (``precision``; ``"auto"``: bfloat16 where ``screen.fast_bf16()``):

    - ``"float32"``: 128 components by default; rows ordered along a principal-axis tree (``tree_order``) into runs
      of ``leaf`` neighbouring rows, runs whose smallest ``LB`` exceeds ``U`` are skipped.
    - ``"bfloat16"`` (AMX): ``BF16_WIDTH - 4`` components by default, the GEMM in bfloat16 as in
      ``screen.GalleryScreen`` (rows ``[-2 P^T y, -2 r_y, |y|^2_hi, |y|^2_lo, 1]``, queries
      ``[P^T x, r_x, 1, 1, |x|^2_hi]``), its rounding bounded by ``u |D| + E`` (``screen.bound_coefficients``, with
      the maxima of ``|y|`` over bands of ~``BAND`` rows sorted by norm); ``U`` comes from the row of smallest ``D``,
      tiles of ``leaf`` rows whose smallest ``D`` is too large are skipped, and rows with ``D - u |D| - E <= U`` are
      the candidates. bfloat16 GEMMs run ~4x faster than float32 ones on AMX, so more components are affordable
      and fewer candidates remain (ResNet-18's 1024-d bank: ~13 per query of 3136 rows, against ~44 with 128
      float32 components). Here the projection is one uncentred GEMM ``x P - centre P`` (or the caller's, e.g.
      computed per layer at a coarser grid: ``search(..., proj=, proj_err=)``); its error ``gamma`` (for the GEMM
      the rounding allowance ``PROJ_REL (|x| + |centre|)``) widens the bound by ``2 gamma |P^T y|`` and the residual
      norms by ``2 gamma |P^T x|``.

    Distances are relative to the float32 rows; returned distances carry the float32 rounding of a sum of squares
    (relative error ~1e-7), not the cancellation of ``|x|^2 + |y|^2 - 2 x.y``.
    """

    def __init__(self, bank: torch.Tensor, components: int | None = None, leaf: int = 32, block: int | None = None,
                 precision: str = "auto") -> None:
        bank = bank.detach().cpu().to(torch.float32).contiguous()
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise ValueError(f"nearest-neighbour bank must be a non-empty (M, D) matrix, got shape {tuple(bank.shape)}")
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
        centred = bank - self.centre
        if components is None:
            components = BF16_WIDTH - 4 if bf16 else 128
        k = max(1, min(int(components), d, m))
        # any orthonormal basis keeps the bound valid: a float32 Gram matrix is precise enough to pick the directions
        _, vecs = torch.linalg.eigh((centred.T @ centred).double())
        self.basis = vecs[:, -k:].flip(1).to(torch.float32).contiguous()  # (D, k), largest variance first
        proj = centred @ self.basis
        sq = centred.double().square_().sum(dim=1)
        del centred
        self.order = sq.argsort() if bf16 else tree_order(proj, leaf)
        self.bank = bank[self.order].contiguous()
        self._bank_np = self.bank.numpy()
        self._centre_np = self.centre.view(1, -1).numpy()
        self.centre_proj = self.centre @ self.basis  # (k,): the uncentred projection's offset
        self.centre_norm = float(self.centre.double().norm())
        proj, sq = proj[self.order], sq[self.order]
        resid = self._residual_bound(sq, proj)
        self.last_candidates = 0  # candidates per query of the last search (diagnostics)
        if bf16:
            self._init_bf16(proj, resid, sq)
            return
        runs = -(-m // leaf)
        pad = runs * leaf - m  # padding rows: LB = +inf, never candidates
        aug = torch.cat([torch.cat([proj, resid.unsqueeze(1)], dim=1), torch.zeros(pad, k + 1)])
        self.aug_t = aug.T.contiguous()  # (k + 1, runs * leaf)
        self.lb_sq = torch.cat([((1 - LB_SLACK) * sq).float(), torch.full((pad,), float("inf"))]).unsqueeze(0)
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
        norm = (proj.double().square().sum(dim=1) + resid.double().square()).sqrt()  # |[P^T y, r_y]|
        self.band_norm = F.pad(norm, (0, pad)).view(self.bands, self.band).amax(dim=1)
        self.band_sq = F.pad(sq, (0, pad)).view(self.bands, self.band).amax(dim=1)

    @staticmethod
    def _residual_bound(sq: torch.Tensor, proj: torch.Tensor, proj_sq: torch.Tensor | None = None,
                        gamma: torch.Tensor | None = None) -> torch.Tensor:
        """Upper bound (float32) of the residual norms from float64 squared norms and the float32 projections (their
        squared norms ``proj_sq`` if already known; ``gamma``: a bound of the projections' error norm, if any)."""
        if proj_sq is None:
            proj_sq = proj.double().square().sum(dim=1)
        r2 = sq - proj_sq + RESIDUAL_SLACK * sq
        if gamma is not None:  # |P^T x|^2 >= (|p| - gamma)^2
            r2 += gamma * (2 * proj_sq.sqrt() + gamma)
        return r2.clamp_(min=0).sqrt_().to(torch.float32)

    def search(self, queries: torch.Tensor, proj: torch.Tensor | None = None,
               proj_err: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared L2 distance (Q,) float64 to the nearest bank row and its index (Q,) int64.

        ``proj`` (Q, k), optional: the caller's ``(queries - centre) @ basis`` with ``proj_err`` an upper bound of
        each row's error norm (bfloat16 mode uses it; float32 mode projects itself)."""
        q = queries.detach().cpu().to(torch.float32).contiguous()
        if q.ndim != 2 or q.shape[1] != self.bank.shape[1]:
            raise ValueError(f"queries must be (Q, {self.bank.shape[1]}), got shape {tuple(q.shape)}")
        n = q.shape[0]
        if proj is not None and tuple(proj.shape) != (n, self.basis.shape[1]):
            raise ValueError(f"proj must be ({n}, {self.basis.shape[1]}), got shape {tuple(proj.shape)}")
        d2 = torch.empty(n, dtype=torch.float64)
        idx = torch.empty(n, dtype=torch.int64)
        q_np = q.numpy()
        if self.precision == "bfloat16":
            given = None if proj is None else (proj.detach().to(torch.float32), float(proj_err))
            self.last_candidates = self._search_bf16(q, q_np, d2, idx, given) / max(n, 1)
            return d2, idx
        xc = q - self.centre
        sq = xc.square().sum(dim=1).double()
        proj = xc @ self.basis
        del xc
        aug = torch.cat([proj, self._residual_bound(sq, proj).unsqueeze(1)], dim=1)
        x_lb = ((1 - LB_SLACK) * sq).float()
        total = 0
        for i in range(0, n, self.block):  # on the caller's torch threads (Python threads measured no faster here)
            j = min(i + self.block, n)
            qi, cj = self._candidates_f32(q_np, i, aug[i:j], x_lb[i:j])
            total += self._exact(q_np, i, qi, cj, d2[i:j], idx[i:j])
        self.last_candidates = total / max(n, 1)
        return d2, idx

    def _search_bf16(self, q: torch.Tensor, q_np: np.ndarray, d2: torch.Tensor, idx: torch.Tensor,
                     given: tuple[torch.Tensor, float] | None) -> int:
        """bfloat16 mode of ``search`` (writes ``d2``, ``idx``; returns the number of candidates): blocks of queries
        spread over Python threads that each run single-threaded (measured ~10 % faster than one thread pool
        splitting every op: most ops here are too small to split)."""
        n, threads = q.shape[0], torch.get_num_threads()
        parts = threads * -(-n // (threads * self.block))  # blocks of at most ``block``, a multiple of the threads
        step = -(-n // parts)
        starts = list(range(0, n, step))

        def run(i: int) -> int:
            j = min(i + step, n)
            qi, cj = self._candidates_bf16(q_np, q[i:j], i, None if given is None else (given[0][i:j], given[1]))
            return self._exact(q_np, i, qi, cj, d2[i:j], idx[i:j])

        if threads == 1 or len(starts) == 1:
            return sum(run(i) for i in starts)
        return sum(map_one_thread_each(run, starts, workers=threads))

    def _upper(self, q_np: np.ndarray, start: int, rows: torch.Tensor) -> torch.Tensor:
        """Exact squared distances (float32) of queries ``start ..`` to the given bank rows (one per query)."""
        return torch.from_numpy(pairwise_l2sqr(q_np, np.arange(start, start + rows.numel()), self._bank_np,
                                               rows.numpy()))

    def _candidates_f32(self, q_np, start, aug, x_lb) -> tuple[torch.Tensor, torch.Tensor]:
        """(block query, bank row) candidate pairs from the float32 bound, run by run."""
        nb, leaf = aug.shape[0], self.leaf
        lb = torch.addmm(self.lb_sq, aug, self.aug_t, alpha=-2).view(nb, self.runs, leaf)  # LB minus |x|^2 terms
        run_min = lb.amin(dim=2)
        r = torch.arange(nb)
        best_run = run_min.argmin(dim=1)
        upper = self._upper(q_np, start, best_run * leaf + lb[r, best_run].argmin(dim=1))
        thr = upper.mul_(1 + TIE_MARGIN).sub_(x_lb)
        cq, cr = (run_min <= thr.unsqueeze(1)).nonzero(as_tuple=True)  # candidate runs per query
        p, s = (lb[cq, cr] <= thr[cq].unsqueeze(1)).nonzero(as_tuple=True)
        return cq[p], cr[p] * leaf + s

    def _candidates_bf16(self, q_np, q, start, given) -> tuple[torch.Tensor, torch.Tensor]:
        """(block query, bank row) candidate pairs from the bfloat16 bound (see the class)."""
        nb = q.shape[0]
        sq = torch.from_numpy(pairwise_l2sqr(q_np, np.arange(start, start + nb), self._centre_np,
                                             np.zeros(nb, dtype=np.int64))).double()  # |x - c|^2: float32 sums
        if given is None:
            proj = torch.addmm(self.centre_proj, q, self.basis, alpha=1, beta=-1)  # x P - c P
            gamma = PROJ_REL * (sq.sqrt() + 2 * self.centre_norm)  # |x| <= |x - c| + |c|
        else:
            proj, gamma = given[0], torch.full((nb,), given[1], dtype=torch.float64)
        proj_sq = torch.linalg.vector_norm(proj, dim=1).double().square_()  # float32: within RESIDUAL_SLACK
        resid = self._residual_bound(sq, proj, proj_sq, gamma)
        k, rows = proj.shape[1], screening.shape_step(nb)  # queries padded: few GEMM shapes (oneDNN caches each)
        hi = sq.to(torch.float32).to(torch.bfloat16)
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
        upper = self._upper(q_np, start, best * leaf + tiles[best, :, r].argmin(dim=1)).double()  # any row will do
        norm = (proj_sq + resid.double().square()).sqrt()  # |[P^T x, r_x]|
        c_qg, c_sq, c_q = screening.bound_coefficients(k + 1, self.width)
        err = ((c_qg * norm + 2 * gamma).unsqueeze(1) * self.band_norm + (c_sq + LB_SLACK) * self.band_sq
               + ((c_q + LB_SLACK) * sq).unsqueeze(1))  # (nb, bands); 2 gamma |P^T y|: the projection's error
        # a row is a candidate when D (1 - u) <= U + E + delta_x (D >= 0; a negative D always passes)
        lim = ((upper * (1 + TIE_MARGIN) + hi.double() - sq).unsqueeze(1) + err) / (1 - screening.U)
        lim = screening.bf16_at_least(lim).view(torch.int16)  # (Q, bands)
        per_band = self.band // leaf
        band, sub, cq = (tile_min.view(self.bands, per_band, nb) <= lim.T.unsqueeze(1)).nonzero(as_tuple=True)
        ct = band * per_band + sub  # tiles that may hold the nearest row
        p, row = (tiles[ct, :, cq] <= lim[cq, band].unsqueeze(1)).nonzero(as_tuple=True)
        qi, cj = cq[p], ct[p] * leaf + row
        real = cj < self.bank.shape[0]  # padding rows pass only against absurd bounds (norms near 1e15)
        return (qi, cj) if bool(real.all()) else (qi[real], cj[real])

    def _exact(self, q_np, start, qi, cj, d2_out, idx_out) -> int:
        """Exact nearest rows of block queries ``start ..`` among the candidate pairs (``qi``, ``cj``); writes d2 and
        original indices; returns the number of candidates."""
        nb = d2_out.numel()
        gq = (qi + start).numpy()
        dist = torch.from_numpy(pairwise_l2sqr(q_np, gq, self._bank_np, cj.numpy()))
        dmin = torch.full((nb,), float("inf")).scatter_reduce_(0, qi, dist, "amin")
        near = dist <= dmin[qi] * (1 + TIE_MARGIN)
        a, j, dn = qi[near], cj[near], dist[near]
        if a.numel() > nb:  # some queries have several candidates within the rounding margin: those are re-scored
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
