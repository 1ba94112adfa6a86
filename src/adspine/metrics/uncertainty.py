"""Uncertainty of the metrics of one category, over its test images.

- Image AUROC: DeLong's variance (fast midrank algorithm of Sun & Xu, IEEE SPL 2014) -> :func:`auroc_ci`, a plain
  normal (Wald) interval clipped to [0, 1]; :func:`delong_paired` compares two configurations scored on the same test
  images (paired DeLong, two-sided z-test). :func:`holm` adjusts several such p-values (Holm-Bonferroni step-down).
- Pixel AUROC and AUPRO: :func:`pixel_bootstrap_ci`, a seeded bootstrap that resamples IMAGES (not pixels),
  stratified into images with and without defective pixels, percentile intervals. Each resample is a weighted sum of
  per-image counts precomputed once (:class:`PixelCounts`), so no resample passes over the pixels again.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, stats

from ._inputs import _as_binary, check_labels_scores, check_masks_maps, pixel_images, split_sorted
from .aupro import _STRUCTURE, _area_to, _check_limit

N_THRESHOLDS = 4096  # score thresholds of the binned pixel metrics (see PixelCounts)


def _check_level(level) -> float:
    try:
        lv = float(level)
    except (TypeError, ValueError):
        raise ValueError(f"level: {level!r} is not a number") from None
    if not (0.0 < lv < 1.0):
        raise ValueError(f"level: {level!r} is outside (0, 1)")
    return lv


# ------------------------------------------------------------------------------------------------- DeLong


def _delong(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs (k,) and DeLong covariance (k, k) of k score rows (k, N) against labels y (N,) bool.

    Midranks (``scipy.stats.rankdata``, ties averaged) of positives among positives (tx), negatives among negatives
    (ty) and both pooled (tz) give the structural components V10 = (tz_pos - tx) / n and V01 = 1 - (tz_neg - ty) / m;
    AUC = mean V10, covariance = cov(V10) / m + cov(V01) / n (sample covariances, ddof = 1).
    """
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        raise ValueError(f"labels: DeLong's variance needs at least 2 good and 2 defective images, got {n} and {m}")
    pos, neg = scores[:, y], scores[:, ~y]
    tx = stats.rankdata(pos, axis=1)
    ty = stats.rankdata(neg, axis=1)
    tz = stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    aucs = v10.mean(axis=1)
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, cov


def auroc_ci(labels, scores, level: float = 0.95) -> tuple[float, float, float]:
    """Image AUROC with a DeLong confidence interval: ``(auc, lo, hi)``.

    Plain normal interval auc +- z * sqrt(DeLong variance), z = the (1 + level) / 2 normal quantile, clipped to
    [0, 1]. When every defective image outscores every good one the variance is 0 and the interval is [1, 1].
    Needs at least 2 good and 2 defective images.
    """
    lv = _check_level(level)
    y, s = check_labels_scores(labels, scores)
    aucs, cov = _delong(y, s[None].astype(np.float64))
    auc, se = float(aucs[0]), float(np.sqrt(max(cov[0, 0], 0.0)))
    half = float(stats.norm.ppf(0.5 + lv / 2)) * se
    return auc, max(0.0, auc - half), min(1.0, auc + half)


def delong_paired(labels, scores_a, scores_b) -> tuple[float, float]:
    """Paired DeLong test of two score sets on the same test images: ``(auc_a - auc_b, two-sided p-value)``.

    z = difference / sqrt(var_a + var_b - 2 cov_ab) from DeLong's covariance; p = 2 (1 - Phi(|z|)). A zero variance
    gives p = 1 for equal AUCs and p = 0 otherwise.
    """
    y, a = check_labels_scores(labels, scores_a)
    _, b = check_labels_scores(labels, scores_b)
    aucs, cov = _delong(y, np.stack([a, b]).astype(np.float64))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    if diff == 0.0:
        return 0.0, 1.0
    if var <= 0.0:
        return diff, 0.0
    return diff, float(2.0 * stats.norm.sf(abs(diff) / np.sqrt(var)))


