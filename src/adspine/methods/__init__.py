"""Anomaly detection methods behind one fit/predict/save/load surface (see ``base.AnomalyMethod``)."""

from __future__ import annotations

import importlib

from adspine.methods.base import AnomalyMethod, ModelFileError, Prediction

# method name -> "module:Class"; imported lazily so a missing optional piece never breaks the others
METHODS: dict[str, str] = {
    "padim": "adspine.methods.padim:PaDiM",
    "spade": "adspine.methods.spade:SPADE",
    "patchcore": "adspine.methods.patchcore:PatchCore",
    "cflow": "adspine.methods.cflow:CFlow",
}


def get_method_class(name: str) -> type[AnomalyMethod]:
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}'; valid: {', '.join(sorted(METHODS))}")
    module, _, attr = METHODS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def build_method(name: str, **settings) -> AnomalyMethod:
    return get_method_class(name)(**settings)


__all__ = ["AnomalyMethod", "ModelFileError", "Prediction", "METHODS", "get_method_class", "build_method"]
