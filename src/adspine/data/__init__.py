"""Datasets in several layouts (mvtec, visa, folder, manifest): reading, validation, preprocessing protocols,
generators and adapters.

Every name below is imported on first use (``adspine --help`` stays fast): scanning imports no torch;
``ImageDataset``, ``preprocess`` and ``preprocess_file`` (``adspine.data.transforms``) import it. ``synth``,
``convert``, ``labelme``, ``magnetic_tile`` and ``summary`` are imported from their modules.
"""

import importlib

from adspine.data.errors import DatasetError

_SOURCES = {
    "category": ("DATASET_FILE", "MASK_MODES", "CategoryData", "Sample"),
    "geometry": ("PROTOCOLS", "normalise_size", "protocol_record", "resize_shape"),
    "images": ("IMAGE_EXTENSIONS", "LargeImageWarning", "load_mask", "load_rgb"),
    "mvtec": ("category_kinds", "scan_category"),
    "readers": ("FORMATS", "detect_format", "list_categories", "scan"),
    "transforms": ("ImageDataset", "preprocess", "preprocess_file"),
}
_MODULE_OF = {name: module for module, names in _SOURCES.items() for name in names}


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"adspine.data.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [  # noqa: PLE0604 (the lazily imported names)
    "DatasetError",
    *sorted(_MODULE_OF),
]
