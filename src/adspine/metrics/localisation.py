"""Cheap localisation figures of one category: the max-in-mask hit rate, and the bootstrap replicates of pixel AUROC
and AUPRO that let the report test two configurations against each other on the same resamples (paired)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ._inputs import _as_binary, check_masks_maps, pixel_images
from .aupro import _check_limit
from .uncertainty import PixelCounts, _check_level, _stratified_weights

HIT_TOLERANCE_PX = 4  # at the evaluation size (the maps' grid)


def max_in_mask(masks, maps, labels=None, has_mask=None, tolerance: float = HIT_TOLERANCE_PX) -> float | None:
    """Share of defective test images whose map maximum lies inside the ground truth or within ``tolerance`` px
    (Euclidean distance to the nearest defective pixel) of it.

    ``masks`` bool (N, H, W), ``maps`` (N, H, W). Images counted: those with at least one defective pixel (among the
    images with a mask: ``labels``/``has_mask`` as in :func:`adspine.metrics.evaluate`). Where several pixels share
    the maximum, the image counts as a hit only if every one of them is within the tolerance (a flat map earns
    nothing). None when no image has a defective pixel.
    """
    m, a = check_masks_maps(masks, maps, allow_no_defect=True)
    if not np.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance: {tolerance!r} is not a non-negative number of pixels")
    y = None if labels is None else _as_binary(labels, "labels")
    keep = pixel_images(y, has_mask)
    if keep is not None:
        m, a = m[keep], a[keep]
    defective = np.flatnonzero(m.reshape(m.shape[0], -1).any(axis=1))
    if defective.size == 0:
        return None
    hits = 0
    for i in defective:
        near = ndimage.distance_transform_edt(~m[i]) <= tolerance  # distance to the nearest defective pixel
        top = a[i] == a[i].max()
        hits += bool(near[top].all())
    return hits / defective.size


def pixel_bootstrap(masks, maps, has_mask=None, n_boot: int = 200, seed: int = 0, level: float = 0.95,
                    fpr_limit: float = 0.3, labels=None) -> tuple[dict[str, float | None], np.ndarray | None]:
    """:func:`adspine.metrics.uncertainty.pixel_bootstrap_ci` (same resamples, same intervals) plus its replicates:
    ``(intervals, replicates (n_boot, 2) float32 of [pixel AUROC, AUPRO] or None)``.

    The resamples depend only on ``seed``, ``n_boot`` and which test images have defective pixels, so two
    configurations scored on the same test images share them: the difference of their replicates is a paired
    bootstrap of the difference.
    """
    lv, lim = _check_level(level), _check_limit(fpr_limit)
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot: {n_boot!r} is not a positive integer")
    m, a = check_masks_maps(masks, maps, allow_no_defect=True)
    y = None if labels is None else _as_binary(labels, "labels")
    keep = pixel_images(y, has_mask)
    if keep is not None:
        m, a = m[keep], a[keep]
    out: dict[str, float | None] = dict.fromkeys(("pixel_auroc_lo", "pixel_auroc_hi", "aupro_lo", "aupro_hi"))
    if not m.any():
        return out, None
    weights = _stratified_weights(m.reshape(m.shape[0], -1).any(axis=1), int(n_boot), int(seed))
    auroc, aupro = PixelCounts(m, a, lim).metrics(weights)
    tails = [(1 - lv) / 2, (1 + lv) / 2]
    out["pixel_auroc_lo"], out["pixel_auroc_hi"] = (float(v) for v in np.quantile(auroc, tails))
    out["aupro_lo"], out["aupro_hi"] = (float(v) for v in np.quantile(aupro, tails))
    return out, np.stack([auroc, aupro], axis=1).astype(np.float32)
