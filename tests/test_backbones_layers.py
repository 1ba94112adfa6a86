"""Layer records: ``FeatureExtractor.layer_info`` grids equal the real output shapes, also for rectangular inputs;
``layer_names`` / ``channels`` / ``strides`` read from the same records; the init vocabulary."""

from __future__ import annotations

import pytest
import torch

from adspine.backbones.extractor import LayerError, build_extractor
from adspine.backbones.init_names import (
    INIT_CHOICES,
    RANDOM_SCHEMES,
    SEEDED_INITS,
    InitError,
    init_label,
    is_pretrained,
    parse_init,
)
from adspine.features import LayerInfo

SIZES = [(64, 256), (67, 131), (96, 64), 80]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "tf_efficientnet_lite0"])
def test_grids_equal_the_real_output_shapes(name):
    """Grids equal the maps the extractor returns (tf_efficientnet_lite0 pads TF-"same" at run time)."""
    ext = build_extractor(name, init="random", layers="stride")
    for size in SIZES:
        h, w = (size, size) if isinstance(size, int) else size
        maps = ext(torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0)))
        recs = ext.layer_info(size)
        assert all(isinstance(r, LayerInfo) for r in recs)
        assert [r.grid for r in recs] == [tuple(m.shape[-2:]) for m in maps], (name, size)
        assert [r.channels for r in recs] == [m.shape[1] for m in maps]
        assert [r.name for r in recs] == ext.layer_names and [r.stride for r in recs] == ext.strides == [4, 8, 16]
    assert ext.layer_info((64, 256)) is ext.layer_info([64, 256])  # cached per size
    assert ext.layer_info(80) == ext.layer_info((80, 80))


def _out(n: int, k: int, s: int, p: int) -> int:
    """Output length of a conv / pool without ceil mode (PyTorch's formula)."""
    return (n + 2 * p - k) // s + 1


def test_odd_sizes_round_as_the_network_does():
    r18 = build_extractor("resnet18", init="random")
    for h, w in ((67, 131), (65, 129), (63, 127)):
        g = [_out(_out(n, 7, 2, 3), 3, 2, 1) for n in (h, w)]  # stem conv, max-pool: layer1 grid
        want = [tuple(g)]
        for _ in range(2):  # layer2, layer3: first 3x3 conv stride 2, padding 1
            g = [_out(n, 3, 2, 1) for n in g]
            want.append(tuple(g))
        assert [r.grid for r in r18.layer_info((h, w))] == want
    alex = build_extractor("alexnet", init="random", layers=["features.0", "features.2", "features.5"])
    c1 = [_out(n, 11, 4, 2) for n in (64, 100)]  # not n / 4: 15 x 24
    p1 = [_out(n, 3, 2, 0) for n in c1]
    p2 = [_out(n, 3, 2, 0) for n in p1]  # conv 5x5 padding 2 keeps the size before the second pool
    assert [r.grid for r in alex.layer_info((64, 100))] == [tuple(c1), tuple(p1), tuple(p2)] == [(15, 24), (7, 11),
                                                                                                (3, 5)]


def test_attributes_come_from_the_records():
    ext = build_extractor("resnet18", init="random")
    assert ext.layers == ext.layer_info(224)
    assert ext.layer_names == ["layer1", "layer2", "layer3"] and ext.channels == [64, 128, 256]
    assert ext.strides == [4, 8, 16] and [r.grid for r in ext.layers] == [(56, 56), (28, 28), (14, 14)]
    assert ext.flops((64, 128)) == 2 * ext.flops(64) > 0


def test_bad_sizes_are_one_line_errors():
    ext = build_extractor("resnet18", init="random")
    for bad in (0, (64,), (64, 64, 3), "64", 64.0, True, (-1, 64)):
        with pytest.raises(LayerError, match="image size must be a positive int or \\(H, W\\)"):
            ext.layer_info(bad)


def test_init_vocabulary():
    assert RANDOM_SCHEMES == ("kaiming_normal", "xavier_uniform", "orthogonal")
    assert SEEDED_INITS == ("random", "kaiming_normal", "xavier_uniform", "orthogonal")
    assert INIT_CHOICES == ("imagenet", "imagenet:<TAG>", "random", "kaiming_normal", "xavier_uniform", "orthogonal",
                            "file:PATH")
    assert parse_init("imagenet") == ("imagenet", None) and parse_init("imagenet:IMAGENET1K_V2") == ("imagenet",
                                                                                                     "IMAGENET1K_V2")
    assert parse_init("file:/a/b:c.pth") == ("file", "/a/b:c.pth") and parse_init("orthogonal") == ("orthogonal", None)
    for bad in ("", "foo", "random:3", "file:", "kaiming", None, 3):
        with pytest.raises(InitError, match="valid: imagenet, imagenet:<TAG>, random, kaiming_normal"):
            parse_init(bad)
    labels = {i: init_label(i) for i in ("imagenet", "imagenet:IMAGENET1K_V2", "random", "xavier_uniform",
                                         "file:/w/x.safetensors")}
    assert labels == {"imagenet": "ImageNet", "imagenet:IMAGENET1K_V2": "ImageNet IMAGENET1K_V2", "random": "random",
                      "xavier_uniform": "xavier_uniform", "file:/w/x.safetensors": "file"}
    assert [is_pretrained(i) for i in ("imagenet:V1", "file:x", "random", "orthogonal")] == [True, True, False, False]
