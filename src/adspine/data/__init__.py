"""Datasets in the MVTec AD layout: loading, validation, preprocessing protocols, generators and adapters.

``synth`` (synthetic generator), ``magnetic_tile`` (adapter) and ``summary`` are imported from their modules.
"""

from adspine.data.images import IMAGE_EXTENSIONS, DatasetError, load_mask, load_rgb
from adspine.data.mvtec import (
    DATASET_FILE,
    PROTOCOLS,
    CategoryData,
    ImageDataset,
    Sample,
    category_kinds,
    list_categories,
    preprocess,
    scan_category,
)

__all__ = [
    "DATASET_FILE",
    "IMAGE_EXTENSIONS",
    "PROTOCOLS",
    "CategoryData",
    "DatasetError",
    "ImageDataset",
    "Sample",
    "category_kinds",
    "list_categories",
    "load_mask",
    "load_rgb",
    "preprocess",
    "scan_category",
]
