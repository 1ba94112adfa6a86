"""Pretrained files are read safely: hash in the name checked against the bytes, nothing unpickled, one-line errors
naming the file; downloads go through adspine; ``check_weights`` needs no build and no torch."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from adspine.backbones import check_weights
from adspine.backbones.extractor import build_extractor
from adspine.backbones.init import build_model
from adspine.backbones.init_names import InitError, OfflineWeightsError
from adspine.backbones.library_weights import LIBRARY_WEIGHTS
from adspine.backbones.registry import get_spec
from adspine.backbones.weights import library_weights_index, name_hash, verify_cached


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears if the payload runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Offline, empty torch.hub and Hugging Face caches under tmp_path; torch.hub/torchvision/timm loaders banned."""
    import huggingface_hub.constants as hfc

    monkeypatch.setenv("ADSPINE_OFFLINE", "1")
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf"))

    def banned(*a, **k):
        raise AssertionError("a library loader was asked to read a pretrained file")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", banned)
    monkeypatch.setattr(torch.hub, "download_url_to_file", banned)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    yield tmp_path
    torch.hub.set_dir(old)


def _payload_file(path, marker):
    torch.save({"conv1.weight": Payload(marker)}, path)
    return path


def _payload_is_live(tmp_path):
    """The planted payload really runs when unpickled in full (what torch.hub's default weights_only=False does):
    the file holds the reduce call, and that call creates the marker (checked without unpickling anything)."""
    twin = _payload_file(tmp_path / "twin.pth", tmp_path / "twin-ran")
    func, args = Payload(tmp_path / "twin-ran").__reduce__()
    assert b"twin-ran" in twin.read_bytes()  # the call's argument is what the planted file carries
    func(*args).close()
    return (tmp_path / "twin-ran").exists()


def _refused(name, init, path, match):
    with pytest.raises(InitError, match=match) as err:
        build_extractor(name, init=init)
    msg = str(err.value)
    assert msg.startswith(str(path)) and "\n" not in msg
    return msg


def test_torchvision_payload_under_the_cached_name_never_runs(caches):
    assert _payload_is_live(caches)
    marker = caches / "ran"
    path = _payload_file(caches / "hub" / "checkpoints" / "resnet18-f37072fd.pth", marker)
    msg = _refused("resnet18", "imagenet", path, "does not match the hash in its name")
    assert "(f37072fd)" in msg and "delete it and download it again" in msg
    assert not marker.exists()


