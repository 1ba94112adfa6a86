"""Exact nearest-row search screened by a bfloat16 GEMM (CPUs with AMX / AVX512-BF16 run it ~5x faster than float32).

``GalleryScreen`` holds galleries of rows grouped in images (N, P, C), float32, centred. For a block of queries it
returns candidate rows that are guaranteed to contain every query's nearest row among the given images; the caller
scores the candidates exactly (float64 differences), so the result is the exact nearest distance, not an
approximation.

How the guarantee is kept (``u = 2^-8``, bfloat16's unit roundoff: 8 significant bits, round to nearest errs by up
to 2^-8 relative; the derivation, term by term, is in docs/methods.md, "Error bounds of the searches"):

- Rows and queries are written as bfloat16 vectors ``[-2 g', |g|^2_hi, |g|^2_lo, 1]`` and ``[q', 1, 1, |q|^2_hi]``
  of width ``32 * ceil(C / 32)`` (the AMX tile depth; a width of 64 runs twice as fast as 70). When the three norm
  columns do not fit, they take the places of the three smallest-variance coordinates, which are left out and whose
  norms enter the bound; for C <= 256 the coordinates are first rotated onto the gallery's principal axes (an
  orthogonal map: distances unchanged), wider rows keep their axes (a C x C rotation per query would cost as much
  as the screen). One GEMM
  gives ``D ~ |q - g|^2 + delta_q`` (fp32 accumulation, one bfloat16 rounding of the result), where
  ``delta_q = |q|^2_hi - |q|^2`` is known exactly and shifts all of a query's entries alike.
- ``|D - delta_q - |q - g|^2| <= u |D| + E``, ``E = c_qg |q| max|g| + 2 |q_tail| max|g_tail| + c_sq max|g|^2
  + c_q |q|^2 + 1e-30`` (``bound_coefficients``: worst case, no factor to spare and none halved) with the maxima over
  a tile of ``TILE`` rows (rows are sorted by norm inside each image, so a tile's maximum is close to each of its
  rows): bfloat16 rounding of both operands of each product (``(2u + u^2) |2 q_i g_i|``), the float32 rotation,
  fp32 accumulation of ``width`` products (Higham's ``gamma_n = n 2^-24 / (1 - n 2^-24)`` times the sum of their
  magnitudes), the dropped coordinates (Cauchy-Schwarz), the two-piece norms, the float32 sum behind ``delta_q``.
  ``probe_ok`` checks the bound on random data once per process (a check that this build's GEMM is the one
  assumed: fp32 accumulation, one rounding of the result), not its proof.
- Pass 1: per tile the minimum of D per query (bfloat16 bit patterns read as int16 keep the order of non-negative
  values; a negative D, possible only through rounding, reads as smaller than all of them: its tile is always kept);
  from these an upper bound ``U`` of each query's nearest squared distance, and the tiles whose lower bound
  is within ``U``.
- Pass 2: per kept tile, D again for the queries that kept it; its rows with ``D - delta_q - u |D| - E <= U`` are the
  candidates (the nearest row always passes). A query keeping more than ``MAX_KEPT`` of the tiles (features without
  structure, where all distances are alike) is handed back unscreened, and small searches (``MIN_MACS``) are not
  worth a screen: the caller searches those in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from adspine.methods.threads import map_one_thread_each

U = 2.0**-8  # bfloat16's unit roundoff: round to nearest errs by up to 2^-8 relative (1 + 0.99 * 2^-8 rounds to 1)
U32 = 2.0**-24  # float32's unit roundoff
F64_REL = 2.0**-40  # relative allowance for sums done in float64 (n 2^-53 for n < 8,000 terms)
TILE = 256  # rows per tile: the unit of the per-tile bounds
ROTATE_MAX = 256  # wider rows are not rotated (see GalleryScreen)
QUERY_BLOCK = 256  # queries per GEMM (measured: 256 beats 128 by ~15%, 512 gains little more)
MAX_KEPT = 0.05  # fraction of a query's tiles above which it is searched without the screen (~0.6 % on CNN features)
MIN_MACS = 2 * 10**9  # brute-force multiply-adds below which the float32 search is as fast (per-call overhead)
QUERY_CHUNK = 4096  # queries per candidates() pass (its bounds take ~12 bytes per query, image and tile)
SPLIT_MACS = 10**10  # pass-1 multiply-adds per Python thread below which splitting the queries does not pay
MAC_S, TILE_CALL_S = 1 / 150e9, 50e-6  # rough seconds per bfloat16 multiply-add and per tile's calls (pass 2 plan)


@functools.lru_cache(maxsize=1)
def fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX or AVX512-BF16) and the bound holds here."""
    try:
        hardware = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    except (AttributeError, RuntimeError):  # private helpers: absent on other builds
        hardware = False
    return bool(hardware) and probe_ok()


