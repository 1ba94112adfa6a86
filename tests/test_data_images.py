"""load_rgb / load_mask: every Pillow mode we promise, checked against values written with numpy."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from adspine.data.images import DatasetError, is_image_file, list_images, load_mask, load_rgb

RNG = np.random.default_rng(7)


def _save(tmp_path, name, image: Image.Image):
    path = tmp_path / name
    image.save(path)
    return path


def test_greyscale_becomes_three_equal_channels(tmp_path):
    grey = RNG.integers(0, 256, (9, 13), dtype=np.uint8)
    out = load_rgb(_save(tmp_path, "g.png", Image.fromarray(grey, "L")))
    assert out.shape == (9, 13, 3) and out.dtype == np.float32
    for c in range(3):
        np.testing.assert_allclose(out[:, :, c], grey / 255.0, atol=1e-7)


def test_rgb_and_one_bit(tmp_path):
    rgb = RNG.integers(0, 256, (8, 6, 3), dtype=np.uint8)
    np.testing.assert_allclose(load_rgb(_save(tmp_path, "c.bmp", Image.fromarray(rgb))), rgb / 255.0, atol=1e-7)
    bits = RNG.random((8, 6)) > 0.5
    out = load_rgb(_save(tmp_path, "b.png", Image.fromarray(bits).convert("1")))
    np.testing.assert_array_equal(out[:, :, 1], bits.astype(np.float32))


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_dropped_not_composited(tmp_path, mode):
    rgb = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    alpha = RNG.integers(0, 256, (5, 7), dtype=np.uint8)
    if mode == "RGBA":
        image, expected = Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), rgb / 255.0
    else:
        image = Image.fromarray(np.dstack([rgb[:, :, 0], alpha]), "LA")
        expected = np.repeat(rgb[:, :, :1], 3, axis=2) / 255.0
    np.testing.assert_allclose(load_rgb(_save(tmp_path, "a.png", image)), expected, atol=1e-7)


def test_palette_is_expanded_through_its_palette(tmp_path):
    palette = RNG.integers(0, 256, (16, 3), dtype=np.uint8)
    index = RNG.integers(0, 16, (6, 10), dtype=np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette(palette.flatten().tolist())
    path = _save(tmp_path, "p.png", image)
    assert Image.open(path).mode == "P"
    np.testing.assert_allclose(load_rgb(path), palette[index] / 255.0, atol=1e-7)


def test_sixteen_bit_png_and_32_bit_tiff_use_the_16_bit_scale(tmp_path):
    values = RNG.integers(0, 65536, (7, 5)).astype(np.uint16)
    path = _save(tmp_path, "s.png", Image.fromarray(values))
    assert Image.open(path).mode.startswith("I")
    out = load_rgb(path)
    np.testing.assert_allclose(out[:, :, 2], values / 65535.0, atol=1e-6)
    ints = np.array([[0, 1000, 65535, 70000]], dtype=np.int32)
    tiff = _save(tmp_path, "i.tif", Image.fromarray(ints, "I"))
    np.testing.assert_allclose(load_rgb(tiff)[0, :, 0], [0, 1000 / 65535, 1.0, 1.0], atol=1e-6)


def test_mask_binarisation_thresholds(tmp_path):
    row = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(load_mask(_save(tmp_path, "m.png", Image.fromarray(row))), [[0, 0, 1, 1]])
    row16 = np.array([[0, 127 * 257, 127 * 257 + 1, 65535]], dtype=np.uint16)
    np.testing.assert_array_equal(load_mask(_save(tmp_path, "m16.png", Image.fromarray(row16))), [[0, 0, 1, 1]])
    colour = np.array([[[255, 0, 0], [0, 0, 0], [100, 120, 127], [0, 0, 200]]], dtype=np.uint8)
    np.testing.assert_array_equal(load_mask(_save(tmp_path, "mc.png", Image.fromarray(colour))), [[1, 0, 0, 1]])
    palette = Image.fromarray(np.array([[0, 1, 1, 0]], dtype=np.uint8), "P")
    palette.putpalette([0, 0, 0, 255, 255, 255])
    np.testing.assert_array_equal(load_mask(_save(tmp_path, "mp.png", palette)), [[0, 1, 1, 0]])
    bits = Image.fromarray(np.array([[True, False, True, True]]))
    np.testing.assert_array_equal(load_mask(_save(tmp_path, "mb.png", bits)), [[1, 0, 1, 1]])


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_truncated_image_names_the_path(tmp_path, fmt):
    path = _save(tmp_path, f"t.{fmt}", Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError) as info:
        load_rgb(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_unreadable_and_missing_files_name_the_path(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    for path in (junk, tmp_path / "absent.png"):
        with pytest.raises(DatasetError, match="^" + str(path).replace("\\", "\\\\")):
            load_mask(path)


def test_stray_files_are_not_images(tmp_path):
    Image.new("L", (2, 2)).save(tmp_path / "a.PNG")
    Image.new("L", (2, 2)).save(tmp_path / "b.tiff")
    Image.new("L", (2, 2)).save(tmp_path / ".hidden.png")
    for name in (".DS_Store", "Thumbs.db", "readme.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.PNG", "b.tiff"]
    assert not is_image_file(tmp_path / "Thumbs.db")
