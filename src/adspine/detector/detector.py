"""``Detector``: backbone + method + alarm thresholds as one object with fit / predict / save / load.

A saved detector is one folder:

- ``detector.json``: registry row, layer names, init, preprocessing protocol and size, mean/std, method and its
  settings, thresholds with their hold-out record, the training images' size range (``input_sizes``; absent in
  folders written before it), the backbone's ``precision`` (absent = fp32), package versions, SHA-256 per backbone
  tensor and of the method's ``model.json``;
- ``detector.safetensors``: the truncated backbone's weights when they are not a named pretrained tag the loader can
  find again (empty otherwise); its header holds the SHA-256 of ``detector.json``, so editing either is detected;
- ``method/``: the method's own ``model.safetensors`` + ``model.json`` (``AnomalyMethod.save``).

Nothing is unpickled. ``Detector.load`` refuses a changed or incomplete folder with one line naming the file.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adspine.detector import threshold as th

JSON_FILE = "detector.json"
TENSORS_FILE = "detector.safetensors"
METHOD_DIR = "method"
FORMAT = "adspine-detector"
FORMAT_VERSION = 1
HEADER_KEY = "adspine_detector_json_sha256"

ImageInput = str | Path | np.ndarray


class DetectorError(ValueError):
    """Bad detector input or model folder; the one-line message names the offending file or value."""


class DetectorWarning(UserWarning):
    """Inputs the detector was not fitted for (other sizes or aspect), images without a score, a large model."""


@dataclass
class Inspection:
    """``Detector.inspect``'s answer: scores (N,) float64 and maps (N, H, W) float32 (NaN for invalid images),
    ``invalid`` (index -> reason: non-finite features or output) and each input's size (H, W) before preprocessing
    (None for an already preprocessed tensor)."""

    scores: np.ndarray
    maps: np.ndarray
    invalid: dict[int, str] = field(default_factory=dict)
    sizes: list[tuple[int, int] | None] = field(default_factory=list)


def is_named_tag(init: str) -> bool:
    """Pretrained weights the loader can find again by name (``imagenet`` / ``imagenet:TAG``)."""
    return init == "imagenet" or init.startswith("imagenet:")


def tensor_digest(t: torch.Tensor) -> str:
    arr = t.detach().cpu().contiguous().numpy()
    return hashlib.sha256(memoryview(arr.reshape(-1)).cast("B")).hexdigest()


def json_digest(doc: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def as_size(size: Any) -> int | tuple[int, int]:
    """``224``, ``"224"``, ``(256, 320)``, ``"256x320"`` -> int or (H, W)."""
    if isinstance(size, str):
        parts = size.lower().replace(",", "x").split("x")
        try:
            size = [int(p) for p in parts] if len(parts) == 2 else int(parts[0])
        except ValueError:
            raise DetectorError(f"image size {size!r}: give N or HxW") from None
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise DetectorError(f"image size {size!r}: give N or (H, W) positive integers")
        return (int(size[0]), int(size[1])) if size[0] != size[1] else int(size[0])
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise DetectorError(f"image size {size!r}: give N or HxW")
    return int(size)


def read_image(item: ImageInput) -> np.ndarray:
    """A path (decoded to float RGB) or a float (H, W, 3) array in [0, 1], before preprocessing."""
    from adspine.data.images import load_rgb

    return load_rgb(Path(item)) if isinstance(item, (str, Path)) else np.asarray(item, dtype=np.float32)


def load_image(item: ImageInput, protocol: str, size: int | tuple[int, int]) -> torch.Tensor:
    """A path or a float (H, W, 3) array in [0, 1] -> the model's input (3, H, W) (``adspine.data.mvtec.preprocess``)."""
    from adspine.data.transforms import preprocess

    return preprocess(read_image(item), None, protocol, size)[0]


def size_range(sizes: Sequence[tuple[int, int]]) -> dict[str, Any] | None:
    """The training images' size range: count, min/max height and width, min/max aspect (width / height)."""
    if not sizes:
        return None
    hs, ws = [h for h, _ in sizes], [w for _, w in sizes]
    aspects = [w / h for h, w in sizes]
    return {"count": len(sizes), "height": [min(hs), max(hs)], "width": [min(ws), max(ws)],
            "aspect": [min(aspects), max(aspects)]}


ASPECT_TOLERANCE = 0.01  # relative: a rounding of the width or height is not another aspect


