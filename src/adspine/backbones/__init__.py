"""Backbones: the registry of every variant of the study, their initialization and truncated feature extraction.

Names are imported lazily so that ``adspine --help`` does not load torch; ``init_names``, ``registry`` and
``weights`` (the init vocabulary, the table, weight locations and ``check_weights``) never load it.
"""

import importlib

_EXPORTS = {
    "extractor": ("FeatureExtractor", "LayerError", "build_extractor", "image_hw", "probe", "resolve_layers"),
    "init": ("InitRecord", "build_model"),
    "init_names": ("INIT_CHOICES", "RANDOM_SCHEMES", "SEEDED_INITS", "InitError", "OfflineWeightsError", "init_label",
                   "is_pretrained", "parse_init"),
    "registry": ("FAMILIES", "SPECS", "BackboneSpec", "get_spec", "list_specs", "weight_tags"),
    "weights": ("WeightsLocation", "check_weights", "is_offline", "preflight", "weights_location"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"adspine.backbones.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'adspine.backbones' has no attribute {name!r}")
