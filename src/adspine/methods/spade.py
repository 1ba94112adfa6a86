"""SPADE (Cohen & Hoshen 2020): K nearest training images, then patch-level nearest neighbours among their patches.

- Image score: mean Euclidean distance to the K nearest training images in the space of globally average-pooled
  features of the deepest given layer (faiss ``IndexFlatL2``).
- Pixel map: for each given layer, the gallery is every patch embedding of those K training images at that layer;
  each test patch scores its distance to the nearest gallery patch (kappa = 1, exact). The per-layer maps are
  upsampled bilinearly (align_corners=False) to the input size and averaged, then blurred (Gaussian, sigma 4).
- The method needs every training feature: fit keeps all per-layer patch features (float32), centred on their
  per-layer mean (distances do not change; the ``|q|^2 + |g|^2 - 2 q.g`` expansion below loses far fewer digits),
  and their squared norms.
- Nearest-patch search (``nearest_patch_sq_dist``), exact either way; the queries of large searches are split over
  ``torch.get_num_threads()`` Python threads that each run single-threaded BLAS (measured here: fewer OpenMP
  fork/joins on small GEMMs when the cores are shared):
  - where the CPU multiplies bfloat16 in hardware (AMX / AVX512-BF16), a bfloat16 GEMM with a proven error bound
    screens the gallery (``adspine.methods.screen``) and the few candidate rows are scored in float64;
  - otherwise blocks of gallery rows go through one float32 ``addmm`` (``|g|^2 - 2 q.g``) into a cache-sized buffer
    and a row minimum, ``|q|^2`` added at the end, near-ties recomputed in float64.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from adspine.methods import knn
from adspine.methods.base import AnomalyMethod, CostShape, MethodInfo, Prediction
from adspine.methods.postprocess import DEFAULT_SIGMA, gaussian_blur
from adspine.methods import screen as screening
from adspine.methods.screen import GalleryScreen, fast_bf16
from adspine.methods.threads import map_one_thread_each

GALLERY_BLOCK = 256  # gallery rows per GEMM block: (queries x 256) float32 buffer stays in cache
TARGET_REL_ERROR = 1e-5  # squared distances whose float32 expansion error may exceed this are searched exactly


class SPADEError(ValueError):
    """A SPADE setting that cannot work (one line naming the value)."""


def nearest_patch_sq_dist(queries: torch.Tensor, gallery: torch.Tensor, gallery_sq: torch.Tensor,
                          images: Sequence[int], threads: int = 1, block: int = GALLERY_BLOCK,
                          screen: GalleryScreen | None = None) -> torch.Tensor:
    """Squared Euclidean distance (Q,) of each query row (Q, C) to its nearest row among ``gallery[images]``.

    ``gallery``: (N, P, C) float32; ``gallery_sq``: its squared row norms (N, P). With a ``screen`` (built on this
    gallery): its candidate rows, scored exactly in float64 (``screened_sq_dist``). Otherwise float32 blocks of
    ``|g|^2 - 2 q.g`` with a running row minimum, then ``+ |q|^2``, clamped at 0. That expansion's worst-case rounding
    error grows with the channel count C (``gamma_{C+4} (|q| + |g|)^2``); queries where it may exceed
    ``TARGET_REL_ERROR`` of the squared distance (half that of the distance) are searched again exactly
    (``exact_near``), so every result is within the target whatever C."""
    q = queries.contiguous()
    if screen is not None and q.shape[0] * len(images) * gallery.shape[1] * gallery.shape[2] >= screening.MIN_MACS:
        out, unscreened = screened_sq_dist(q, screen, images, threads)
        if unscreened.numel():
            out[unscreened] = nearest_patch_sq_dist(q[unscreened], gallery, gallery_sq, images, threads, block)
        return out
    step = -(-q.shape[0] // max(1, threads))  # ceil: one slice of query rows per thread
    parts = [(a, min(a + step, q.shape[0])) for a in range(0, q.shape[0], step)]
    out = torch.empty(q.shape[0], dtype=torch.float32)

    def run(rows: tuple[int, int]) -> None:
        qs = q[rows[0] : rows[1]]
        n = qs.shape[0]
        best = out[rows[0] : rows[1]].fill_(float("inf"))
        buf = torch.empty(n * block, dtype=torch.float32)
        row_min = torch.empty(n, dtype=torch.float32)
        for j in images:
            g, gsq = gallery[j], gallery_sq[j]
            for a in range(0, g.shape[0], block):
                e = min(a + block, g.shape[0])
                prod = buf[: n * (e - a)].view(n, e - a)
                torch.addmm(gsq[a:e], qs, g[a:e].T, alpha=-2.0, out=prod)
                torch.amin(prod, dim=1, out=row_min)
                torch.minimum(best, row_min, out=best)
        best.add_(qs.square().sum(dim=1)).clamp_(min=0.0)

    if len(parts) == 1:
        run(parts[0])
    else:
        map_one_thread_each(run, parts)
    # worst-case rounding of the expansion for a row g (Higham, C + 4 roundings: the dot product, |g|^2, |q|^2, the
    # additions): gamma (|q| + |g|)^2; the winner and the true nearest row lie within dmax of q (see ``_reach``);
    # where that error may exceed TARGET_REL_ERROR of the squared distance, the query is re-searched exactly
    c = q.shape[1]
    gam = screening.gamma(c + 4) * screening.inflation(c)
    q_norm = (q.square().sum(dim=1).double() * (1 + screening.gamma(c + 1))).sqrt()
    err = gam * (2 * q_norm + _reach(out.double(), q_norm, gam)) ** 2
    flagged = torch.nonzero(~(err < TARGET_REL_ERROR * out.double())).flatten()
    if flagged.numel():
        out[flagged] = exact_near(q[flagged], gallery, gallery_sq, images, out[flagged].double() + 2 * err[flagged],
                                  block)
    return out


def _reach(out: torch.Tensor, q_norm: torch.Tensor, gam: float) -> torch.Tensor:
    """Upper bound of the true distance of the float32 winner (and so of the true nearest row) from its computed
    squared distance ``out``: ``d^2 <= out + gam (2 |q| + d)^2`` gives ``d <= (sqrt(out) + 2 sqrt(gam) |q|) /
    (1 - sqrt(gam))``."""
    root = gam**0.5
    return (out.clamp(min=0).sqrt() + 2 * root * q_norm) / (1 - root)


def exact_near(queries: torch.Tensor, gallery: torch.Tensor, gallery_sq: torch.Tensor, images: Sequence[int],
               limit: torch.Tensor, block: int = GALLERY_BLOCK) -> torch.Tensor:
    """Squared distance (F,) float32 of each query to its nearest row among ``gallery[images]``, exact: the float32
    expansion again, every row whose value is within ``limit`` (F,) float64 (the winner's plus twice the rounding
    bound: the true nearest row always is) scored in float64 from the differences."""
    best = torch.full((queries.shape[0],), float("inf"), dtype=torch.float64)
    q = queries.contiguous()
    lim = (limit - q.square().sum(dim=1).double()).to(torch.float32)
    lim = torch.where(lim.double() < limit - q.square().sum(dim=1).double(),
                      torch.nextafter(lim, torch.tensor(float("inf"))), lim)  # rounded up
    for j in images:
        g, gsq = gallery[j], gallery_sq[j]
        for a in range(0, g.shape[0], block):
            prod = torch.addmm(gsq[a : a + block], q, g[a : a + block].T, alpha=-2.0)
            qi, r = (prod <= lim.unsqueeze(1)).nonzero(as_tuple=True)
            if qi.numel():
                d2 = (q[qi].double() - g[a + r].double()).square_().sum(dim=1)
                best.scatter_reduce_(0, qi, d2, "amin")
    return best.float()


def screened_sq_dist(queries: torch.Tensor, screen: GalleryScreen, images: Sequence[int],
                     threads: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact squared distance (Q,) float32 to the nearest row among ``images``: float64 differences of the screen's
    candidate rows (which always include the nearest); and the queries the screen left out (their entries: inf)."""
    qi, rows, unscreened = screen.candidates_threaded(queries, images, threads)
    flat = screen.rows.reshape(-1, queries.shape[1])
    d2 = (queries[qi].double() - flat[rows].double()).square_().sum(dim=1)
    best = torch.full((queries.shape[0],), float("inf"), dtype=torch.float64)
    return best.scatter_reduce_(0, qi, d2, "amin").float(), unscreened


