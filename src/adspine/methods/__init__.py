"""Anomaly detection methods behind one fit/predict/save/load surface (see ``base.AnomalyMethod``)."""

from __future__ import annotations

import importlib

from adspine.methods.base import AnomalyMethod, MethodInfo, ModelFileError, NotFittedError, Prediction

# The method registry: name -> "module:Class" (the class declares its ``MethodInfo`` descriptor). A new method is one
# new file plus one line here. Imported lazily so a missing optional piece never breaks the others.
METHODS: dict[str, str] = {
    "padim": "adspine.methods.padim:PaDiM",
    "spade": "adspine.methods.spade:SPADE",
    "patchcore": "adspine.methods.patchcore:PatchCore",
    "cflow": "adspine.methods.cflow:CFlow",
}


# optional libraries a method needs -> the adspine extra that installs them
EXTRAS = {"FrEIA": "cflow"}


def get_method_class(name: str) -> type[AnomalyMethod]:
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}'; valid: {', '.join(sorted(METHODS))}")
    module, _, attr = METHODS[name].partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as e:
        extra = EXTRAS.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        raise ImportError(f"method '{name}' needs {e.name}: pip install 'adspine[{extra}]'") from None


def method_info(name: str) -> MethodInfo:
    return get_method_class(name).info


def build_method(name: str, **settings) -> AnomalyMethod:
    return get_method_class(name)(**settings)


__all__ = ["AnomalyMethod", "MethodInfo", "ModelFileError", "NotFittedError", "Prediction", "METHODS",
           "get_method_class", "method_info", "build_method"]
