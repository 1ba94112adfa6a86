"""Initialization: offline errors before any download, cache lookups, seeded random schemes, zero-init, files."""

from __future__ import annotations

import hashlib
import importlib.util
import pickle

import pytest
import torch
from safetensors.torch import save_file

from adspine.backbones import extractor as bext
from adspine.backbones import init as binit
from adspine.backbones.extractor import build_extractor
from adspine.backbones.init import InitError, OfflineWeightsError, build_model, weights_location
from adspine.backbones.library_weights import LIBRARY_WEIGHTS
from adspine.backbones.registry import get_spec


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def offline_caches(tmp_path, monkeypatch):
    """Offline, with empty torch.hub and Hugging Face caches under tmp_path."""
    import huggingface_hub.constants as hfc

    monkeypatch.setenv("ADSPINE_OFFLINE", "1")
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path
    torch.hub.set_dir(old)


def _plant(hub, monkeypatch, row, tag, state_dict, stem):
    """Save ``state_dict`` in the torch.hub cache under a torch.hub-style name whose hash prefix matches its bytes,
    and point the library index entry of (row, tag) at that name."""
    ckpt = hub / "hub" / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    tmp = ckpt / "tmp.pth"
    torch.save(state_dict, tmp)
    path = ckpt / f"{stem}-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"
    tmp.rename(path)
    top1 = LIBRARY_WEIGHTS[row][tag][1]
    monkeypatch.setitem(LIBRARY_WEIGHTS[row], tag, (f"https://download.pytorch.org/models/{path.name}", top1))
    return path


def _fails_fast(name, init, match):
    with pytest.raises(OfflineWeightsError, match=match) as err:
        build_extractor(name, init=init)
    assert "\n" not in str(err.value) and "file:PATH" in str(err.value)
    return str(err.value)


def test_missing_weights_offline_fail_at_once_naming_the_file(offline_caches, monkeypatch):
    """No download, no model build, no shape probe: the error comes first."""
    def boom(*a, **k):
        raise AssertionError("reached work that should not happen")

    for target, attr in ((torch.hub, "download_url_to_file"), (bext, "probe"), (binit, "construct")):
        monkeypatch.setattr(target, attr, boom)
    msg = _fails_fast("resnet18", "imagenet", "resnet18-f37072fd.pth")
    assert str(offline_caches / "hub" / "checkpoints") in msg
    _fails_fast("resnet50", "imagenet:IMAGENET1K_V2", "resnet50-11ad3fa6.pth")
    _fails_fast("resnest50d", "imagenet", "timm/resnest50d.in1k")  # Hugging Face weights
    _fails_fast("seresnet50", "imagenet", "se_resnet50-ce0d4300.pth")  # timm URL weights
    _fails_fast("resnet50_ibn_a", "imagenet", "resnet50_ibn_a-d9d0bb7b.pth")


def test_offline_flag_and_forced_online(monkeypatch):
    monkeypatch.setenv("ADSPINE_OFFLINE", "1")
    assert binit.is_offline()
    monkeypatch.setenv("ADSPINE_OFFLINE", "0")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert not binit.is_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert binit.is_offline()


