"""Image-level and pixel-level area under the ROC curve."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from ._inputs import check_labels_scores, check_masks_maps, split_sorted

_CHUNK = 1 << 22  # positives per searchsorted call (bounds the int64 temporaries to ~64 MB)


def image_auroc(labels, scores) -> float:
    """Image AUROC: ``sklearn.metrics.roc_auc_score(labels, scores)``.

    ``labels``: (N,) 0 = good, 1 = defective; ``scores``: (N,) higher = more anomalous. Both classes must be present,
    otherwise ValueError (ROC AUC is undefined with one class).
    """
    y, s = check_labels_scores(labels, scores)
    return float(roc_auc_score(y, s))


def auroc_from_sorted(neg: np.ndarray, pos: np.ndarray) -> float:
    """Mann-Whitney AUROC from ascending-sorted negative and positive scores.

    AUROC = (#pairs with pos > neg + 0.5 * #pairs with pos == neg) / (n_pos * n_neg), counted exactly in int64: for
    every positive p, ``left = #neg < p`` and ``right = #neg <= p``, and the doubled numerator is sum(left + right).
    This equals the trapezoidal area under the ROC curve with ties as diagonal segments (what scikit-learn computes).
    """
    twice = 0
    for start in range(0, pos.size, _CHUNK):
        p = pos[start : start + _CHUNK]
        twice += int(np.searchsorted(neg, p, side="left").sum(dtype=np.int64))
        twice += int(np.searchsorted(neg, p, side="right").sum(dtype=np.int64))
    return twice / (2.0 * pos.size * neg.size)


def pixel_auroc(masks, maps) -> float:
    """Pixel AUROC: ROC AUC of all pixels of all test images pooled into one set (good images included).

    ``masks``: bool (N, H, W), True = defective pixel; ``maps``: (N, H, W) anomaly scores. Computed exactly as the
    Mann-Whitney statistic (ties count one half) from two sorts, without sklearn's float64 copies and index arrays,
    so 500 x 224 x 224 pixels need about one extra copy of the maps in memory. Equal to
    ``roc_auc_score(masks.ravel(), maps.ravel())``. ValueError if no pixel (or every pixel) is defective.
    """
    m, a = check_masks_maps(masks, maps)
    return auroc_from_sorted(*split_sorted(m, a))
