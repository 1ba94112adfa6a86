"""Registry: every variant of the study, the stated dimensions (measured on meta-device builds), layer presets."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from adspine.backbones.extractor import LayerError, probe, resolve_layers, stage_candidates, stride_layers
from adspine.backbones.registry import FAMILIES, SPECS, get_spec, list_specs, rule_of_thumb_d, weight_tags

# The study's table (issue 3): name -> (dim a, d); None = "not stated" (measured and chosen here).
_R = ("regnet_y_400mf 360 100, regnet_y_800mf 528 150, regnet_y_1_6gf 504 150, regnet_y_3_2gf 864 220, "
      "regnet_y_8gf 1568 450, regnet_y_16gf 1904 600, regnet_y_32gf 2320 700, regnet_x_400mf 256 100, "
      "regnet_x_800mf 480 100, regnet_x_1_6gf 648 150, regnet_x_3_2gf 720 200, regnet_x_8gf 1040 300, "
      "regnet_x_16gf 1664 500, regnet_x_32gf 2352 700")
STATED: dict[str, tuple[int, int | None]] = {
    "alexnet": (256, 100),
    **{f"vgg{n}{bn}": (512, 120) for n in (11, 13, 16, 19) for bn in ("", "_bn")},
    "resnet18": (448, 100), "resnet34": (448, 100),
    **{f"resnet{n}": (1792, 550) for n in (50, 101, 152)},
    "squeezenet1_0": (512, 100), "squeezenet1_1": (512, 100),
    "googlenet": (1248, 550), "inception_v3": (832, 220),
    "shufflenet_v2_x0_5": (336, 100), "shufflenet_v2_x1_0": (812, 220),
    "mobilenet_v2": (64, None), "mobilenet_v3_small": (64, None), "mobilenet_v3_large": (64, None),
    **{n: (1792, 550) for n in ("resnext50_32x4d", "resnext101_32x8d", "seresnet50", "seresnet101",
                                "seresnext50_32x4d", "seresnext101_32x4d", "wide_resnet50_2", "wide_resnet101_2",
                                "resnest50d", "resnest101e", "resnet50_ibn_a", "resnet101_ibn_a", "resnext101_ibn_a",
                                "se_resnet101_ibn_a")},
    "mnasnet0_5": (80, None), "mnasnet1_0": (144, None),
    **{f"efficientnet_b{i}": (a, None if i <= 2 else 100) for i, a in enumerate((80, 80, 88, 104, 112, 128, 144, 160))},
    **{r.split()[0]: (int(r.split()[1]), int(r.split()[2])) for r in _R.split(", ")},
}
NOT_STATED = [f"densenet{n}" for n in (121, 161, 169, 201)] + [f"convnext_{s}"
                                                              for s in ("tiny", "small", "base", "large")]
OFFLINE_ROWS = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2", "mobilenetv2_deepsort"]
_HAS = {m: importlib.util.find_spec(f"adspine.backbones.{m}") is not None for m in ("ibn", "offline")}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _needs_module(spec):
    if spec.source in _HAS and not _HAS[spec.source]:
        pytest.skip(f"adspine.backbones.{spec.source} not present")


def test_table_covers_the_study_and_nothing_twice():
    names = [s.name for s in SPECS]
    assert len(names) == len(set(names))
    assert set(names) == set(STATED) | set(NOT_STATED) | set(OFFLINE_ROWS)
    assert len(FAMILIES) == len(set(FAMILIES)) and {s.family for s in SPECS} == set(FAMILIES)


@pytest.mark.parametrize("name", [s.name for s in SPECS])
def test_thesis_dim_and_stride_preset(name):
    """Thesis layers give exactly the stated dim a (measured on a meta build); stride preset gives 4, 8, 16."""
    spec = get_spec(name)
    _needs_module(spec)
    outputs = probe(spec)
    layers = resolve_layers(spec, "thesis", outputs)
    measured = sum(outputs[n].shape[1] for n in layers)
    assert measured == spec.dim_a
    if name in STATED:
        assert spec.dim_a_stated and (spec.dim_a, spec.d) == STATED[name]
    else:
        assert not spec.dim_a_stated and spec.d_chosen_here
        assert spec.d == (None if name in OFFLINE_ROWS else rule_of_thumb_d(spec.dim_a))
    chosen = stride_layers(spec, outputs)
    assert [outputs[n].stride for n in chosen] == [4, 8, 16]
    cands = [c.name for c in stage_candidates(spec, outputs)]
    for s, n in zip((4, 8, 16), chosen):  # the LAST stage output at that stride
        assert n in cands and all(outputs[c].stride != s for c in cands[cands.index(n) + 1:])


def test_measured_dims_recorded_for_unstated_rows():
    measured = {n: get_spec(n).dim_a for n in NOT_STATED}
    assert measured == {"densenet121": 1792, "densenet161": 3264, "densenet169": 2048, "densenet201": 2560,
                        "convnext_tiny": 672, "convnext_small": 672, "convnext_base": 896, "convnext_large": 1344}
    assert [get_spec(n).d for n in NOT_STATED] == [540, 700, 610, 700, 200, 200, 270, 400]


def test_stride_preset_handles_convnext_and_vgg():
    conv = get_spec("convnext_tiny")
    out = probe(conv)
    assert stride_layers(conv, out) == ["features.1", "features.3", "features.5"]
    assert min(c.stride for c in stage_candidates(conv, out)) == 4  # the stem is already stride 4: no stride 2
    vgg = get_spec("vgg16")
    out = probe(vgg)
    assert stage_candidates(vgg, out)[0].stride == 1  # first block runs at full resolution
    assert stride_layers(vgg, out) == ["features.15", "features.22", "features.29"]  # ReLUs before pools 3, 4, 5
    assert [out[n].shape[1] for n in stride_layers(vgg, out)] == [256, 512, 512]


def test_strides_are_measured_not_indexed():
    spec = get_spec("resnet18")
    out = probe(spec, 96)
    assert [out[n].shape[-1] for n in ("layer1", "layer2", "layer3")] == [24, 12, 6]
    assert [out[n].stride for n in ("layer1", "layer2", "layer3")] == [4, 8, 16]
    alex = get_spec("alexnet")  # 55 px at 224 is stride 4 after rounding to a power of two
    assert probe(alex)["features.0"].shape[-1] == 55 and probe(alex)["features.0"].stride == 4


def test_explicit_layers_validated():
    spec = get_spec("resnet18")
    out = probe(spec)
    assert resolve_layers(spec, ["layer3", "layer1"], out) == ["layer1", "layer3"]  # shallow to deep
    assert resolve_layers(spec, "layer2, layer1.0", out) == ["layer1.0", "layer2"]
    with pytest.raises(LayerError, match=r"'layer9'.*valid: conv1, bn1, relu, maxpool, layer1"):
        resolve_layers(spec, ["layer1", "layer9"], out)
    with pytest.raises(LayerError, match="repeat"):
        resolve_layers(spec, ["layer1", "layer1"], out)
    with pytest.raises(LayerError, match="runs 2 times"):
        resolve_layers(spec, ["layer1.0.relu"], out)
    with pytest.raises(LayerError, match="'fc'"):
        resolve_layers(spec, ["fc"], out)  # (1, 1000) is not a map
    with pytest.raises(LayerError, match="at least 32"):
        probe(spec, 8)


def test_lookup_errors_list_valid_values():
    with pytest.raises(KeyError, match="unknown backbone 'resnet19'.*resnet18"):
        get_spec("resnet19")
    with pytest.raises(KeyError, match="unknown backbone family 'Transformers'.*ConvNeXt"):
        list_specs("Transformers")
    assert [s.name for s in list_specs("convnext")] == [f"convnext_{s}" for s in ("tiny", "small", "base", "large")]


def test_weight_tags_and_default_tags():
    r50 = weight_tags(get_spec("resnet50"))
    assert list(r50)[0] == "IMAGENET1K_V1" and r50["IMAGENET1K_V1"] == pytest.approx(76.13)
    assert r50["IMAGENET1K_V2"] == pytest.approx(80.858)  # torchvision DEFAULT, deliberately not the default here
    assert get_spec("wide_resnet50_2").default_tag == "IMAGENET1K_V1"
    for s in SPECS:
        if s.source == "torchvision":
            assert s.default_tag == "IMAGENET1K_V1" and weight_tags(s)[s.default_tag] is not None, s.name
        elif s.source == "timm":
            assert s.default_tag in weight_tags(s), s.name
    assert weight_tags(get_spec("seresnet50")) == {"in1k": 77.636}


def test_mean_std_follow_the_weights():
    import timm
    import torchvision.models as tvm

    for s in SPECS:
        if s.source == "torchvision":
            t = tvm.get_model_weights(s.constructor)[s.default_tag].transforms()
            assert (tuple(t.mean), tuple(t.std)) == (s.mean, s.std), s.name
        elif s.source == "timm":
            cfg = timm.models.get_pretrained_cfg(f"{s.constructor}.{s.default_tag}")
            assert (tuple(cfg.mean), tuple(cfg.std)) == (s.mean, s.std), s.name
    assert get_spec("tf_efficientnet_lite0").mean == (0.5, 0.5, 0.5) == get_spec("tf_efficientnet_lite0").std


@pytest.mark.skipif(not _HAS["offline"], reason="adspine.backbones.offline not present")
def test_offline_rows_agree_with_offline_module():
    from adspine.backbones import offline

    for name in OFFLINE_ROWS:
        spec = get_spec(name)
        assert offline.OFFLINE_MEAN_STD[name] == (spec.mean, spec.std)
        assert offline.OFFLINE_MODELS[name].imagenet_top1 == weight_tags(spec)["packaged"]


@pytest.mark.skipif(not _HAS["ibn"], reason="adspine.backbones.ibn not present")
def test_ibn_rows_agree_with_ibn_module():
    from adspine.backbones import ibn

    for spec in list_specs("IBN-Net"):
        variant = ibn.IBN_VARIANTS[spec.constructor]
        assert (variant.url, variant.imagenet_top1) == (spec.url, weight_tags(spec)["official"])
