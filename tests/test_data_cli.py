"""`adspine data` commands: help, a small end-to-end run, and one-line errors with exit status 2."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from adspine.data.cli import app

runner = CliRunner()


@pytest.mark.parametrize("command", [[], ["synth"], ["magnetic-tile"], ["summary"]])
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
