"""Feature extractor: truncation (later layers never run), exact maps, eval/inference mode, fusion, Rd, FLOPs."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from adspine.backbones.extractor import (
    LayerError,
    build_extractor,
    from_model,
    meta_model,
    probe,
    resolve_layers,
    stride_layers,
    trace_outputs,
    truncate,
)
from adspine.backbones.init import build_model
from adspine.backbones.registry import get_spec
from adspine.features import rd_indices

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def r18():
    torch.set_num_threads(1)
    spec = get_spec("resnet18")
    model, rec = build_model(spec, "random", init_seed=0)
    outputs = probe(spec)
    names = resolve_layers(spec, "thesis", outputs)
    return spec, model, from_model(spec, model, names, outputs, rec.as_dict())


def test_later_layers_never_run(r18):
    spec, model, ext = r18
    calls = []
    handles = [model.get_submodule(n).register_forward_hook(lambda *a, n=n: calls.append(n))
               for n in ("layer3.1.conv2", "layer4.0.conv1", "layer4.1.conv2", "fc")]
    try:
        ext(torch.rand(1, 3, 64, 64))
        assert calls == ["layer3.1.conv2"]  # the hooks work, and nothing after layer3 runs
        calls.clear()
        model(torch.rand(1, 3, 64, 64))
        assert calls == ["layer3.1.conv2", "layer4.0.conv1", "layer4.1.conv2", "fc"]
    finally:
        for h in handles:
            h.remove()
    kept = [n for n, _ in ext.body.graph_module.named_modules() if n]
    assert "layer3.1.conv2" in kept and not any(n.startswith(("layer4", "fc", "avgpool")) for n in kept)


def test_maps_equal_the_eager_network(r18):
    _, model, ext = r18
    x = torch.rand(2, 3, 64, 64)
    maps = ext(x)
    with torch.no_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1((x - MEAN) / STD))))
        ref = [h := model.layer1(h), h := model.layer2(h), model.layer3(h)]
    assert [tuple(m.shape) for m in maps] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4)]
    for m, r in zip(maps, ref):
        assert torch.allclose(m, r, atol=1e-5)
    assert ext.channels == [64, 128, 256] and ext.strides == [4, 8, 16] and ext.default_d == 100


def test_eval_inference_mode_and_attributes(r18):
    _, model, ext = r18
    ext.train()
    assert not ext.training and not ext.body.training
    before = model.bn1.running_mean.clone()
    maps = ext(torch.rand(4, 3, 64, 64))
    assert torch.equal(model.bn1.running_mean, before)
    assert all(m.is_inference() and not m.requires_grad for m in maps)
    assert ext.mean == (0.485, 0.456, 0.406) and ext.std == (0.229, 0.224, 0.225)
    for key in ("backbone", "family", "source", "init", "weights_tag", "init_seed", "layers", "zero_init_last",
                "imagenet_top1"):
        assert key in ext.info
    assert ext.info["init"] == "random" and ext.info["init_seed"] == 0 and ext.info["layers"] == ext.layer_names
    with pytest.raises(ValueError, match=r"images must be a \(B, 3, H, W\) tensor, got \(3, 64, 64\)"):
        ext(torch.rand(3, 64, 64))


def test_truncated_params_and_flops(r18):
    _, model, ext = r18
    kept = ("conv1", "bn1", "layer1", "layer2", "layer3")
    assert ext.truncated_params() == sum(p.numel() for n in kept for p in model.get_submodule(n).parameters())
    assert ext.truncated_params() < sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1(torch.rand(2, 3, 96, 96)))))
        model.layer3(model.layer2(model.layer1(h)))
    assert ext.flops(size=96, batch=2) == fc.get_total_flops() > 0


def test_embed_fuses_and_draws_rd(r18):
    _, _, ext = r18
    x = torch.rand(2, 3, 64, 64)
    full, idx = ext.embed(x, d=None)
    assert full.shape == (2, 448, 16, 16) and idx is None
    assert torch.equal(full[:, 64:192, ::2, ::2], full[:, 64:192, 1::2, 1::2])  # nearest upsampling
    red, idx = ext.embed(x)  # default d = 100, seed 1024
    assert red.shape == (2, 100, 16, 16) and torch.equal(idx, rd_indices(448, 100, 1024))
    assert torch.equal(red, full[:, idx])


def test_module_and_its_last_child_share_a_node():
    """'features' ends with 'features.12': both requested at once must both be the real output."""
    spec = get_spec("squeezenet1_1")
    model = meta_model(spec)
    outputs = trace_outputs(model)
    names = resolve_layers(spec, ["features.12", "features", "features.4"], outputs)
    body = truncate(model, names)
    assert body.nodes["features"] == body.nodes["features.12"]
    out = body(torch.zeros(1, 3, 224, 224, device="meta"))
    assert [tuple(out[n].shape) for n in names] == [outputs[n].shape for n in names]


# one member per family (the smallest), traced on the meta device: graph outputs agree with the measured shapes
FAMILY_REPS = ["alexnet", "vgg11_bn", "resnet18", "squeezenet1_0", "densenet121", "googlenet", "inception_v3",
               "shufflenet_v2_x0_5", "mobilenet_v3_small", "resnext50_32x4d", "seresnext50_32x4d", "wide_resnet50_2",
               "resnest50d", "resnet50_ibn_a", "mnasnet0_5", "efficientnet_b0", "tf_efficientnet_lite0",
               "mobilenetv2_deepsort", "regnet_y_400mf", "convnext_tiny"]


@pytest.mark.parametrize("name", FAMILY_REPS)
def test_truncation_matches_probe_for_each_family(name):
    spec = get_spec(name)
    if spec.source in ("ibn", "offline") and importlib.util.find_spec(f"adspine.backbones.{spec.source}") is None:
        pytest.skip(f"adspine.backbones.{spec.source} not present")
    model = meta_model(spec)
    outputs = trace_outputs(model)
    names = sorted(set(resolve_layers(spec, "thesis", outputs)) | set(stride_layers(spec, outputs)),
                   key=lambda n: outputs[n].order)
    out = truncate(model, names)(torch.zeros(1, 3, 224, 224, device="meta"))
    assert [tuple(out[n].shape) for n in names] == [outputs[n].shape for n in names]


def test_inception_blocks_at_two_strides_fuse_to_first_grid():
    ext = build_extractor("googlenet", init="random", init_seed=1)
    assert ext.strides == [8, 8, 16] and ext.channels == [256, 480, 512]
    maps = ext(torch.rand(1, 3, 96, 96))
    assert [tuple(m.shape[-2:]) for m in maps] == [(12, 12), (12, 12), (6, 6)]
    emb, _ = ext.embed(torch.rand(1, 3, 96, 96), d=None)
    assert emb.shape == (1, 1248, 12, 12)


def test_stride_preset_and_explicit_layers_build():
    ext = build_extractor("mobilenet_v3_small", init="random", layers="stride")
    assert ext.layer_names == ["features.1", "features.3", "features.8"] and ext.strides == [4, 8, 16]
    maps = ext(torch.rand(1, 3, 64, 64))
    assert [m.shape[-1] for m in maps] == [16, 8, 4]
    with pytest.raises(LayerError, match="unknown or non-map module 'features.99'.*valid: features.0"):
        build_extractor("mobilenet_v3_small", init="random", layers=["features.99"])


@pytest.mark.skipif(importlib.util.find_spec("adspine.backbones.ibn") is None, reason="ibn module absent")
def test_ibn_extractor_runs():
    ext = build_extractor("resnet50_ibn_a", init="random")
    maps = ext(torch.rand(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == [256, 512, 1024] and ext.strides == [4, 8, 16]


def test_a_deep_copy_runs_in_eval_mode_and_gives_the_same_features():
    """torch.fx rebuilds a copied graph's modules in training mode; BatchNorm would then use batch statistics."""
    import copy

    ext = build_extractor("resnet18", init="random", layers="thesis")
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    twin = copy.deepcopy(ext)
    for a, b in zip(ext(x), twin(x)):
        assert torch.equal(a, b)
