"""Detector: save/load round trip, tampering refused, thresholds from training data only, predict past corrupt
images, ONNX equal to torch, offline-pretrained backbone, fit_command."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from adspine.data.synth import generate
from adspine.detector import threshold as th
from adspine.detector.cli import app, fit_command, parse_settings
from adspine.detector.detector import Detector, DetectorError

SIZE = 64
PADIM = {"d": 40}
PATCHCORE = {"coreset_ratio": 0.5, "target_dim": 64, "proj_dim": 16}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, n_train=12, n_test_good=3, n_per_defect=2, size=SIZE, categories=["fabric"])
    return root / "fabric"


def _fit(data: Path, method: str = "padim", **kw) -> Detector:
    settings = PADIM if method == "padim" else PATCHCORE
    return Detector("resnet18", "random", "thesis", method, image_size=SIZE, **{**settings, **kw}).fit(data)


@pytest.fixture(scope="module")
def padim(data, tmp_path_factory) -> tuple[Detector, Path]:
    det = _fit(data)
    return det, det.save(tmp_path_factory.mktemp("model") / "padim")


def _test_images(data: Path) -> list[Path]:
    return sorted((data / "test").rglob("*.png"))


# -- thresholds ------------------------------------------------------------------------------------------------------
def test_holdout_split_is_seeded_and_sized():
    fit_idx, held = th.holdout_split(40, 0.1, 5, seed=3)
    assert len(held) == 5 and sorted(fit_idx + held) == list(range(40))
    assert held == sorted(np.random.default_rng(3).permutation(40)[:5].tolist())
    assert len(th.holdout_split(100, 0.1, 5, 0)[1]) == 10
    with pytest.raises(ValueError, match="at least 7"):
        th.holdout_split(6, 0.1, 5, 0)


def test_pick_threshold_bounds_the_false_alarm_rate():
    values = np.random.default_rng(0).normal(size=1000)
    assert th.pick_threshold(values) == values.max()
    for fpr in (0.01, 0.0123, 0.5):
        t = th.pick_threshold(values, fpr)
        assert np.mean(values > t) <= fpr < np.mean(values >= t)  # the tightest such threshold
    assert th.pick_threshold(values, 0.0) == values.max()


def test_fit_sets_thresholds_on_the_recorded_holdout(data, padim):
    det, _ = padim
    rec = det.holdout_record
    assert rec["count"] == 5 and rec["n_fit"] == 7 and rec["rule"] == "max" and rec["seed"] == 0
    held = [data / "train" / "good" / f for f in rec["files"]]
    scores, maps = det.predict(held)
    assert det.threshold == pytest.approx(scores.max(), rel=1e-6)
    assert det.pixel_threshold == pytest.approx(maps.max(), rel=1e-6)
    assert not det.flag(scores).any()


def test_threshold_independent_of_test_data(data, tmp_path):
    """Fit twice through the CLI on the same category with different test sets: identical model files."""
    root = tmp_path / "cat"
    shutil.copytree(data, root)
    runner = CliRunner()
    args = ["fit", "--backbone", "resnet18", "--init", "random", "--method", "padim", "--set", "d=40",
            "--size", str(SIZE), "--train", str(root)]
    first = runner.invoke(app, [*args, "--out", str(tmp_path / "m1")])
    assert first.exit_code == 0, first.output
    for p in (root / "test").rglob("*.png"):  # a different test set
        p.write_bytes((data / "train" / "good" / "000.png").read_bytes())
    shutil.rmtree(root / "test" / "good")
    second = runner.invoke(app, [*args, "--out", str(tmp_path / "m2")])
    assert second.exit_code == 0, second.output
    files = sorted(p.relative_to(tmp_path / "m1") for p in (tmp_path / "m1").rglob("*") if p.is_file())
    assert len(files) == 4
    for f in files:
        assert (tmp_path / "m1" / f).read_bytes() == (tmp_path / "m2" / f).read_bytes(), f


# -- persistence -----------------------------------------------------------------------------------------------------
def test_save_load_round_trip_gives_identical_scores(data, padim):
    det, folder = padim
    loaded = Detector.load(folder)
    imgs = _test_images(data)
    s1, m1 = det.predict(imgs)
    s2, m2 = loaded.predict(imgs)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(m1, m2)
    assert loaded.threshold == det.threshold and loaded.layers == det.layers
    doc = json.loads((folder / "detector.json").read_text())
    assert doc["backbone_weights"] == "detector.safetensors"  # random init: weights travel with the detector
    assert doc["holdout_record"]["files"] == det.holdout_record["files"]


def _copy(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(folder, out)
    return out


def test_changed_threshold_refused(padim, tmp_path):
    folder = _copy(padim[1], tmp_path)
    doc = json.loads((folder / "detector.json").read_text())
    doc["threshold"] = 1e9
    (folder / "detector.json").write_text(json.dumps(doc))
    with pytest.raises(DetectorError, match=r"detector\.json: altered"):
        Detector.load(folder)


def test_changed_backbone_tensor_refused(padim, tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    folder = _copy(padim[1], tmp_path)
    path = folder / "detector.safetensors"
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    tensors = load_file(str(path))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + 1
    save_file(tensors, str(path), metadata=header)
    with pytest.raises(DetectorError, match=rf"detector\.safetensors: backbone tensor '{key}'"):
        Detector.load(folder)


@pytest.mark.parametrize("victim", ["method/model.safetensors", "method/model.json", "detector.safetensors"])
def test_incomplete_folder_refused(padim, tmp_path, victim):
    folder = _copy(padim[1], tmp_path)
    (folder / victim).unlink()
    with pytest.raises(DetectorError, match=victim.split("/")[-1].replace(".", r"\.")):
        Detector.load(folder)


def test_swapped_method_refused(data, padim, tmp_path):
    folder = _copy(padim[1], tmp_path)
    other = _fit(data, holdout_seed=1).save(tmp_path / "other")
    shutil.rmtree(folder / "method")
    shutil.copytree(other / "method", folder / "method")
    with pytest.raises(DetectorError, match=r"method/model\.json: not the method"):
        Detector.load(folder)


# -- predict CLI ------------------------------------------------------------------------------------------------------
def test_predict_continues_past_a_corrupt_image(data, padim, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    good = sorted((data / "test" / "good").glob("*.png"))[:2]
    bad = sorted(p for p in (data / "test").rglob("*.png") if p.parent.name != "good")[:1]
    for p in good + bad:
        shutil.copy(p, folder / f"{p.parent.name}_{p.name}")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["predict", str(padim[1]), str(folder), "--out", str(out), "--no-progress"])
    assert "broken.png" in res.output
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "score", "verdict", "ms", "reason"] and len(rows) == 5
    verdicts = {Path(r[0]).name: r[2] for r in rows[1:]}
    assert verdicts["broken.png"] == "unreadable"
    assert res.exit_code == 1  # an unreadable image counts as a failed image
    scores, _ = padim[0].predict(sorted(p for p in folder.iterdir() if p.name != "broken.png"))
    csv_scores = [float(r[1]) for r in rows[1:] if r[2] != "unreadable"]
    np.testing.assert_allclose(csv_scores, scores, rtol=1e-5)
    readable = [p for p in sorted(folder.iterdir()) if p.name != "broken.png"]
    assert all((out / f"{p.stem}_overlay.png").is_file() and (out / f"{p.stem}_mask.png").is_file()
               for p in readable)


# -- ONNX ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["padim", "patchcore"])
def test_onnx_equals_torch(data, method, tmp_path):
    pytest.importorskip("onnxruntime")
    from adspine.detector.onnx_export import TOLERANCE, OnnxDetector, export_onnx

    det = _fit(data, method)
    res = export_onnx(det, tmp_path / "d.onnx", check=False)
    imgs = _test_images(data)
    s_torch, m_torch = det.predict(imgs)
    onnx_det = OnnxDetector(res["path"])
    s_onnx, m_onnx = onnx_det.predict(imgs)
    assert np.abs(m_onnx - m_torch).max() <= TOLERANCE * np.abs(m_torch).max()
    np.testing.assert_allclose(s_onnx, s_torch, rtol=TOLERANCE)
    assert onnx_det.threshold == det.threshold and onnx_det.protocol == det.protocol
    res = CliRunner().invoke(app, ["predict", res["path"], str(data / "test"), "--out", str(tmp_path / "p"),
                                   "--no-progress"])  # a folder: its sub-folders' images, sorted
    assert res.exit_code == (1 if det.flag(s_torch).any() else 0), res.output
    rows = [r.split(",") for r in (tmp_path / "p" / "predictions.csv").read_text().splitlines()[1:]]
    np.testing.assert_allclose([float(r[1]) for r in rows], s_torch, rtol=1e-4)


def test_export_refuses_unsupported_method(data):
    from adspine.detector.onnx_export import DetectorGraph

    det = _fit(data, "patchcore", reweight=True)
    with pytest.raises(DetectorError, match="reweight"):
        DetectorGraph(det)
    spade = Detector("resnet18", "random", "thesis", "spade", image_size=SIZE)  # refused before any fitted state
    with pytest.raises(DetectorError, match="spade cannot be exported"):
        DetectorGraph(spade)


# -- backbones, inputs, fit_command -----------------------------------------------------------------------------------
def test_offline_pretrained_backbone_round_trip(data, tmp_path):
    """The packaged EfficientNet-Lite0 weights: stored by name, found again and checked on load."""
    det = Detector("tf_efficientnet_lite0", "imagenet", "thesis", "padim", image_size=SIZE, d=20).fit(data)
    folder = det.save(tmp_path / "lite")
    doc = json.loads((folder / "detector.json").read_text())
    assert doc["backbone_weights"] == "named tag" and doc["mean"] == [0.5, 0.5, 0.5]
    from safetensors.torch import load_file

    assert load_file(str(folder / "detector.safetensors")) == {}
    imgs = _test_images(data)[:3]
    np.testing.assert_array_equal(det.predict(imgs)[0], Detector.load(folder).predict(imgs)[0])


def test_bad_inputs_are_one_line_errors(data, tmp_path):
    with pytest.raises(DetectorError, match="unknown method 'nope'"):
        Detector("resnet18", "random", method="nope")
    with pytest.raises(DetectorError, match="bogus"):
        Detector("resnet18", "random", "thesis", "padim", bogus=1)
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted((data / "train" / "good").glob("*.png"))[:4]:
        shutil.copy(p, few / p.name)
    with pytest.raises(DetectorError, match="at least 7"):
        Detector("resnet18", "random", "thesis", "padim", image_size=SIZE, d=10).fit(few)


def test_parse_settings():
    assert parse_settings(["d=100", "layers=[1,2]", "distance=euclidean", "x=null"]) == {
        "d": 100, "layers": [1, 2], "distance": "euclidean", "x": None}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_settings(["d"])


def test_fit_command_round_trips_through_the_parser():
    import shlex

    row = {"backbone": "resnet18", "init": "kaiming_normal", "init_seed": 3, "layer_preset": "thesis",
           "layers": json.dumps(["layer1", "layer2"]), "method": "patchcore",
           "settings": json.dumps({"coreset_ratio": 0.01, "layers": [1, 2], "distance": "squared"}),
           "protocol": "paper", "image_size": 224}
    argv = shlex.split(fit_command(row, train="data/fabric", out="m"))
    assert argv[:2] == ["adspine", "fit"]
    opts = {argv[i]: argv[i + 1] for i in range(2, len(argv), 2) if argv[i] != "--set"}
    sets = parse_settings([argv[i + 1] for i in range(2, len(argv), 2) if argv[i] == "--set"])
    from adspine.methods import get_method_class

    defaults = get_method_class("patchcore").defaults()
    assert {**defaults, **sets} == {**defaults, **json.loads(row["settings"])}  # the same method is built
    assert sets == {"coreset_ratio": 0.01}  # settings at their defaults need no flag
    assert opts == {"--backbone": "resnet18", "--init": "kaiming_normal", "--init-seed": "3",
                    "--layers": "layer1,layer2", "--method": "patchcore", "--protocol": "paper", "--size": "224",
                    "--train": "data/fabric", "--out": "m"}
    row2 = {**row, "init": "imagenet", "layers": None, "image_size": [256, 320]}
    argv2 = shlex.split(fit_command(row2))
    assert "--init-seed" not in argv2 and argv2[argv2.index("--layers") + 1] == "thesis"
    assert argv2[argv2.index("--size") + 1] == "256x320"


def test_evaluate_on_folder_without_masks(data, padim, tmp_path):
    """A plain good/ + defect folders tree without masks: image metrics, pixel metrics absent."""
    from adspine.detector.cli import evaluate_detector
    from adspine.metrics import image_auroc

    tree = tmp_path / "lot"
    shutil.copytree(data / "test", tree)
    res = evaluate_detector(padim[0], tree)
    assert res["pixel_auroc"] is None and res["pixel_metrics"] == "absent (no masks)"
    good = sorted((tree / "good").glob("*.png"))
    bad = sorted(p for p in tree.rglob("*.png") if p.parent.name != "good")
    scores, _ = padim[0].predict(good + bad)
    labels = np.r_[np.zeros(len(good)), np.ones(len(bad))]
    assert res["image_auroc"] == pytest.approx(image_auroc(labels, scores))
    assert res["false_alarms"] == int((scores[: len(good)] > padim[0].threshold).sum())
    with_masks = evaluate_detector(padim[0], data)  # MVTec category with masks: pixel metrics present
    assert with_masks["pixel_auroc"] is not None
