"""Anomaly detection metrics: plain functions on numpy arrays (masks bool (N, H, W), maps float (N, H, W)).

Each function's docstring states its exact definition. F1-max values are OPTIMISTIC (threshold chosen on the test set).
"""

from .aggregate import METRIC_KEYS, evaluate, mean_over_categories
from .aupro import aupro, pro_curve
from .auroc import image_auroc, pixel_auroc
from .f1 import f1_max, pixel_f1_max

__all__ = [
    "METRIC_KEYS",
    "aupro",
    "evaluate",
    "f1_max",
    "image_auroc",
    "mean_over_categories",
    "pixel_auroc",
    "pixel_f1_max",
    "pro_curve",
]