def test_cached_torchvision_file_is_used_without_network(offline_caches, monkeypatch):
    """A file at torch.hub's cache path (name hash matching its bytes) is what is loaded: its tensors end up in the
    extractor."""
    ref, _ = build_model(get_spec("resnet18"), "random", init_seed=7)
    path = _plant(offline_caches, monkeypatch, "resnet18", "IMAGENET1K_V1", ref.state_dict(), "resnet18")
    assert weights_location(get_spec("resnet18")).cached
    ext = build_extractor("resnet18", init="imagenet")
    assert torch.equal(ext.body.graph_module.get_submodule("layer1.0.conv1").weight, ref.layer1[0].conv1.weight)
    assert ext.info["weights_tag"] == "IMAGENET1K_V1" and ext.info["imagenet_top1"] == pytest.approx(69.758)
    assert ext.info["init_seed"] is None and ext.info["weights_file"] == str(path)
    assert ext.info["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_hugging_face_cache_is_found(offline_caches):
    snap = offline_caches / "hf" / "models--timm--resnest50d.in1k"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("abc123")
    (snap / "snapshots" / "abc123").mkdir(parents=True)
    (snap / "snapshots" / "abc123" / "model.safetensors").write_bytes(b"x")
    loc = weights_location(get_spec("resnest50d"))
    assert loc.cached and loc.path.name == "model.safetensors"


def test_unknown_tag_and_bad_init_strings():
    with pytest.raises(InitError, match="unknown weights tag 'V9' for resnet50; valid: IMAGENET1K_V1, IMAGENET1K_V2"):
        build_extractor("resnet50", init="imagenet:V9")
    for bad in ("foo", "random:3", "file:", "", "kaiming"):
        with pytest.raises(InitError, match="valid: imagenet, imagenet:<TAG>, random"):
            build_model(get_spec("resnet18"), bad)


def test_random_is_seeded_and_recorded():
    spec = get_spec("resnet18")
    a, rec = build_model(spec, "random", init_seed=3)
    b, _ = build_model(spec, "random", init_seed=3)
    c, _ = build_model(spec, "random", init_seed=4)
    assert torch.equal(a.conv1.weight, b.conv1.weight) and not torch.equal(a.conv1.weight, c.conv1.weight)
    assert (rec.init, rec.init_seed, rec.zero_init_last, rec.weights_tag) == ("random", 3, False, None)


def test_zero_init_last_is_explicit_for_timm_and_torchvision():
    """timm's own default (zero_init_last=True) would leave random residual branches dead; ours is False."""
    timm_model, rec = build_model(get_spec("resnest50d"), "random")
    assert rec.zero_init_last is False and timm_model.layer1[0].bn3.weight.abs().min() > 0
    timm_zero, rec = build_model(get_spec("resnest50d"), "random", zero_init_last=True)
    assert rec.zero_init_last is True and timm_zero.layer1[0].bn3.weight.abs().max() == 0
    tv_zero, _ = build_model(get_spec("resnet18"), "random", zero_init_last=True)
    assert tv_zero.layer1[0].bn2.weight.abs().max() == 0
    with pytest.raises(InitError, match="zero_init_last=True needs init='random'.*vgg11"):
        build_model(get_spec("vgg11"), "random", zero_init_last=True)
    with pytest.raises(InitError, match="zero_init_last"):
        build_model(get_spec("resnet18"), "kaiming_normal", zero_init_last=True)


def test_named_schemes():
    spec = get_spec("resnet18")
    k1, rec = build_model(spec, "kaiming_normal", init_seed=5)
    k2, _ = build_model(spec, "kaiming_normal", init_seed=5)
    assert torch.equal(k1.layer3[0].conv2.weight, k2.layer3[0].conv2.weight) and rec.init_seed == 5
    w = k1.layer3[0].conv2.weight  # 256 x 256 x 3 x 3, fan_out = 2304
    assert w.std().item() == pytest.approx((2 / 2304) ** 0.5, rel=0.05)
    assert torch.all(k1.layer2[0].bn1.weight == 1) and torch.all(k1.layer2[0].bn1.bias == 0)
    assert torch.all(k1.fc.bias == 0)
    x, _ = build_model(spec, "xavier_uniform", init_seed=5)
    bound = (6 / (64 * 9 + 64 * 9)) ** 0.5
    assert x.layer1[0].conv1.weight.abs().max() <= bound and x.layer1[0].conv1.weight.abs().max() > 0.9 * bound
    o, _ = build_model(spec, "orthogonal", init_seed=5)
    flat = o.layer1[0].conv1.weight.flatten(1)  # 64 x 576: orthonormal rows
    assert torch.allclose(flat @ flat.T, torch.eye(64), atol=1e-4)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_file_roundtrip(tmp_path, suffix):
    spec = get_spec("resnet18")
    ref, _ = build_model(spec, "random", init_seed=11)
    path = tmp_path / f"w{suffix}"
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": sd}, path)
    ext = build_extractor("resnet18", init=f"file:{path}")
    assert torch.equal(ext.body.graph_module.get_submodule("layer2.1.conv2").weight, ref.layer2[1].conv2.weight)
    assert ext.info["weights_file"] == str(path.resolve()) and len(ext.info["weights_sha256"]) == 64


def test_file_errors(tmp_path):
    spec = get_spec("resnet18")
    ref, _ = build_model(spec, "random")
    sd = ref.state_dict()
    sd.pop("fc.bias")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(InitError, match=r"bad.pth: state dict keys do not match resnet18: 1 missing \(e.g. fc.bias\), "
                                        r"1 unexpected \(e.g. extra.weight\)"):
        build_model(spec, f"file:{tmp_path / 'bad.pth'}")
    shapes = ref.state_dict()
    shapes["fc.weight"] = torch.zeros(10, 512)
    torch.save(shapes, tmp_path / "shape.pth")
    with pytest.raises(InitError, match=r"'fc.weight' has shape \(10, 512\), resnet18 needs \(1000, 512\)"):
        build_model(spec, f"file:{tmp_path / 'shape.pth'}")
    (tmp_path / "evil.pth").write_bytes(pickle.dumps(pickle.Pickler, protocol=2))  # not loadable with weights_only=True
    with pytest.raises(InitError, match="evil.pth: cannot read weights"):
        build_model(spec, f"file:{tmp_path / 'evil.pth'}")
    with pytest.raises(InitError, match="nope.pth: weights file not found"):
        build_extractor("resnet18", init=f"file:{tmp_path / 'nope.pth'}")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(InitError, match="unsupported weights file type '.npz'"):
        build_model(spec, f"file:{tmp_path / 'w.npz'}")


@pytest.mark.skipif(importlib.util.find_spec("adspine.backbones.offline") is None, reason="offline module absent")
def test_packaged_lite0_needs_no_network(offline_caches):
    ext = build_extractor("tf_efficientnet_lite0", init="imagenet")
    assert ext.mean == (0.5, 0.5, 0.5) and ext.info["weights_tag"] == "packaged"
    assert ext.info["imagenet_top1"] == pytest.approx(75.1)
    maps = ext(torch.rand(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == [16, 24, 40]


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_pretrained_inception_builds_match_random_builds(name, offline_caches, monkeypatch):
    """The pretrained path (aux heads in the file, as torchvision's) ends with the modules of the random build."""
    import torchvision.models as tvm

    sd = tvm.get_model(name, weights=None, aux_logits=True, init_weights=True).state_dict()
    _plant(offline_caches, monkeypatch, name, "IMAGENET1K_V1", sd, name)
    pre = binit.construct(get_spec(name), pretrained_tag="IMAGENET1K_V1")
    rnd = binit.construct(get_spec(name))
    assert set(pre.state_dict()) == set(rnd.state_dict())
    assert pre.transform_input and rnd.transform_input and not pre.aux_logits
    assert all(torch.equal(v, sd[k]) for k, v in pre.state_dict().items())