def size_mismatch(record: dict[str, Any] | None, sizes: Sequence[tuple[int, int] | None]) -> str | None:
    """One line counting the inputs outside the training size range (height or width) or aspect range, or None."""
    known = [s for s in sizes if s is not None]
    if record is None or not known:
        return None
    (h0, h1), (w0, w1), (a0, a1) = record["height"], record["width"], record["aspect"]
    off_size = sum(not (h0 <= h <= h1 and w0 <= w <= w1) for h, w in known)
    off_aspect = sum(not (a0 * (1 - ASPECT_TOLERANCE) <= w / h <= a1 * (1 + ASPECT_TOLERANCE)) for h, w in known)
    if not off_size and not off_aspect:
        return None
    fitted = (f"{_span(h0, h1)} x {_span(w0, w1)} px (H x W), aspect W/H {_span(round(a0, 3), round(a1, 3))}")
    return (f"{off_size} of {len(known)} image(s) outside the training sizes and {off_aspect} outside their aspect "
            f"(fitted on {fitted}); scores of other images are not comparable with the threshold")


def _span(lo: Any, hi: Any) -> str:
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


class Detector:
    """An anomaly detector: a backbone (registry name, init, layers), a method with settings, and thresholds.

    ``fit(images)`` holds out ``max(min_holdout, ceil(holdout * N))`` normal images (seed ``holdout_seed``), fits
    on the rest and sets the image and pixel thresholds on the held-out ones (``fpr`` None: their maximum, else the
    ``1 - fpr`` quantile). ``predict(images) -> (scores (N,), maps (N, H, W))``; ``inspect(images)`` adds which
    images got no score and why, and their sizes; ``flag(scores)`` applies the threshold (``threshold.above``).
    ``settings`` are the method's constructor arguments. ``precision`` (fp32 or bf16) is the backbone's
    (``FeatureExtractor.set_precision``); the method always gets float32 features. The thresholds are set at the
    fitted precision; ``set_precision`` runs a loaded detector in another one.
    """

    def __init__(self, backbone: str = "tf_efficientnet_lite0", init: str = "imagenet",
                 layers: str | Sequence[str] = "thesis", method: str = "padim", *, init_seed: int = 0,
                 protocol: str = "resize", image_size: int | tuple[int, int] | str = 224,
                 holdout: float = th.DEFAULT_HOLDOUT, min_holdout: int = th.MIN_HOLDOUT, holdout_seed: int = 0,
                 fpr: float | None = None, batch_size: int = 8, device: str = "cpu", precision: str = "fp32",
                 **settings: Any) -> None:
        from adspine.methods import get_method_class

        self.precision = torch_precision(precision)
        self.backbone, self.init, self.init_seed = backbone, init, int(init_seed)
        self.protocol, self.image_size = protocol, as_size(image_size)
        self.holdout, self.min_holdout, self.holdout_seed = float(holdout), int(min_holdout), int(holdout_seed)
        self.fpr = None if fpr is None else float(fpr)
        self.batch_size, self.device = int(batch_size), device
        if self.fpr is not None and not 0 <= self.fpr < 1:
            raise DetectorError(f"fpr={fpr!r}: the false-alarm rate must be in [0, 1)")
        try:
            klass = get_method_class(method)
        except ValueError as e:
            raise DetectorError(str(e)) from None
        self.extractor = self._build_extractor(layers)
        self.layers = list(self.extractor.layer_names)
        if "d" in klass.param_names() and "d" not in settings:  # as the study: the row's default Rd dimension
            settings["d"] = getattr(self.extractor, "default_d", None)
        try:
            self.method = klass(**settings)
        except TypeError as e:
            raise DetectorError(f"method {method}: {e}; valid settings: {', '.join(klass.param_names())}") from None
        self.threshold: float | None = None
        self.pixel_threshold: float | None = None
        self.holdout_record: dict[str, Any] | None = None
        self.input_sizes: dict[str, Any] | None = None

    def _build_extractor(self, layers: str | Sequence[str], init: str | None = None):
        from adspine.backbones import build_extractor

        try:
            return build_extractor(self.backbone, init=init or self.init, layers=layers, device=self.device,
                                   init_seed=self.init_seed, precision=self.precision)
        except (ValueError, KeyError) as e:  # InitError, LayerError, unknown backbone
            raise DetectorError(str(e).strip("'\"")) from None

    def set_precision(self, precision: str) -> "Detector":
        """Run the backbone in ``precision`` from now on (fp32 or bf16; the thresholds stay those fitted)."""
        self.precision = torch_precision(precision)
        self.extractor.set_precision(self.precision)
        return self

    # -- images -> features ------------------------------------------------------------------------------------
    def _inputs(self, images: Iterable[ImageInput] | torch.Tensor,
                sizes: list[tuple[int, int] | None] | None = None) -> Iterator[torch.Tensor]:
        """Batches (B, 3, H, W) of model inputs from paths, arrays or an already preprocessed tensor; each input's
        size before preprocessing is appended to ``sizes`` (None for a tensor)."""
        from adspine.data.transforms import preprocess

        if isinstance(images, torch.Tensor):
            for x in images.split(self.batch_size):
                if sizes is not None:
                    sizes.extend([None] * len(x))
                yield x
            return
        batch: list[torch.Tensor] = []
        for item in images:
            raw = read_image(item)
            if sizes is not None:
                sizes.append((int(raw.shape[0]), int(raw.shape[1])))
            batch.append(preprocess(raw, None, self.protocol, self.image_size)[0])
            if len(batch) == self.batch_size:
                yield torch.stack(batch)
                batch = []
        if batch:
            yield torch.stack(batch)

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [m.cpu() for m in self.extractor(x.to(self.device))]

    def layer_records(self, size: tuple[int, int]):
        info = getattr(self.extractor, "layer_info", None)
        return tuple(info(size)) if info is not None else None

    # -- estimator ---------------------------------------------------------------------------------------------
    def fit(self, images: str | Path | Sequence[ImageInput]) -> "Detector":
        """Fit on normal images (a folder, a manifest CSV, or paths / float (H, W, 3) arrays) and set thresholds on
        a held-out share. An image with non-finite features is a ``DetectorError`` naming it. Warns
        (``DetectorWarning``) when the estimated model size is above ``sizing.LIMIT_BYTES``."""
        from adspine.detector import sizing
        from adspine.methods.base import nonfinite_feature_images

        items, names = _listing(images)
        try:
            fit_idx, held_idx = th.holdout_split(len(items), self.holdout, self.min_holdout, self.holdout_seed)
        except ValueError as e:
            raise DetectorError(str(e)) from None
        records = self.layer_records(self._input_size())
        _, too_big = sizing.describe(self.method.name, self.estimate_bytes(len(fit_idx)))
        if too_big:
            warnings.warn(too_big, DetectorWarning, stacklevel=2)
        sizes: list[tuple[int, int] | None] = []

        def checked() -> Iterator[list[torch.Tensor]]:
            for x in self._inputs([items[i] for i in fit_idx], sizes):
                feats = self._features(x)
                bad = nonfinite_feature_images(feats, records or [])
                if bad:
                    i, reason = next(iter(bad.items()))
                    k = fit_idx[len(sizes) - len(x) + i]
                    raise DetectorError(f"{_item_name(items[k], k)}: {reason}")
                yield feats

        self.method.fit(checked(), layers=records)
        held = self.inspect([items[i] for i in held_idx])
        if held.invalid:
            i, reason = next(iter(held.invalid.items()))
            raise DetectorError(f"{_item_name(items[held_idx[i]], held_idx[i])}: {reason} (held-out image)")
        scores, maps = held.scores, held.maps
        self.input_sizes = size_range([s for s in sizes + held.sizes if s is not None])
        self.threshold = th.pick_threshold(scores, self.fpr)
        self.pixel_threshold = th.pick_threshold(maps, self.fpr)
        self.holdout_record = {
            "rule": th.rule(self.fpr), "fpr": self.fpr, "fraction": self.holdout, "minimum": self.min_holdout,
            "seed": self.holdout_seed, "count": len(held_idx), "n_fit": len(fit_idx),
            "files": [names[i] for i in held_idx], "scores": [float(s) for s in scores],
        }
        return self

    def _input_size(self) -> tuple[int, int]:
        s = self.image_size
        return (s, s) if isinstance(s, int) else s

    def estimate_bytes(self, n_fit: int) -> int | None:
        """Estimated size of the fitted method's tensors for ``n_fit`` training images (``sizing.model_bytes``)."""
        from adspine.detector import sizing

        records = self.layer_records(self._input_size())
        return None if records is None else sizing.model_bytes(self.method.name, self.method.settings(), records,
                                                               n_fit)

    def inspect(self, images: Iterable[ImageInput] | torch.Tensor) -> Inspection:
        """Scores, maps, the images that got no score (index -> reason) and the input sizes; images never affect
        each other's scores (``AnomalyMethod.predict``)."""
        scores, maps, invalid, sizes = [], [], {}, []
        for x in self._inputs(images, sizes):
            pred = self.method.predict(self._features(x), tuple(int(s) for s in x.shape[-2:]))
            invalid.update({len(sizes) - len(x) + i: reason for i, reason in pred.invalid.items()})
            scores.append(pred.scores)
            maps.append(pred.maps)
        if not scores:
            raise DetectorError("predict() got no image")
        return Inspection(np.concatenate(scores), np.concatenate(maps), invalid, sizes)

    def predict(self, images: Iterable[ImageInput] | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Image scores (N,) float64 and anomaly maps (N, H, W) float32 at the model's input size; NaN for an image
        that got no score. Warns (``DetectorWarning``) about such images and about inputs outside the training
        images' size or aspect range."""
        res = self.inspect(images)
        for i, reason in res.invalid.items():
            warnings.warn(f"image {i}: invalid, {reason}", DetectorWarning, stacklevel=2)
        mismatch = size_mismatch(self.input_sizes, res.sizes)
        if mismatch:
            warnings.warn(mismatch, DetectorWarning, stacklevel=2)
        return res.scores, res.maps

    def flag(self, scores: np.ndarray) -> np.ndarray:
        """True where a score exceeds the image threshold (``threshold.above``), or is NaN (an invalid image)."""
        if self.threshold is None:
            raise DetectorError("the detector has no threshold; fit() or load() it first")
        return th.above(scores, self.threshold)

    def flag_pixels(self, maps: np.ndarray) -> np.ndarray:
        if self.pixel_threshold is None:
            raise DetectorError("the detector has no pixel threshold; fit() or load() it first")
        return th.above(maps, self.pixel_threshold)

    # -- persistence -------------------------------------------------------------------------------------------
    def backbone_state(self) -> dict[str, torch.Tensor]:
        """The truncated backbone's weights and buffers (the modules that run)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.extractor.body.state_dict().items()}

    def config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this detector unfitted (JSON values)."""
        return {"backbone": self.backbone, "init": self.init, "init_seed": self.init_seed, "layers": self.layers,
                "method": self.method.name, "settings": self.method.settings(), "protocol": self.protocol,
                "image_size": self.image_size if isinstance(self.image_size, int) else list(self.image_size),
                "holdout": self.holdout, "min_holdout": self.min_holdout, "holdout_seed": self.holdout_seed,
                "fpr": self.fpr, "precision": self.precision}

    def save(self, folder: str | Path) -> Path:
        """Write the detector folder (see the module docstring); returns it."""
        from safetensors.torch import save_file

        from adspine.methods.base import META_FILE, library_versions, meta_digest, read_meta

        if self.threshold is None:
            raise DetectorError("save() before fit(): nothing to save")
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise DetectorError(f"{folder}: exists and is not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        method_dir = self.method.save(folder / METHOD_DIR, provenance={"detector": JSON_FILE})
        state = self.backbone_state()
        stored = {} if is_named_tag(self.init) else state
        info = getattr(self.extractor, "info", {}) or {}
        doc = {
            "format": FORMAT, "format_version": FORMAT_VERSION, **self.config(),
            "registry_row": _registry_row(self.backbone), "mean": list(self.extractor.mean),
            "std": list(self.extractor.std), "channels": list(self.extractor.channels),
            "strides": list(self.extractor.strides), "weights_tag": info.get("weights_tag"),
            "backbone_weights": "named tag" if not stored else TENSORS_FILE,
            "backbone_tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""),
                                     "sha256": tensor_digest(v)} for k, v in state.items()},
            "method_meta_sha256": meta_digest(read_meta(method_dir / META_FILE)),
            "threshold": self.threshold, "pixel_threshold": self.pixel_threshold, "holdout_record": self.holdout_record,
            "input_sizes": self.input_sizes, "versions": library_versions(),
        }
        (folder / JSON_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        save_file(stored, str(folder / TENSORS_FILE), metadata={HEADER_KEY: json_digest(doc)})
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Detector":
        """Rebuild a saved detector; a missing, altered or incomplete file is a ``DetectorError`` naming it."""
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        from adspine.methods.base import META_FILE, AnomalyMethod, meta_digest, read_meta

        folder = Path(folder)
        json_path, tensor_path = folder / JSON_FILE, folder / TENSORS_FILE
        if not folder.is_dir():
            raise DetectorError(f"{folder}: not a detector folder (missing)")
        for p in (json_path, tensor_path, folder / METHOD_DIR / META_FILE):
            if not p.is_file():
                raise DetectorError(f"{p}: missing detector file")
        try:
            doc = json.loads(json_path.read_text())
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise ValueError("not an adspine detector description")
        except (ValueError, UnicodeDecodeError) as e:
            raise DetectorError(f"{json_path}: unreadable ({e})") from None
        try:
            with safe_open(str(tensor_path), framework="pt") as f:
                header = f.metadata() or {}
            stored = load_file(str(tensor_path))
        except (SafetensorError, OSError, ValueError) as e:
            raise DetectorError(f"{tensor_path}: unreadable safetensors file ({e})") from None
        if header.get(HEADER_KEY) != json_digest(doc):
            raise DetectorError(f"{json_path}: altered (its checksum in {TENSORS_FILE} differs); save the detector "
                                f"again")
        if doc.get("format_version") != FORMAT_VERSION:
            raise DetectorError(f"{json_path}: detector format {doc.get('format_version')}, this adspine reads "
                                f"{FORMAT_VERSION}")
        method_json = folder / METHOD_DIR / META_FILE
        try:
            if meta_digest(read_meta(method_json)) != doc["method_meta_sha256"]:
                raise DetectorError(f"{method_json}: not the method this detector was saved with")
            method = AnomalyMethod.load(folder / METHOD_DIR)
        except DetectorError:
            raise
        except ValueError as e:  # ModelFileError names its file
            raise DetectorError(str(e)) from None
        expected = doc["backbone_tensors"]
        det = cls.__new__(cls)
        det.backbone, det.init, det.init_seed = doc["backbone"], doc["init"], int(doc["init_seed"])
        det.protocol, det.image_size = doc["protocol"], as_size(doc["image_size"])
        det.holdout, det.min_holdout, det.holdout_seed = doc["holdout"], doc["min_holdout"], doc["holdout_seed"]
        det.fpr, det.batch_size, det.device = doc["fpr"], 8, "cpu"
        det.precision = torch_precision(doc.get("precision", "fp32"))  # absent in folders saved before precision
        if doc["backbone_weights"] == "named tag":
            det.extractor = det._build_extractor(doc["layers"])
            state, where = det.backbone_state(), det.extractor.info.get("weights_file") or doc["init"]
        else:
            if set(stored) != set(expected):
                raise DetectorError(f"{tensor_path}: backbone tensors missing or unexpected")
            state, where = stored, tensor_path
        for k, meta in expected.items():
            if k not in state or list(state[k].shape) != meta["shape"] or tensor_digest(state[k]) != meta["sha256"]:
                raise DetectorError(f"{where}: backbone tensor {k!r} differs from the one the detector was fitted "
                                    f"with")
        if doc["backbone_weights"] != "named tag":
            det.extractor = det._build_extractor(doc["layers"], init="random")
            det.extractor.body.load_state_dict(stored, strict=True)
        det.layers, det.method = list(det.extractor.layer_names), method
        det.threshold, det.pixel_threshold = float(doc["threshold"]), float(doc["pixel_threshold"])
        det.holdout_record = doc["holdout_record"]
        det.input_sizes = doc.get("input_sizes")  # None in folders saved before the size range was recorded
        return det

    def __repr__(self) -> str:
        return (f"Detector(backbone={self.backbone!r}, init={self.init!r}, method={self.method.name!r}, "
                f"layers={self.layers}, threshold={self.threshold})")


def torch_precision(precision: Any) -> str:
    """``precision`` if torch runs it (fp32, bf16), else one ``DetectorError`` line (int8 goes through OpenVINO)."""
    from adspine.backbones.precision import TORCH_PRECISIONS, PrecisionError, check_precision, int8_problem

    try:
        if check_precision(precision) in TORCH_PRECISIONS:
            return precision
    except PrecisionError as e:
        raise DetectorError(str(e)) from None
    raise DetectorError(int8_problem() or "int8 detectors run in OpenVINO: fit in fp32, then adspine export MODEL "
                        "--format openvino --precision int8 (calibrated on normal training images)")


def _listing(images: str | Path | Sequence[ImageInput]) -> tuple[list[ImageInput], list[str]]:
    """Items and their names: a folder's images (sorted), or the given paths / arrays (arrays named ``#i``)."""
    if isinstance(images, (str, Path)):
        from adspine.detector.sources import normal_images

        items: list[ImageInput] = list(normal_images(Path(images)))
    else:
        items = list(images)
    names = [Path(x).name if isinstance(x, (str, Path)) else f"#{i}" for i, x in enumerate(items)]
    return items, names


def _item_name(item: ImageInput, index: int) -> str:
    return str(item) if isinstance(item, (str, Path)) else f"image #{index}"


def _registry_row(name: str) -> dict[str, Any]:
    """The backbone's registry row as JSON values."""
    import dataclasses

    from adspine.backbones import get_spec
    from adspine.methods.base import _plain

    return _plain(dataclasses.asdict(get_spec(name)))
