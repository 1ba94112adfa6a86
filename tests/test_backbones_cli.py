"""``adspine backbones list/show``: the table, layer shapes, one-line errors."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from adspine.backbones import cli as bcli

from adspine.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setenv("ADSPINE_OFFLINE", "1")
    monkeypatch.setattr(bcli, "console", Console(width=250))


def test_list_family():
    res = runner.invoke(app, ["backbones", "list", "--family", "convnext"])
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