def probe_ok(seed: int = 0) -> bool:
    """Check the error bound entry by entry on random galleries (offset, unequal scales, near-duplicates; spare norm
    columns, rotated and wide layouts)."""
    gen = torch.Generator().manual_seed(seed)
    for c in (16, 64, 100, 320):
        g = torch.randn(2, 260, c, generator=gen) * torch.rand(c, generator=gen) * 3 + 0.5
        q = torch.randn(24, c, generator=gen) * 2
        q[:8] = g[1, :8] + 1e-3 * torch.randn(8, c, generator=gen)
        centre = g.mean(dim=(0, 1))
        screen = GalleryScreen(g - centre)
        qc = (q - centre).double()
        aug, shift, err = screen.query_terms(q - centre, range(2))  # err (2, tiles, Q)
        for j in range(2):
            d = torch.mm(screen.aug[j], aug.T).double()[: screen.p]  # (P, Q), rows in the screen's order
            rows = screen.rows[j][screen.order[j]].double()
            exact = torch.stack([(rows - x).square_().sum(dim=1) for x in qc], dim=1)
            tile_err = err[j].double().repeat_interleave(TILE, dim=0)[: screen.p]  # (P, Q)
            if not bool(((d - shift - exact).abs() <= U * d.abs() + tile_err).all()):
                return False
    return True