def test_payload_with_matching_hash_prefix_is_not_unpickled(caches, monkeypatch):
    """The name's prefix matches the payload's bytes, so only weights_only=True stands between it and running."""
    marker = caches / "ran"
    tmp = _payload_file(caches / "payload.pth", marker)
    path = caches / "hub" / "checkpoints" / f"resnet18-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"
    tmp.rename(path)
    entry = LIBRARY_WEIGHTS["resnet18"]["IMAGENET1K_V1"]
    monkeypatch.setitem(LIBRARY_WEIGHTS["resnet18"], "IMAGENET1K_V1",
                        (f"https://download.pytorch.org/models/{path.name}", entry[1]))
    assert verify_cached(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    msg = _refused("resnet18", "imagenet", path, "pickled objects other than tensors")
    assert "never unpickled" in msg and "delete it and download it again" in msg
    assert not marker.exists()


def test_timm_url_row_payload_never_runs(caches):
    marker = caches / "ran"
    path = _payload_file(caches / "hub" / "checkpoints" / "se_resnet50-ce0d4300.pth", marker)
    _refused("seresnet50", "imagenet", path, "does not match the hash in its name")
    assert not marker.exists()


def test_timm_hugging_face_row_payload_never_runs(caches):
    """A Hugging Face blob is named by its full SHA-256: matching bytes, then refused by weights_only=True."""
    marker = caches / "ran"
    repo = caches / "hf" / "models--timm--resnest50d.in1k"
    tmp = _payload_file(caches / "payload.bin", marker)
    blob = repo / "blobs" / hashlib.sha256(tmp.read_bytes()).hexdigest()
    blob.parent.mkdir(parents=True)
    tmp.rename(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "pytorch_model.bin").symlink_to(os.path.relpath(blob, snap))
    assert name_hash(blob) == blob.name and name_hash(snap / "pytorch_model.bin") is None
    _refused("resnest50d", "imagenet", snap / "pytorch_model.bin", "pickled objects other than tensors")
    assert not marker.exists()
    blob.write_bytes(blob.read_bytes() + b"x")  # altered blob: caught by the hash before reading
    _refused("resnest50d", "imagenet", snap / "pytorch_model.bin", f"does not match the hash in the name {blob.name}")


def _blob(folder, data: bytes, name=None):
    """A Hugging Face-style blob under ``folder/blobs``, named by its SHA-256 unless ``name`` is given."""
    blob = folder / "blobs" / (name or hashlib.sha256(data).hexdigest())
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    return blob


def _one_line_refusal(path, match):
    with pytest.raises(InitError, match=match) as err:
        verify_cached(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    return str(err.value)


def test_torchvision_name_linked_into_a_blobs_folder_is_checked_against_its_own_name(caches, monkeypatch):
    """A forged but well-formed state dict in a blob named by its own SHA-256 is refused under a torch.hub name
    whose hash prefix it does not match; a blob whose SHA-256 does start with that prefix still loads."""
    forged, _ = build_model(get_spec("resnet18"), "random", init_seed=5)
    tmp = caches / "forged.pth"
    torch.save(forged.state_dict(), tmp)
    data = tmp.read_bytes()
    blob = _blob(caches / "elsewhere", data)
    link = caches / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    link.symlink_to(blob)
    with pytest.raises(InitError, match=r"resnet18-f37072fd.pth \(resolves to .*\): its SHA-256 \(\w{12}\.\.\.\) "
                                        r"does not match the hash in its name \(f37072fd\)") as err:
        build_model(get_spec("resnet18"), "imagenet")
    assert str(err.value).startswith(str(link)) and "\n" not in str(err.value)
    genuine = link.with_name(f"resnet18-{hashlib.sha256(data).hexdigest()[:8]}.pth")
    genuine.symlink_to(blob)
    monkeypatch.setitem(LIBRARY_WEIGHTS["resnet18"], "IMAGENET1K_V1", (f"https://x/{genuine.name}", 69.758))
    model, rec = build_model(get_spec("resnet18"), "imagenet")
    assert rec.weights_sha256 == hashlib.sha256(data).hexdigest() == blob.name
    assert all(torch.equal(v, forged.state_dict()[k]) for k, v in model.state_dict().items())


def test_hugging_face_blob_names_are_verified(caches):
    """Snapshot links to LFS blobs (full SHA-256) and small git blobs (git blob SHA-1, as ``git hash-object``)."""
    repo = caches / "hf" / "models--timm--x"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    data = b"tensor bytes" * 100
    lfs = _blob(repo, data)
    (snap / "model.safetensors").symlink_to(os.path.relpath(lfs, snap))
    assert verify_cached(snap / "model.safetensors") == hashlib.sha256(data).hexdigest()
    small = b'{"architecture": "x"}\n'
    git_sha1 = subprocess.run(["git", "hash-object", "--stdin"], input=small, capture_output=True,
                              check=True).stdout.decode().strip()
    (snap / "config.json").symlink_to(_blob(repo, small, git_sha1))
    assert verify_cached(snap / "config.json") == hashlib.sha256(small).hexdigest()
    (snap / "bad.json").symlink_to(_blob(repo, small, git_sha1[::-1]))
    _one_line_refusal(snap / "bad.json", rf"resolves to .*: its git blob SHA-1 \({git_sha1[:12]}\.\.\.\) does not "
                                         rf"match the hash in the name {git_sha1[::-1]}")
    forged_name = _blob(repo, b"forged", "ab" * 32)  # a blob whose name is not its SHA-256
    (snap / "pytorch_model.bin").symlink_to(forged_name)
    _one_line_refusal(snap / "pytorch_model.bin", f"does not match the hash in the name {'ab' * 32}")


def test_links_out_of_the_cache_need_a_hash_in_the_target_name(caches):
    outside = caches / "outside"
    outside.mkdir()
    evil = outside / "evil.bin"
    evil.write_bytes(b"forged")
    snap = caches / "hf" / "models--timm--x" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "pytorch_model.bin").symlink_to(evil)
    _one_line_refusal(snap / "pytorch_model.bin", r"a link to .*evil.bin, outside the cache .*models--timm--x, whose "
                                                  r"name states no hash")
    prefix = hashlib.sha256(b"forged").hexdigest()[:8]
    ckpt = caches / "hub" / "checkpoints"
    (ckpt / f"r-{prefix}.pth").symlink_to(evil)  # the link's own name matches, the target's states nothing
    _one_line_refusal(ckpt / f"r-{prefix}.pth", "outside the cache")
    named = outside / f"evil-{prefix}.pth"
    evil.rename(named)
    (ckpt / f"s-{prefix}.pth").symlink_to(named)  # out of the cache, but the target's own name checks out
    assert verify_cached(ckpt / f"s-{prefix}.pth") == hashlib.sha256(b"forged").hexdigest()
    (ckpt / "t-00000000.pth").symlink_to(named)
    _one_line_refusal(ckpt / "t-00000000.pth", r"does not match the hash in its name \(00000000\)")
    inside = ckpt / "plain.pth"  # a link inside the cache to an unnamed file is taken as it is
    inside.write_bytes(b"x")
    (ckpt / "u.pth").symlink_to(inside)
    assert verify_cached(ckpt / "u.pth") == hashlib.sha256(b"x").hexdigest()
    (ckpt / f"v-{prefix}.pth").symlink_to(ckpt / "missing.pth")
    _one_line_refusal(ckpt / f"v-{prefix}.pth", "cannot resolve the cached file")


def test_ibn_row_payload_never_runs(caches):
    marker = caches / "ran"
    path = _payload_file(caches / "hub" / "checkpoints" / "resnet50_ibn_a-d9d0bb7b.pth", marker)
    _refused("resnet50_ibn_a", "imagenet", path, "does not match the hash in its name")
    assert not marker.exists()


def test_online_download_goes_to_the_cache_path_with_hash_check(caches, monkeypatch):
    """Not cached and online: adspine downloads into torch.hub's path (passing the name's hash prefix), then loads
    the file itself."""
    ref, _ = build_model(get_spec("resnet18"), "random", init_seed=3)
    blob = caches / "served.pth"
    torch.save(ref.state_dict(), blob)
    prefix = hashlib.sha256(blob.read_bytes()).hexdigest()[:8]
    url = f"https://download.pytorch.org/models/resnet18-{prefix}.pth"
    monkeypatch.setitem(LIBRARY_WEIGHTS["resnet18"], "IMAGENET1K_V1", (url, 69.758))
    monkeypatch.setenv("ADSPINE_OFFLINE", "0")
    calls = []

    def fake_download(src, dst, hash_prefix=None, progress=True):
        calls.append((src, dst, hash_prefix))
        with open(dst, "wb") as f:
            f.write(blob.read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    model, rec = build_model(get_spec("resnet18"), "imagenet")
    dst = caches / "hub" / "checkpoints" / f"resnet18-{prefix}.pth"
    assert calls == [(url, str(dst), prefix)]
    assert rec.weights_file == str(dst) and rec.weights_sha256.startswith(prefix)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())


def test_densenet_old_key_names_are_renamed_as_torchvision_does(caches, monkeypatch):
    ref, _ = build_model(get_spec("densenet121"), "random", init_seed=1)
    old = {}
    for k, v in ref.state_dict().items():  # torchvision's released files say norm.1 / conv.2 inside dense layers
        if k.endswith("num_batches_tracked"):  # and predate this buffer
            continue
        parts = k.split(".")
        if "denselayer" in k and parts[-2][:-1] in ("norm", "conv", "relu"):
            parts[-2:-1] = [parts[-2][:-1], parts[-2][-1]]
        old[".".join(parts)] = v
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    tmp = caches / "d.pth"
    torch.save(old, tmp)
    path = caches / "hub" / "checkpoints" / f"densenet121-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"
    tmp.rename(path)
    monkeypatch.setitem(LIBRARY_WEIGHTS["densenet121"], "IMAGENET1K_V1", (f"https://x/{path.name}", 74.434))
    model, _ = build_model(get_spec("densenet121"), "imagenet")
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())


