"""Every dataset layout reads back to the same samples as the MVTec one; mask policy, image-level and wide datasets,
BTAD-style names, broken links, large-image warnings, and one-line errors naming the path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adspine.data import (
    FORMATS,
    DatasetError,
    ImageDataset,
    LargeImageWarning,
    detect_format,
    list_categories,
    load_mask,
    load_rgb,
    normalise_size,
    protocol_record,
    scan,
)
from adspine.data.convert import export_layout
from adspine.data.summary import summarize
from adspine.data.synth import generate

torch.set_num_threads(1)
SMALL = {"seed": 5, "size": 64, "n_train": 2, "n_test_good": 1, "n_per_defect": 1}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("layouts") / "mvtec", categories=["tiles", "nut"], **SMALL)


@pytest.fixture(scope="module")
def image_level(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("layouts") / "nomask", categories=["wood"], masks=False, **SMALL)


def _content(data):
    """Per sample: label, has_mask, decoded image and mask (paths aside)."""
    out = []
    for s in data.train + data.test:
        mask = load_mask(s.mask_path, s.mask_threshold) if s.mask_path is not None else None
        out.append((s.label, s.has_mask, load_rgb(s.path), mask))
    return out


def _assert_same_content(a, b):
    assert len(a) == len(b)
    for (la, ha, ia, ma), (lb, hb, ib, mb) in zip(a, b):
        assert (la, ha) == (lb, hb)
        np.testing.assert_array_equal(ia, ib)
        assert (ma is None) == (mb is None)
        if ma is not None:
            np.testing.assert_array_equal(ma, mb)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_layout_reads_back_the_same_samples(synth, tmp_path, fmt):
    reference = scan(synth, "nut")
    root = export_layout(synth, "nut", tmp_path / fmt, fmt)
    export_layout(synth, "tiles", tmp_path / fmt, fmt)
    assert detect_format(root) == fmt
    data = scan(root, "nut")
    assert data.format == fmt and data.masks == "yes" and data.pixel_level and data.skipped == []
    _assert_same_content(_content(data), _content(reference))
    defects = [s.defect for s in reference.test]
    expected = [d if d == "good" else "anomaly" for d in defects] if fmt == "visa" else defects
    assert [s.defect for s in data.test] == expected
    if fmt == "visa":  # VisA masks are stored 0/1 and binarised at > 0
        stored = np.asarray(Image.open(data.test[-1].mask_path))
        assert stored.max() == 1 and data.test[-1].mask_threshold == 0
    categories = ["nut"] if fmt == "folder" and root.name == "nut" else ["nut", "tiles"]
    assert list_categories(root) == (["nut"] if fmt == "manifest" else categories)


def test_folder_root_with_several_categories_and_multi_category_manifest(synth, tmp_path):
    export_layout(synth, "nut", tmp_path / "f", "folder")
    export_layout(synth, "tiles", tmp_path / "f", "folder")
    assert detect_format(tmp_path / "f") == "folder" and list_categories(tmp_path / "f") == ["nut", "tiles"]
    _assert_same_content(_content(scan(tmp_path / "f", "tiles")), _content(scan(synth, "tiles")))
    csv_path = export_layout(synth, "nut", tmp_path / "m", "manifest")
    lines = csv_path.read_text().splitlines()
    tagged = [lines[0] + ",category"] + [line + ",parts" for line in lines[1:]]
    (tmp_path / "m" / "all.csv").write_text("\n".join(tagged) + "\n")
    assert list_categories(tmp_path / "m" / "all.csv") == ["parts"]
    assert scan(tmp_path / "m" / "all.csv").name == "parts"
    with pytest.raises(DatasetError, match="^" + str(tmp_path / "m" / "all.csv") + ": unknown category 'nut'"):
        scan(tmp_path / "m" / "all.csv", "nut")


@pytest.mark.parametrize("fmt", FORMATS)
def test_image_level_dataset_is_valid_in_every_layout(image_level, tmp_path, fmt):
    root = export_layout(image_level, "wood", tmp_path / fmt, fmt)
    for masks in ("required", "optional"):
        data = scan(root, "wood", masks=masks)
        assert data.masks == "no" and not data.pixel_level
        np.testing.assert_array_equal(data.has_mask, [s.label == 0 for s in data.test])
    item = ImageDataset(data.test, "resize", 32)[len(data.test) - 1]
    assert item["label"] == 1 and item["has_mask"] is False and not item["mask"].any()
    rows = summarize(root)
    assert rows[0]["masks"] == "no" and rows[0]["test_defective"] == 4


def _drop_masks(root: Path, category: str, defect: str) -> None:
    shutil.rmtree(root / category / "ground_truth" / defect)


def test_partial_masks_refused_unless_optional(synth, tmp_path):
    root = export_layout(synth, "tiles", tmp_path / "m", "mvtec")
    _drop_masks(root, "tiles", "hole")
    with pytest.raises(DatasetError) as info:
        scan(root, "tiles")
    message = str(info.value)
    assert message.startswith(str(root / "tiles" / "test" / "hole") + ":") and "optional" in message
    data = scan(root, "tiles", masks="optional")
    assert data.masks == "partial" and not data.pixel_level
    np.testing.assert_array_equal(data.has_mask, [s.defect != "hole" for s in data.test])
    assert [r["masks"] for r in summarize(root)] == ["partial"]
    # the manifest of the same data names the CSV and the defect
    csv_path = export_layout(root, "tiles", tmp_path / "man", "manifest")
    with pytest.raises(DatasetError, match="^" + str(csv_path) + r" \(category 'tiles', defect 'hole'\)"):
        scan(csv_path)
    assert scan(csv_path, masks="optional").masks == "partial"
    with pytest.raises(DatasetError, match="^masks='sometimes'"):
        scan(root, "tiles", masks="sometimes")


def test_btad_style_names_ok_ko_and_bmp_masks(synth, tmp_path):
    cat = tmp_path / "btad" / "01"
    src = synth / "nut"
    for split in ("train", "test"):
        shutil.copytree(src / split / "good", cat / split / "ok")
    (cat / "test" / "ko").mkdir(parents=True)
    (cat / "ground_truth" / "ko").mkdir(parents=True)
    for i, image in enumerate(sorted((src / "test").glob("[!g]*/*.png"))):
        Image.open(image).save(cat / "test" / "ko" / f"{i:04d}.bmp")
        mask = src / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"
        Image.open(mask).save(cat / "ground_truth" / "ko" / f"{i:04d}.bmp")
    for pattern in (None, "{stem}.bmp"):
        data = scan(tmp_path / "btad", "01", mask_pattern=pattern)
        assert data.masks == "yes" and len(data.train) == 2 and {s.defect for s in data.test} == {"good", "ko"}
        assert data.test[-1].mask_path == cat / "ground_truth" / "ko" / "0004.bmp"
    with pytest.raises(DatasetError, match="^" + str(cat / "ground_truth" / "ko") + ": holds masks but none"):
        scan(tmp_path / "btad", "01", mask_pattern="{stem}_mask.png")
    with pytest.raises(DatasetError, match=r"^mask_pattern='mask\.png'"):
        scan(tmp_path / "btad", "01", mask_pattern="mask.png")
    Image.open(cat / "ground_truth" / "ko" / "0000.bmp").save(cat / "ground_truth" / "ko" / "0000_mask.png")
    with pytest.raises(DatasetError, match="^" + str(cat / "test" / "ko" / "0000.bmp") + ": ambiguous mask"):
        scan(tmp_path / "btad", "01")


def test_wide_images_keep_their_geometry(tmp_path):
    root = generate(tmp_path / "wide", categories=["fabric"], aspect=4, **SMALL)
    data = scan(root, "fabric")
    assert Image.open(data.train[0].path).size == (256, 64)
    for s in data.test[1:]:  # the defect sits in square index % 4 (index 0 here) of its row
        mask = load_mask(s.mask_path)
        assert mask[:, :64].any() and not mask[:, 64:].any()
    row = summarize(root)[0]
    assert row["sizes"] == {"256x64": 7}  # 2 train, 1 good, 4 defects
    sample = data.test[1]
    image, mask = load_rgb(sample.path), load_mask(sample.mask_path)
    # aspect-crop to 64 x 64: the image already covers it, so the item is the centre square, untouched
    item = ImageDataset([sample], "aspect-crop", 64)[0]
    np.testing.assert_allclose(item["image"].permute(1, 2, 0).numpy(), image[:, 96:160], atol=1e-6)
    np.testing.assert_array_equal(item["mask"].numpy(), mask[:, 96:160])
    # a rectangle end to end: (32, 128) keeps the aspect ratio, so resize and aspect-crop agree
    a = ImageDataset([sample], "resize", (32, 128))[0]
    b = ImageDataset([sample], "aspect-crop", [32, 128])[0]
    assert a["image"].shape == (3, 32, 128) and a["mask"].shape == (32, 128)
    torch.testing.assert_close(a["image"], b["image"])
    assert torch.equal(a["mask"], b["mask"]) and a["mask"].any()
    assert ImageDataset([sample], "paper", (32, 128))[0]["image"].shape == (3, 32, 128)


def test_sizes_and_protocol_record():
    assert normalise_size(224) == (224, 224) and normalise_size([64, 256]) == (64, 256)
    for bad in (0, 7, True, 2.5, (64,), (64, 0), "224", (64, 128, 3)):
        with pytest.raises(DatasetError, match=r"^size="):
            normalise_size(bad)
    assert protocol_record("aspect-crop", [64, 256])["image_size"] == [64, 256]
    with pytest.raises(DatasetError, match="^'squash'"):
        protocol_record("squash", 224)


def test_broken_and_looping_links_are_skipped_and_counted(synth, tmp_path):
    root = export_layout(synth, "tiles", tmp_path / "m", "mvtec")
    good = root / "tiles" / "train" / "good"
    os.symlink(tmp_path / "nowhere.png", good / "broken.png")
    os.symlink(good / "loop.png", good / "loop.png")
    data = scan(root, "tiles")
    assert sorted(p.name for p in data.skipped) == ["broken.png", "loop.png"] and len(data.train) == 2
    assert summarize(root)[0]["skipped"] == 2
    csv_path = export_layout(root, "tiles", tmp_path / "man", "manifest")
    with csv_path.open("a") as handle:
        handle.write(f"{good / 'broken.png'},train,good,\n")
    assert [p.name for p in scan(csv_path).skipped] == ["broken.png"]


def test_large_image_warning_names_the_file_once(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 400 pixels: above the limit, below twice it (an error)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_rgb(path)
    assert [w.category for w in caught] == [LargeImageWarning]
    assert str(caught[0].message).startswith(f"{path}: very large image (20x20")


def _first_line_error(func, *args, **kwargs) -> str:
    with pytest.raises(DatasetError) as info:
        func(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_errors_name_the_path_in_one_line(synth, tmp_path):
    assert _first_line_error(detect_format, tmp_path / "nope").startswith(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    assert _first_line_error(detect_format, tmp_path / "empty").startswith(f"{tmp_path / 'empty'}: unknown dataset")
    assert _first_line_error(scan, synth, "nut", format="coco").startswith("format='coco'")
    mixed = tmp_path / "mixed"
    export_layout(synth, "nut", mixed, "mvtec")
    export_layout(synth, "tiles", mixed, "folder")
    assert _first_line_error(detect_format, mixed).startswith(f"{mixed}: ambiguous layout")
    assert scan(mixed, "tiles", format="folder").masks == "yes"
    assert _first_line_error(detect_format, mixed / "nut").startswith(f"{mixed / 'nut'}: looks like one MVTec")
    # visa: a missing column, a bad label, a missing image
    visa_root = export_layout(synth, "nut", tmp_path / "visa", "visa")
    split = visa_root / "split_csv" / "1cls.csv"
    text = split.read_text()
    split.write_text(text.replace("mask", "msk", 1))
    assert _first_line_error(scan, visa_root, "nut").startswith(f"{split}: missing column(s) mask")
    split.write_text(text.replace(",anomaly,", ",broken,", 1))
    assert _first_line_error(scan, visa_root, "nut").startswith(f"{split}:")
    assert "label 'broken'" in _first_line_error(scan, visa_root, "nut")
    split.write_text(text)
    missing = visa_root / "nut" / "Data" / "Images" / "Normal" / "train_000.png"
    missing.unlink()
    assert _first_line_error(scan, visa_root, "nut").startswith(f"{missing}: file not found")
    # manifest: a defective train row, an unknown split
    csv_path = export_layout(synth, "nut", tmp_path / "man", "manifest")
    lines = csv_path.read_text().splitlines()
    bad = csv_path.with_name("bad.csv")
    bad.write_text("\n".join(lines[:-1] + [lines[-1].replace(",test,", ",train,")]) + "\n")
    assert _first_line_error(scan, bad).startswith(f"{bad}:{len(lines)}: defective image")
    bad.write_text("\n".join(lines[:-1] + [lines[-1].replace(",test,", ",val,")]) + "\n")
    assert _first_line_error(scan, bad).startswith(f"{bad}:{len(lines)}: split 'val'")


def test_summary_imports_no_torch(synth, tmp_path):
    root = export_layout(synth, "nut", tmp_path / "f", "folder")
    code = ("import sys; from adspine.data.summary import summarize; import adspine.data.cli; "
            f"rows = summarize({str(root)!r}); assert 'torch' not in sys.modules, 'torch imported'; "
            "print(rows[0]['format'], rows[0]['masks'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["folder", "yes"]
