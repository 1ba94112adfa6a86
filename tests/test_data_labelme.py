"""LabelMe JSON -> masks: shapes against brute-force pixel tests, labels and counts, errors, the CLI, and the output
used as a manifest."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner

from adspine.data import DatasetError, scan
from adspine.data.cli import app
from adspine.data.labelme import masks_from_labelme, rasterise

H, W = 40, 60
YY, XX = np.mgrid[0:H, 0:W]


def _shape(kind, points, label="crack"):
    return {"label": label, "points": points, "shape_type": kind, "flags": {}}


def _mask(shapes):
    return np.asarray(rasterise(shapes, H, W)[0]) > 0


def test_rectangle_is_exact_and_corner_order_free():
    expected = (XX >= 10) & (XX <= 25) & (YY >= 5) & (YY <= 12)
    np.testing.assert_array_equal(_mask([_shape("rectangle", [[10, 5], [25, 12]])]), expected)
    np.testing.assert_array_equal(_mask([_shape("rectangle", [[25, 12], [10, 5]])]), expected)


def test_polygon_and_circle_match_brute_force_up_to_the_boundary():
    triangle = np.array([[5.0, 5.0], [50.0, 10.0], [20.0, 35.0]])

    def inside(points):  # pixel centres at integer coordinates, same-side test for every edge
        signs = []
        for (x0, y0), (x1, y1) in zip(points, np.roll(points, -1, axis=0)):
            signs.append((x1 - x0) * (YY - y0) - (y1 - y0) * (XX - x0))
        signs = np.array(signs)
        return (signs >= 0).all(0) | (signs <= 0).all(0)

    reference = inside(triangle)
    mask = _mask([_shape("polygon", triangle.tolist())])
    assert (reference & ~mask).sum() == 0
    assert (mask & ~ndimage.binary_dilation(reference)).sum() == 0
    assert abs(int(mask.sum()) - int(reference.sum())) <= 0.15 * reference.sum()
    circle = _mask([_shape("circle", [[30, 20], [30, 30]])])
    distance = np.hypot(XX - 30, YY - 20)
    assert circle[distance <= 9].all() and not circle[distance > 11].any()


def _labelme(folder, name, shapes, flags=None, size=(H, W)):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), 128, dtype=np.uint8)).save(folder / f"{name}.png")
    meta = {"version": "5.4.1", "flags": flags or {}, "shapes": shapes, "imagePath": f"{name}.png",
            "imageData": None, "imageHeight": size[0], "imageWidth": size[1]}
    (folder / f"{name}.json").write_text(json.dumps(meta))


@pytest.fixture
def annotated(tmp_path):
    src = tmp_path / "src"
    _labelme(src, "a", [_shape("polygon", [[5, 5], [30, 5], [30, 20]]), _shape("line", [[0, 0], [9, 9]])])
    _labelme(src, "b", [_shape("rectangle", [[1, 1], [4, 4]], "dent"), _shape("circle", [[20, 20], [22, 20]])])
    _labelme(src, "c", [])
    _labelme(src, "d", [], flags={"good": False, "stain": True})
    _labelme(src / "more", "e", [])
    return src


def test_labels_counts_and_empty_masks(annotated, tmp_path):
    counts = masks_from_labelme(annotated, tmp_path / "out")
    assert counts == {"files": 5, "defective": 2, "good": 2, "image_level": 1,
                      "shapes": {"circle": 1, "polygon": 1, "rectangle": 1, "skipped:line": 1},
                      "defects": {"combined": 1, "crack": 1, "stain": 1}}
    rows = list(csv.DictReader((tmp_path / "out" / "labels.csv").open()))
    assert [(r["label"], r["mask"]) for r in rows] == [
        ("crack", "a.png"), ("combined", "b.png"), ("good", ""), ("stain", ""), ("good", "")]
    empty = np.asarray(Image.open(tmp_path / "out" / "more" / "e.png"))
    assert empty.shape == (H, W) and not empty.any()
    assert (tmp_path / "out" / rows[0]["path"]).resolve() == (annotated / "a.png").resolve()


def test_output_becomes_a_manifest(annotated, tmp_path):
    out = tmp_path / "out"
    masks_from_labelme(annotated, out)
    rows = list(csv.DictReader((out / "labels.csv").open()))
    manifest = out / "labels_split.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "split", "label", "mask"])
        writer.writerow([str(annotated / "c.png"), "train", "good", ""])
        for row in rows:
            writer.writerow([row["path"], "test", row["label"], row["mask"]])
    data = scan(manifest, masks="optional")
    assert data.masks == "partial" and [s.has_mask for s in data.test].count(False) == 1


def test_errors_name_the_file(tmp_path):
    src = tmp_path / "src"
    _labelme(src, "a", [_shape("polygon", [[1, 1], [2, 2]])])
    with pytest.raises(DatasetError, match="^" + str(src / "a.json") + ": shape 0 .polygon. has 2 point"):
        masks_from_labelme(src, tmp_path / "out")
    (src / "a.json").write_text(json.dumps({"shapes": []}))
    with pytest.raises(DatasetError, match="^" + str(src / "a.json") + ": imageHeight"):
        masks_from_labelme(src, tmp_path / "out2")
    with pytest.raises(DatasetError, match="^" + str(tmp_path / "none")):
        masks_from_labelme(tmp_path / "none", tmp_path / "out3")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    _labelme(src, "a", [])
    with pytest.raises(DatasetError, match="^" + str(full) + ": output folder is not empty"):
        masks_from_labelme(src, full)


def test_cli_prints_counts(annotated, tmp_path):
    result = CliRunner().invoke(app, ["masks-from-labelme", str(annotated), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "5 files: 2 defective with masks, 2 good (empty masks), 1 defective without shapes" in result.stdout
    assert "skipped:line 1" in result.stdout


# -- images kept elsewhere (bare imagePath), their sizes, and output that stays inside --out -------------------------
@pytest.fixture
def separate(tmp_path):
    """JSON files in ``ann/`` naming bare files (one a Windows path) that live in ``photos/`` (and a sub-folder)."""
    ann, photos = tmp_path / "ann", tmp_path / "photos"
    ann.mkdir()
    for name, folder in (("a", photos), ("b", photos / "cam2"), ("c", photos)):
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((H, W, 3), 90, dtype=np.uint8)).save(folder / f"{name}.jpg")
    shapes = [_shape("rectangle", [[1, 1], [9, 9]])]
    for name, stored in (("a", "a.jpg"), ("b", "C:\\Users\\me\\Pictures\\b.jpg"), ("c", "c.jpg")):
        meta = {"shapes": shapes, "imagePath": stored, "imageHeight": H, "imageWidth": W, "flags": {}}
        (ann / f"{name}.json").write_text(json.dumps(meta))
    return ann, photos


def test_bare_image_paths_are_found_in_the_images_folder(separate, tmp_path):
    ann, photos = separate
    masks_from_labelme(ann, tmp_path / "out", images=photos)
    rows = list(csv.DictReader((tmp_path / "out" / "labels.csv").open()))
    found = [(tmp_path / "out" / r["path"]).resolve() for r in rows]
    assert found == [(photos / "a.jpg").resolve(), (photos / "cam2" / "b.jpg").resolve(),
                     (photos / "c.jpg").resolve()]


def test_missing_images_are_counted_named_and_nothing_is_written(separate, tmp_path):
    ann, photos = separate
    result = CliRunner().invoke(app, ["masks-from-labelme", str(ann), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {ann}: 3 of 3 LabelMe file(s) name an image not found beside the JSON (pass --images DIR, the "
        "folder holding the photos): a.json -> a.jpg; b.json -> C:\\Users\\me\\Pictures\\b.jpg; c.json -> c.jpg"]
    assert not (tmp_path / "o").exists()
    (photos / "c.jpg").unlink()
    with pytest.raises(DatasetError, match=f"^{ann}: 1 of 3 .* in --images {photos}: c.json -> c.jpg$"):
        masks_from_labelme(ann, tmp_path / "o", images=photos)
    assert not (tmp_path / "o").exists()


def test_size_mismatch_with_the_annotation_is_refused(separate, tmp_path):
    ann, photos = separate
    Image.fromarray(np.zeros((W, H, 3), dtype=np.uint8)).save(photos / "a.jpg")  # stored rotated
    with pytest.raises(DatasetError, match=rf"^{ann}: 1 of 3 .* differ in size .*: a.json says {W}x{H}, "
                                           rf".*a.jpg is {H}x{W} \(EXIF-rotated\?\)$"):
        masks_from_labelme(ann, tmp_path / "o", images=photos)
    assert not (tmp_path / "o").exists()


def test_traversal_never_writes_outside_out(tmp_path):
    src, outside = tmp_path / "deep" / "er" / "src", tmp_path / "outside"
    _labelme(src, "a", [_shape("rectangle", [[1, 1], [5, 5]])])
    outside.mkdir()
    Image.fromarray(np.zeros((H, W, 3), dtype=np.uint8)).save(outside / "x.png")
    meta = json.loads((src / "a.json").read_text())
    (src / "a.json").write_text(json.dumps({**meta, "imagePath": "../../../outside/x.png"}))
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "deep" / "out"
    masks_from_labelme(src, out)  # reading an image up the tree is allowed (LabelMe stores relative paths)
    assert {p for p in tmp_path.rglob("*") if not p.is_relative_to(out)} == before
    row = next(csv.DictReader((out / "labels.csv").open()))
    assert (out / row["path"]).resolve() == (outside / "x.png").resolve()
    (src / "a.json").write_text(json.dumps({**meta, "shapes": [_shape("rectangle", [[1, 1], [5, 5]],
                                                                       "../../../outside/evil")]}))
    result = CliRunner().invoke(app, ["masks-from-labelme", str(src), "--out", str(tmp_path / "o2")])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[0].startswith(f"error: {src / 'a.json'}: label '../../../outside/evil'")
    assert not (tmp_path / "o2").exists() and {p for p in tmp_path.rglob("*") if not p.is_relative_to(out)} == before
