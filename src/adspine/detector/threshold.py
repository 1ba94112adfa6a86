"""Alarm thresholds from held-out normal training images only (never test data).

``fit`` holds out a seeded share of the normal training images, scores them with the fitted model and puts the
threshold at a chosen false-alarm rate on them: the maximum (default, no held-out image flagged) or the
``1 - fpr`` quantile (at most ``fpr`` of them above it). A score is flagged when it exceeds the threshold by more
than ``REL_TOLERANCE`` of it: the same image scored in a batch of another size differs in the last float32 digits
(convolution and matrix kernels are chosen per shape; measured up to 2.2e-6 relative, ONNX vs torch 6e-7), and the
held-out image that set the threshold must not be flagged when it is predicted again. A non-finite score is flagged.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_HOLDOUT = 0.1
MIN_HOLDOUT = 5
MIN_FIT = 2  # images the method is fitted on after the hold-out (PaDiM's covariance needs two)
REL_TOLERANCE = 1e-5  # relative margin above a threshold before a value is flagged (see the module docstring)


def holdout_split(n: int, fraction: float = DEFAULT_HOLDOUT, minimum: int = MIN_HOLDOUT,
                  seed: int = 0) -> tuple[list[int], list[int]]:
    """Sorted (fit, held-out) indices of ``n`` images: ``max(minimum, ceil(fraction * n))`` held out, drawn with
    ``numpy.random.default_rng(seed)``."""
    if not 0 < fraction < 1:
        raise ValueError(f"holdout={fraction!r}: the held-out fraction must be in (0, 1)")
    k = max(int(minimum), math.ceil(fraction * n))
    if n - k < MIN_FIT:
        raise ValueError(f"{n} training image(s): {k} are held out for the threshold and at least {MIN_FIT} "
                         f"must remain to fit; give at least {k + MIN_FIT} normal images")
    held = np.random.default_rng(int(seed)).permutation(n)[:k]
    mask = np.zeros(n, dtype=bool)
    mask[held] = True
    return np.flatnonzero(~mask).tolist(), np.flatnonzero(mask).tolist()


def pick_threshold(values: np.ndarray, fpr: float | None = None) -> float:
    """The smallest value with at most ``fpr`` of ``values`` strictly above it: the ``floor(fpr * n) + 1``-th largest
    (``fpr`` None or 0: the maximum)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("no held-out value to set a threshold on")
    fpr = 0.0 if fpr is None else fpr
    if not 0 <= fpr < 1:
        raise ValueError(f"fpr={fpr!r}: the false-alarm rate must be in [0, 1)")
    k = values.size - 1 - math.floor(fpr * values.size)
    return float(np.partition(values, k)[k])


def rule(fpr: float | None) -> str:
    return "max" if fpr is None else f"quantile {1.0 - fpr:g} (fpr {fpr:g})"


def above(values: np.ndarray, threshold: float) -> np.ndarray:
    """True where a value exceeds ``threshold`` by more than ``REL_TOLERANCE`` of it, or is not finite."""
    values = np.asarray(values)
    return (values > threshold + REL_TOLERANCE * abs(threshold)) | ~np.isfinite(values)
