"""Magnetic tile adapter: a small stand-in with the real layout, then (when present) a subset of the real data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adspine.data import DatasetError, scan_category
from adspine.data.magnetic_tile import convert

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "magnetic-tile"
RNG = np.random.default_rng(5)


def _pair(folder: Path, stem: str, size=(20, 14), mask_value: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    Image.fromarray(RNG.integers(0, 256, (h, w), dtype=np.uint8)).save(folder / f"{stem}.jpg")
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[2:6, 3:9] = mask_value
    mask[2, 3] = 100 if mask_value else 0  # an anti-aliased edge value below the threshold
    Image.fromarray(mask).save(folder / f"{stem}.png")


@pytest.fixture
def fake(tmp_path):
    src = tmp_path / "mt"
    for i in range(10):
        _pair(src / "MT_Free" / "Imgs", f"free_{i}", size=(20 + i, 14))
    for i in range(3):
        _pair(src / "MT_Crack" / "Imgs", f"crack_{i}", mask_value=255 if i else 0)
    _pair(src / "MT_Blowhole" / "Imgs", "hole_0", mask_value=200)
    (src / "MT_Free" / "Imgs" / "Thumbs.db").write_text("x")
    (src / "PROVENANCE.md").write_text("x")
    return src


def test_fake_conversion_split_masks_and_empty_masks(fake, tmp_path):
    out = convert(fake, tmp_path / "out", seed=1024, n_train=6)
    split = json.loads((out / "split.json").read_text())
    assert split["seed"] == 1024 and split["n_train"] == 6
    assert split["counts"] == {"train/good": 6, "test/good": 4, "test/blowhole": 1, "test/crack": 3}
    train, test_good = set(split["files"]["train/good"]), set(split["files"]["test/good"])
    assert not train & test_good and len(train | test_good) == 10
    assert split["empty_masks"] == ["test/crack/crack_0.jpg"]
    data = scan_category(out, "magnetic_tile")
    assert data.kind == "texture" and len(data.train) == 6
    labels = {s.path.name: s.label for s in data.test}
    assert labels["crack_0.jpg"] == 1  # empty mask: still defective at image level
    mask = np.asarray(Image.open(out / "magnetic_tile/ground_truth/crack/crack_1_mask.png"))
    expected = np.asarray(Image.open(fake / "MT_Crack/Imgs/crack_1.png")) > 127
    assert set(np.unique(mask)) == {0, 255} and np.array_equal(mask > 0, expected) and not mask[2, 3]
    copied = out / "magnetic_tile/test/blowhole/hole_0.jpg"
    assert copied.read_bytes() == (fake / "MT_Blowhole/Imgs/hole_0.jpg").read_bytes()
    meta = json.loads((out / "adspine_dataset.json").read_text())
    assert meta["name"] == "magnetic-tile" and "Visual Computer" in meta["citation"]


def test_n_test_good_caps_good_test_images_and_keeps_every_defect(fake, tmp_path):
    full = json.loads((convert(fake, tmp_path / "full", seed=3, n_train=5) / "split.json").read_text())
    capped = json.loads((convert(fake, tmp_path / "cap", seed=3, n_train=5, n_test_good=2) / "split.json").read_text())
    assert capped["files"]["train/good"] == full["files"]["train/good"]
    assert len(capped["files"]["test/good"]) == 2 and set(capped["files"]["test/good"]) < set(full["files"]["test/good"])
    assert capped["counts"]["test/crack"] == 3 and capped["n_test_good"] == 2
    with pytest.raises(DatasetError, match="n_test_good=6"):
        convert(fake, tmp_path / "bad", seed=3, n_train=5, n_test_good=6)


def test_split_depends_on_seed_only(fake, tmp_path):
    files = []
    for seed, name in ((1, "a"), (1, "b"), (2, "c")):
        out = convert(fake, tmp_path / name, seed=seed)
        files.append(json.loads((out / "split.json").read_text())["files"]["train/good"])
    assert files[0] == files[1] and files[0] != files[2] and len(files[0]) == 6  # 60 % of 10


def test_bad_inputs_name_the_path(fake, tmp_path):
    (fake / "MT_Crack/Imgs/crack_2.png").unlink()
    with pytest.raises(DatasetError, match="^" + str(fake / "MT_Crack/Imgs/crack_2.jpg")):
        convert(fake, tmp_path / "o1")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(fake / "MT_Crack/Imgs/crack_2.png")
    with pytest.raises(DatasetError, match="^" + str(fake / "MT_Crack/Imgs/crack_2.png")):
        convert(fake, tmp_path / "o2")
    assert not (tmp_path / "o2").exists()  # validated before anything is written
    with pytest.raises(DatasetError, match="^" + str(tmp_path / "absent")):
        convert(tmp_path / "absent", tmp_path / "o3")
    with pytest.raises(DatasetError, match="^n_train=10"):
        convert(fake, tmp_path / "o4", n_train=10)
    inside = Path(__file__).resolve().parents[1] / "data-out-never-created"  # this checkout is a git repository
    with pytest.raises(DatasetError, match="^" + str(inside)):
        convert(fake, inside)
    assert not inside.exists()


@pytest.mark.realdata
def test_real_data_subset(tmp_path):
    if not (REAL / "MT_Free").is_dir():
        pytest.skip(f"{REAL.resolve()} not found")
    out = convert(REAL, tmp_path / "mt", seed=1024, limit_per_class=6)
    split = json.loads((out / "split.json").read_text())
    assert split["counts"] == {"train/good": 4, "test/good": 2, "test/blowhole": 6, "test/break": 6,
                               "test/crack": 6, "test/fray": 6, "test/uneven": 6}
    data = scan_category(out, "magnetic_tile")
    assert data.kind == "texture" and len(data.test) == 32
    for sample in data.test:
        if sample.label:
            source = REAL / f"MT_{sample.defect.capitalize()}" / "Imgs"
            expected = np.asarray(Image.open(source / f"{sample.path.stem}.png").convert("L")) > 127
            assert np.array_equal(np.asarray(Image.open(sample.mask_path)) > 127, expected)
            assert sample.path.read_bytes() == (source / sample.path.name).read_bytes()
