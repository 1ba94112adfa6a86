"""``Detector``: backbone + method + alarm thresholds as one object with fit / predict / save / load.

A saved detector is one folder:

- ``detector.json``: registry row, layer names, init, preprocessing protocol and size, mean/std, method and its
  settings, thresholds with their hold-out record, package versions, SHA-256 per backbone tensor and of the method's
  ``model.json``;
- ``detector.safetensors``: the truncated backbone's weights when they are not a named pretrained tag the loader can
  find again (empty otherwise); its header holds the SHA-256 of ``detector.json``, so editing either is detected;
- ``method/``: the method's own ``model.safetensors`` + ``model.json`` (``AnomalyMethod.save``).

Nothing is unpickled. ``Detector.load`` refuses a changed or incomplete folder with one line naming the file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
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


def load_image(item: ImageInput, protocol: str, size: int | tuple[int, int]) -> torch.Tensor:
    """A path or a float (H, W, 3) array in [0, 1] -> the model's input (3, H, W) (``adspine.data.mvtec.preprocess``)."""
    from adspine.data.images import load_rgb
    from adspine.data.transforms import preprocess

    image = load_rgb(Path(item)) if isinstance(item, (str, Path)) else np.asarray(item, dtype=np.float32)
    return preprocess(image, None, protocol, size)[0]


class Detector:
    """An anomaly detector: a backbone (registry name, init, layers), a method with settings, and thresholds.

    ``fit(images)`` holds out ``max(min_holdout, ceil(holdout * N))`` normal images (seed ``holdout_seed``), fits
    on the rest and sets the image and pixel thresholds on the held-out ones (``fpr`` None: their maximum, else the
    ``1 - fpr`` quantile). ``predict(images) -> (scores (N,), maps (N, H, W))``; ``flag(scores)`` applies the
    threshold (score > threshold). ``settings`` are the method's constructor arguments.
    """

    def __init__(self, backbone: str = "tf_efficientnet_lite0", init: str = "imagenet",
                 layers: str | Sequence[str] = "thesis", method: str = "padim", *, init_seed: int = 0,
                 protocol: str = "resize", image_size: int | tuple[int, int] | str = 224,
                 holdout: float = th.DEFAULT_HOLDOUT, min_holdout: int = th.MIN_HOLDOUT, holdout_seed: int = 0,
                 fpr: float | None = None, batch_size: int = 8, device: str = "cpu", **settings: Any) -> None:
        from adspine.methods import get_method_class

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

    def _build_extractor(self, layers: str | Sequence[str], init: str | None = None):
        from adspine.backbones import build_extractor

        try:
            return build_extractor(self.backbone, init=init or self.init, layers=layers, device=self.device,
                                   init_seed=self.init_seed)
        except (ValueError, KeyError) as e:  # InitError, LayerError, unknown backbone
            raise DetectorError(str(e).strip("'\"")) from None

    # -- images -> features ------------------------------------------------------------------------------------
    def _inputs(self, images: Iterable[ImageInput] | torch.Tensor) -> Iterator[torch.Tensor]:
        """Batches (B, 3, H, W) of model inputs from paths, arrays or an already preprocessed tensor."""
        if isinstance(images, torch.Tensor):
            yield from images.split(self.batch_size)
            return
        batch: list[torch.Tensor] = []
        for item in images:
            batch.append(load_image(item, self.protocol, self.image_size))
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
        """Fit on normal images (a folder, or paths / float (H, W, 3) arrays) and set thresholds on a held-out share."""
        items, names = _listing(images)
        try:
            fit_idx, held_idx = th.holdout_split(len(items), self.holdout, self.min_holdout, self.holdout_seed)
        except ValueError as e:
            raise DetectorError(str(e)) from None
        batches = (self._features(x) for x in self._inputs(items[i] for i in fit_idx))
        self.method.fit(batches, layers=self.layer_records(self._input_size()))
        scores, maps = self.predict([items[i] for i in held_idx])
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

    def predict(self, images: Iterable[ImageInput] | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Image scores (N,) float64 and anomaly maps (N, H, W) float32 at the model's input size."""
        scores, maps = [], []
        for x in self._inputs(images):
            pred = self.method.predict(self._features(x), tuple(int(s) for s in x.shape[-2:]))
            scores.append(pred.scores)
            maps.append(pred.maps)
        if not scores:
            raise DetectorError("predict() got no image")
        return np.concatenate(scores), np.concatenate(maps)

    def flag(self, scores: np.ndarray) -> np.ndarray:
        """True where a score exceeds the image threshold."""
        if self.threshold is None:
            raise DetectorError("the detector has no threshold; fit() or load() it first")
        return np.asarray(scores) > self.threshold

    def flag_pixels(self, maps: np.ndarray) -> np.ndarray:
        if self.pixel_threshold is None:
            raise DetectorError("the detector has no pixel threshold; fit() or load() it first")
        return np.asarray(maps) > self.pixel_threshold

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
                "fpr": self.fpr}

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
            "versions": library_versions(),
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
        return det

    def __repr__(self) -> str:
        return (f"Detector(backbone={self.backbone!r}, init={self.init!r}, method={self.method.name!r}, "
                f"layers={self.layers}, threshold={self.threshold})")


def _listing(images: str | Path | Sequence[ImageInput]) -> tuple[list[ImageInput], list[str]]:
    """Items and their names: a folder's images (sorted), or the given paths / arrays (arrays named ``#i``)."""
    if isinstance(images, (str, Path)):
        from adspine.detector.sources import normal_images

        items: list[ImageInput] = list(normal_images(Path(images)))
    else:
        items = list(images)
    names = [Path(x).name if isinstance(x, (str, Path)) else f"#{i}" for i, x in enumerate(items)]
    return items, names


def _registry_row(name: str) -> dict[str, Any]:
    """The backbone's registry row as JSON values."""
    import dataclasses

    from adspine.backbones import get_spec
    from adspine.methods.base import _plain

    return _plain(dataclasses.asdict(get_spec(name)))
