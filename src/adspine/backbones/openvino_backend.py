"""A ``FeatureExtractor`` run by OpenVINO's CPU plugin in fp32, bf16 or int8.

``build_openvino_extractor(extractor, precision, calibration=None)`` converts the truncated network (normalisation
inside, dynamic batch and size) with ``openvino.convert_model`` and compiles it with ``INFERENCE_PRECISION_HINT``
f32 or bf16. int8 is NNCF post-training static quantization (``nncf.quantize``: activation ranges measured on
normal training images, ``calibration_set``; weights per channel, the rest of the graph f32). The answer keeps
``FeatureExtractor``'s contract (``forward(images in [0, 1]) -> list[Tensor float32]``, ``layer_info``,
``layer_names``, ``embed``, ...), so the Detector and the study can use it in its place; ``record`` says the backend,
precision, library versions and, for int8, the calibration images.
"""

from __future__ import annotations

import contextlib
import logging
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adspine.backbones.extractor import FeatureExtractor
from adspine.backbones.precision import PrecisionError, check_precision

HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: the layers NNCF leaves unquantized run in f32
CALIBRATION_LIMIT = 64


def versions(int8: bool = False) -> dict[str, str]:
    """Versions of the libraries that made a model (NNCF only where it quantized)."""
    import openvino

    out = {"openvino": openvino.__version__, "torch": torch.__version__}
    if int8:
        import nncf

        out["nncf"] = nncf.__version__
    return out


@dataclass(frozen=True)
class Calibration:
    """Preprocessed normal training images for int8 calibration: ``images`` (N, 3, H, W) in [0, 1], their
    ``names`` (and ``paths`` where they came from files), the draw's ``seed`` and how many images it was
    ``drawn_from``."""

    images: torch.Tensor
    names: tuple[str, ...]
    seed: int | None = None
    drawn_from: int | None = None
    paths: tuple[Path, ...] = ()

    def record(self) -> dict[str, Any]:
        return {"count": len(self.names), "drawn_from": self.drawn_from, "seed": self.seed, "images": list(self.names),
                "size": list(self.images.shape[-2:])}


def calibration_set(paths: Sequence[str | Path], protocol: str, size: int | tuple[int, int],
                    limit: int = CALIBRATION_LIMIT, seed: int = 0) -> Calibration:
    """A seeded subset of at most ``limit`` normal training images (``random.Random(seed).sample``, kept in file
    order), preprocessed like the study and the detector."""
    from adspine.data.images import load_rgb
    from adspine.data.transforms import preprocess

    paths = [Path(p) for p in paths]
    if not paths:
        raise PrecisionError("int8 calibration needs at least one normal training image; none were given")
    chosen = sorted(random.Random(seed).sample(range(len(paths)), min(limit, len(paths))))
    images = torch.stack([preprocess(load_rgb(paths[i]), None, protocol, size)[0] for i in chosen])
    return Calibration(images, tuple(paths[i].name for i in chosen), seed, len(paths), tuple(paths[i] for i in chosen))


def as_calibration(calibration: Calibration | torch.Tensor | None) -> Calibration:
    """A ``Calibration`` from itself or a preprocessed (N, 3, H, W) tensor (named ``tensor[i]``)."""
    if calibration is None:
        raise PrecisionError("int8 needs calibration images (normal training images); none were given")
    if isinstance(calibration, torch.Tensor):
        calibration = Calibration(calibration, tuple(f"tensor[{i}]" for i in range(len(calibration))))
    x = calibration.images
    if x.dim() != 4 or x.shape[1] != 3 or len(x) == 0:
        raise PrecisionError(f"calibration images must be a non-empty (N, 3, H, W) tensor, got {tuple(x.shape)}")
    return calibration


@contextlib.contextmanager
def _quiet():
    """Tracer warnings of the conversion and NNCF's info logging, silenced."""
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        nncf_log.setLevel(level)


def convert(module: nn.Module, example: torch.Tensor, shape: Sequence[int] = (-1, 3, -1, -1)):
    """``module`` (image tensor in, tensor or tuple of tensors out) as an ``openvino.Model`` whose input has
    ``shape`` (-1 = dynamic)."""
    import openvino as ov

    with _quiet(), torch.no_grad():
        return ov.convert_model(module.eval(), example_input=example, input=[ov.PartialShape(list(shape))])


