"""The small estimator surface every method implements, and its safetensors + JSON persistence.

A method sees only feature maps: ``fit`` consumes an iterable of training batches, each a list of per-layer tensors
``(B, C_i, h_i, w_i)`` ordered shallow to deep (as the backbone extractor returns them) plus the extractor's layer
records; ``predict`` takes one such batch of test features and the input image size (H, W) and returns an anomaly map
per image at that size plus an image score.

Conventions (as scikit-learn's estimators): constructor arguments are stored under their own names and are the
method's settings (``settings()`` reads them off the signature; ``clone(**changes)`` rebuilds); fitted state lives in
attributes whose names end with ``_`` (tensors are saved as safetensors, plain values as JSON); the base class checks
every batch against the layer records once, so methods do not re-validate shapes. Each method class declares a
``MethodInfo`` descriptor next to it, read by the study, its estimate, the report and the CLI.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import platform
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from adspine.features import LayerInfo, describe_maps

TENSORS_FILE = "model.safetensors"
META_FILE = "model.json"
FORMAT_VERSION = 2  # 2: layer records, fitted attributes by name, model.json covered by a checksum


class ModelFileError(ValueError):
    """A saved model folder is missing, incomplete or altered."""


class NotFittedError(RuntimeError):
    """``predict`` or ``save`` before ``fit`` (or ``load``)."""


@dataclass(frozen=True)
class CostShape:
    """What a dry-run cost model knows of a job: images, per-layer positions (h * w) and channels, Rd dimension."""

    n_train: int
    n_test: int
    positions: list[int]
    channels: list[int]
    d: int  # channels after Rd (= sum(channels) when none is dropped)
    backbone_flops: float  # per image


@dataclass(frozen=True)
class MethodInfo:
    """Descriptor of a method, declared next to its class (``info = MethodInfo(...)``).

    ``draws_rd``: takes ``d`` / ``rd_seed`` settings (one result per Rd seed when channels are dropped);
    ``seed_setting``: the setting that receives the study's ``seed`` (None: no randomness of its own);
    ``cost``: FLOPs of fit + predict for a job, ``cost(shape, settings)``, used by the dry-run estimate (None: three
    backbone passes per image); ``efficiency``: fraction of the measured conv FLOP/s it reaches (calibrated);
    ``devices``: where it runs; ``exportable``: ONNX export supported.
    """

    name: str
    display: str
    draws_rd: bool = False
    seed_setting: str | None = None
    devices: tuple[str, ...] = ("cpu", "cuda")
    exportable: bool = False
    trains: bool = False
    cost: Callable[[CostShape, dict], float] | None = None
    efficiency: float = 1.0
    summary: str = ""


@dataclass
class Prediction:
    """Per-image anomaly maps ``(B, H, W)`` float32 and image scores ``(B,)`` float64; ``invalid`` maps the batch
    index of each image that got no score (non-finite features or output; its map and score are NaN) to the reason."""

    maps: np.ndarray
    scores: np.ndarray
    invalid: dict[int, str] = field(default_factory=dict)

    @property
    def valid(self) -> np.ndarray:
        """(B,) bool: True where the image has a finite score and map."""
        ok = np.ones(len(self.scores), dtype=bool)
        ok[list(self.invalid)] = False
        return ok


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
    """Base class: subclasses declare ``info``, store constructor arguments under their own names, implement
    ``_fit(batches)`` and ``_predict(maps, image_size)``, and keep fitted state in attributes ending with ``_``."""

    info: ClassVar[MethodInfo] = MethodInfo("base", "base")
    name: ClassVar[str] = "base"

    def __init_subclass__(cls, **kw) -> None:
        super().__init_subclass__(**kw)
        if "info" in cls.__dict__:
            cls.name = cls.info.name

    provenance: dict[str, Any]

    # -- parameters (scikit-learn style) ----------------------------------------------------------------------------
    @classmethod
    def param_names(cls) -> tuple[str, ...]:
        """Constructor argument names: the method's settings."""
        sig = inspect.signature(cls.__init__)
        return tuple(n for n, p in sig.parameters.items()
                     if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        sig = inspect.signature(cls.__init__)
        return {n: _plain(sig.parameters[n].default) for n in cls.param_names()}

    def settings(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this method (JSON values), read off the signature."""
        return {n: _plain(getattr(self, n)) for n in self.param_names()}

    def clone(self, **changes: Any) -> "AnomalyMethod":
        """A new unfitted method with the same settings, ``changes`` applied."""
        unknown = sorted(set(changes) - set(self.param_names()))
        if unknown:
            raise ValueError(f"{self.name}: unknown setting(s) {', '.join(unknown)}; valid: "
                             f"{', '.join(self.param_names())}")
        return type(self)(**{**self.settings(), **changes})

    # -- fitted state --------------------------------------------------------------------------------------------
    def fitted_attributes(self) -> dict[str, Any]:
        """Fitted state: instance attributes whose names end with ``_`` (not dunder), set to something."""
        return {k: v for k, v in vars(self).items()
                if k.endswith("_") and not k.startswith("__") and v is not None}

    def is_fitted(self) -> bool:
        return getattr(self, "feature_layers_", None) is not None

    def check_fitted(self) -> None:
        if not self.is_fitted():
            raise NotFittedError(f"{self.name}: not fitted; call fit() or load() first")

    def _reset(self) -> None:
        for k in list(self.fitted_attributes()):
            setattr(self, k, None)

    # -- estimator surface ---------------------------------------------------------------------------------------
    def fit(self, batches: Iterable[Sequence[torch.Tensor]],
            layers: Sequence[LayerInfo] | None = None) -> "AnomalyMethod":
        """Fit on training batches (each a list of per-layer maps ``(B, C_i, h_i, w_i)``, shallow to deep).

        ``layers``: the extractor's records for these maps (read off the first batch when not given). Every batch
        is checked against them here, once, for all methods."""
        self._reset()
        it = iter(batches)
        first = next(it, None)
        if first is None:
            raise ValueError(f"{self.name}: fit() got no training batch")
        recs = tuple(layers) if layers is not None else describe_maps(first)
        self.feature_layers_ = recs
        self.check_maps(first)

        def checked() -> Iterator[Sequence[torch.Tensor]]:
            yield first
            for b in it:
                self.check_maps(b)
                yield b

        try:
            self._fit(checked())
        except BaseException:
            self.feature_layers_ = None
            raise
        return self

    def predict(self, features: Sequence[torch.Tensor], image_size: tuple[int, int] | int) -> Prediction:
        """Anomaly maps at ``image_size`` (H, W) and image scores for one batch of test features.

        Images whose features hold NaN or inf never reach ``_predict``: each is replaced by a copy of a finite image
        of the batch (the batch keeps its shape, so the other images' scores stay bit-identical to a clean batch:
        BLAS kernels and convolutions differ in the last digits between batch sizes), and it comes back with NaN
        score and map and its reason in ``Prediction.invalid``; so does an image whose score or map is non-finite."""
        self.check_fitted()
        self.check_maps(features)
        size = (int(image_size), int(image_size)) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
        invalid = nonfinite_feature_images(features, self.feature_layers_)
        if not invalid:
            pred = self._predict(features, size)
        elif len(invalid) == int(features[0].shape[0]):
            b = len(invalid)
            return Prediction(np.full((b, *size), np.nan, np.float32), np.full(b, np.nan), invalid)
        else:
            donor = next(i for i in range(int(features[0].shape[0])) if i not in invalid)
            bad = torch.tensor(sorted(invalid))
            patched = []
            for m in features:
                m = m.clone()
                m[bad] = m[donor].clone()
                patched.append(m)
            pred = self._predict(patched, size)
        return _mark_invalid(pred, invalid)

    def check_maps(self, maps: Sequence[torch.Tensor]) -> None:
        """Each map must match its layer record: same count, (B, C, h, w) with the recorded C and grid."""
        recs = self.feature_layers_
        if len(maps) != len(recs):
            raise ValueError(f"{self.name}: got {len(maps)} feature map(s), fitted on {len(recs)} "
                             f"({', '.join(r.name for r in recs)})")
        for r, m in zip(recs, maps):
            if m.ndim != 4 or int(m.shape[1]) != r.channels or tuple(int(s) for s in m.shape[-2:]) != r.grid:
                raise ValueError(f"{self.name}: feature map of layer {r.name} has shape {tuple(m.shape)}, "
                                 f"expected (B, {r.channels}, {r.grid[0]}, {r.grid[1]})")

    def _fit(self, batches: Iterable[Sequence[torch.Tensor]]) -> None:
        raise NotImplementedError

    def _predict(self, maps: Sequence[torch.Tensor], image_size: tuple[int, int]) -> Prediction:
        raise NotImplementedError

    # -- state for persistence (defaults derived from the fitted attributes) -------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything ``predict`` needs after ``fit``, as named tensors (default: fitted tensor attributes)."""
        self.check_fitted()
        return {k: v for k, v in self.fitted_attributes().items() if isinstance(v, torch.Tensor)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            setattr(self, k, v)

    def extra_state(self) -> dict[str, Any]:
        """Fitted non-tensor facts (JSON values; default: fitted plain attributes other than the layer records)."""
        out = {}
        for k, v in self.fitted_attributes().items():
            if k == "feature_layers_" or isinstance(v, torch.Tensor):
                continue
            out[k] = _plain(v)
        return out

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        for k, v in extra.items():
            if k.endswith("_"):
                setattr(self, k, v)

    # -- persistence ---------------------------------------------------------------------------------------------
    def _meta(self, provenance: dict[str, Any] | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        self.check_fitted()
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_tensors().items()}
        meta = {
            "format_version": FORMAT_VERSION,
            "method": self.name,
            "settings": self.settings(),
            "layers": [r.as_dict() for r in self.feature_layers_],
            "extra_state": self.extra_state(),
            "provenance": _plain({**getattr(self, "provenance", {}), **(provenance or {})}),
            "versions": library_versions(),
            "tensors": {
                k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""), "sha256": _digest(v)}
                for k, v in tensors.items()
            },
        }
        return tensors, meta

    def save(self, folder: str | Path, provenance: dict[str, Any] | None = None) -> Path:
        """Write ``model.safetensors`` and ``model.json`` (settings, layers, fitted facts, provenance, versions,
        SHA-256 per tensor). The SHA-256 of everything in ``model.json`` that changes predictions is stored in the
        safetensors header, so editing either file is detected on load."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors, meta = self._meta(provenance)
        save_file(tensors, str(folder / TENSORS_FILE), metadata={"adspine_meta_sha256": meta_digest(meta)})
        (folder / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "AnomalyMethod":
        """Rebuild a fitted method from a folder written by ``save``; a missing, malformed or altered file is a
        ``ModelFileError`` naming it."""
        folder = Path(folder)
        meta_path, tensor_path = folder / META_FILE, folder / TENSORS_FILE
        for p in (meta_path, tensor_path):
            if not p.is_file():
                raise ModelFileError(f"{p}: missing model file")
        meta = read_meta(meta_path)
        from adspine.methods import get_method_class

        try:
            klass = get_method_class(meta["method"]) if cls is AnomalyMethod else cls
        except ValueError as e:
            raise ModelFileError(f"{meta_path}: {e}") from None
        if klass.name != meta["method"]:
            raise ModelFileError(f"{meta_path}: holds a '{meta['method']}' model, not '{klass.name}'")
        try:
            tensors = load_file(str(tensor_path))
            with safe_open(str(tensor_path), framework="pt") as f:
                header = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelFileError(f"{tensor_path}: unreadable safetensors file ({e})") from None
        expected = meta["tensors"]
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise ModelFileError(f"{tensor_path}: missing tensor(s) {', '.join(missing)}")
        extra = sorted(set(tensors) - set(expected))
        if extra:
            raise ModelFileError(f"{tensor_path}: unexpected tensor(s) {', '.join(extra)}")
        if header.get("adspine_meta_sha256") != meta_digest(meta):
            raise ModelFileError(f"{meta_path}: altered (settings, layers or fitted facts differ from the checksum "
                                 f"stored in {TENSORS_FILE}); save the model again")
        for k, info in expected.items():
            if list(tensors[k].shape) != info.get("shape") or _digest(tensors[k]) != info.get("sha256"):
                raise ModelFileError(f"{tensor_path}: tensor '{k}' was altered (shape or checksum differs)")
        try:
            model = klass(**meta["settings"])
            model.feature_layers_ = tuple(LayerInfo.from_dict(r) for r in meta["layers"])
            model.load_state_tensors(tensors)
            model.load_extra_state(meta["extra_state"])
        except (TypeError, ValueError, KeyError) as e:
            raise ModelFileError(f"{meta_path}: cannot rebuild the {klass.name} model ({e})") from None
        model.provenance = meta.get("provenance", {})
        return model


def nonfinite_feature_images(features: Sequence[torch.Tensor], layers: Sequence[LayerInfo]) -> dict[int, str]:
    """Batch index -> reason for each image with a NaN or inf feature value in any layer."""
    bad: dict[int, list[str]] = {}
    for rec, m in zip(layers, features):
        finite = torch.isfinite(m.detach()).flatten(1).all(dim=1)
        if not bool(finite.all()):
            for i in torch.nonzero(~finite).flatten().tolist():
                bad.setdefault(int(i), []).append(rec.name)
    return {i: f"non-finite feature values (NaN/inf) in layer(s) {', '.join(names)}" for i, names in bad.items()}


def _mark_invalid(pred: Prediction, invalid: dict[int, str]) -> Prediction:
    """``pred`` with NaN score and map for ``invalid`` images and for any image whose own output is non-finite."""
    maps = np.asarray(pred.maps, dtype=np.float32)
    scores = np.asarray(pred.scores, dtype=np.float64)
    out = dict(invalid)
    finite_out = np.isfinite(scores) & np.isfinite(maps.reshape(len(maps), -1)).all(axis=1)
    for i in np.flatnonzero(~finite_out).tolist():
        out.setdefault(int(i), "the method's score or map is not finite (NaN/inf)")
    if not out:
        return Prediction(maps, scores)
    idx = sorted(out)
    maps, scores = maps.copy(), scores.copy()
    maps[idx], scores[idx] = np.nan, np.nan
    return Prediction(maps, scores, dict(sorted(out.items())))


#: model.json fields that change predictions; their SHA-256 is kept in the safetensors header
_COVERED = ("format_version", "method", "settings", "layers", "extra_state", "tensors")
_META_TYPES = {"format_version": int, "method": str, "settings": dict, "layers": list, "extra_state": dict,
               "tensors": dict}


def meta_digest(meta: dict[str, Any]) -> str:
    covered = {k: meta.get(k) for k in _COVERED}
    return hashlib.sha256(json.dumps(covered, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_meta(path: Path) -> dict[str, Any]:
    """``model.json`` parsed and shape-checked; anything malformed is a ``ModelFileError`` naming the file."""
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ModelFileError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    for k, t in _META_TYPES.items():
        if not isinstance(meta.get(k), t):
            raise ModelFileError(f"{path}: field '{k}' is missing or not a {t.__name__}")
    if meta["format_version"] != FORMAT_VERSION:
        raise ModelFileError(f"{path}: model format version {meta['format_version']}, this adspine reads "
                             f"{FORMAT_VERSION}; fit and save the model again")
    return meta


def _plain(v: Any) -> Any:
    """JSON-friendly copy: tuples -> lists, numpy / torch scalars -> Python numbers, Paths -> str."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    if isinstance(v, Path):
        return str(v)
    if v is inspect.Parameter.empty:
        return None
    return v
