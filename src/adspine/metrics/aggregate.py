"""All metrics of one category at once, and means over categories (all, texture, object)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from ._inputs import check_labels_scores, check_masks_maps, pixel_images, split_sorted
from .aupro import _area_to, _check_limit, _curve
from .auroc import auroc_from_sorted, image_auroc
from .f1 import f1_max, f1_max_from_sorted

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max")
KINDS = ("texture", "object")


def evaluate(labels, scores, masks=None, maps=None, has_mask=None, fpr_limit: float = 0.3) -> dict[str, float | None]:
    """Every metric of one category: ``{image_auroc, pixel_auroc, aupro, image_f1_max, pixel_f1_max}``.

    ``labels`` (N,) 0/1 and ``scores`` (N,) give the image metrics (both classes required). ``masks`` bool (N, H, W)
    and ``maps`` (N, H, W) give the pixel metrics (pixel AUROC, AUPRO up to ``fpr_limit``, pixel F1-max). Pixel
    metrics are None (absent, not 0) when ``masks`` is None (an image-level dataset), or when no pixel of the used
    masks is defective. ``has_mask`` (N,) bool, optional: which images have a pixel mask; the pixel metrics then cover
    the good images (labels 0, all-normal ground truth, whatever ``has_mask`` says) plus the defective images with a
    mask; defective images without one are left out. Both F1-max values are OPTIMISTIC (threshold chosen on the test
    set). Pixel scores are sorted once and shared.
    """
    lim = _check_limit(fpr_limit)
    y, s = check_labels_scores(labels, scores)
    out: dict[str, float | None] = {
        "image_auroc": image_auroc(y, s),
        "pixel_auroc": None,
        "aupro": None,
        "image_f1_max": f1_max(y, s),
        "pixel_f1_max": None,
    }
    if masks is None:
        return out
    if maps is None:
        raise ValueError("maps: None while masks are given; pass the anomaly maps or masks=None")
    m, a = check_masks_maps(masks, maps, allow_no_defect=True)
    if m.shape[0] != y.size:
        raise ValueError(f"masks: {m.shape[0]} masks for {y.size} labels")
    keep = pixel_images(y, has_mask)
    if keep is not None:
        m, a = m[keep], a[keep]
    if not m.any():
        return out
    neg, pos = split_sorted(m, a)
    out["pixel_auroc"] = auroc_from_sorted(neg, pos)
    out["pixel_f1_max"] = f1_max_from_sorted(neg, pos)
    del neg, pos
    fpr, pro = _curve(m, a, lim)
    out["aupro"] = _area_to(fpr, pro, lim) / lim
    return out


def mean_over_categories(
    rows: Mapping[str, Mapping[str, float | None]],
    kinds: Mapping[str, str | None] | None = None,
) -> dict[str, dict[str, float | int | None]]:
    """Unweighted means of per-category metrics, over all categories and per category kind.

    ``rows``: category name -> metric dict (e.g. the output of :func:`evaluate`); ``kinds``: category name ->
    ``"texture"``, ``"object"`` or None (unknown; missing names count as None). Returns
    ``{"all": {...}, "texture": {...}, "object": {...}}`` where the ``texture``/``object`` groups appear only when at
    least one category has that kind. Each group holds ``n_categories`` and, for every metric key seen in any row, the
    arithmetic mean over the group's categories, or None if any category of the group lacks that metric (None or
    absent), so that every mean in a group covers the same categories.
    """
    if not isinstance(rows, Mapping) or not rows:
        raise ValueError(f"rows: expected a non-empty mapping category -> metrics, got {type(rows).__name__}")
    kinds = dict(kinds or {})
    for cat, kind in kinds.items():
        if kind is not None and kind not in KINDS:
            raise ValueError(f"kinds[{cat!r}]: {kind!r} is not 'texture', 'object' or None")
    keys: list[str] = []
    for cat, metrics in rows.items():
        if not isinstance(metrics, Mapping):
            raise ValueError(f"rows[{cat!r}]: expected a mapping metric -> value, got {type(metrics).__name__}")
        for key, value in metrics.items():
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, (int, float, np.integer, np.floating))
                or not math.isfinite(value)
            ):
                raise ValueError(f"rows[{cat!r}][{key!r}]: {value!r} is not a finite number or None")
            if key not in keys:
                keys.append(key)

    groups = {"all": list(rows)}
    for kind in KINDS:
        members = [c for c in rows if kinds.get(c) == kind]
        if members:
            groups[kind] = members

    out: dict[str, dict[str, float | int | None]] = {}
    for group, cats in groups.items():
        res: dict[str, float | int | None] = {"n_categories": len(cats)}
        for key in keys:
            values = [rows[c].get(key) for c in cats]
            res[key] = None if any(v is None for v in values) else float(np.mean(np.asarray(values, dtype=np.float64)))
        out[group] = res
    return out
