"""Backbones: the registry of every variant of the study, their initialization and truncated feature extraction.

Names are imported lazily so that ``adspine --help`` does not load torch.
"""

import importlib

_EXPORTS = {
    "extractor": ("FeatureExtractor", "LayerError", "build_extractor", "probe", "resolve_layers"),
    "init": ("InitError", "OfflineWeightsError", "build_model", "is_offline", "weights_location"),
    "registry": ("FAMILIES", "SPECS", "BackboneSpec", "get_spec", "list_specs", "weight_tags"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"adspine.backbones.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'adspine.backbones' has no attribute {name!r}")
