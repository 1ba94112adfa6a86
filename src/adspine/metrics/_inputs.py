"""Input validation shared by the metric functions, and the sorted negative/positive split of pixel scores.

Every error is a ``ValueError`` with one line that names the offending argument and value.
"""

from __future__ import annotations

import numpy as np


def _as_real_array(x, name: str) -> np.ndarray:
    """``x`` as a numeric numpy array (bool, int or float); any other dtype or a non-finite value -> ValueError."""
    try:
        a = np.asarray(x)
    except Exception as exc:  # noqa: BLE001 - ragged lists and the like
        raise ValueError(f"{name}: cannot be read as a numeric array ({exc})") from None
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{name}: dtype {a.dtype} is not numeric")
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a)
        if bad.any():
            first = a[bad].flat[0].item()
            raise ValueError(f"{name}: {int(bad.sum())} non-finite value(s), first {first!r}")
    return a


def _as_binary(x, name: str) -> np.ndarray:
    """``x`` as a bool array; bool arrays pass, numeric arrays must hold only 0 and 1."""
    a = _as_real_array(x, name)
    if a.dtype == np.bool_:
        return a
    bad = (a != 0) & (a != 1)
    if bad.any():
        raise ValueError(f"{name}: values must be 0/1 or bool; found {a[bad].flat[0].item()!r}")
    return a.astype(bool)


def check_labels_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """Validate image-level inputs: 1-D 0/1 ``labels`` and 1-D finite ``scores`` of equal length, both classes present."""
    y = _as_binary(labels, "labels")
    s = _as_real_array(scores, "scores")
    if y.ndim != 1:
        raise ValueError(f"labels: expected a 1-D array (N,), got shape {y.shape}")
    if s.ndim != 1:
        raise ValueError(f"scores: expected a 1-D array (N,), got shape {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"scores: length {s.shape[0]} differs from labels length {y.shape[0]}")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        only = "1 (defective)" if n_pos else "0 (good)"
        raise ValueError(f"labels: only class {only} present in {y.size} labels; need both good and defective images")
    return y, s


def check_masks_maps(masks, maps, allow_no_defect: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Validate pixel-level inputs: bool ``masks`` (N, H, W) and finite numeric ``maps`` of the same shape.

    Raises if no pixel is good, or if no pixel is defective (unless ``allow_no_defect``): pixel metrics are undefined.
    """
    m = _as_binary(masks, "masks")
    a = _as_real_array(maps, "maps")
    if m.ndim != 3:
        raise ValueError(f"masks: expected a 3-D array (N, H, W), got shape {m.shape}")
    if a.shape != m.shape:
        raise ValueError(f"maps: shape {a.shape} differs from masks shape {m.shape}")
    if a.dtype.kind == "b":
        a = a.astype(np.uint8)
    n_pos = int(np.count_nonzero(m))
    if n_pos == 0 and not allow_no_defect:
        raise ValueError(f"masks: no defective pixel in {m.shape[0]} mask(s); pixel metrics are undefined")
    if n_pos == m.size:
        raise ValueError(f"masks: all {m.size} pixels are defective; no good pixel, pixel metrics are undefined")
    return m, a


def pixel_images(labels: np.ndarray | None, has_mask) -> np.ndarray | None:
    """Bool (N,) selection of the images that enter pixel metrics, or None for all of them (``has_mask`` None).

    Kept: images with ``has_mask`` True, and every good image (``labels`` 0: all-normal ground truth) when
    ``labels`` are given. Defective images without a mask are left out.
    """
    if has_mask is None:
        return None
    h = _as_binary(has_mask, "has_mask")
    if h.ndim != 1:
        raise ValueError(f"has_mask: expected a 1-D array (N,), got shape {h.shape}")
    if labels is None:
        return h
    if h.size != labels.size:
        raise ValueError(f"has_mask: length {h.size} differs from labels length {labels.size}")
    return h | ~labels.astype(bool)


def split_sorted(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ascending-sorted scores of the good (mask False) pixels and of the defective (mask True) pixels.

    Memory: one copy of the maps' values in their own dtype (no float64 upcast, no index arrays).
    """
    neg = maps[~masks]
    neg.sort()
    pos = maps[masks]
    pos.sort()
    return neg, pos