def spade_cost(shape: CostShape, settings: dict) -> float:
    """FLOPs of predict (fit only stores): per test image and layer, 2 * K * P_l^2 * C_l (exact nearest patch in
    the K images' galleries), K = min(k, N)."""
    k = min(int(settings.get("k", 50)), shape.n_train)
    return float(sum(2.0 * shape.n_test * k * p * p * c for p, c in zip(shape.positions, shape.channels)))


class SPADE(AnomalyMethod):
    """Semantic pyramid anomaly detection with K nearest training images (K clipped to the training-set size)."""

    # efficiency: measured 0.56 of the conv FLOP/s with the bfloat16 screen, 0.25 with the float32 search
    # (benchmarks/methods_dense.py --parts calibrate, R18 K=50 at 224, fit + one image), but 0.07-0.11 on the demo's
    # small galleries (per-call overhead; benchmarks/estimate.py): 0.2 keeps both within ~3x
    info = MethodInfo(
        name="spade", display="SPADE", cost=spade_cost, efficiency=0.2,
        summary="K nearest training images, then nearest patch among their patches",
    )

    def __init__(self, k: int = 50, sigma: float = DEFAULT_SIGMA) -> None:
        if int(k) < 1:
            raise SPADEError(f"SPADE: k must be >= 1, got {k}")
        self.k, self.sigma = int(k), float(sigma)

    def _fit(self, batches: Iterable[Sequence[torch.Tensor]]) -> None:
        per_layer: list[list[torch.Tensor]] = [[] for _ in self.feature_layers_]
        pooled: list[torch.Tensor] = []
        with torch.no_grad():
            for batch in batches:
                maps = [m.detach().cpu().float() for m in batch]
                for store, m in zip(per_layer, maps):
                    store.append(m.flatten(2).transpose(1, 2).contiguous())  # (B, hw, C)
                pooled.append(maps[-1].mean(dim=(2, 3)))
            self.train_, self.centres_ = [], []
            for store in per_layer:
                x = torch.cat(store)
                store.clear()
                centre = x.mean(dim=(0, 1), dtype=torch.float64).float()
                self.train_.append(x.sub_(centre))
                self.centres_.append(centre)
        self.pooled_ = torch.cat(pooled)
        self.n_train_ = int(self.pooled_.shape[0])
        self.k_effective_ = min(self.k, self.n_train_)
        self.notes_ = [f"k={self.k} clipped to the {self.n_train_} training images"] if self.k > self.n_train_ else []
        self._derive()

    def _derive(self) -> None:
        """Squared norms of the centred training patches and the pooled-feature index (rebuilt after load)."""
        self._train_sq = [t.square().sum(dim=2) for t in self.train_]
        self._screens = [GalleryScreen(t) for t in self.train_] if fast_bf16() else [None] * len(self.train_)
        self._index = knn.flat_l2_index(self.pooled_)

    def nearest_images(self, pooled: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Distances (B, K) and indices (B, K) of the K nearest training images to pooled test features (B, C)."""
        return knn.search(self._index, pooled, self.k_effective_)

    def _predict(self, maps: Sequence[torch.Tensor], image_size: tuple[int, int]) -> Prediction:
        threads = max(1, torch.get_num_threads())
        with torch.no_grad():
            maps = [m.detach().cpu().float() for m in maps]
            dist, nn_idx = self.nearest_images(maps[-1].mean(dim=(2, 3)))
            scores = dist.astype(np.float64).mean(axis=1)
            b = maps[0].shape[0]
            acc = torch.zeros(b, *image_size, dtype=torch.float32)
            for m, train, train_sq, centre, screen in zip(maps, self.train_, self._train_sq, self.centres_,
                                                          self._screens):
                h, w = m.shape[-2:]
                queries = m.flatten(2).transpose(1, 2) - centre  # (B, hw, C), centred like the gallery
                layer = torch.stack([
                    nearest_patch_sq_dist(queries[i], train, train_sq, nn_idx[i].tolist(), threads,
                                          screen=screen).sqrt_()
                    for i in range(b)
                ]).view(b, 1, h, w)
                acc += F.interpolate(layer, size=image_size, mode="bilinear", align_corners=False).squeeze(1)
            out = gaussian_blur(acc / len(maps), self.sigma)
        return Prediction(maps=out.numpy().astype(np.float32), scores=scores)

    # -- persistence: per-layer lists as numbered tensors -------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        self.check_fitted()
        out = {f"train.{i}": t for i, t in enumerate(self.train_)}
        out.update({f"centre.{i}": c for i, c in enumerate(self.centres_)})
        out["pooled"] = self.pooled_
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        n = len(self.feature_layers_)
        self.train_ = [tensors[f"train.{i}"].float() for i in range(n)]
        self.centres_ = [tensors[f"centre.{i}"].float() for i in range(n)]
        self.pooled_ = tensors["pooled"].float()
        self._derive()

    def extra_state(self) -> dict:
        return {"n_train_": self.n_train_, "k_effective_": self.k_effective_, "notes_": list(self.notes_)}