def quantize(model, calibration: Calibration, ignored_patterns: Sequence[str] = ()):
    """NNCF post-training static int8 quantization of ``model`` with activation ranges from ``calibration``'s
    images, one image per calibration step; nodes whose names match ``ignored_patterns`` (regular expressions) stay
    f32."""
    import nncf

    items = [calibration.images[i:i + 1].numpy() for i in range(len(calibration.images))]
    scope = nncf.IgnoredScope(patterns=list(ignored_patterns), validate=False) if ignored_patterns else None
    with _quiet():
        return nncf.quantize(model, nncf.Dataset(items), subset_size=len(items), ignored_scope=scope)


def compile_model(model, precision: str, threads: int | None = None):
    """``model`` compiled for the CPU with the precision's ``INFERENCE_PRECISION_HINT`` and ``threads`` (default
    torch's thread count)."""
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": HINTS[check_precision(precision)],
              "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads())}
    return ov.Core().compile_model(model, "CPU", config)


class _Normalised(nn.Module):
    """The extractor's network with its normalisation, as a tuple of maps (what OpenVINO converts)."""

    def __init__(self, extractor: FeatureExtractor) -> None:
        super().__init__()
        self.body, self.names = extractor.body, list(extractor.layer_names)
        self.register_buffer("mean", extractor._mean.detach().cpu().clone())
        self.register_buffer("std", extractor._std.detach().cpu().clone())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.body((x - self.mean) / self.std)
        return tuple(out[n] for n in self.names)


class OpenVinoExtractor:
    """``FeatureExtractor``'s contract run by a compiled OpenVINO model; everything but ``forward`` (layer records,
    mean / std, FLOPs, ``info``) is the torch extractor's, whose weights it was converted from."""

    embed = FeatureExtractor.embed

    def __init__(self, extractor: FeatureExtractor, compiled, precision: str, record: dict[str, Any]) -> None:
        self.extractor, self.compiled, self.precision, self.record = extractor, compiled, precision, record
        self.info = {**extractor.info, "backend": "openvino", "precision": precision}

    def __getattr__(self, name: str):
        if name == "extractor":  # not yet set (copy / unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.extractor, name)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) images in [0, 1] -> per-layer maps (B, C_i, h_i, w_i) float32 on the CPU, shallow to deep."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a (B, 3, H, W) tensor, got {shape}")
        x = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())
        out = self.compiled(x)
        return [torch.from_numpy(np.asarray(out[port], dtype=np.float32)) for port in self.compiled.outputs]

    __call__ = forward

    def __repr__(self) -> str:
        return f"OpenVinoExtractor({self.info.get('backbone')}, {self.precision})"


def openvino_backbone(extractor: FeatureExtractor, precision: str = "fp32",
                      calibration: Calibration | torch.Tensor | None = None) -> tuple[Any, dict[str, Any]]:
    """``extractor``'s network with its normalisation as an ``openvino.Model`` (quantized for int8, which needs
    ``calibration``) and its record (backend, precision, hint, versions, calibration images)."""
    check_precision(precision)
    calib = as_calibration(calibration) if precision == "int8" else None
    example = calib.images[:1] if calib is not None else torch.full((1, 3, 64, 64), 0.5)
    model = convert(_Normalised(extractor).cpu(), example)
    if calib is not None:
        model = quantize(model, calib)
    record = {"backend": "openvino", "precision": precision, "inference_precision_hint": HINTS[precision],
              "versions": versions(int8=calib is not None)}
    if calib is not None:
        record["calibration"] = calib.record()
    return model, record


def build_openvino_extractor(extractor: FeatureExtractor, precision: str = "fp32",
                             calibration: Calibration | torch.Tensor | None = None,
                             threads: int | None = None) -> OpenVinoExtractor:
    """``extractor`` converted to OpenVINO and compiled in ``precision`` (fp32, bf16, int8); int8 needs
    ``calibration`` (normal training images: a ``Calibration`` or a preprocessed (N, 3, H, W) tensor)."""
    model, record = openvino_backbone(extractor, precision, calibration)
    return OpenVinoExtractor(extractor, compile_model(model, precision, threads), precision, record)