def holm(pvalues) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the order given.

    With the p-values sorted ascending p_(1) <= ... <= p_(k): adjusted p_(i) = max over j <= i of
    min(1, (k - j + 1) p_(j)). Reject hypothesis i at family-wise level alpha when its adjusted value is <= alpha.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"pvalues: expected a 1-D sequence, got shape {p.shape}")
    bad = ~((p >= 0.0) & (p <= 1.0))
    if bad.any():
        raise ValueError(f"pvalues: {p[bad][0].item()!r} is not a probability in [0, 1]")
    k = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((k - np.arange(k)) * p[order]))
    out = np.empty(k)
    out[order] = adjusted
    return out.tolist()


# ------------------------------------------------------------------------------------------------- pixel bootstrap


class PixelCounts:
    """Per-image binned pixel counts from which pixel AUROC and AUPRO of any image reweighting follow by sums.

    Binning: the thresholds (``edges``, ascending, each an actual score) are at most ``n_thresholds`` quantiles of
    the scores: 1/4 over all good pixels, 1/2 over the good pixels of the top 1.5 * fpr_limit (where the AUPRO
    curve lives), 1/4 over the defective pixels. Bin b holds the scores in [edges[b], edges[b + 1]). Pixels of one
    bin count as tied (AUROC) and the PRO curve is known only at the edges, joined by straight segments (AUPRO).
    When the maps hold fewer distinct values than thresholds every value is an edge and both metrics are exact.
    Otherwise, on the unweighted sample, |error| <= 0.5 * sum_b p_b n_b <= 0.5 * 4 / n_thresholds for AUROC
    (p_b, n_b: fractions of defective / good pixels in bin b) and <= max_b (FPR step in bin b) / (2 * fpr_limit)
    <= 0.75 * 2 / n_thresholds for AUPRO, i.e. below 5e-4 for the default 4096 thresholds.

    Kept after construction (images in the order given): ``neg`` and ``pos`` (N, B) good / defective pixel counts
    per bin, ``coverage`` (R, B) fraction of each ground-truth region (8-connected, per image) scoring >= each edge,
    ``region_image`` (R,) the image of each region.
    """

    def __init__(self, masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3,
                 n_thresholds: int = N_THRESHOLDS):
        """``masks`` bool (N, H, W) with at least one defective and one good pixel, ``maps`` (N, H, W) finite."""
        self.fpr_limit = _check_limit(fpr_limit)
        neg_sorted, pos_sorted = split_sorted(masks, maps)
        n_neg, quarter = neg_sorted.size, max(1, n_thresholds // 4)
        top = max(0, n_neg - int(np.ceil(min(1.0, 1.5 * self.fpr_limit) * n_neg)))

        def picks(sorted_values: np.ndarray, start: int, count: int) -> np.ndarray:
            idx = np.linspace(start, sorted_values.size - 1, count).round().astype(np.int64)
            return sorted_values[idx]

        self.edges = np.unique(np.concatenate([
            picks(neg_sorted, 0, quarter),
            picks(neg_sorted, top, n_thresholds - 2 * quarter),
            picks(pos_sorted, 0, quarter),
        ]))  # edges[0] = the smallest score of all
        del neg_sorted, pos_sorted
        n_bins, n_img = self.edges.size, masks.shape[0]

        regions, n_regions = ndimage.label(masks, structure=_STRUCTURE)
        self.neg = np.empty((n_img, n_bins), dtype=np.float64)
        self.pos = np.empty((n_img, n_bins), dtype=np.float64)
        pos_bins, pos_regions, pos_images = [], [], []
        for i in range(n_img):
            q = np.searchsorted(self.edges, maps[i].ravel(), side="right") - 1
            m = masks[i].ravel()
            self.neg[i] = np.bincount(q[~m], minlength=n_bins)
            self.pos[i] = np.bincount(q[m], minlength=n_bins)
            pos_bins.append(q[m])
            pos_regions.append(regions[i].ravel()[m] - 1)
            pos_images.append(np.full(pos_bins[-1].size, i))
        region_of_pixel = np.concatenate(pos_regions)
        per_region = np.bincount(region_of_pixel * n_bins + np.concatenate(pos_bins), minlength=n_regions * n_bins)
        per_region = per_region.reshape(n_regions, n_bins).astype(np.float64)
        at_or_above = np.cumsum(per_region[:, ::-1], axis=1)[:, ::-1]  # pixels with bin >= b
        self.coverage = at_or_above / at_or_above[:, :1]
        self.region_image = np.empty(n_regions, dtype=np.int64)
        self.region_image[region_of_pixel] = np.concatenate(pos_images)

    def metrics(self, weights) -> tuple[np.ndarray, np.ndarray]:
        """Pixel AUROC and AUPRO (K,) for K image weightings ``weights`` (K, N) (1 = the image once, 2 = twice...).

        Equal to the binned metrics of the test set in which image i appears weights[k, i] times.
        """
        w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        hn, hp = w @ self.neg, w @ self.pos  # (K, B)
        total_n, total_p = hn.sum(axis=1), hp.sum(axis=1)
        below = np.cumsum(hn, axis=1) - hn
        auroc = (hp * (below + 0.5 * hn)).sum(axis=1) / (total_p * total_n)

        fpr = np.cumsum(hn[:, ::-1], axis=1) / total_n[:, None]  # thresholds descending: edges[B-1], ..., edges[0]
        wr = w[:, self.region_image]  # (K, R) copies of each region
        pro = (wr @ self.coverage)[:, ::-1] / wr.sum(axis=1, keepdims=True)
        zero = np.zeros((w.shape[0], 1))
        fpr, pro = np.hstack([zero, fpr]), np.hstack([zero, pro])
        aupro = np.array([_area_to(f, p, self.fpr_limit) for f, p in zip(fpr, pro)]) / self.fpr_limit
        return auroc, aupro


def _stratified_weights(strata: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, N) bootstrap multiplicities: each stratum (value of ``strata``) is resampled to its own size."""
    rng = np.random.default_rng(seed)
    w = np.zeros((n_boot, strata.size))
    for value in (False, True):
        idx = np.flatnonzero(strata == value)
        if idx.size:
            w[:, idx] = rng.multinomial(idx.size, np.full(idx.size, 1.0 / idx.size), size=n_boot)
    return w


def pixel_bootstrap_ci(masks, maps, has_mask=None, n_boot: int = 200, seed: int = 0, level: float = 0.95,
                       fpr_limit: float = 0.3, labels=None) -> dict[str, float | None]:
    """Percentile bootstrap intervals of pixel AUROC and AUPRO (up to ``fpr_limit``) over test IMAGES.

    Returns ``{pixel_auroc_lo, pixel_auroc_hi, aupro_lo, aupro_hi}``. Each of ``n_boot`` resamples (generator seeded
    with ``seed``) draws images with replacement, separately among the images with defective pixels and the others,
    keeping both counts. The metrics of each resample come from :class:`PixelCounts` (binned, error below 5e-4).
    ``has_mask`` (N,) bool selects the images as in :func:`adspine.metrics.evaluate`: with ``labels`` (N,) 0/1
    the good images are kept whatever ``has_mask`` says; without ``labels`` only images with ``has_mask`` True are
    used. All four values are None when the used masks hold no defective pixel.
    """
    lv = _check_level(level)
    lim = _check_limit(fpr_limit)
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot: {n_boot!r} is not a positive integer")
    m, a = check_masks_maps(masks, maps, allow_no_defect=True)
    y = None
    if labels is not None:
        y = _as_binary(labels, "labels")
        if y.shape != (m.shape[0],):
            raise ValueError(f"labels: shape {y.shape} does not match {m.shape[0]} masks")
    keep = pixel_images(y, has_mask)
    if keep is not None:
        if keep.size != m.shape[0]:
            raise ValueError(f"has_mask: length {keep.size} differs from the {m.shape[0]} masks")
        m, a = m[keep], a[keep]
    out: dict[str, float | None] = dict.fromkeys(("pixel_auroc_lo", "pixel_auroc_hi", "aupro_lo", "aupro_hi"))
    if not m.any():
        return out
    counts = PixelCounts(m, a, lim)
    weights = _stratified_weights(m.reshape(m.shape[0], -1).any(axis=1), int(n_boot), int(seed))
    auroc, aupro_values = counts.metrics(weights)
    tails = [(1 - lv) / 2, (1 + lv) / 2]
    out["pixel_auroc_lo"], out["pixel_auroc_hi"] = (float(v) for v in np.quantile(auroc, tails))
    out["aupro_lo"], out["aupro_hi"] = (float(v) for v in np.quantile(aupro_values, tails))
    return out
