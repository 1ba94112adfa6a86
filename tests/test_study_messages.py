"""What `adspine study` prints about its inputs and failures: each fact once, one line each."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adspine.cli import app
from study_fixtures import tiny_study_spec


@pytest.fixture()
def spec(tmp_path) -> Path:
    return tiny_study_spec(tmp_path, "messages")


def test_large_images_are_one_line_each(spec, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 64 x 64 = 4096 pixels: a warning, not an error
    res = CliRunner().invoke(app, ["study", str(spec), "--dry-run"])
    assert res.exit_code == 0, res.output
    images = sorted(str(p) for p in (tmp_path / "data").rglob("*.png"))  # masks are images too
    lines = [line for line in res.output.splitlines() if "very large image" in line]
    assert len(lines) == len(images) == len(set(lines))  # each image once, one line each
    assert all(line.startswith("warning: ") for line in lines) and "LargeImageWarning" not in res.output
    assert sorted(line.removeprefix("warning: ").split(": very large")[0] for line in lines) == images


def test_broken_links_are_counted(spec, tmp_path):
    good = tmp_path / "data" / "fabric" / "train" / "good"
    (good / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (good / "loop.png").symlink_to(good / "loop.png")
    res = CliRunner().invoke(app, ["study", str(spec), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert res.output.count("warning: data/fabric: skipped 2 broken or looping link(s)") == 1, res.output


def test_a_method_out_of_memory_is_reported_once(spec, tmp_path, monkeypatch):
    from adspine.study import job

    def out_of_memory(*a, **k):
        raise MemoryError("cannot allocate 12 GiB")

    monkeypatch.setattr(job, "_run_method", out_of_memory)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as outside pytest: unhandled warnings reach stderr
    res = CliRunner().invoke(app, ["study", str(spec), "--db", str(tmp_path / "r.sqlite"), "--no-progress"])
    assert res.exit_code == 1, res.output
    assert res.output.count("cannot allocate 12 GiB") == 1 and "job failed" not in res.output, res.output
    assert "0 done, 1 failed, 1 method run(s) failed" in res.output
