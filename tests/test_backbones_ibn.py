"""IBN-a builders reproduce the official XingangPan/IBN-Net state-dict layout (keys and shapes)."""

from __future__ import annotations

import math

import pytest
import torch

from adspine.backbones.ibn import IBN_VARIANTS, build_ibn, load_ibn_weights

# Architecture description transcribed from the official ibnnet/{resnet,resnext,se_resnet}_ibn.py, written out here
# independently of adspine's code: (blocks per stage, baseWidth, cardinality, SE).
OFFICIAL = {
    "resnet50_ibn_a": ((3, 4, 6, 3), 64, 1, False),
    "resnet101_ibn_a": ((3, 4, 23, 3), 64, 1, False),
    "resnext101_ibn_a": ((3, 4, 23, 3), 4, 32, False),
    "se_resnet101_ibn_a": ((3, 4, 23, 3), 64, 1, True),
}


def _bn(prefix: str, c: int) -> dict:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def expected_state(name: str) -> dict[str, tuple]:
    """Official key -> shape, generated from per-block templates of the official model files."""
    blocks, base_width, card, se = OFFICIAL[name]
    out = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    inplanes = 64
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks)):
        ibn_a = stage < 3  # ibn_cfg = ('a', 'a', 'a', None)
        # official ResNet: width = planes; ResNeXt: D * C with D = floor(planes * baseWidth / 64)
        width = planes if card == 1 else math.floor(planes * base_width / 64) * card
        for i in range(n):
            p = f"layer{stage + 1}.{i}"
            cin = inplanes if i == 0 else planes * 4
            out[f"{p}.conv1.weight"] = (width, cin, 1, 1)
            if ibn_a:
                half = int(width * 0.5)
                out[f"{p}.bn1.IN.weight"] = (half,)
                out[f"{p}.bn1.IN.bias"] = (half,)
                out.update(_bn(f"{p}.bn1.BN", width - half))
            else:
                out.update(_bn(f"{p}.bn1", width))
            out[f"{p}.conv2.weight"] = (width, width // card, 3, 3)
            out.update(_bn(f"{p}.bn2", width))
            out[f"{p}.conv3.weight"] = (planes * 4, width, 1, 1)
            out.update(_bn(f"{p}.bn3", planes * 4))
            if se:
                out[f"{p}.se.fc.0.weight"] = (planes * 4 // 16, planes * 4)
                out[f"{p}.se.fc.2.weight"] = (planes * 4, planes * 4 // 16)
            if i == 0 and (stage > 0 or inplanes != planes * 4):
                out[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                out.update(_bn(f"{p}.downsample.1", planes * 4))
        inplanes = planes * 4
    out["fc.weight"] = (1000, 2048)
    out["fc.bias"] = (1000,)
    return out


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_state_dict_matches_official_layout(name):
    with torch.device("meta"):
        model = build_ibn(name)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = expected_state(name)
    assert sorted(set(got) - set(want)) == [] and sorted(set(want) - set(got)) == []
    assert {k: s for k, s in got.items() if want[k] != s} == {}


def test_known_key_counts_and_variants():
    # Sanity anchors for the generator itself: layer1.0 of every variant has IBN halves; layer4 never does.
    assert set(IBN_VARIANTS) == set(OFFICIAL)
    r50 = expected_state("resnet50_ibn_a")
    assert r50["layer1.0.bn1.IN.weight"] == (32,) and r50["layer3.5.bn1.BN.running_var"] == (128,)
    assert "layer4.0.bn1.weight" in r50 and not any(k.startswith("layer4") and ".IN." in k for k in r50)
    rx = expected_state("resnext101_ibn_a")
    assert rx["layer1.0.conv1.weight"] == (128, 64, 1, 1) and rx["layer1.0.conv2.weight"] == (128, 4, 3, 3)
    for v in IBN_VARIANTS.values():
        assert v.url.startswith("https://github.com/XingangPan/IBN-Net/releases/download/v1.0/")
        assert v.filename.endswith(".pth") and 77 < v.imagenet_top1 < 80


def test_strict_load_roundtrip_and_layer_channels(tmp_path):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    src = build_ibn("resnet50_ibn_a").eval()
    path = tmp_path / "ckpt.pth"
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, path)
    dst = load_ibn_weights(build_ibn("resnet50_ibn_a"), path).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(src(x), dst(x))
        h = dst.maxpool(dst.relu(dst.bn1(dst.conv1(x))))
        chans = []
        for layer in (dst.layer1, dst.layer2, dst.layer3):
            h = layer(h)
            chans.append(h.shape[1])
    assert chans == [256, 512, 1024] and sum(chans) == 1792
    bad = tmp_path / "bad.pth"
    torch.save({k: v for k, v in src.state_dict().items() if "IN" not in k}, bad)
    with pytest.raises(RuntimeError, match="Missing key"):
        load_ibn_weights(build_ibn("resnet50_ibn_a"), bad)


@pytest.mark.parametrize("name", ["resnet101_ibn_a", "resnext101_ibn_a", "se_resnet101_ibn_a"])
def test_layer_channels_meta(name):
    with torch.device("meta"):
        m = build_ibn(name).eval()
        h = m.maxpool(m.relu(m.bn1(m.conv1(torch.empty(1, 3, 64, 64)))))
        chans = []
        for layer in (m.layer1, m.layer2, m.layer3):
            h = layer(h)
            chans.append(h.shape[1])
    assert chans == [256, 512, 1024]


def test_ibn_split_normalises_halves():
    from adspine.backbones.ibn import IBN

    m = IBN(8).eval()
    x = torch.randn(2, 8, 5, 5) * 3 + 2
    y = m(x)
    # first half: per-sample, per-channel instance normalised; second half: BN in eval with fresh stats = identity-ish
    assert torch.allclose(y[:, :4].mean(dim=(2, 3)), torch.zeros(2, 4), atol=1e-5)
    assert torch.allclose(y[:, 4:], x[:, 4:] / torch.sqrt(torch.tensor(1 + 1e-5)), atol=1e-5)


def test_unknown_variant():
    with pytest.raises(ValueError, match="resnet50_ibn_a"):
        build_ibn("resnet152_ibn_a")