def test_state_dict_metadata_reaches_the_model(caches, monkeypatch):
    """MNASNet's loader reads the per-module format version saved with the state dict: it must survive loading."""
    ref, _ = build_model(get_spec("mnasnet0_5"), "random", init_seed=2)
    tmp = caches / "m.pth"
    torch.save(ref.state_dict(), tmp)
    path = caches / "hub" / "checkpoints" / f"mnasnet0_5-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"
    tmp.rename(path)
    monkeypatch.setitem(LIBRARY_WEIGHTS["mnasnet0_5"], "IMAGENET1K_V1", (f"https://x/{path.name}", 67.734))
    model, _ = build_model(get_spec("mnasnet0_5"), "imagenet")
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())
    torch.save(dict(ref.state_dict()), tmp)  # a plain dict: no versions, which MNASNet refuses (one line)
    path.unlink()
    path = caches / "hub" / "checkpoints" / f"mnasnet0_5-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"
    tmp.rename(path)
    monkeypatch.setitem(LIBRARY_WEIGHTS["mnasnet0_5"], "IMAGENET1K_V1", (f"https://x/{path.name}", 67.734))
    with pytest.raises(InitError, match=r"mnasnet0_5-\w+.pth: cannot load into mnasnet0_5 \(version should be"):
        build_model(get_spec("mnasnet0_5"), "imagenet")


