"""From a LabelMe-annotated pile of photos to a detector with commands only: data split -> fit -> predict ->
evaluate (bare ``imagePath``, photos in another folder, normal photos without a JSON, rectangular 64x48 images)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from adspine.cli import app

H, W = 48, 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _pile(root: Path) -> tuple[Path, Path]:
    """``photos/``: 18 normal and 6 defective photos (4 crack, 2 dent); ``labelme/``: one JSON per defective photo
    (bare imagePath) and one for a normal photo without shapes."""
    rng = np.random.default_rng(0)
    photos, ann = root / "photos", root / "labelme"
    photos.mkdir()
    ann.mkdir()
    for i in range(24):
        pixels = (120 + 20 * rng.standard_normal((H, W, 3))).clip(0, 255).astype(np.uint8)
        name = f"img{i:02d}.png"
        if i >= 18:
            x, y = 8 + 3 * (i - 18), 10
            pixels[y:y + 12, x:x + 16] = 250
            label = "crack" if i < 22 else "dent"
            shapes = [{"label": label, "points": [[x, y], [x + 15, y + 11]], "shape_type": "rectangle"}]
        elif i == 0:
            shapes = []
        else:
            shapes = None
        Image.fromarray(pixels).save(photos / name)
        if shapes is not None:
            meta = {"version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": name, "imageData": None,
                    "imageHeight": H, "imageWidth": W}
            (ann / f"img{i:02d}.json").write_text(json.dumps(meta))
    return ann, photos


def _run(*args: str, code: int | tuple[int, ...] = 0):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code in ((code,) if isinstance(code, int) else code), result.output
    return result


def test_labelme_pile_to_detector_with_commands_only(tmp_path):
    ann, photos = _pile(tmp_path)
    split = tmp_path / "split"
    _run("data", "split", str(ann), "--images", str(photos), "--out", str(split), "--name", "parts",
         "--train", "12", "--seed", "0")
    manifest = split / "parts.csv"
    rows = list(csv.DictReader(manifest.open()))
    assert Counter((r["split"], r["label"]) for r in rows) == {("train", "good"): 12, ("test", "good"): 6,
                                                               ("test", "crack"): 4, ("test", "dent"): 2}
    assert json.loads((split / "parts.split.json").read_text())["seed"] == 0

    model = tmp_path / "detector"
    _run("fit", "--train", str(manifest), "--backbone", "resnet18", "--init", "random", "--method", "padim",
         "--set", "d=40", "--size", f"{H}x{W}", "--out", str(model))

    test = [r for r in rows if r["split"] == "test"]
    paths = [str((split / r["path"]).resolve()) if not Path(r["path"]).is_absolute() else r["path"] for r in test]
    _run("predict", str(model), *paths, "--out", str(tmp_path / "pred"), "--no-progress", code=(0, 1))
    scores = {r["path"]: float(r["score"]) for r in csv.DictReader((tmp_path / "pred" / "predictions.csv").open())}
    labels = [int(r["label"] != "good") for r in test]

    figures = json.loads(_run("evaluate", str(model), str(manifest), "--json").stdout)
    assert (figures["n_good"], figures["n_defective"]) == (6, 6)
    assert figures["pixel_metrics"] == "computed" and figures["pixel_auroc"] is not None
    reference = roc_auc_score(labels, [scores[p] for p in paths])
    assert figures["image_auroc"] == pytest.approx(reference, abs=1 / 36 + 1e-9)  # one pair may swap on rounding

    odd = tmp_path / "odd.png"
    Image.fromarray(np.full((W, H, 3), 120, dtype=np.uint8)).save(odd)  # the photo turned by 90 degrees
    warned = _run("predict", str(model), str(odd), "--no-progress", code=(0, 1))
    assert "outside the training sizes" in warned.output
