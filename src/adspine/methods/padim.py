"""PaDiM (Defard et al. 2020): one multivariate Gaussian per patch position, scored by Mahalanobis distance.

Embedding: every given layer, deeper ones upsampled with nearest to the first layer's grid and concatenated
(``adspine.features.fuse``), then ``d`` channels drawn once with ``rd_indices(total, d, rd_seed, scheme=rd_scheme)``
(kept in ascending order: the set is what matters for a Mahalanobis distance).

Fit memory stays near the float32 model (``P * d * d`` floats) whatever the number of training images
(``GaussianAccumulator``): while the training embeddings take less memory than half the model they are kept and the
statistics are computed exactly per block of positions in float64 (two passes: mean, then centred products); beyond
that they are folded into float32 shifted sums, each batch's contribution computed in float64 per block of positions,
and the whitening factors then overwrite those sums in place. Covariance is unbiased (N - 1) plus ``eps * I``:
``eps_mode="absolute"`` adds ``eps`` itself (0.01 like the original code), ``"relative"`` adds ``eps`` times the mean
channel variance (over all positions and channels), which keeps features far from ImageNet's scale (random-init deep
networks) factorisable; the value added is recorded (``eps_applied_``).

Stored for scoring (float32): the mean ``(P, d)`` and the whitening factor ``W = L^-1`` ``(P, d, d)`` where
``L L^T = Sigma + eps I`` (LAPACK Cholesky; ``W^T W`` = the precision). Score = ``||W (x - mu)||``: the same size
and matmul cost as the precision matrix, but a sum of squares, so it can never go negative or cancel in float32 the
way ``delta^T Sigma^-1 delta`` can for ill-conditioned covariances.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from adspine.features import DEFAULT_RD_SEED, rd_indices
from adspine.methods.base import AnomalyMethod, CostShape, MethodInfo, Prediction
from adspine.methods.postprocess import DEFAULT_SIGMA, patch_scores_to_map

POSITION_CHUNK = 256  # most positions per block of float64 work
BLOCK_BYTES = 2**27  # float64 work per block of positions: at most 128 MiB (covariances + samples)
KEEP_MIN_BYTES = 2**26  # training embeddings are kept (exact two-pass statistics) up to max(64 MiB, model / 2)
SCORE_BUFFER_ELEMENTS = 2**23  # Mahalanobis scoring: at most 32 MB of float32 products per chunk of positions
EPS_MODES = ("absolute", "relative")


class PaDiMError(ValueError):
    """A PaDiM setting or fit that cannot work (one line naming the value)."""


def select_and_fuse(maps: Sequence[torch.Tensor], idx: torch.Tensor | None) -> torch.Tensor:
    """Equivalent to ``fuse(maps, "nearest")[:, idx]`` for ascending ``idx`` (None = all channels), but selects
    channels per layer before upsampling."""
    size = maps[0].shape[-2:]
    out, offset = [], 0
    for m in maps:
        c = m.shape[1]
        if idx is None:
            sel = m
        else:
            local = idx[(idx >= offset) & (idx < offset + c)] - offset
            sel = m.index_select(1, local) if local.numel() else None
        offset += c
        if sel is None:
            continue
        if sel.shape[-2:] != size:
            sel = F.interpolate(sel, size=size, mode="nearest")
        out.append(sel)
    return torch.cat(out, dim=1)


class GaussianAccumulator:
    """Per-position mean and covariance of samples streamed as (P, B, d) batches, in about one float32 model.

    Samples are kept (float32) while they fit in ``keep_bytes`` (default ``max(KEEP_MIN_BYTES, P*d*d*4 / 2)``);
    statistics are then exact float64 two-pass values per block of positions. Past that, everything is folded into
    float64 sums ``s1`` (P, d) and float32 sums ``s2`` (P, d, d) of ``y = x - shift`` (``shift`` = first batch mean,
    which avoids the cancellation of raw sums), each batch's products computed per block in float64.
    """

    def __init__(self, positions: int, dim: int, chunk: int = POSITION_CHUNK, keep_bytes: int | None = None) -> None:
        self.positions, self.dim, self.n = positions, dim, 0
        step = max(1, min(chunk, BLOCK_BYTES // (8 * dim * dim + 8 * dim * 64)))
        self.ranges = [(a, min(a + step, positions)) for a in range(0, positions, step)]
        model_bytes = positions * dim * dim * 4
        self.keep_bytes = max(KEEP_MIN_BYTES, model_bytes // 2) if keep_bytes is None else int(keep_bytes)
        self.kept: list[torch.Tensor] | None = []  # float32 (P, B, d) batches while exact; None once folded
        self.shift: torch.Tensor | None = None
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None

    @property
    def exact(self) -> bool:
        """True while the samples are kept (statistics computed exactly at the end)."""
        return self.kept is not None

    def update(self, x: torch.Tensor) -> None:
        """Add samples ``x`` of shape (P, B, d)."""
        # a permuted view would keep its strides through the ops below and send bmm down a slow path
        x = x.to(dtype=torch.float32, memory_format=torch.contiguous_format)
        self.n += x.shape[1]
        if self.kept is not None:
            self.kept.append(x)
            if self.n * self.positions * self.dim * 4 <= self.keep_bytes:
                return
            kept, self.kept = self.kept, None  # too many to keep: fold them into the sums
            for batch in kept:
                self._fold(batch)
            return
        self._fold(x)

    def _fold(self, x: torch.Tensor) -> None:
        if self.shift is None:
            self.shift = x.double().mean(dim=1)
            self.s1 = torch.zeros(self.positions, self.dim, dtype=torch.float64)
            self.s2 = torch.zeros(self.positions, self.dim, self.dim, dtype=torch.float32)
        for a, b in self.ranges:
            y = x[a:b].double() - self.shift[a:b].unsqueeze(1)
            self.s1[a:b] += y.sum(dim=1)
            self.s2[a:b] += torch.bmm(y.transpose(1, 2), y).float()

    def _samples(self, a: int, b: int) -> torch.Tensor:
        """Kept samples of positions a:b as float64 (c, n, d)."""
        return torch.cat([t[a:b] for t in self.kept], dim=1).double()

    def mean(self) -> torch.Tensor:
        """Per-position mean (P, d), float64."""
        if self.exact:
            return torch.cat([self._samples(a, b).mean(dim=1) for a, b in self.ranges])
        return self.shift + self.s1 / self.n

    def covariance(self, chunk: int) -> torch.Tensor:
        """Unbiased covariance (N - 1) of the positions of block ``chunk`` (of ``ranges``), float64 (c, d, d)."""
        a, b = self.ranges[chunk]
        if self.exact:
            y = self._samples(a, b)
            y -= y.mean(dim=1, keepdim=True)
            return torch.bmm(y.transpose(1, 2), y).div_(self.n - 1)
        s1 = self.s1[a:b]
        cov = self.s2[a:b].double()
        return cov.baddbmm_(s1.unsqueeze(2), s1.unsqueeze(1), alpha=-1.0 / self.n).div_(self.n - 1)

    def mean_variance(self) -> float:
        """Mean of the per-position channel variances (N - 1), over all positions and channels."""
        if self.exact:
            total = sum(float(self._samples(a, b).var(dim=1).sum()) for a, b in self.ranges)
        else:
            diag = self.s2.diagonal(dim1=1, dim2=2).double()
            total = float(((diag - self.s1.square() / self.n) / (self.n - 1)).sum())
        return total / (self.positions * self.dim)

    def finalize(self, eps: float, eps_mode: str = "absolute") -> tuple[torch.Tensor, torch.Tensor, float]:
        """Mean (P, d) and whitening factor ``L^-1`` (P, d, d) of ``cov + e I``, both float32, and ``e``.

        ``e = eps`` (``absolute``) or ``eps * mean_variance()`` (``relative``). Block by block of positions the
        float64 covariances are factorised with LAPACK ``dpotrf`` (Cholesky) and inverted with ``dtrtri``
        (triangular inverse, d^3/3 flops) in place, BLAS on one thread (measured here much faster than torch's
        batched ``solve_triangular`` against the identity and than multi-threaded OpenBLAS competing with torch's
        OpenMP pool). With folded sums the float32 result overwrites ``s2`` block by block (no second (P, d, d)
        buffer); with kept samples it goes into a lazily allocated tensor whose pages land block by block while the
        kept samples are released at the end.
        """
        from scipy.linalg import lapack
        from threadpoolctl import threadpool_limits

        mean_var = self.mean_variance()
        added = float(eps) * mean_var if eps_mode == "relative" else float(eps)
        mean = self.mean().float()
        whiten = self.s2 if not self.exact else torch.empty(self.positions, self.dim, self.dim, dtype=torch.float32)
        out = whiten.numpy()
        with threadpool_limits(1, user_api="blas"):
            for c, (a, b) in enumerate(self.ranges):
                cov = self.covariance(c)
                cov.diagonal(dim1=1, dim2=2).add_(added)
                for i, m in enumerate(cov.numpy()):
                    chol, info = lapack.dpotrf(m, lower=1, clean=1, overwrite_a=1)
                    if info == 0:
                        chol, info = lapack.dtrtri(chol, lower=1, overwrite_c=1)
                    if info != 0:
                        raise PaDiMError(_not_pd_message(a + i, eps, eps_mode, added, self.n, mean_var))
                    out[a + i] = chol
                del cov, m
        self.kept = self.s2 = self.s1 = None
        return mean, whiten, added


def _not_pd_message(position: int, eps: float, mode: str, added: float, n: int, mean_var: float) -> str:
    head = (f"PaDiM: covariance at position {position} is not positive definite (eps={eps}, eps_mode={mode}, "
            f"added {added:.3g} to a mean channel variance of {mean_var:.3g}, n={n})")
    if mean_var == 0:
        return f"{head}: the features are constant; check the backbone"
    if mode == "absolute":
        return (f"{head}: the features' scale is far from ImageNet's (e.g. a random-init deep network); use "
                f"eps_mode='relative' (eps times the mean channel variance)")
    return f"{head}: use a larger eps (e.g. eps=0.1)"


def padim_cost(shape: CostShape, settings: dict) -> float:
    """FLOPs of one fit + predict: products 2*N*P*d^2, Cholesky + triangular inverse P*d^3 (2/3 d^3, rounded up for
    the float64 path), Mahalanobis scoring 2*T*P*d^2, on the first layer's grid P."""
    p, d = shape.positions[0], shape.d
    return 2.0 * shape.n_train * p * d * d + p * d**3 + 2.0 * shape.n_test * p * d * d


