"""Anomaly detection metrics: plain functions on numpy arrays (masks bool (N, H, W), maps float (N, H, W)).

Each function's docstring states its exact definition. F1-max values are OPTIMISTIC (threshold chosen on the test set).
Intervals and paired tests over the test images: :mod:`adspine.metrics.uncertainty`.
"""

from .aggregate import METRIC_KEYS, evaluate, mean_over_categories
from .aupro import aupro, pro_curve
from .auroc import image_auroc, pixel_auroc
from .f1 import f1_max, pixel_f1_max
from .uncertainty import auroc_ci, delong_paired, holm, pixel_bootstrap_ci

__all__ = [
    "METRIC_KEYS",
    "aupro",
    "auroc_ci",
    "delong_paired",
    "evaluate",
    "f1_max",
    "holm",
    "image_auroc",
    "mean_over_categories",
    "pixel_auroc",
    "pixel_bootstrap_ci",
    "pixel_f1_max",
    "pro_curve",
]
