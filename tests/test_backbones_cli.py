"""``adspine backbones list/show``: the table (and its plain / csv / json forms for pipes), layer shapes, one-line
errors; help texts free of reStructuredText markup."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest
import torch
import typer
from rich.console import Console
from typer.testing import CliRunner

from adspine.backbones import cli as bcli
from adspine.backbones.registry import list_specs
from adspine.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setenv("ADSPINE_OFFLINE", "1")
    monkeypatch.setattr(bcli, "console", Console(width=250))


def test_list_family():
    res = runner.invoke(app, ["backbones", "list", "--family", "convnext", "--format", "table"])
    assert res.exit_code == 0, res.output
    assert "4 backbones" in res.output and "convnext_large" in res.output and "resnet18" not in res.output
    assert "1344*" in res.output and "400*" in res.output  # measured dim a, d chosen here
    assert "IMAGENET1K_V1* (82.52)" in res.output  # convnext_tiny default tag with its top-1


def test_list_all_and_bad_family():
    res = runner.invoke(app, ["backbones", "list"])
    assert res.exit_code == 0 and "regnet_x_32gf" in res.output and "tf_efficientnet_lite2" in res.output
    res = runner.invoke(app, ["backbones", "list", "--family", "vit"])
    assert res.exit_code == 2 and "unknown backbone family 'vit'" in res.output


def test_show_shapes_and_errors():
    res = runner.invoke(app, ["backbones", "show", "wide_resnet50_2", "--size", "256", "--layers", "stride"])
    assert res.exit_code == 0, res.output
    assert "layer3" in res.output and "16 x 16" in res.output and "dim a = 1792" in res.output
    res = runner.invoke(app, ["backbones", "show", "resnet18", "--layers", "layer1,layer9"])
    assert res.exit_code == 2 and "'layer9'" in res.output and "valid:" in res.output
    res = runner.invoke(app, ["backbones", "show", "resnet19"])
    assert res.exit_code == 2 and "unknown backbone 'resnet19'" in res.output


COLUMNS = ["name", "family", "source", "thesis layers", "dim a", "d", "weights (top-1 %)", "offline here"]


def test_list_piped_is_plain_tab_separated_lines_never_cut(monkeypatch):
    """Not a terminal (80 columns, as rich assumes for a pipe): one tab-separated line per variant, names whole."""
    monkeypatch.setattr(bcli, "console", Console(width=80))
    res = runner.invoke(app, ["backbones", "list"])
    assert res.exit_code == 0, res.output
    rows = list(csv.reader(io.StringIO(res.stdout), delimiter="\t"))
    assert rows[0] == COLUMNS and {len(r) for r in rows} == {len(COLUMNS)}
    assert [r[0] for r in rows[1:]] == [s.name for s in list_specs()]
    assert "tf_efficientnet_lite2" in [r[0] for r in rows[1:]]
    table = runner.invoke(app, ["backbones", "list", "--format", "table"])  # the boxed table, piped: not cut either
    assert re.search(r"\btf_efficientnet_lite2\b", table.stdout) and f"{len(list_specs())} backbones" in table.stdout


def test_list_terminal_gets_the_table(monkeypatch):
    monkeypatch.setattr(bcli, "console", Console(width=250, force_terminal=True, color_system=None))
    res = runner.invoke(app, ["backbones", "list", "--family", "resnet"])
    assert res.exit_code == 0 and "backbones" in res.stdout and "┃ name" in res.stdout


def test_list_csv_and_json_agree():
    as_csv = runner.invoke(app, ["backbones", "list", "--family", "convnext", "--format", "csv"]).stdout
    as_json = runner.invoke(app, ["backbones", "list", "--family", "convnext", "--format", "json"]).stdout
    rows = list(csv.DictReader(io.StringIO(as_csv)))
    assert rows == json.loads(as_json)
    assert [r["name"] for r in rows] == ["convnext_tiny", "convnext_small", "convnext_base", "convnext_large"]
    assert rows[0]["thesis layers"] == "features.1, features.3, features.5" and rows[3]["dim a"] == "1344*"
    res = runner.invoke(app, ["backbones", "list", "--format", "xml"])
    assert res.exit_code == 2


def test_show_json_keeps_numbers_and_sends_the_note_to_stderr():
    res = runner.invoke(app, ["backbones", "show", "resnet18", "--format", "json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == [{"layer": f"layer{i}", "channels": c, "height x width": f"{g} x {g}", "stride": s}
                                      for i, c, g, s in ((1, 64, 56, 4), (2, 128, 28, 8), (3, 256, 14, 16))]
    assert "dim a = 448" in res.stderr


def _commands(group, path=()):
    for name, cmd in getattr(group, "commands", {}).items():
        yield (*path, name)
        yield from _commands(cmd, (*path, name))


def test_help_texts_carry_no_restructuredtext_markup():
    paths = [(), *_commands(typer.main.get_command(app))]
    assert ("backbones", "list") in paths and ("data", "summary") in paths and ("report",) in paths
    for path in paths:
        res = runner.invoke(app, [*path, "--help"], terminal_width=100)
        assert res.exit_code == 0, (path, res.output)
        assert not re.search(r"``|`[^`]+`|::|\\b", res.stdout), (path, res.stdout)