class PaDiM(AnomalyMethod):
    """Patch distribution modelling; ``d`` = Rd channel count (None = all), image score = map maximum."""

    # efficiency: measured 0.10 / 0.18 of the conv FLOP/s (benchmarks/methods_dense.py --parts calibrate, R18 d=100)
    info = MethodInfo(
        name="padim", display="PaDiM", draws_rd=True, exportable=True, cost=padim_cost, efficiency=0.035,
        summary="one Gaussian per patch position, Mahalanobis distance",
    )

    def __init__(
        self,
        d: int | None = None,
        rd_seed: int = DEFAULT_RD_SEED,
        rd_scheme: str = "reference",
        eps: float = 0.01,
        eps_mode: str = "absolute",
        sigma: float = DEFAULT_SIGMA,
    ) -> None:
        if d is not None and int(d) <= 0:
            raise PaDiMError(f"PaDiM: d must be a positive integer or None, got {d}")
        if eps < 0:
            raise PaDiMError(f"PaDiM: eps must be >= 0, got {eps}")
        if eps_mode not in EPS_MODES:
            raise PaDiMError(f"PaDiM: eps_mode={eps_mode!r}; valid: {', '.join(EPS_MODES)}")
        self.d = None if d is None else int(d)
        self.rd_seed, self.rd_scheme = int(rd_seed), str(rd_scheme)
        self.eps, self.eps_mode, self.sigma = float(eps), eps_mode, float(sigma)

    def _embed(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, d, h, w) float32 embedding of one batch (the drawn channels, fused on the first layer's grid)."""
        maps = [m.detach().cpu().float() for m in maps]
        idx = None if self.rd_idx_.numel() == sum(r.channels for r in self.feature_layers_) else self.rd_idx_
        return select_and_fuse(maps, idx)

    def _fit(self, batches: Iterable[Sequence[torch.Tensor]]) -> None:
        total = sum(r.channels for r in self.feature_layers_)
        idx = rd_indices(total, self.d, self.rd_seed, scheme=self.rd_scheme)
        # the drawn set is what matters for a Mahalanobis distance: keep it ascending (channel order of the layers)
        self.rd_idx_ = torch.arange(total) if idx is None else idx.sort().values
        h, w = self.feature_layers_[0].grid
        acc = GaussianAccumulator(h * w, int(self.rd_idx_.numel()))
        with torch.no_grad():
            for batch in batches:
                acc.update(self._embed(batch).flatten(2).permute(2, 0, 1))  # (P, B, d)
                del batch
            if acc.n < 2:
                raise PaDiMError("PaDiM: fit needs at least 2 training images")
            self.n_train_ = acc.n
            self.exact_statistics_ = acc.exact
            self.mean_, self.whiten_, self.eps_applied_ = acc.finalize(self.eps, self.eps_mode)

    def mahalanobis(self, emb: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance (B, h, w) of a (B, d, h, w) embedding, batched over chunks of positions.

        Few, large ops on purpose: one subtraction for all positions, then per chunk one ``bmm`` and one norm into
        preallocated buffers (many small element-wise ops cost more in OpenMP fork/join than they compute)."""
        b, d, h, w = emb.shape
        x = emb.flatten(2).permute(2, 0, 1).contiguous()  # (P, B, d); a strided view makes bmm very slow
        x -= self.mean_.unsqueeze(1)
        out = torch.empty(h * w, b, dtype=torch.float32)
        step = max(1, min(h * w, SCORE_BUFFER_ELEMENTS // (b * d)))  # bounds the (chunk, B, d) product buffer
        z = torch.empty(step, b, d, dtype=torch.float32)
        for a in range(0, h * w, step):
            e = min(a + step, h * w)
            zc = z[: e - a]
            torch.bmm(x[a:e], self.whiten_[a:e].transpose(1, 2), out=zc)  # rows: (W delta)^T
            torch.linalg.vector_norm(zc, dim=-1, out=out[a:e])
        return out.permute(1, 0).reshape(b, h, w)

    def _predict(self, maps: Sequence[torch.Tensor], image_size: tuple[int, int]) -> Prediction:
        with torch.no_grad():
            dist = self.mahalanobis(self._embed(maps))
            amap = patch_scores_to_map(dist, image_size, self.sigma)
            scores = amap.flatten(1).amax(dim=1)
        return Prediction(maps=amap.numpy().astype(np.float32), scores=scores.numpy().astype(np.float64))

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors(tensors)
        self.rd_idx_ = self.rd_idx_.long()
