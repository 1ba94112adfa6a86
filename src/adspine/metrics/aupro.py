"""AUPRO: normalised area under the per-region-overlap (PRO) curve up to a false positive rate limit.

Definition (MVTec AD, Bergmann et al., IJCV 2021):

- The ground truth of each image is split into connected components with 8-connectivity
  (``scipy.ndimage.label`` with a 3x3 ones structure, images never connect to each other).
- For a threshold t (prediction = map >= t), PRO(t) = mean over ALL components of ALL test images of the fraction of
  the component's pixels predicted, and FPR(t) = predicted ground-truth-negative pixels / all ground-truth-negative
  pixels (all test images, good images included).
- Every distinct map value is a threshold (exact curve); the curve starts at (0, 0) above the maximum score.
  Equal scores form one step, i.e. a straight segment between the neighbouring points.
- AUPRO = area under PRO(FPR) from FPR 0 to ``fpr_limit`` by the trapezoid rule, with PRO linearly interpolated at
  ``fpr_limit``, divided by ``fpr_limit``. Random maps give about fpr_limit / 2 (0.15 at 0.3), perfect maps 1.0.

Vectorised: each positive pixel carries the weight 1 / (|its component| * n_components) so PRO(t) is a cumulative sum
over pixels sorted by descending score, FPR(t) a cumulative count of negatives; tie groups are collapsed to their last
element. Only pixels scoring at least the value where FPR first exceeds ``fpr_limit`` are sorted (found with one
``np.partition`` of the negatives), which keeps the curve exact up to and past the limit.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from ._inputs import check_masks_maps

# 8-connectivity inside each image, no connectivity along the image axis.
_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE[1] = True


def _check_limit(fpr_limit) -> float:
    try:
        lim = float(fpr_limit)
    except (TypeError, ValueError):
        raise ValueError(f"fpr_limit: {fpr_limit!r} is not a number") from None
    if not (0.0 < lim <= 1.0):
        raise ValueError(f"fpr_limit: {fpr_limit!r} is outside (0, 1]")
    return lim


def _curve(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO curve points (fpr, pro) for descending thresholds, from (0, 0) to the first point past fpr_limit."""
    labels, n_components = ndimage.label(masks, structure=_STRUCTURE)
    sizes = np.bincount(labels[masks], minlength=n_components + 1)
    weight = np.zeros(sizes.size, dtype=np.float64)
    weight[1:] = 1.0 / (sizes[1:].astype(np.float64) * n_components)

    neg = maps[~masks]
    n_neg = neg.size
    k = math.floor(fpr_limit * n_neg) + 2  # a threshold with >= k negatives above it has FPR > fpr_limit
    flat = maps.ravel()
    flat_labels = labels.ravel()
    if k < n_neg:
        kth = n_neg - k
        cut = np.partition(neg, kth)[kth]  # the k-th largest negative score
        sel = flat >= cut
        flat = flat[sel]
        flat_labels = flat_labels[sel]
    del neg

    order = np.argsort(flat)[::-1]
    scores = flat[order]
    lab = flat_labels[order]
    pro = np.cumsum(weight[lab])
    fp = np.cumsum(lab == 0)
    last_of_tie = np.empty(scores.size, dtype=bool)
    np.not_equal(scores[1:], scores[:-1], out=last_of_tie[:-1])
    last_of_tie[-1] = True

    fpr = np.concatenate(([0.0], fp[last_of_tie] / n_neg))
    pro = np.concatenate(([0.0], np.minimum(pro[last_of_tie], 1.0)))
    return fpr, pro


def _area_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under y(x) for x in [0, limit], y linearly interpolated at limit; x non-decreasing from 0."""
    i = int(np.searchsorted(x, limit, side="right"))  # points with x <= limit
    xs, ys = x[:i], y[:i]
    area = float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs)))
    if xs[-1] < limit and i < x.size:
        y_lim = ys[-1] + (y[i] - ys[-1]) * (limit - xs[-1]) / (x[i] - xs[-1])
        area += 0.5 * (ys[-1] + y_lim) * (limit - xs[-1])
    return area


def pro_curve(masks, maps, fpr_limit: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The exact PRO curve as (fpr, pro) arrays (see module docstring), from (0, 0) through the first point with
    FPR > ``fpr_limit`` (the full curve up to FPR 1 for the default 1.0)."""
    m, a = check_masks_maps(masks, maps)
    return _curve(m, a, _check_limit(fpr_limit))


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """AUPRO up to ``fpr_limit`` as defined for MVTec AD (see the module docstring for the exact definition).

    ``masks``: bool (N, H, W), True = defective pixel; ``maps``: (N, H, W) anomaly scores, higher = more anomalous.
    ValueError if no mask has a defective pixel, if no pixel is good, or if fpr_limit is outside (0, 1].
    """
    lim = _check_limit(fpr_limit)
    m, a = check_masks_maps(masks, maps)
    fpr, pro = _curve(m, a, lim)
    return _area_to(fpr, pro, lim) / lim
