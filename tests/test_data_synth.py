"""Synthetic generator: determinism, MVTec layout, exact masks, defect placement and pose jitter."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from adspine.data import DatasetError, list_categories, scan_category
from adspine.data.synth import (
    CATEGORIES,
    DEFECTS,
    _image_rng,
    defects_for,
    generate,
    render_defective,
    render_good,
)

SMALL = dict(size=64, n_train=2, n_test_good=1, n_per_defect=1)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synth") / "a", seed=3, **SMALL)


def test_same_seed_gives_identical_files_and_other_seed_differs(small, tmp_path):
    again = _files(generate(tmp_path / "b", seed=3, **SMALL))
    assert again == _files(small)
    other = _files(generate(tmp_path / "c", seed=4, **SMALL))
    assert other.keys() == again.keys()
    assert sum(other[k] != again[k] for k in again if k.endswith(".png")) > 0.9 * sum(k.endswith(".png") for k in again)


def test_layout_kinds_and_validation(small):
    meta = json.loads((small / "adspine_dataset.json").read_text())
    assert meta["name"] == "synthetic" and meta["generator"]["seed"] == 3
    kinds = [meta["categories"][c]["kind"] for c in list_categories(small)]
    assert kinds.count("texture") >= 3 and kinds.count("object") >= 2
    for name in list_categories(small):
        data = scan_category(small, name)
        assert data.kind == CATEGORIES[name]
        assert len(data.train) == 2 and sum(s.label == 0 for s in data.test) == 1
        assert sorted({s.defect for s in data.test if s.label}) == sorted(defects_for(name))
        with Image.open(data.train[0].path) as image:
            assert image.size == (64, 64) and image.mode == "RGB"
    assert {"scratch", "hole", "contamination", "colour_spot"} <= set(defects_for("wood"))
    assert "missing_piece" in defects_for("nut") and "missing_piece" not in defects_for("tiles")


def test_written_files_are_the_rendered_pairs(small):
    """The stored defect image and mask are exactly render_defective's output for that image's seed."""
    for name in ("tiles", "chip"):
        for defect in defects_for(name):
            _, bad, mask = render_defective(name, defect, _image_rng(3, name, 2 + DEFECTS.index(defect), 0), 64)
            np.testing.assert_array_equal(np.asarray(Image.open(small / name / "test" / defect / "000.png")), bad)
            stored = np.asarray(Image.open(small / name / "ground_truth" / defect / "000_mask.png"))
            assert set(np.unique(stored)) <= {0, 255}
            np.testing.assert_array_equal(stored > 127, mask)


@pytest.mark.parametrize("category", list(CATEGORIES))
def test_masks_are_exactly_the_changed_pixels_and_sensibly_sized(category):
    size = 128
    margin = size // 16  # what the paper crop removes per side
    for defect in defects_for(category):
        for index in range(3):
            good, bad, mask = render_defective(category, defect, np.random.default_rng([5, index]), size)
            changed = (good.astype(int) - bad.astype(int)) != 0
            np.testing.assert_array_equal(mask, changed.any(axis=2))
            area = mask.mean()
            assert 5e-4 < area < 0.02, (category, defect, index, area)
            inner = np.zeros_like(mask)
            inner[margin:-margin, margin:-margin] = True
            assert not (mask & ~inner).any(), "a defect would be cut off by the paper centre crop"
            assert np.abs(good[mask].astype(int) - bad[mask].astype(int)).max() >= 40, "defect barely visible"


def test_object_defects_sit_on_the_object():
    rng = np.random.default_rng
    for index in range(3):
        for defect in ("scratch", "hole", "contamination", "colour_spot", "missing_piece"):
            good, bad, mask = render_defective("nut", defect, rng([9, index]), 128)
            assert good[mask].mean() > 100  # the nut is light metal on a dark (~45) background
        good, bad, mask = render_defective("chip", "hole", rng([9, index]), 128)
        assert good[mask][:, 1].max() < 80  # the chip body is dark; the board's green channel is ~100
        good, bad, mask = render_defective("nut", "missing_piece", rng([9, index]), 128)
        assert bad[mask].mean() < good[mask].mean() - 40  # the background shows through


def test_objects_have_pose_jitter_and_textures_vary():
    centres = []
    for i in range(6):
        grey = render_good("nut", np.random.default_rng([1, i]), 128).mean(axis=2)
        ys, xs = np.nonzero(grey > 100)
        centres.append((ys.mean(), xs.mean()))
    assert np.ptp(np.array(centres), axis=0).min() > 3
    a, b = (render_good("fabric", np.random.default_rng(i), 128) for i in (0, 1))
    assert (a != b).mean() > 0.5


def test_bad_arguments_and_non_empty_output(tmp_path, small):
    with pytest.raises(DatasetError, match="^size=16"):
        generate(tmp_path / "x", size=16)
    with pytest.raises(DatasetError, match="^n_per_defect=0"):
        generate(tmp_path / "x", n_per_defect=0)
    with pytest.raises(DatasetError, match="^'marble'"):
        generate(tmp_path / "x", categories=["marble"])
    with pytest.raises(DatasetError, match="^" + str(small)):
        generate(small, seed=3, **SMALL)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(DatasetError, match="^" + str(other)):
        generate(other, overwrite=True, **SMALL)
    out = generate(tmp_path / "re", seed=1, categories=["wood"], **SMALL)
    generate(out, seed=2, categories=["nut"], overwrite=True, **SMALL)
    assert list_categories(out) == ["nut"]


def test_shortcut_darkens_only_the_defective_test_images(tmp_path):
    from adspine.data.synth import generate

    kw = dict(seed=2, size=64, n_train=2, n_test_good=2, n_per_defect=1, categories=["fabric"])
    plain, dark = generate(tmp_path / "plain", **kw), generate(tmp_path / "dark", shortcut=0.25, **kw)
    files = sorted(p.relative_to(plain) for p in plain.rglob("*.png"))
    assert files == sorted(p.relative_to(dark) for p in dark.rglob("*.png"))
    for rel in files:
        a = np.asarray(Image.open(plain / rel)).astype(float)
        b = np.asarray(Image.open(dark / rel)).astype(float)
        if "test" in rel.parts and "good" not in rel.parts:
            np.testing.assert_allclose(b, np.round(a * 0.75), atol=0)
        else:  # train, good test images and masks unchanged
            np.testing.assert_array_equal(a, b)
    with pytest.raises(DatasetError, match="shortcut=1.0"):
        generate(tmp_path / "bad", shortcut=1.0, **kw)
