"""MVTec-format scanning, validation messages, kinds, and the paper/resize protocols (PIL as the reference)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from adspine.data import PROTOCOLS, DatasetError, ImageDataset, category_kinds, list_categories, scan_category
from adspine.data.mvtec import paper_resize_size, preprocess

torch.set_num_threads(1)
RNG = np.random.default_rng(11)


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_category(root: Path, name: str = "widget", size=(40, 30)) -> Path:
    """A tiny valid category: 3 train, 2 test good, 2 'crack' with masks (w, h = size)."""
    w, h = size
    cat = root / name
    for split, count in (("train/good", 3), ("test/good", 2), ("test/crack", 2)):
        for i in range(count):
            _png(cat / split / f"{i:03d}.png", RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))
    for i in range(2):
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[5:9, 10 + i : 20] = 255
        _png(cat / "ground_truth" / "crack" / f"{i:03d}_mask.png", mask)
    return cat


def _error(root: Path, name: str = "widget") -> str:
    with pytest.raises(DatasetError) as info:
        scan_category(root, name)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_valid_category_is_scanned_sorted_with_labels(tmp_path):
    make_category(tmp_path)
    data = scan_category(tmp_path, "widget")
    assert data.name == "widget" and data.kind is None and len(data.train) == 3
    assert [(s.label, s.defect) for s in data.test] == [(0, "good")] * 2 + [(1, "crack")] * 2
    assert data.test[2].mask_path == tmp_path / "widget/ground_truth/crack/000_mask.png"
    assert all(s.mask_path is None for s in data.train + data.test[:2])


def test_stray_files_are_skipped(tmp_path):
    cat = make_category(tmp_path)
    for folder in (cat / "train/good", cat / "test/crack", cat / "test", tmp_path):
        for name in (".DS_Store", "Thumbs.db", "readme.txt"):
            (folder / name).write_text("junk")
    (cat / "test/crack/.hidden.png").write_text("junk")
    (tmp_path / "license.txt").write_text("x")
    (tmp_path / "not_a_category").mkdir()
    assert list_categories(tmp_path) == ["widget"]
    data = scan_category(tmp_path, "widget")
    assert len(data.train) == 3 and len(data.test) == 4


def test_unknown_category_lists_valid_ones(tmp_path):
    make_category(tmp_path, "alpha")
    make_category(tmp_path, "beta")
    message = _error(tmp_path, "gamma")
    assert message.startswith(str(tmp_path / "gamma")) and "alpha, beta" in message


def test_missing_train_good(tmp_path):
    cat = make_category(tmp_path)
    (cat / "train/good").rename(cat / "train/ok")
    assert _error(tmp_path).startswith(str(cat / "train" / "good"))


@pytest.mark.parametrize("split", ["train/good", "test/good", "test/crack"])
def test_empty_split(tmp_path, split):
    cat = make_category(tmp_path)
    for image in (cat / split).iterdir():
        image.unlink()
    (cat / split / ".DS_Store").write_text("x")
    message = _error(tmp_path)
    assert message.startswith(str(cat / split)) and "empty" in message


def test_unreadable_image(tmp_path):
    cat = make_category(tmp_path)
    bad = cat / "test/good/001.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert _error(tmp_path).startswith(str(bad))


def test_truncated_image(tmp_path):
    cat = make_category(tmp_path)
    bad = cat / "train/good/002.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) * 2 // 3])
    message = _error(tmp_path)
    assert message.startswith(str(bad)) and "truncated" in message


def test_defect_image_without_mask(tmp_path):
    cat = make_category(tmp_path)
    (cat / "ground_truth/crack/001_mask.png").unlink()
    message = _error(tmp_path)
    assert message.startswith(str(cat / "test/crack/001.png")) and "001_mask.png" in message


def test_mask_size_differs(tmp_path):
    cat = make_category(tmp_path)
    mask = _png(cat / "ground_truth/crack/000_mask.png", np.zeros((31, 40), dtype=np.uint8))
    message = _error(tmp_path)
    assert message.startswith(str(mask)) and "40x31" in message and "40x30" in message


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="^" + str(tmp_path / "nope")):
        list_categories(tmp_path / "nope")


def test_kinds_from_json_then_builtin_mvtec_list(tmp_path):
    for name in ("carpet", "screw", "widget", "thing"):
        make_category(tmp_path, name, size=(8, 8))
    kinds = category_kinds(tmp_path)
    assert kinds == {"carpet": "texture", "screw": "object", "thing": None, "widget": None}
    meta = {"name": "mine", "categories": {"widget": {"kind": "object"}, "carpet": {"kind": "object"}}}
    (tmp_path / "adspine_dataset.json").write_text(json.dumps(meta))
    assert scan_category(tmp_path, "widget").kind == "object"
    assert category_kinds(tmp_path)["carpet"] == "object"
    (tmp_path / "adspine_dataset.json").write_text("{broken")
    assert _error(tmp_path).startswith(str(tmp_path / "adspine_dataset.json"))


def test_bad_protocol_and_size_name_the_value():
    with pytest.raises(DatasetError, match="^'crop'"):
        ImageDataset([], protocol="crop")
    with pytest.raises(DatasetError, match="^size=0"):
        ImageDataset([], size=0)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_items_shapes_and_types(tmp_path, protocol):
    make_category(tmp_path)
    data = scan_category(tmp_path, "widget")
    dataset = ImageDataset(data.test, protocol=protocol, size=32)
    assert len(dataset) == 4
    good, bad = dataset[0], dataset[3]
    assert set(good) == {"image", "mask", "has_mask", "label", "defect", "path"}
    assert good["has_mask"] and bad["has_mask"]
    assert good["image"].shape == (3, 32, 32) and good["image"].dtype == torch.float32
    assert good["mask"].shape == (32, 32) and good["mask"].dtype == torch.bool and not good["mask"].any()
    assert 0.0 <= good["image"].min() and good["image"].max() <= 1.0
    assert (bad["label"], bad["defect"], bad["path"]) == (1, "crack", str(data.test[3].path))
    assert bad["mask"].any()


def _expected_resize(protocol: str, out_hw, image_hw):
    """The resize before the centre crop, written out independently of adspine.data.geometry."""
    (oh, ow), (h, w) = out_hw, image_hw
    if protocol == "paper":
        return round(oh * 256 / 224), round(ow * 256 / 224)
    if protocol == "resize":
        return oh, ow
    scale = max(oh / h, ow / w)
    return max(oh, round(h * scale)), max(ow, round(w * scale))


def _reference(image_u8: np.ndarray, mask: np.ndarray, protocol: str, out_hw):
    """Pillow reference: bilinear (antialiased) image, nearest mask, then the centre crop by hand."""
    rh, rw = _expected_resize(protocol, out_hw, image_u8.shape[:2])
    img = np.asarray(Image.fromarray(image_u8).resize((rw, rh), Image.BILINEAR), dtype=np.float32) / 255
    msk = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((rw, rh), Image.NEAREST)) > 127
    top, left = round((rh - out_hw[0]) / 2.0), round((rw - out_hw[1]) / 2.0)
    crop = (slice(top, top + out_hw[0]), slice(left, left + out_hw[1]))
    return img[crop], msk[crop], (rh, rw), (top, left)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("shape", [(300, 300), (180, 260), (129, 308)])
@pytest.mark.parametrize("size", [224, (64, 160)])
def test_protocol_matches_pillow_and_keeps_mask_aligned(protocol, shape, size):
    h, w = shape
    out_hw = (size, size) if isinstance(size, int) else size
    yy, xx = np.mgrid[0:h, 0:w]
    box = (yy >= 0.4 * h) & (yy < 0.7 * h) & (xx >= 0.4 * w) & (xx < 0.55 * w)
    image = np.where(box[:, :, None], 230, 20).astype(np.uint8).repeat(3, axis=2)
    image = (image.astype(int) + RNG.integers(-15, 16, image.shape)).clip(0, 255).astype(np.uint8)
    img, msk = preprocess(image / 255.0, box, protocol, size)
    assert img.shape == (3, *out_hw) and msk.shape == out_hw
    ref_img, ref_msk, (rh, rw), (top, left) = _reference(image, box, protocol, out_hw)
    np.testing.assert_allclose(img.permute(1, 2, 0).numpy(), ref_img, atol=3 / 255)
    np.testing.assert_array_equal(msk.numpy(), ref_msk)
    # alignment: the bright region of the resized image is the resized mask (only boundary pixels may differ)
    bright, m = img.mean(0).numpy() > 0.5, msk.numpy()
    edge = ndimage.binary_dilation(m ^ ndimage.binary_erosion(m), iterations=1)
    assert not ((bright ^ m) & ~edge).any()
    # the mask box lands where the geometry says: scale then shift by the crop
    rows = np.nonzero(m.any(1))[0]
    cols = np.nonzero(m.any(0))[0]
    assert abs(rows[0] - (np.ceil(0.4 * h) * rh / h - top)) <= 1
    assert abs(cols[-1] + 1 - (np.ceil(0.55 * w) * rw / w - left)) <= 1
    if protocol == "aspect-crop":  # the aspect ratio is kept: both axes scaled alike (up to rounding)
        assert abs(rh / h - rw / w) <= 1 / min(h, w)


def test_paper_square_resize_side_is_256_for_224():
    assert paper_resize_size(224) == 256 and paper_resize_size(128) == 146
