"""Detector usability (issue 22.3-22.6): manifests wherever a folder is accepted, the training size range and its
warning, the model size estimate before fitting, plain per-image lines and a summary from ``predict``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from adspine.data.synth import generate
from adspine.detector import sizing
from adspine.detector.cli import app
from adspine.detector.detector import JSON_FILE, TENSORS_FILE, Detector, DetectorWarning, json_digest

SIZE = 64
FIT = ["fit", "--backbone", "resnet18", "--init", "random", "--method", "padim", "--set", "d=40", "--size", str(SIZE)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """A manifest CSV (relative paths) over a synthetic MVTec category, masks listed for the defective rows."""
    root = tmp_path_factory.mktemp("synth")
    generate(root, n_train=12, n_test_good=3, n_per_defect=2, size=SIZE, categories=["fabric"])
    cat = root / "fabric"
    rows = [["path", "split", "label", "mask"]]
    rows += [[str(p.relative_to(root)), "train", "good", ""] for p in sorted((cat / "train" / "good").glob("*.png"))]
    for p in sorted((cat / "test").rglob("*.png")):
        mask = cat / "ground_truth" / p.parent.name / f"{p.stem}_mask.png"
        rows.append([str(p.relative_to(root)), "test", p.parent.name,
                     str(mask.relative_to(root)) if p.parent.name != "good" else ""])
    path = root / "parts.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


@pytest.fixture(scope="module")
def model(manifest, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "m"
    res = CliRunner().invoke(app, [*FIT, "--train", str(manifest), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


# -- manifests -----------------------------------------------------------------------------------------------------
def test_fit_reads_the_manifests_train_rows(manifest, model):
    det = Detector.load(model)
    assert det.holdout_record["n_fit"] + det.holdout_record["count"] == 12
    train = {Path(r["path"]).name for r in csv.DictReader(open(manifest)) if r["split"] == "train"}
    assert set(det.holdout_record["files"]) <= train


def test_evaluate_reads_the_manifests_test_rows(manifest, model):
    res = CliRunner().invoke(app, ["evaluate", str(model), str(manifest), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    rows = [r for r in csv.DictReader(open(manifest)) if r["split"] == "test"]
    assert out["n_good"] == 3 and out["n_defective"] == sum(r["label"] != "good" for r in rows) > 0
    assert out["pixel_metrics"] == "computed"


def test_manifest_errors_are_one_line(manifest, model, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["evaluate", str(model), str(manifest), "--category", "nope"])
    assert res.exit_code == 2 and "unknown category 'nope'" in res.output
    res = runner.invoke(app, [*FIT, "--train", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "m")])
    assert res.exit_code == 2 and "missing.csv: CSV file not found" in res.output
    res = runner.invoke(app, [*FIT, "--train", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")])
    assert res.exit_code == 2 and "training folder or manifest CSV not found" in res.output


# -- the training images' size range -------------------------------------------------------------------------------
def test_size_range_is_recorded_and_other_sizes_are_warned(manifest, model, tmp_path):
    det = Detector.load(model)
    assert det.input_sizes == {"count": 12, "height": [SIZE, SIZE], "width": [SIZE, SIZE], "aspect": [1.0, 1.0]}
    good = next((manifest.parent / "fabric" / "test" / "good").glob("*.png"))
    img = np.asarray(Image.open(good).convert("RGB"))
    Image.fromarray(np.concatenate([img, img], axis=1)).save(tmp_path / "wide.png")  # 64 x 128: size and aspect
    Image.fromarray(np.kron(img, np.ones((2, 2, 1), np.uint8))).save(tmp_path / "big.png")  # 128 x 128: size only
    with pytest.warns(DetectorWarning, match="2 of 3 image.* training sizes and 1 outside their aspect"):
        det.predict([good, tmp_path / "wide.png", tmp_path / "big.png"])
    res = CliRunner().invoke(app, ["predict", str(model), str(good), str(tmp_path / "wide.png"), "--no-progress"])
    assert "1 of 2 image(s) outside the training sizes and 1 outside their aspect" in res.output
    assert "64 x 64 px" in res.output


def test_old_detector_folder_without_size_range_loads(model, tmp_path):
    from safetensors.torch import load_file, save_file

    import shutil

    old = tmp_path / "old"
    shutil.copytree(model, old)
    doc = json.loads((old / JSON_FILE).read_text())
    del doc["input_sizes"]
    (old / JSON_FILE).write_text(json.dumps(doc))
    save_file(load_file(str(old / TENSORS_FILE)), str(old / TENSORS_FILE),
              metadata={"adspine_detector_json_sha256": json_digest(doc)})
    det = Detector.load(old)
    assert det.input_sizes is None
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error", DetectorWarning)  # nothing to compare with: no warning
        det.predict([np.zeros((40, 90, 3), np.float32)])


# -- model size estimate -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,settings", [("padim", {"d": 40}), ("padim", {"d": None}),
                                             ("patchcore", {"coreset_ratio": 0.25, "target_dim": 64}),
                                             ("spade", {"k": 3})])
def test_size_estimate_matches_the_saved_tensors(manifest, method, settings, tmp_path):
    det = Detector("resnet18", "random", "thesis", method, image_size=SIZE, **settings)
    estimate = det.estimate_bytes(7)
    det.fit(manifest)
    assert det.holdout_record["n_fit"] == 7
    saved = det.method.save(tmp_path / "m") / "model.safetensors"
    actual = sum(t.numel() * t.element_size() for t in det.method.state_tensors().values())
    assert abs(estimate - actual) <= 0.05 * actual and saved.stat().st_size >= actual


def test_fit_says_the_estimate_and_warns_above_the_limit(manifest, tmp_path, monkeypatch):
    monkeypatch.setattr(sizing, "LIMIT_BYTES", 1000)
    res = CliRunner().invoke(app, [*FIT, "--train", str(manifest), "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert "estimated model size" in res.output and "smaller d" in res.output and "(above" in res.output


# -- predict output --------------------------------------------------------------------------------------------------
def test_predict_prints_plain_lines_with_times_and_a_summary(manifest, model, tmp_path):
    deep = tmp_path / ("a-rather-long-folder-name-" * 4)
    deep.mkdir()
    good = next((manifest.parent / "fabric" / "test" / "good").glob("*.png"))
    target = deep / good.name
    target.write_bytes(good.read_bytes())
    res = CliRunner().invoke(app, ["predict", str(model), str(target), "--no-progress"])
    lines = res.output.splitlines()
    line = next(x for x in lines if str(target) in x)  # the whole path on one line: no wrapping at 80 columns
    assert line.split()[0] in ("good", "anomalous") and " ms " in line
    assert lines[-1].startswith("1 image(s): ") and "0 invalid" in lines[-1] and lines[-1].endswith("ms/img")