def gamma(n: int, unit: float = U32) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: a sum of ``n`` products in that precision errs by at most gamma_n
    times the sum of their magnitudes, in any order of summation."""
    if n * unit >= 0.5:
        raise ValueError(f"{n} terms is too many for a rounding bound in this precision")
    return n * unit / (1 - n * unit)


def inflation(c: int) -> float:
    """Factor on bound coefficients covering the float32 evaluation of the bound itself (norms from float32 sums of
    ``c`` squares: relative error below ``c 2^-24``; a few float32 products: below 2^-10)."""
    return 1 + 2.0**-10 + c * 2.0**-23


def bound_coefficients(c: int, width: int, rho: float = 0.0, sq_terms: int | None = None) -> tuple[float, float, float]:
    """Worst-case coefficients of the screen's error bound (see the module and docs/methods.md) for ``c`` multiplied
    coordinates in rows of ``width``: ``E = c_qg |q| |g| + c_sq |g|^2 + c_q |q|^2`` before the dropped coordinates'
    term (``|q|``, ``|g|``: norms of the vectors whose coordinates are multiplied). ``rho``: relative error norm of
    each side's float32 coordinates against an exact orthogonal map of them (rotation, projection rounding);
    ``sq_terms``: squares summed in float32 for ``|q|^2`` (default ``c``), whose error ``c_q`` covers."""
    acc = gamma(width)  # fp32 accumulation of the width products (exact in fp32: 8 x 8 significant bits)
    grow = (1 + U) ** 2 * (1 + rho) ** 2  # |q~_i g~_i| <= (1 + u)^2 |q'_i g'_i|, |q'| <= (1 + rho) |q|
    c_qg = 2 * ((2 * U + U * U) * (1 + rho) ** 2 + 2 * rho + rho * rho + acc * grow)
    c_sq = U * U + 2 * U32 + F64_REL + acc * (1 + 2 * U)  # two-piece |g|^2 (from float64), accumulation
    c_q = gamma((sq_terms or c) + 1) + acc * (1 + 2 * U)  # float32 |q|^2 behind delta_q, accumulation
    f = inflation(max(c, sq_terms or c))
    return c_qg * f, c_sq * f, c_q * f


class GalleryScreen:
    """bfloat16 screen of a gallery ``rows`` (N, P, C) float32 (centred; kept, not copied) - see the module."""

    def __init__(self, rows: torch.Tensor) -> None:
        n, p, c = rows.shape
        self.rows, self.p = rows, p
        sq = torch.stack([r.double().square().sum(dim=1) for r in rows])  # (N, P), one image at a time in float64
        self.order = sq.argsort(dim=1)  # screen row r of image j is rows[j, order[j, r]]
        flat = rows.reshape(-1, c)
        self.width = 32 * -(-c // 32)
        # three columns carry the norms: spare ones, else those of the three smallest-variance coordinates (dropped)
        self.rotation, self.rho = None, 0.0
        if c + 3 <= self.width:
            self.slots, self.dropped = torch.arange(c, c + 3), torch.arange(0)
        elif c <= ROTATE_MAX:  # rotated onto the principal axes, largest variance first
            _, vecs = torch.linalg.eigh((flat.T @ flat).double())
            self.rotation = vecs.flip(1).to(torch.float32).contiguous()
            # float32 product with a float32-rounded orthogonal matrix: error norm <= (gamma_C + u) sqrt(C) |q|
            self.rho = (gamma(c) + U32) * c**0.5 * (1 + U32) + F64_REL
            self.slots = self.dropped = torch.arange(c - 3, c)
        else:  # wide rows keep their axes (a C x C rotation per query would cost as much as the screen)
            self.slots = self.dropped = flat.square().sum(dim=0).argsort()[:3].sort().values
        sq = torch.gather(sq, 1, self.order)
        self.tiles = -(-p // TILE)
        p_pad = self.tiles * TILE
        aug = torch.zeros(n, p_pad, self.width, dtype=torch.bfloat16)
        tail = torch.zeros(n, p_pad, dtype=torch.float64)
        for j in range(n):  # one image at a time: no full-size temporaries
            rot = rows[j, self.order[j]]
            rot = rot if self.rotation is None else rot @ self.rotation
            aug[j, :p, :c] = (-2.0 * rot).to(torch.bfloat16)
            tail[j, :p] = rot[:, self.dropped].double().square().sum(dim=1)
        hi, lo = split_bf16(sq)
        aug[:, :p, self.slots] = torch.stack([hi, lo, torch.ones_like(hi)], dim=2)
        aug[:, p:, self.slots[0]] = 1e30  # padding rows: D = 1e30, never a candidate
        self.aug = aug
        pad = torch.zeros(n, p_pad - p, dtype=torch.float64)
        self.norm_max = torch.cat([sq, pad], 1).view(n, self.tiles, TILE).amax(dim=2).sqrt()  # (N, tiles)
        self.tail_max = tail.view(n, self.tiles, TILE).amax(dim=2).sqrt()

    def query_terms(self, q: torch.Tensor, images: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Augmented bfloat16 queries (Q, width), their shift ``delta_q`` (Q,) float64 and the bound ``E``
        (len(images), tiles, Q) float32 (rounded up by a relative 1e-5)."""
        c = q.shape[1]
        rot = q if self.rotation is None else q @ self.rotation
        sq = q.square().sum(dim=1).double()  # float32 sums: within C 2^-24 |q|^2, a term of E
        aug = torch.zeros(q.shape[0], self.width, dtype=torch.bfloat16)
        aug[:, :c] = rot
        hi = sq.to(torch.float32).to(torch.bfloat16)
        aug[:, self.slots] = torch.stack([torch.ones_like(hi), torch.ones_like(hi), hi], dim=1)
        idx = torch.as_tensor(list(images), dtype=torch.long)
        gmax, tmax = self.norm_max[idx].unsqueeze(2), self.tail_max[idx].unsqueeze(2)  # (images, tiles, 1)
        c_qg, c_sq, c_q = bound_coefficients(c, self.width, self.rho)
        a = c_qg * sq.sqrt()
        b = 2 * inflation(c) * rot[:, self.dropped].double().square().sum(dim=1).sqrt()
        f32 = torch.float32  # each float32 rounding below is covered by the relative 1e-5 added at the end
        err = (gmax.to(f32) * a.to(f32)).addcmul_(tmax.to(f32), b.to(f32)).add_((c_sq * gmax**2 + 1e-30).to(f32))
        return aug, hi.double() - sq, err.add_((c_q * sq).to(f32)).mul_(1 + 1e-5)

    def candidates(self, q: torch.Tensor, images: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Candidate (query index, flat row index into ``rows.reshape(-1, C)``) pairs, each screened query's nearest
        row among ``images`` included, and the queries left unscreened (more than ``MAX_KEPT`` of the tiles passed:
        search those another way); single-threaded (run one call per thread)."""
        images = list(images)
        if q.shape[0] > QUERY_CHUNK:  # bounds are (images, tiles, queries): cap their memory on large images
            return _joined([(a, self.candidates(q[a : a + QUERY_CHUNK], images))
                            for a in range(0, q.shape[0], QUERY_CHUNK)])
        aug, shift, err = self.query_terms(q, images)
        nq, n_img, nt, p_pad = q.shape[0], len(images), self.tiles, self.tiles * TILE
        padded = torch.cat([aug, aug.new_zeros(shape_step(nq) - nq, self.width)])  # zero queries, sliced off below
        blocks = [padded[a : a + QUERY_BLOCK].T for a in range(0, padded.shape[0], QUERY_BLOCK)]
        mins = torch.empty(n_img, nt, padded.shape[0], dtype=torch.int16)
        buf = torch.empty(p_pad * QUERY_BLOCK, dtype=torch.bfloat16)
        for k, j in enumerate(images):  # pass 1: per-tile minima
            for b, block in enumerate(blocks):
                w = block.shape[1]
                d = buf[: p_pad * w].view(p_pad, w)
                torch.mm(self.aug[j], block, out=d)
                cols = slice(b * QUERY_BLOCK, b * QUERY_BLOCK + w)
                torch.amin(d.view(torch.int16).view(nt, TILE, w), 1, out=mins[k, :, cols])
        # float32 bounds, each rounding covered by the relative 1e-5 on E and 1e-6 on U
        v = mins[..., :nq].view(torch.bfloat16).to(torch.float32)  # (images, tiles, Q)
        slack = v.abs().mul_(U).add_(err)
        negative = v < 0  # the int16 minimum of a tile holding a negative D is some negative D, not the smallest
        v.sub_(shift.to(torch.float32))
        upper = (v + slack).view(-1, nq).amin(dim=0).mul_(1 + 1e-6)  # (Q,): any row's D gives an upper bound
        kept = (v.sub_(slack) <= upper) | negative  # tiles that may hold the nearest row
        # a query keeping many tiles (features without structure: distances all alike) is not worth screening
        unscreened = (kept.view(-1, nq).sum(dim=0) > MAX_KEPT * n_img * nt).nonzero().flatten()
        kept[:, :, unscreened] = False
        upper64 = upper.double()
        out_q, out_r = [], []

        def keep_rows(qs: torch.Tensor, d: torch.Tensor, k: int, j: int, t: torch.Tensor, r0: torch.Tensor) -> None:
            """Rows of ``d`` (pairs, TILE) int16 (tile ``t``, first row ``r0`` per pair) whose D passes."""
            # a row is a candidate when D (1 - u) <= U + E + delta_q (D >= 0; a negative D always passes)
            lim = ((upper64[qs] + err[k, t, qs].double() + shift[qs]) / (1 - U)).clamp_(min=0)  # >= 0: int16 order
            lim = bf16_at_least(lim).view(torch.int16)
            c, r = (d <= lim[:, None]).nonzero(as_tuple=True)
            row = r0[c] + r
            ok = row < self.p
            out_q.append(qs[c[ok]])
            out_r.append(j * self.p + self.order[j, row[ok]])

        for k, j in enumerate(images):  # pass 2: candidate rows of the kept tiles
            pairs = kept[k].nonzero()  # (kept, 2): tile, query
            sel = kept[k].any(dim=0).nonzero().flatten()
            # whole image for its selected queries, or tile by tile: whichever the GEMM and call costs favour
            n_tiles = int(kept[k].any(dim=1).sum())
            by_tile = (n_tiles * TILE_CALL_S + pairs.shape[0] * TILE * self.width * MAC_S
                       < sel.numel() * p_pad * self.width * MAC_S)
            if by_tile or nt == 1:
                for t in pairs[:, 0].unique().tolist():
                    tile_qs = pairs[pairs[:, 0] == t, 1]
                    for a in range(0, tile_qs.numel(), QUERY_BLOCK):
                        qs = tile_qs[a : a + QUERY_BLOCK]
                        d = _mm_rows(aug, qs, self.aug[j, t * TILE : (t + 1) * TILE].T).view(torch.int16)
                        keep_rows(qs, d, k, j, torch.full_like(qs, t), torch.full_like(qs, t * TILE))
                continue
            for a in range(0, sel.numel(), QUERY_BLOCK):
                qs = sel[a : a + QUERY_BLOCK]
                d = _mm_rows(aug, qs, self.aug[j].T)
                c, t = kept[k][:, qs].T.nonzero(as_tuple=True)
                keep_rows(qs[c], d.view(torch.int16).view(-1, nt, TILE)[c, t], k, j, t, t * TILE)
        empty = torch.empty(0, dtype=torch.long)
        return torch.cat([empty, *out_q]), torch.cat([empty, *out_r]), unscreened

    def candidates_threaded(self, q: torch.Tensor, images: Sequence[int],
                            threads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``candidates`` on ``threads`` cores: large searches split the queries over Python threads that each run
        single-threaded GEMMs (fewer OpenMP fork/joins on small GEMMs when the cores are shared); small ones, whose
        time goes to per-call overhead that threads would contend for (the GIL), run single-threaded here."""
        work = q.shape[0] * self.tiles * TILE * self.width * len(images)  # pass-1 multiply-adds
        step = -(-q.shape[0] // max(1, min(threads, work // SPLIT_MACS)))
        starts = list(range(0, q.shape[0], step))
        parts = map_one_thread_each(lambda a: self.candidates(q[a : a + step], images), starts)
        return parts[0] if len(parts) == 1 else _joined(list(zip(starts, parts)))


def _joined(parts: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``candidates`` results of query slices starting at the given offsets, as one."""
    return (torch.cat([qi + a for a, (qi, _, _) in parts]), torch.cat([r for _, (_, r, _) in parts]),
            torch.cat([u + a for a, (_, _, u) in parts]))


def shape_step(n: int) -> int:
    """``n`` rounded up to a multiple of 32: GEMMs see a few shapes only (oneDNN keeps ~0.7 MB per shape it met)."""
    return 32 * -(-n // 32)


def _mm_rows(a: torch.Tensor, rows: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a[rows] @ b`` computed on ``rows`` padded to ``shape_step`` rows (repeating the last), the padding cut off."""
    n = rows.numel()
    padded = torch.cat([rows, rows[-1:].expand(shape_step(n) - n)])
    return torch.mm(a.index_select(0, padded), b)[:n]


def split_bf16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 -> two bfloat16 pieces whose sum is within 2^-16 |x| of x."""
    hi = x.to(torch.float32).to(torch.bfloat16)
    return hi, (x - hi.double()).to(torch.float32).to(torch.bfloat16)


def bf16_at_least(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 >= each (non-negative) value."""
    b = x.to(torch.float32).to(torch.bfloat16)
    up = (b.to(x.dtype) < x).to(torch.int16)  # next representable value above (positive: consecutive bit patterns)
    return (b.view(torch.int16) + up).view(torch.bfloat16)
