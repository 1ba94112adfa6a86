"""`adspine data` commands: help, a small end-to-end run, and one-line errors with exit status 2."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from adspine.data.cli import app

runner = CliRunner()


@pytest.mark.parametrize("command", [[], ["synth"], ["magnetic-tile"], ["summary"], ["masks-from-labelme"], ["convert"]])
def test_help(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_synth_then_summary(tmp_path):
    out = tmp_path / "syn"
    args = ["synth", "--out", str(out), "--seed", "2", "--size", "64", "--n-train", "1", "--n-test-good", "1",
            "--n-per-defect", "1", "--category", "tiles", "--category", "nut"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "wrote 13 images" in result.stdout  # tiles 1 + 1 + 4 defect types, nut 1 + 1 + 5
    result = runner.invoke(app, ["summary", str(out)])
    assert result.exit_code == 0, result.output
    assert "synthetic" in result.stdout and "tiles" in result.stdout and "missing_piece 1" in result.stdout


def _one_line_error(args, starts_with: str):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {starts_with}"), result.stderr
    assert "Traceback" not in result.output


def test_errors_are_one_line_with_exit_status_2(tmp_path):
    long_path = tmp_path / ("a-rather-long-folder-name-" * 4) / "missing"
    _one_line_error(["summary", str(long_path)], str(long_path))
    _one_line_error(["synth", "--out", str(tmp_path / "x"), "--size", "10"], "size=10")
    _one_line_error(["magnetic-tile", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "y")],
                    str(tmp_path / "nope"))


@pytest.mark.parametrize("fmt", ["mvtec", "visa", "folder", "manifest"])
def test_summary_works_on_every_format(tmp_path, fmt):
    from adspine.data.convert import export_layout

    src = tmp_path / "syn"
    result = runner.invoke(app, ["synth", "--out", str(src), "--size", "64", "--n-train", "1", "--n-test-good", "1",
                                 "--n-per-defect", "1", "--category", "tiles", "--aspect", "2", "--no-masks"])
    assert result.exit_code == 0, result.output
    root = export_layout(src, "tiles", tmp_path / fmt, fmt)
    for args in (["summary", str(root)], ["summary", str(root), "--format", fmt]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert f"({fmt}" in result.stdout and "tiles" in result.stdout and "128x64" in result.stdout
        assert " no " in result.stdout  # masks: none (an image-level dataset)
    _one_line_error(["summary", str(root), "--format", "coco"], "format='coco'")


def test_summary_reports_large_images_as_one_warning_line(tmp_path, monkeypatch):
    from PIL import Image

    out = tmp_path / "syn"
    runner.invoke(app, ["synth", "--out", str(out), "--size", "64", "--n-train", "1", "--n-test-good", "1",
                        "--n-per-defect", "1", "--category", "tiles"])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 64 x 64 = 4096 pixels: a warning, not an error
    result = runner.invoke(app, ["summary", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("warning: ") and "very large image" in line for line in lines)
    named = [line.split(": ")[1] for line in lines]
    assert len(named) == len(set(named)) == 10  # 6 images + 4 masks, each named once
    assert "DecompressionBombWarning" not in result.output


def test_convert_then_summary(tmp_path):
    src = tmp_path / "syn"
    runner.invoke(app, ["synth", "--out", str(src), "--size", "64", "--n-train", "1", "--n-test-good", "1",
                        "--n-per-defect", "1", "--category", "nut"])
    result = runner.invoke(app, ["convert", str(src), "--category", "nut", "--out", str(tmp_path / "m"),
                                 "--format", "manifest"])
    assert result.exit_code == 0, result.output
    assert "nut.csv" in result.stdout
    result = runner.invoke(app, ["summary", str(tmp_path / "m" / "nut.csv")])
    assert result.exit_code == 0 and "(manifest" in result.stdout and " yes " in result.stdout, result.output
    _one_line_error(["convert", str(src), "--category", "nut", "--out", str(tmp_path / "x"), "--format", "coco"],
                    "format='coco'")
