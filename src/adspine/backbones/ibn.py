"""IBN-Net IBN-a backbones whose state dicts match the official XingangPan/IBN-Net checkpoints key for key.

IBN-a (Pan et al., ECCV 2018): in every bottleneck of layer1-3 the first normalisation (``bn1``) is an ``IBN`` module
that normalises the first half of the channels with ``InstanceNorm2d(affine=True)`` (``bn1.IN``) and the rest with
``BatchNorm2d`` (``bn1.BN``); layer4 and the stem are plain BatchNorm. The module names, channel widths and block
order follow the official ``ibnnet/resnet_ibn.py``, ``resnext_ibn.py`` (ResNeXt-101 32x4d) and ``se_resnet_ibn.py``
(squeeze-excitation ``se.fc.0`` / ``se.fc.2``, reduction 16, no biases, applied after ``bn3``), so the released v1.0
checkpoints load with ``strict=True``. The interface mirrors torchvision's ResNet (``conv1, bn1, relu, maxpool,
layer1..layer4, avgpool, fc``); parameter-free modules may be named differently from the official code (the
official ResNeXt calls its max-pool ``maxpool1`` and pools with ``AvgPool2d(7)``), which does not affect any key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from adspine.backbones.registry import get_spec

__all__ = ["IBN", "SELayer", "IBNBottleneck", "IBNResNet", "IBNVariant", "IBN_VARIANTS", "build_ibn",
           "load_ibn_weights"]


@dataclass(frozen=True)
class IBNVariant:
    """One released IBN-a model: its architecture; checkpoint address and top-1 are the registry row's (``name``).

    The registry's top-1 is 100 - the top-1 error in the "IBN-Net" column of the official README (the same table
    links the checkpoint). An older README notes 22.76 / 21.29 % top-1 error for the fast ResNet-50/101-IBN-a
    implementation these checkpoints belong to (77.24 / 78.71 % top-1); see ``note``.
    """

    name: str
    imagenet_top5: float
    layers: tuple[int, int, int, int]
    groups: int = 1
    width_per_group: int = 64
    se: bool = False
    note: str = ""

    @property
    def url(self) -> str:
        return get_spec(self.name).url

    @property
    def imagenet_top1(self) -> float:
        return dict(get_spec(self.name).top1)["official"]

    @property
    def filename(self) -> str:
        """File name of the checkpoint (the torch.hub cache name)."""
        return self.url.rsplit("/", 1)[-1]


IBN_VARIANTS: dict[str, IBNVariant] = {v.name: v for v in (
    IBNVariant("resnet50_ibn_a", 93.68, (3, 4, 6, 3),
               note="older README: 22.76/6.41 % error (77.24 % top-1) for this fast implementation"),
    IBNVariant("resnet101_ibn_a", 94.41, (3, 4, 23, 3),
               note="older README: 21.29/5.61 % error (78.71 % top-1) for this fast implementation"),
    IBNVariant("resnext101_ibn_a", 94.58, (3, 4, 23, 3), groups=32, width_per_group=4,
               note="ResNeXt-101 32x4d (official baseWidth=4, cardinality=32)"),
    IBNVariant("se_resnet101_ibn_a", 94.49, (3, 4, 23, 3), se=True,
               note="SE reduction 16, bias-free fully connected layers"),
)}


class IBN(nn.Module):
    """Instance-Batch Normalization: InstanceNorm on the first ``int(planes * ratio)`` channels, BatchNorm on the
    rest."""

    def __init__(self, planes: int, ratio: float = 0.5) -> None:
        super().__init__()
        self.half = int(planes * ratio)
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat((self.IN(a.contiguous()), self.BN(b.contiguous())), dim=1)


class SELayer(nn.Module):
    """Squeeze-excitation as in the official code: ``fc = Sequential(Linear, ReLU, Linear, Sigmoid)``, no biases."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        hidden = int(channels / reduction)
        self.fc = nn.Sequential(nn.Linear(channels, hidden, bias=False), nn.ReLU(inplace=True),
                                nn.Linear(hidden, channels, bias=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fc(self.avg_pool(x).flatten(1))
        return x * w[:, :, None, None]


class IBNBottleneck(nn.Module):
    """Bottleneck (expansion 4) with optional IBN-a ``bn1``, grouped 3x3 conv (ResNeXt) and SE after ``bn3``."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 ibn: bool = False, groups: int = 1, width_per_group: int = 64, se: bool = False) -> None:
        super().__init__()
        width = int(planes * (width_per_group / 64.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, kernel_size=1, bias=False)
        self.bn1 = IBN(width) if ibn else nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.se = SELayer(planes * self.expansion) if se else None
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.se is not None:
            out = self.se(out)
        return self.relu(out + identity)


class IBNResNet(nn.Module):
    """ResNet/ResNeXt/SE-ResNet with IBN-a blocks in layer1-3; torchvision-like attribute names."""

    def __init__(self, layers: tuple[int, int, int, int], groups: int = 1, width_per_group: int = 64,
                 se: bool = False, ibn_stages: tuple[bool, bool, bool, bool] = (True, True, True, False),
                 num_classes: int = 1000) -> None:
        super().__init__()
        self.inplanes = 64
        self._block_kw = dict(groups=groups, width_per_group=width_per_group, se=se)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0], 1, ibn_stages[0])
        self.layer2 = self._make_layer(128, layers[1], 2, ibn_stages[1])
        self.layer3 = self._make_layer(256, layers[2], 2, ibn_stages[2])
        self.layer4 = self._make_layer(512, layers[3], 2, ibn_stages[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * IBNBottleneck.expansion, num_classes)
        self._init_weights()

    def _make_layer(self, planes: int, blocks: int, stride: int, ibn: bool) -> nn.Sequential:
        out = planes * IBNBottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, out, kernel_size=1, stride=stride, bias=False),
                                       nn.BatchNorm2d(out))
        mods = [IBNBottleneck(self.inplanes, planes, stride, downsample, ibn, **self._block_kw)]
        self.inplanes = out
        mods += [IBNBottleneck(out, planes, 1, None, ibn, **self._block_kw) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def _init_weights(self) -> None:
        """Official init: conv ~ N(0, sqrt(2 / (k*k*out))) (He fan-out); norm scales 1, shifts 0; fc PyTorch default."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and layer1-4 (stride 32 map)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.forward_features(x)), 1))


def build_ibn(name: str, weights: str | Path | None = None) -> IBNResNet:
    """Build an IBN-a variant (random official init); with ``weights`` load that official checkpoint strictly."""
    if name not in IBN_VARIANTS:
        raise ValueError(f"unknown IBN-Net variant {name!r}; valid: {', '.join(IBN_VARIANTS)}")
    v = IBN_VARIANTS[name]
    model = IBNResNet(v.layers, groups=v.groups, width_per_group=v.width_per_group, se=v.se)
    if weights is not None:
        load_ibn_weights(model, weights)
    return model


def load_ibn_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load an official IBN-Net ``.pth`` (tensors only, ``weights_only=True``) with strict key matching.

    A ``module.`` prefix (DataParallel) or a ``{"state_dict": ...}`` wrapper is accepted.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: IBN-Net checkpoint not found")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True)
    return model
