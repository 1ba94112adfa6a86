"""Maximum F1 over all thresholds, image level and pixel level.

OPTIMISTIC: the threshold that maximises F1 is chosen on the test set itself, so F1-max is an upper bound of what a
threshold fixed without test labels would reach. Report it as such.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import precision_recall_curve

from ._inputs import check_labels_scores, check_masks_maps, split_sorted


def f1_max(labels, scores) -> float:
    """Image F1-max (OPTIMISTIC: threshold chosen on the test set).

    max over the thresholds of ``sklearn.metrics.precision_recall_curve(labels, scores)`` of
    F1 = 2 * precision * recall / (precision + recall) (0 where precision + recall = 0); prediction = score >= threshold.
    ``labels``: (N,) 0 good / 1 defective, both classes present; ``scores``: (N,) higher = more anomalous.
    """
    y, s = check_labels_scores(labels, scores)
    precision, recall, _ = precision_recall_curve(y, s)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom, dtype=np.float64), where=denom > 0)
    return float(f1.max())


def f1_max_from_sorted(neg: np.ndarray, pos: np.ndarray) -> float:
    """F1-max from ascending-sorted negative and positive scores.

    The maximum over all thresholds is reached at a threshold equal to some positive score (moving a threshold up to
    the next positive score keeps TP and can only drop FP), so for each distinct positive score u:
    TP = #pos >= u, FP = #neg >= u, F1 = 2 TP / (TP + FP + n_pos).
    """
    u = np.unique(pos)
    tp = pos.size - np.searchsorted(pos, u, side="left")
    fp = neg.size - np.searchsorted(neg, u, side="left")
    f1 = 2.0 * tp / (tp + fp + pos.size)
    return float(f1.max())


def pixel_f1_max(masks, maps) -> float:
    """Pixel F1-max (OPTIMISTIC: threshold chosen on the test set).

    All pixels of all test images pooled (good images included); the maximum over thresholds t of
    F1 = 2 TP / (2 TP + FP + FN) with prediction = map >= t, i.e. the maximum F1 of
    ``sklearn.metrics.precision_recall_curve(masks.ravel(), maps.ravel())``, computed exactly from two sorts so that
    millions of pixels stay cheap. ValueError if no pixel (or every pixel) is defective.
    """
    m, a = check_masks_maps(masks, maps)
    return f1_max_from_sorted(*split_sorted(m, a))
