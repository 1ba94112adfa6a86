"""``data split``: the seeded draw against numpy, stratified shares, the three pool kinds, the manifest and its
sidecar, layouts through ``data convert``, and one-line errors that write nothing."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from adspine.data import DatasetError, scan
from adspine.data.cli import app
from adspine.data.split import parse_amount, shares, split_pool

H, W = 24, 32


def _image(path: Path, value: int = 128, size=(H, W)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, dtype=np.uint8)).save(path)
    return path


def _mask(path: Path, size=(H, W)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    values = np.zeros(size, dtype=np.uint8)
    values[2:8, 3:9] = 255
    Image.fromarray(values).save(path)
    return path


@pytest.fixture
def pool(tmp_path) -> Path:
    """20 normal images, 6 ``crack`` (with masks) and 3 ``dent`` (without)."""
    root = tmp_path / "pool"
    for i in range(20):
        _image(root / "good" / f"g{i:02d}.png", i)
    for i in range(6):
        _image(root / "crack" / f"c{i}.png")
        _mask(root / "masks" / "crack" / f"c{i}.png")
    for i in range(3):
        _image(root / "dent" / f"d{i}.png")
    return root


def _rows(manifest: Path) -> list[dict]:
    return list(csv.DictReader(manifest.open()))


def test_shares_are_proportional_and_sum_to_the_total():
    for total, sizes in [(5, {"a": 6, "b": 3}), (7, {"a": 1, "b": 1, "c": 1}), (10, {"x": 3, "y": 3, "z": 4}),
                         (4, {"a": 2, "b": 2, "c": 4})]:
        got = shares(total, sizes)
        whole = sum(sizes.values())
        assert sum(got.values()) == total
        assert all(abs(got[k] - total * n / whole) < 1 for k, n in sizes.items())
    assert shares(4, {"a": 2, "b": 2, "c": 4}) == {"a": 1, "b": 1, "c": 2}  # exact where it divides
    assert shares(5, {"a": 6, "b": 3}) == {"a": 3, "b": 2}  # remainders 1/3 and 2/3: b gets the extra one


def test_amounts_parse_counts_and_fractions():
    assert parse_amount("40", "--train") == 40 and parse_amount("0.8", "--train") == 0.8
    assert parse_amount("1.0", "--train") == 1.0 and parse_amount(None, "--test-good") is None
    for bad in ("abc", "1.5", "-3", "0.0"):
        with pytest.raises(DatasetError, match=f"^--train={bad!r}"):
            parse_amount(bad, "--train")


def test_folder_pool_split_follows_numpy_and_is_stratified(pool, tmp_path):
    record = split_pool(pool, tmp_path / "out", name="parts", train="10", test_good="5", test_defective="0.5",
                        seed=7)
    manifest = tmp_path / "out" / "parts.csv"
    rows = _rows(manifest)
    good = sorted(str(p) for p in (pool / "good").iterdir())
    order = np.random.default_rng(7).permutation(len(good))
    assert sorted(r["path"] for r in rows if r["split"] == "train") == sorted(good[i] for i in order[:10])
    assert sorted(r["path"] for r in rows if r["split"] == "test" and r["label"] == "good") == sorted(
        good[i] for i in order[10:15])
    # 9 defective images, half = 4.5 -> 5; crack 6 * 5 / 9 = 3.33 -> 3, dent 1.67 -> 2
    assert Counter(r["label"] for r in rows if r["label"] != "good") == {"crack": 3, "dent": 2}
    assert all(r["label"] == "good" for r in rows if r["split"] == "train")
    assert all(r["mask"] for r in rows if r["label"] == "crack") and not any(r["mask"] for r in rows
                                                                           if r["label"] != "crack")
    sidecar = json.loads((tmp_path / "out" / "parts.split.json").read_text())
    assert sidecar["seed"] == 7 and sidecar == {k: v for k, v in record.items() if k != "manifest"}
    assert sidecar["counts"] == {"train": 10, "test_good": 5, "test_defective": {"crack": 3, "dent": 2},
                                 "unused": 9}
    listed = {r["path"] for r in rows} | set(sidecar["unused"])
    assert len(listed) == len(rows) + 9 == 29  # every pool image once: in the split or unused
    data = scan(manifest, masks="optional")
    assert data.name == "parts" and len(data.train) == 10 and len(data.test) == 10
    split_pool(pool, tmp_path / "again", name="parts", train="10", test_good="5", test_defective="0.5", seed=7)
    assert (tmp_path / "again" / "parts.csv").read_text() == manifest.read_text()


def test_csv_pool_labels_defects_and_relative_paths(tmp_path):
    src = tmp_path / "csvpool"
    lines = ["path,label,mask,defect"]
    for i in range(8):
        _image(src / "img" / f"n{i}.png")
        lines.append(f"img/n{i}.png,{'good' if i % 2 else '0'},,")
    for i in range(3):
        _image(src / "img" / f"s{i}.png")
        _mask(src / "m" / f"s{i}.png")
        lines.append(f"img/s{i}.png,scratch,m/s{i}.png,")
    _image(src / "img" / "x.png")
    lines.append("img/x.png,1,,stain")
    (src / "pool.csv").write_text("\n".join(lines) + "\n")
    split_pool(src / "pool.csv", tmp_path / "out", train="0.5", seed=1)
    rows = _rows(tmp_path / "out" / "out.csv")
    assert Counter((r["split"], r["label"]) for r in rows) == {("train", "good"): 4, ("test", "good"): 4,
                                                               ("test", "scratch"): 3, ("test", "stain"): 1}
    scratch = [r for r in rows if r["label"] == "scratch"]
    assert all(Path(r["mask"]).resolve() == (src / "m" / Path(r["path"]).name).resolve() for r in scratch)
    assert scan(tmp_path / "out" / "out.csv", masks="optional").masks == "partial"


def test_split_converts_to_every_layout(pool, tmp_path):
    split_pool(pool, tmp_path / "out", name="parts", train="12", seed=0)
    runner = CliRunner()
    for fmt in ("mvtec", "folder", "visa"):
        result = runner.invoke(app, ["convert", str(tmp_path / "out" / "parts.csv"), "--category", "parts",
                                     "--out", str(tmp_path / fmt), "--format", fmt])
        assert result.exit_code == 0, result.output
        root = tmp_path / fmt / "parts" if fmt == "folder" else tmp_path / fmt
        data = scan(root, "parts", fmt, masks="optional")
        assert (len(data.train), len(data.test), data.masks) == (12, 8 + 9, "partial")


def _tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.mark.parametrize("problem, message", [
    ("missing", r"1 listed files not found .or not images.: .*gone\.png"),
    ("good_mask", r"pool\.csv:3: a good image with a mask"),
    ("traversal", r"pool\.csv:2: defect '\.\./\.\./evil' holds a path separator"),
    ("too_many", r"train 9 \+ test good 2 normal images asked, the pool has 10"),
])
def test_errors_are_one_line_and_write_nothing(tmp_path, problem, message):
    src = tmp_path / "c"
    lines = ["path,label,mask,defect"] + [f"n{i}.png,good,," for i in range(10)] + ["d.png,bad,,"]
    for i in range(10):
        _image(src / f"n{i}.png")
    _image(src / "d.png")
    args = {"train": "0.8"}
    if problem == "missing":
        lines.append("gone.png,crack,,")
    elif problem == "good_mask":
        lines[2] = "n1.png,good,d.png,"
    elif problem == "traversal":
        lines[1] = "n0.png,crack,,../../evil"
    else:
        args = {"train": "9", "test_good": "2"}
    (src / "pool.csv").write_text("\n".join(lines) + "\n")
    before = _tree(tmp_path)
    result = CliRunner().invoke(app, ["split", str(src / "pool.csv"), "--out", str(tmp_path / "out"),
                                      *[x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", v)]])
    assert result.exit_code == 2
    lines_out = result.stderr.strip().splitlines()
    assert len(lines_out) == 1 and re.search(message, lines_out[0]), result.stderr
    assert _tree(tmp_path) == before


def test_cli_prints_counts_and_refuses_a_full_folder(pool, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["split", str(pool), "--out", str(tmp_path / "s"), "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "train 16, test good 4, test defective 9 (crack 6, dent 3), unused 0 (seed 3)" in result.stdout
    again = runner.invoke(app, ["split", str(pool), "--out", str(tmp_path / "s")])
    assert again.exit_code == 2 and "output folder is not empty" in again.stderr


def test_labelme_pool_normal_photos_without_json_and_traversal_refused(tmp_path):
    ann, photos = tmp_path / "ann", tmp_path / "photos"
    ann.mkdir()
    for i in range(6):
        _image(photos / f"p{i}.png")
    shapes = [{"label": "crack", "points": [[1, 1], [6, 6]], "shape_type": "rectangle"}]
    for name, found in (("p4", shapes), ("p5", shapes), ("p0", [])):
        meta = {"shapes": found, "imagePath": f"{name}.png", "imageHeight": H, "imageWidth": W}
        (ann / f"{name}.json").write_text(json.dumps(meta))
    split_pool(ann, tmp_path / "out", images=photos, train="2", test_defective="1", seed=0)
    rows = _rows(tmp_path / "out" / "out.csv")
    assert Counter((r["split"], r["label"]) for r in rows) == {("train", "good"): 2, ("test", "good"): 2,
                                                               ("test", "crack"): 1}
    written = sorted(p.name for p in (tmp_path / "out" / "masks").iterdir())
    assert written == [Path(r["mask"]).name for r in rows if r["mask"]]  # only the used mask
    meta = {"shapes": [{**shapes[0], "label": "../../evil"}], "imagePath": "p5.png", "imageHeight": H,
            "imageWidth": W}
    (ann / "p5.json").write_text(json.dumps(meta))
    before = _tree(tmp_path)
    with pytest.raises(DatasetError, match=f"^{re.escape(str(ann / 'p5.json'))}: label '../../evil'"):
        split_pool(ann, tmp_path / "out2", images=photos, seed=0)
    assert _tree(tmp_path) == before