def test_name_hash_rules(tmp_path):
    assert name_hash(tmp_path / "resnet18-f37072fd.pth") == "f37072fd"
    assert name_hash(tmp_path / "alexnet-owt-7be5be79.pth") == "7be5be79"
    assert name_hash(tmp_path / "efficientnet-lite0-57934424.pth") == "57934424"
    assert name_hash(tmp_path / "model.safetensors") is None and name_hash(tmp_path / "run-final.pth") is None
    good = tmp_path / "w.bin"
    good.write_bytes(b"abc")
    digest = hashlib.sha256(b"abc").hexdigest()
    named = tmp_path / f"w-{digest[:10]}.bin"
    good.rename(named)
    assert verify_cached(named) == digest
    wrong = tmp_path / f"w-{'0' * 8}.bin"
    wrong.write_bytes(b"abc")
    with pytest.raises(InitError, match=r"w-00000000.bin: its SHA-256 \(ba7816bf8f01\.\.\.\) does not match"):
        verify_cached(wrong)


def test_check_weights_one_line_errors(caches, tmp_path):
    check_weights("resnet18", "random")
    check_weights("resnet18", "kaiming_normal", 3)
    check_weights("tf_efficientnet_lite0", "imagenet")  # packaged
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"")
    check_weights("resnet18", f"file:{f}")
    cases = [
        (("resnet19", "random"), InitError, "unknown backbone 'resnet19'"),
        (("resnet18", "kaiming"), InitError, "unknown init 'kaiming'; valid: imagenet, imagenet:<TAG>, random"),
        (("resnet50", "imagenet:V9"), InitError, "unknown weights tag 'V9' for resnet50; valid: IMAGENET1K_V1"),
        (("resnet18", f"file:{tmp_path / 'nope.pth'}"), InitError, "nope.pth: weights file not found"),
        (("resnet18", "imagenet"), OfflineWeightsError, "resnet18-f37072fd.pth"),
        (("resnest50d", "imagenet"), OfflineWeightsError, "timm/resnest50d.in1k"),
        (("resnet18", "random", -1), InitError, "init_seed must be a non-negative integer"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match) as err:
            check_weights(*args)
        assert "\n" not in str(err.value)
        assert isinstance(err.value, ValueError)


def test_check_weights_and_list_load_no_torch(tmp_path):
    code = ("import sys\n"
            "from adspine.backbones import check_weights, weights_location, get_spec\n"
            "check_weights('resnet18', 'random'); check_weights('tf_efficientnet_lite0', 'imagenet')\n"
            "try:\n    check_weights('resnet18', 'imagenet')\nexcept Exception as e:\n    print(type(e).__name__)\n"
            "from typer.testing import CliRunner\n"
            "from adspine.backbones.cli import app\n"
            "res = CliRunner().invoke(app, ['list'])\n"
            "assert res.exit_code == 0, res.output\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'timm', 'numpy') if m in sys.modules))\n")
    env = {**os.environ, "ADSPINE_OFFLINE": "1", "TORCH_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split("\n")[:2] == ["OfflineWeightsError", "[]"]


def test_library_weights_index_matches_the_installed_libraries():
    assert json.dumps(library_weights_index(), sort_keys=True) == json.dumps(LIBRARY_WEIGHTS, sort_keys=True)
