"""The small estimator surface every method implements, and its safetensors + JSON persistence.

A method sees only feature maps: ``fit`` consumes an iterable of training batches, each a list of per-layer tensors
``(B, C_i, h_i, w_i)`` ordered shallow to deep (as the backbone extractor returns them); ``predict`` takes one such
batch of test features and the input image size and returns an anomaly map per image at that size plus an image score.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

TENSORS_FILE = "model.safetensors"
META_FILE = "model.json"
FORMAT_VERSION = 1


class ModelFileError(ValueError):
    """A saved model folder is missing, incomplete or altered."""


@dataclass
class Prediction:
    """Per-image anomaly maps ``(B, H, W)`` float32 and image scores ``(B,)`` float64."""

    maps: np.ndarray
    scores: np.ndarray


def library_versions() -> dict[str, str]:
    import faiss
    import timm
    import torchvision

    import adspine

    return {
        "adspine": adspine.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "faiss": getattr(faiss, "__version__", "unknown"),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _digest(t: torch.Tensor) -> str:
    # hash the tensor's buffer in place: .tobytes() would copy it (GBs for a WRN50 PaDiM model)
    arr = t.detach().cpu().contiguous().numpy()
    return hashlib.sha256(memoryview(arr.reshape(-1)).cast("B")).hexdigest()


class AnomalyMethod:
    """Base class: subclasses set ``name``, implement ``fit``/``predict``, ``settings`` and ``state_tensors``/
    ``load_state_tensors``. Settings are plain JSON values given to the constructor."""

    name: ClassVar[str] = "base"

    def __init__(self) -> None:
        self.provenance: dict[str, Any] = {}

    # -- estimator surface -------------------------------------------------------------------------------------
    def fit(self, batches: Iterable[Sequence[torch.Tensor]]) -> "AnomalyMethod":
        raise NotImplementedError

    def predict(self, features: Sequence[torch.Tensor], image_size: tuple[int, int]) -> Prediction:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this method (JSON-serialisable)."""
        raise NotImplementedError

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything ``predict`` needs after ``fit``, as named tensors."""
        raise NotImplementedError

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        """Fitted non-tensor facts to record (e.g. number of training images); JSON values."""
        return {}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        pass

    # -- persistence ---------------------------------------------------------------------------------------------
    def save(self, folder: str | Path, provenance: dict[str, Any] | None = None) -> Path:
        """Write ``model.safetensors`` and ``model.json`` (settings, provenance, versions, per-tensor SHA-256)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_tensors().items()}
        prov = {**self.provenance, **(provenance or {})}
        meta = {
            "format_version": FORMAT_VERSION,
            "method": self.name,
            "settings": self.settings(),
            "extra_state": self.extra_state(),
            "provenance": prov,
            "versions": library_versions(),
            "tensors": {
                k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""), "sha256": _digest(v)}
                for k, v in tensors.items()
            },
        }
        save_file(tensors, str(folder / TENSORS_FILE))
        (folder / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "AnomalyMethod":
        """Rebuild a fitted method from a folder written by ``save``; any missing or altered tensor is an error."""
        folder = Path(folder)
        meta_path, tensor_path = folder / META_FILE, folder / TENSORS_FILE
        for p in (meta_path, tensor_path):
            if not p.is_file():
                raise ModelFileError(f"{p}: missing model file")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ModelFileError(f"{meta_path}: not valid JSON ({e})") from None
        from adspine.methods import get_method_class

        klass = get_method_class(meta.get("method", "?")) if cls is AnomalyMethod else cls
        if klass.name != meta.get("method"):
            raise ModelFileError(f"{meta_path}: holds a '{meta.get('method')}' model, not '{klass.name}'")
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelFileError(f"{tensor_path}: unreadable safetensors file ({e})") from None
        expected = meta.get("tensors", {})
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise ModelFileError(f"{tensor_path}: missing tensor(s) {', '.join(missing)}")
        extra = sorted(set(tensors) - set(expected))
        if extra:
            raise ModelFileError(f"{tensor_path}: unexpected tensor(s) {', '.join(extra)}")
        for k, info in expected.items():
            if list(tensors[k].shape) != info["shape"] or _digest(tensors[k]) != info["sha256"]:
                raise ModelFileError(f"{tensor_path}: tensor '{k}' was altered (shape or checksum differs)")
        model = klass(**meta["settings"])
        model.load_state_tensors(tensors)
        model.load_extra_state(meta.get("extra_state", {}))
        model.provenance = meta.get("provenance", {})
        return model
