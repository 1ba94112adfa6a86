"""PatchCore (Roth et al. 2022) as in the authors' code (amazon-science/patchcore-inspection).

- Features: the layers at ``layers`` (indices into the given list; default 1, 2 = layers 2 and 3 of a 3-layer list).
  Each patch feature is its 3x3 neighbourhood (``unfold``, stride 1, zero padding 1) flattened channel-major and
  reduced by ``adaptive_avg_pool1d`` to ``target_dim``; deeper layers are resized bilinearly (align_corners=False) to
  the first used layer's grid; the per-layer vectors are stacked and pooled again to ``target_dim``. (Pooling along
  channels and resizing along space are linear maps on different axes, so pooling before resizing, as done here,
  equals the authors' resize-then-pool and is cheaper.) Fit aggregates a few images at a time.
- Memory bank: greedy k-center coreset of ``int(N * coreset_ratio)`` patches chosen on a seeded Gaussian random
  projection to ``proj_dim``; like the authors' approximate greedy sampler it starts from ``coreset_starts`` random
  points (initial distance = mean distance to them). See ``greedy_coreset``.
- Scores: patch score = distance to the nearest bank entry, squared L2 by default like the authors' faiss
  ``IndexFlatL2`` (``distance="euclidean"``: its square root); image score = maximum patch score, or with
  ``reweight=True`` the paper's Eq. 7 with ``num_neighbors`` = b bank neighbours (off by default, like the authors'
  code); map = bilinear upsampling + Gaussian blur (sigma 4) of the patch scores.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from adspine.methods import knn
from adspine.methods import screen as screening
from adspine.methods.base import AnomalyMethod, CostShape, MethodInfo, Prediction
from adspine.methods.postprocess import DEFAULT_SIGMA, patch_scores_to_map

DISTANCES = ("squared", "euclidean")
AGGREGATE_IMAGES = 2  # images aggregated at once during fit: bounds the temporaries (about the size of the output)
CORESET_BLOCK = 512  # rows per block of the coreset's lazy distance updates (128-d float32: 256 KiB, in L2)


class PatchCoreSettingError(ValueError):
    """An invalid PatchCore setting (the message names it and its value)."""


def resolve_layers(requested: Sequence[int], n_available: int) -> list[int]:
    """Requested layer indices clipped to the available ones (``min(i, n - 1)``, duplicates dropped, sorted)."""
    return sorted({min(int(i), n_available - 1) for i in requested})


def aggregate(maps: Sequence[torch.Tensor], target_dim: int, threads: int | None = 1) -> torch.Tensor:
    """Locally aware patch features (B, H, W, target_dim) of the used maps (first map's grid is the reference).

    Equals the authors' unfold + ``adaptive_avg_pool1d`` per layer, bilinear resize, stack and pool again: the two
    poolings of a layer compose into one fixed sparse linear map of its 3x3 neighbourhoods (``_layer_kernel``),
    applied as a grouped convolution (channels-last) before the resize (both linear, on different axes). Layers
    own disjoint column ranges of the output unless the final pooling's bins straddle layers, where they add up.
    Runs on ``threads`` torch threads (None: the caller's setting). Fit aggregates two images at a time on one
    thread: such small ops stall on OpenMP barriers when the cores are shared; predict aggregates a whole batch,
    where two threads take ~0.55x the time of one (ResNet-18, 224 px).
    """
    old = torch.get_num_threads()
    torch.set_num_threads(threads or old)
    try:
        return _aggregate(maps, target_dim)
    finally:
        torch.set_num_threads(old)


def _aggregate(maps: Sequence[torch.Tensor], target_dim: int) -> torch.Tensor:
    return _assemble(_layer_parts(maps, target_dim), tuple(maps[0].shape[-2:]), target_dim)


def _layer_parts(maps: Sequence[torch.Tensor], target_dim: int) -> list[tuple[int, int, torch.Tensor]]:
    """Each layer's part of ``aggregate`` on its own grid: (lo, hi, (B, h, w, hi - lo) contiguous) per map."""
    parts = []
    for index, m in enumerate(maps):
        weight, groups, lo, hi = _layer_kernel(m.shape[1], target_dim, len(maps), index, m.dtype, m.device)
        y = F.conv2d(m.contiguous(memory_format=torch.channels_last), weight, padding=1, groups=groups)
        parts.append((lo, hi, y.permute(0, 2, 3, 1)))  # contiguous: channels-last
    return parts


def _resize(y: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w, C) resized bilinearly (align_corners=False) to (B, *size, C), contiguous."""
    if tuple(y.shape[1:3]) == size:
        return y
    return F.interpolate(y.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)


def _disjoint(parts: Sequence[tuple[int, int, torch.Tensor]], target_dim: int) -> bool:
    """Whether the layers' column ranges tile [0, target_dim) in order (each output column from one layer)."""
    return parts[0][0] == 0 and parts[-1][1] == target_dim and all(a[1] == b[0] for a, b in zip(parts, parts[1:]))


def _assemble(parts: Sequence[tuple[int, int, torch.Tensor]], ref: tuple[int, int], target_dim: int) -> torch.Tensor:
    """(B, H, W, target_dim) from the layers' parts resized to the grid ``ref`` (overlapping columns add up)."""
    if _disjoint(parts, target_dim):
        return torch.cat([_resize(y, ref) for _, _, y in parts], dim=3)
    out = torch.zeros(*parts[0][2].shape[:1], *ref, target_dim, dtype=parts[0][2].dtype, device=parts[0][2].device)
    for lo, hi, y in parts:
        out[..., lo:hi] += _resize(y, ref)
    return out


def project_parts(parts: Sequence[tuple[int, int, torch.Tensor]], ref: tuple[int, int], centre: torch.Tensor,
                  basis: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(embedding - centre) @ basis`` (B * H * W, k) from the layers' parts (``_layer_parts``, disjoint columns),
    each projected on its own grid and then resized (both linear: a deeper layer's rows are multiplied at its
    coarser grid, 1/4 of the rows for layer 3 of ResNets), and a worst-case bound of each row's error norm against
    the exact orthonormal projection of the assembled embedding: per part ``knn.proj_error`` of its largest row norm;
    a resized part adds the bilinear resize's float32 rounding twice (of the projection and of the embedding the
    search scores, each within ``gamma_4`` of the largest row norm: weights >= 0 summing to 1); the centre's
    projection ``knn.proj_error`` of ``|centre|``; the ``len(parts)`` additions ``gamma_{len(parts)}`` of it all."""
    total, d, k = None, basis.shape[0], basis.shape[1]
    c_norm = float(centre.double().norm())
    err, size = knn.proj_error(d, k, c_norm), c_norm
    for lo, hi, y in parts:
        b, h, w, c = y.shape
        rows = y.reshape(-1, c)
        p = _resize((rows @ basis[lo:hi]).view(b, h, w, -1), ref)
        total = p if total is None else total.add_(p)
        top = float(torch.linalg.vector_norm(rows, dim=1).max()) if rows.numel() else 0.0
        err += knn.proj_error(c, k, top) + (0.0 if (h, w) == ref else 2 * screening.gamma(4) * top * 1.01)
        size += top * 1.01
    total = total.reshape(-1, k).sub_(centre @ basis)
    err += screening.gamma(len(parts)) * size
    return total, err * screening.inflation(d)


def _pooling_matrix(n: int, target: int) -> torch.Tensor:
    """(n, target) float64 matrix of ``adaptive_avg_pool1d`` (bin i: [floor(i n / target), ceil((i + 1) n / target)))"""
    i = torch.arange(target)
    lo, hi = (i * n) // target, -((-(i + 1) * n) // target)
    e = torch.arange(n).unsqueeze(1)
    return ((e >= lo) & (e < hi)).to(torch.float64) / (hi - lo).to(torch.float64)


@functools.lru_cache(maxsize=64)
def _layer_kernel(
    channels: int, target: int, n_layers: int, index: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, int, int, int]:
    """Layer ``index``'s part of ``aggregate`` as a conv: (weight (hi - lo, channels / groups, 3, 3), groups, lo, hi).

    Its unfolded neighbourhood (entries channel-major, ``c * 9 + ky * 3 + kx``) is pooled to ``target``, then the
    stacked layers' ``n_layers * target`` values are pooled to ``target``: bins of exactly ``n_layers`` entries, so
    entry ``index * target + t`` goes to output ``(index * target + t) // n_layers``. The composed map touches the
    output columns [lo, hi); ``groups`` is the most blocks of whole channels -> equal output slices it splits into.
    Built in float64, returned in ``dtype`` on ``device`` (cached: treat as read-only).
    """
    first = _pooling_matrix(channels * 9, target)
    final_bin = (index * target + torch.arange(target)) // n_layers
    composed = torch.zeros(channels * 9, target, dtype=torch.float64).index_add_(1, final_bin, first) / n_layers
    used = composed.abs().sum(dim=0).nonzero().view(-1)
    lo, hi = int(used[0]), int(used[-1]) + 1
    composed = composed[:, lo:hi]
    width = hi - lo
    rows, cols = composed.nonzero(as_tuple=True)
    common = math.gcd(channels, width)
    groups = max(g for g in range(1, common + 1)
                 if common % g == 0 and bool(((rows // (9 * channels // g)) == (cols // (width // g))).all()))
    blocks = composed.reshape(groups, 9 * channels // groups, groups, width // groups)
    diag = torch.arange(groups)
    weight = blocks[diag, :, diag, :].transpose(1, 2)  # (groups, width / groups, 9 * channels / groups)
    weight = weight.reshape(width, channels // groups, 3, 3).to(device=device, dtype=dtype).contiguous()
    return weight, groups, lo, hi


def greedy_coreset(x: torch.Tensor, n: int, starts: torch.Tensor, block: int = CORESET_BLOCK) -> torch.Tensor:
    """Greedy k-center selection of ``n`` rows of ``x`` (N, D): the same rows as the textbook loop.

    The min-distance to the selected set starts as the mean Euclidean distance to the rows ``starts`` (which are not
    themselves selected); each step picks the row with the largest min-distance (first on ties) and lowers the
    min-distances by its distances. Squared distances in float32 on centred rows (less cancellation in
    ``|x|^2 - 2 x.c + |c|^2``).

    Lazy blocked updates: the rows are cut into blocks of ``block`` rows, each with an upper bound of its
    min-distances and the number of selected centres already applied to it. A step refreshes only the block with the
    largest bound (one small GEMM of the block against all its pending centres, in cache), until the top block is up
    to date: its maximum is then the global one. Blocks far from the selection skip most updates. Candidates within a
    float32 rounding margin of the maximum are re-scored in float64 from their exact definition, so near-ties resolve
    as the textbook float64 loop does. Buffers are preallocated; the loop allocates no (N, D) temporary. It runs on
    one torch thread: its many small ops cost more in OpenMP fork/join than they save when the cores are shared.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _greedy_coreset(x, n, starts, block)
    finally:
        torch.set_num_threads(threads)


def _greedy_coreset(x: torch.Tensor, n: int, starts: torch.Tensor, block: int) -> torch.Tensor:
    x = x.detach().to(torch.float32)
    x = (x - x.mean(dim=0)).contiguous()
    num = x.shape[0]
    n = min(int(n), num)
    starts = starts.to(torch.int64)
    sq = x.square().sum(dim=1)
    g = torch.addmm(sq[starts].unsqueeze(0), x, x[starts].T, alpha=-2).add_(sq.unsqueeze(1)).clamp_(min=0)
    min_d2 = g.sqrt_().mean(dim=1).square_()
    del g
    nb = -(-num // block)
    bounds = torch.amax(F.pad(min_d2, (0, nb * block - num), value=-1.0).view(nb, block), dim=1)
    state = _LazyBlocks(x, sq, min_d2, bounds, n, block)
    margin = 1e-5  # relative: above the float32 rounding of centred 128-d squared distances (~1e-6)
    for step in range(n):
        while True:
            b = int(torch.argmax(bounds))
            if state.applied[b] < step:
                state.refresh(b, step)
                continue
            threshold = float(bounds[b]) * (1 - margin)
            close = (bounds >= threshold).nonzero().view(-1).tolist()
            stale = [i for i in close if state.applied[i] < step]
            if stale:  # a near-tie with blocks not up to date: refresh them, then look again
                for i in stale:
                    state.refresh(i, step)
                continue
            cand = torch.cat([(state.rows(i) >= threshold).nonzero().view(-1) + i * block for i in close])
            j = int(cand[0]) if cand.numel() == 1 else _exact_argmax(x, cand, starts, state.selected[:step])
            break
        state.select(step, j)
    return state.selected


class _LazyBlocks:
    """Blocked min-distances of ``greedy_coreset``: which centres each block has seen, and its refresh."""

    def __init__(self, x, sq, min_d2, bounds, n, block) -> None:
        self.x, self.sq, self.min_d2, self.bounds, self.block = x, sq, min_d2, bounds, block
        self.applied = [0] * bounds.numel()  # centres already applied to each block
        self.selected = torch.empty(n, dtype=torch.int64)
        self.selected_sq = torch.empty(n)
        self.buf = torch.empty(block * 64)  # (rows, pending) workspace, grown by doubling

    def rows(self, b: int) -> torch.Tensor:
        return self.min_d2[b * self.block : (b + 1) * self.block]

    def select(self, step: int, j: int) -> None:
        self.selected[step] = j
        self.selected_sq[step] = self.sq[j]

    def refresh(self, b: int, step: int) -> None:
        """Lower block ``b``'s min-distances by its pending centres (one GEMM) and reset its bound."""
        lo, first = b * self.block, self.applied[b]
        seg = self.rows(b)
        m, k = seg.numel(), step - first
        if m * k > self.buf.numel():
            self.buf = torch.empty(max(2 * self.buf.numel(), m * k))
        out = self.buf[: m * k].view(m, k)
        centres = self.x[self.selected[first:step]]
        torch.addmm(self.selected_sq[first:step].unsqueeze(0), self.x[lo : lo + m], centres.T, alpha=-2, out=out)
        out.add_(self.sq[lo : lo + m].unsqueeze(1))
        torch.minimum(seg, out.amin(dim=1).clamp_(min=0), out=seg)
        self.applied[b] = step
        self.bounds[b] = seg.max()


def _exact_argmax(x: torch.Tensor, cand: torch.Tensor, starts: torch.Tensor, selected: torch.Tensor) -> int:
    """Among near-tied candidate rows, the one the float64 textbook loop picks (largest min-distance, first index)."""
    cand = cand.sort().values
    c = x[cand].double()
    d_start = torch.cdist(c, x[starts].double()).mean(dim=1)
    if selected.numel():
        d_start = torch.minimum(d_start, torch.cdist(c, x[selected].double()).amin(dim=1))
    return int(cand[int(torch.argmax(d_start))])


def _cost(shape: CostShape, settings: dict) -> float:
    """FLOPs of fit (projection + at most ``n_select`` distance passes over the projected bank) and of predict (one
    GEMM of every test patch against the bank)."""
    positions = shape.positions[resolve_layers(settings.get("layers", (1, 2)), len(shape.positions))[0]]
    target, proj = int(settings.get("target_dim", 1024)), int(settings.get("proj_dim", 128))
    patches = shape.n_train * positions
    bank = max(1, int(patches * float(settings.get("coreset_ratio", 0.1))))
    fit = 2.0 * patches * target * proj + 2.0 * bank * patches * proj
    return fit + 2.0 * shape.n_test * positions * bank * target


class PatchCore(AnomalyMethod):
    """Patch-level memory bank with coreset subsampling; nearest-neighbour patch scores."""

    info = MethodInfo(
        name="patchcore", display="PatchCore", draws_rd=False, seed_setting="coreset_seed", exportable=True,
        cost=_cost, efficiency=0.15,
        summary="coreset memory bank of locally aggregated patches, nearest-neighbour distance",
    )

    def __init__(
        self,
        coreset_ratio: float = 0.1,
        proj_dim: int = 128,
        target_dim: int = 1024,
        coreset_seed: int = 0,
        layers: Sequence[int] = (1, 2),
        distance: str = "squared",
        reweight: bool = False,
        num_neighbors: int = 9,
        sigma: float = DEFAULT_SIGMA,
        coreset_starts: int = 10,
    ) -> None:
        if not 0 < float(coreset_ratio) <= 1:
            raise PatchCoreSettingError(f"PatchCore: coreset_ratio must be in (0, 1], got {coreset_ratio}")
        for name, value in (("proj_dim", proj_dim), ("target_dim", target_dim), ("num_neighbors", num_neighbors),
                            ("coreset_starts", coreset_starts)):
            if int(value) < 1:
                raise PatchCoreSettingError(f"PatchCore: {name} must be >= 1, got {value}")
        if not layers or any(int(i) < 0 for i in layers):
            raise PatchCoreSettingError(f"PatchCore: layers must be non-negative indices, got {list(layers)}")
        if distance not in DISTANCES:
            raise PatchCoreSettingError(f"PatchCore: distance must be one of {', '.join(DISTANCES)}, got {distance!r}")
        self.coreset_ratio, self.proj_dim, self.target_dim = float(coreset_ratio), int(proj_dim), int(target_dim)
        self.coreset_seed, self.layers, self.distance = int(coreset_seed), [int(i) for i in layers], distance
        self.reweight, self.num_neighbors, self.sigma = bool(reweight), int(num_neighbors), float(sigma)
        self.coreset_starts = int(coreset_starts)
        self._search: knn.NearestBank | None = None  # derived from bank_ (fit, or first predict after load), not saved

    # -- features ----------------------------------------------------------------------------------------------------
    def used_maps(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [maps[i].detach().cpu().float() for i in self.layers_used_]

    def embed(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Patch features (B, H, W, target_dim) of one batch of per-layer maps (on the caller's torch threads)."""
        return aggregate(self.used_maps(maps), self.target_dim, threads=None)

    def projection(self) -> torch.Tensor | None:
        """Seeded Gaussian projection (target_dim, proj_dim), or None when proj_dim >= target_dim."""
        if self.proj_dim >= self.target_dim:
            return None
        gen = torch.Generator().manual_seed(self.coreset_seed)
        return torch.randn(self.target_dim, self.proj_dim, generator=gen) / self.proj_dim**0.5

    # -- fit -----------------------------------------------------------------------------------------------------------
    def _fit(self, batches: Iterable[Sequence[torch.Tensor]]) -> None:
        n_layers = len(self.feature_layers_)
        self.layers_used_ = resolve_layers(self.layers, n_layers)
        self.notes_ = []
        if self.layers_used_ != sorted(set(self.layers)):
            self.notes_.append(f"requested layers {self.layers} but {n_layers} feature map(s) were given: "
                               f"used {self.layers_used_}")
        proj = self.projection()
        chunks, projected = [], []  # per few images: embeddings (rows, T) and their projection (rows, proj_dim)
        self.n_train_ = 0
        with torch.no_grad():
            for batch in batches:
                maps = self.used_maps(batch)
                self.n_train_ += int(maps[0].shape[0])
                for i in range(0, maps[0].shape[0], AGGREGATE_IMAGES):
                    emb = aggregate([m[i : i + AGGREGATE_IMAGES] for m in maps], self.target_dim)
                    emb = emb.reshape(-1, self.target_dim)
                    chunks.append(emb)
                    projected.append(emb if proj is None else emb @ proj)
            self.n_patches_ = sum(c.shape[0] for c in chunks)
            n_select = max(1, int(self.n_patches_ * self.coreset_ratio))
            if n_select >= self.n_patches_:
                self.bank_ = torch.cat(chunks)
                self._search = knn.NearestBank(self.bank_)
                return
            z = torch.cat(projected)
            projected.clear()
            gen = torch.Generator().manual_seed(self.coreset_seed + 1)
            starts = torch.randperm(self.n_patches_, generator=gen)[: self.coreset_starts]
            selected = greedy_coreset(z, n_select, starts)
            del z
            self.bank_ = _gather_rows(chunks, selected)
        self._search = knn.NearestBank(self.bank_)  # built here so predict starts searching at once

    # -- predict -------------------------------------------------------------------------------------------------------
    def _nearest(self) -> knn.NearestBank:
        if self._search is None:
            self._search = knn.NearestBank(self.bank_)
        return self._search

    def _predict(self, maps: Sequence[torch.Tensor], image_size: tuple[int, int]) -> Prediction:
        with torch.no_grad():
            used, bank = self.used_maps(maps), self._nearest()
            ref = tuple(used[0].shape[-2:])
            parts = _layer_parts(used, self.target_dim)
            emb = _assemble(parts, ref, self.target_dim)
            b, h, w, t = emb.shape
            if bank.precision == "bfloat16" and _disjoint(parts, self.target_dim):
                proj, err = project_parts(parts, ref, bank.centre, bank.basis)
                d2, idx = bank.search(emb.reshape(-1, t), proj, err)
            else:
                d2, idx = bank.search(emb.reshape(-1, t))
            patch = d2 if self.distance == "squared" else d2.sqrt()
            patch = patch.reshape(b, h, w)
            flat = patch.reshape(b, -1)
            scores = flat.amax(dim=1)
            if self.reweight:
                scores = self._reweight(flat, idx.reshape(b, -1), emb.reshape(b, h * w, t))
            maps_out = patch_scores_to_map(patch.float(), image_size, self.sigma)
        return Prediction(maps=maps_out.numpy().astype(np.float32), scores=scores.numpy().astype(np.float64))

    def _reweight(self, patch: torch.Tensor, nn_idx: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Paper Eq. 7: s = (1 - exp|m* - m_test*| / sum_{m in N_b(m*)} exp|m - m_test*|) * s*, N_b(m*) including m*
        (the weight from Euclidean distances as in the paper; s* in the chosen ``distance``)."""
        bank = self.bank_
        b = min(self.num_neighbors, bank.shape[0])
        rows = torch.arange(patch.shape[0])
        worst = patch.argmax(dim=1)  # m_test*: the test patch with the largest score
        s_star = patch[rows, worst]
        m_star = nn_idx[rows, worst]
        d_bank = torch.cdist(bank[m_star].double(), bank.double())  # (B, M)
        d_bank[rows, m_star] = -1.0  # m* first even when it has exact duplicates
        support = torch.topk(d_bank, b, dim=1, largest=False).indices  # N_b(m*), nearest first
        test = emb[rows, worst].double()  # (B, T)
        d = torch.linalg.vector_norm(bank[support].double() - test.unsqueeze(1), dim=-1)  # (B, b)
        weight = 1.0 - torch.softmax(d, dim=1)[:, 0]
        return weight * s_star

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors(tensors)
        self._search = None


def _gather_rows(chunks: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """Rows (in the given order) of the virtual concatenation of ``chunks``, without concatenating them."""
    sizes = torch.tensor([c.shape[0] for c in chunks])
    ends = torch.cumsum(sizes, 0)
    which = torch.searchsorted(ends, rows, right=True)
    out = torch.empty(rows.numel(), chunks[0].shape[1], dtype=chunks[0].dtype)
    for ci, chunk in enumerate(chunks):
        mask = which == ci
        if mask.any():
            out[mask] = chunk[rows[mask] - (ends[ci] - sizes[ci])]
    return out
