"""`data convert` writes only inside --out and copies only images: names from data that would leave the output folder
(manifest labels and categories, VisA objects, symbolic links in --out) and listed files that are no images are
refused with one line naming the row, before anything is written."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from adspine.data import DatasetError, scan
from adspine.data.cli import app
from adspine.data.convert import export_layout
from adspine.data.paths import plain_name, safe_join

FORMATS = ("mvtec", "folder", "visa", "manifest")
HEADER = ["path", "split", "label", "mask", "category"]


def _image(path: Path, value: int = 100) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)
    return path.name


def _mask(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    values = np.zeros((8, 8), np.uint8)
    values[2:5, 2:5] = 255
    Image.fromarray(values).save(path)
    return path.name


def _manifest(folder: Path, label: str = "crack", category: str = "nut", extra: list[list[str]] = ()) -> Path:
    """A valid one-category manifest (train good, test good, one defect with a mask) plus ``extra`` rows."""
    data = folder / "src"
    rows = [[f"src/{_image(data / 'a.png')}", "train", "good", "", category],
            [f"src/{_image(data / 'b.png', 50)}", "test", "good", "", category],
            [f"src/{_image(data / 'c.png', 200)}", "test", label, f"src/{_mask(data / 'c_mask.png')}", category]]
    path = folder / "parts.csv"
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([HEADER, *rows, *extra])
    return path


def _files(root: Path) -> set[Path]:
    """Every path under ``root`` (links included, not followed)."""
    return {p for p in root.rglob("*")}


def _refused(call, match: str) -> str:
    with pytest.raises(DatasetError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message.startswith(match), message
    return message


@pytest.mark.parametrize("fmt", FORMATS)
def test_label_that_climbs_out_is_refused_naming_the_row(tmp_path, fmt):
    work = tmp_path / "a" / "b" / "c"
    csv_path = _manifest(work, label="../../../escaped")
    before = _files(tmp_path)
    message = _refused(lambda: export_layout(csv_path, "nut", work / "out", fmt), f"{csv_path}:4: label ")
    assert "'../../../escaped'" in message
    assert _files(tmp_path) == before  # nothing written, inside or outside --out
    assert not list(tmp_path.rglob("escaped"))


@pytest.mark.parametrize("label", ["..", ".", "a/b", "a\\b", "a\0b"])
def test_every_non_plain_label_is_refused_on_read(tmp_path, label):
    csv_path = _manifest(tmp_path, label=label)
    _refused(lambda: scan(csv_path), f"{csv_path}:4: label {label!r}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_category_that_climbs_out_is_refused(tmp_path, fmt):
    work = tmp_path / "a" / "b"
    csv_path = _manifest(work, category="../../evil")
    before = _files(tmp_path)
    _refused(lambda: export_layout(csv_path, "../../evil", work / "out", fmt), f"{csv_path}: category '../../evil'")
    _refused(lambda: export_layout(csv_path, "..", work / "out", fmt), f"{csv_path}: category '..'")
    _refused(lambda: scan(csv_path), f"{csv_path}:2: category '../../evil'")  # the reader names the first row
    assert _files(tmp_path) == before


def test_visa_object_that_climbs_out_is_refused_naming_the_row(tmp_path):
    good = export_layout(_manifest(tmp_path / "m"), "nut", tmp_path / "visa", "visa")
    split = good / "split_csv" / "1cls.csv"
    lines = split.read_text().splitlines()
    split.write_text("\n".join([lines[0], lines[1].replace("nut,", "../../x,", 1), *lines[2:]]) + "\n")
    before = _files(tmp_path)
    _refused(lambda: scan(good, "nut"), f"{split}:2: object '../../x'")
    _refused(lambda: export_layout(good, "nut", tmp_path / "out", "mvtec"), f"{split}:2: object '../../x'")
    assert _files(tmp_path) == before


@pytest.mark.parametrize("column", ["path", "mask"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_listed_file_that_is_no_image_is_refused_naming_the_row(tmp_path, fmt, column):
    secret = tmp_path / "etc" / "passwd"
    secret.parent.mkdir()
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    row = [str(secret), "test", "hole", ""] if column == "path" else [f"src/{_image(tmp_path / 'src' / 'd.png')}",
                                                                     "test", "hole", str(secret)]
    csv_path = _manifest(tmp_path, extra=[row + ["nut"]])
    before = _files(tmp_path)
    message = _refused(lambda: export_layout(csv_path, "nut", tmp_path / "out", fmt), f"{secret}: unreadable")
    assert message.endswith(f"(listed at {csv_path}:5)")
    assert _files(tmp_path) == before
    assert not any(p.read_bytes() == secret.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p != secret)


def test_cli_convert_refuses_in_one_line_and_writes_nothing(tmp_path):
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0\n")
    csv_path = _manifest(tmp_path, extra=[[str(secret), "test", "good", "", "nut"]])
    before = _files(tmp_path)
    result = CliRunner().invoke(app, ["convert", str(csv_path), "--category", "nut", "--out", str(tmp_path / "out"),
                                      "--format", "folder"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(secret) in lines[0] and f"{csv_path}:5" in lines[0], result.output
    assert _files(tmp_path) == before


def test_symbolic_links_in_out_that_lead_outside_are_refused(tmp_path):
    csv_path = _manifest(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "nut").symlink_to(outside, target_is_directory=True)  # a category folder leading out
    _refused(lambda: export_layout(csv_path, "nut", out, "mvtec"), str(tmp_path / "src" / "a.png") + ": ")
    assert list(outside.iterdir()) == []
    (out / "nut").unlink()
    victim = outside / "victim.png"
    victim.write_bytes(b"keep")
    (out / "nut" / "train" / "good").mkdir(parents=True)
    (out / "nut" / "train" / "good" / "a.png").symlink_to(victim)  # an existing target file leading out
    before = _files(tmp_path)
    message = _refused(lambda: export_layout(csv_path, "nut", out, "mvtec"), str(tmp_path / "src" / "a.png"))
    assert "resolves outside" in message
    assert victim.read_bytes() == b"keep" and _files(tmp_path) == before


def test_two_sources_on_one_target_are_refused_before_writing(tmp_path):
    other = tmp_path / "other" / "a.png"
    _image(other, 7)
    csv_path = _manifest(tmp_path, extra=[["other/a.png", "train", "good", "", "nut"]])
    before = _files(tmp_path)
    message = _refused(lambda: export_layout(csv_path, "nut", tmp_path / "out", "folder"), str(tmp_path))
    assert str(other) in message and str(tmp_path / "src" / "a.png") in message and "would be written to" in message
    assert _files(tmp_path) == before


def test_a_valid_manifest_still_converts_inside_out(tmp_path):
    csv_path = _manifest(tmp_path)
    for fmt in FORMATS:
        root = export_layout(csv_path, "nut", tmp_path / fmt, fmt)
        data = scan(root, "nut")
        assert [s.path.name for s in data.train] == ["train_a.png" if fmt == "visa" else "a.png"]
        assert [s.defect for s in data.test] == ["good", "anomaly" if fmt == "visa" else "crack"]
        written = [p.resolve() for p in (tmp_path / fmt).rglob("*")]
        assert all(p.is_relative_to((tmp_path / fmt).resolve()) for p in written)
        assert data.test[0].path.read_bytes() == (tmp_path / "src" / "b.png").read_bytes()  # byte for byte


@pytest.mark.parametrize("part", ["..", "../x", "a/../../b", "/etc/passwd", "C:\\x", "a\\b", "a\0b", "", ".", "./"])
def test_safe_join_refuses_parts_that_are_not_inside(tmp_path, part):
    with pytest.raises(DatasetError) as info:
        safe_join(tmp_path, "ok", part, where="row 3")
    assert str(info.value).startswith("row 3: ")


def test_safe_join_and_plain_name_accept_plain_paths(tmp_path):
    assert safe_join(tmp_path, "a", "b/c.png") == Path(tmp_path, "a", "b", "c.png")
    assert safe_join(tmp_path, "./a") == tmp_path / "a"
    assert plain_name("scratch deep-1.png", "defect", "row 2") == "scratch deep-1.png"
    (tmp_path / "link").symlink_to(tmp_path.parent)
    with pytest.raises(DatasetError, match="resolves outside"):
        safe_join(tmp_path, "link", "x.png")
