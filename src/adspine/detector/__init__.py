"""The engineer's path: ``Detector`` (fit / predict / save / load with alarm thresholds), ONNX export and the
``fit`` / ``predict`` / ``evaluate`` / ``export`` commands. Names are imported lazily (``adspine --help`` loads no
torch)."""

import importlib

_EXPORTS = {
    "detector": ("Detector", "DetectorError"),
    "onnx_export": ("OnnxDetector", "export_onnx"),
    "cli": ("fit_command",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"adspine.detector.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'adspine.detector' has no attribute {name!r}")
