"""Shared helpers: fuse, Rd indices, map post-processing, result store."""

import random

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter, zoom  # noqa: F401

from adspine.features import DEFAULT_RD_SCHEME, RD_SCHEMES, fuse, rd_indices
from adspine.methods.postprocess import gaussian_blur, gaussian_kernel1d, patch_scores_to_map
from adspine.study.store import ResultStore


def test_fuse_nearest_matches_repeat():
    a = torch.randn(2, 3, 8, 8)
    b = torch.randn(2, 5, 4, 4)
    out = fuse([a, b])
    assert out.shape == (2, 8, 8, 8)
    assert torch.equal(out[:, :3], a)
    expected = b.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert torch.equal(out[:, 3:], expected)


def test_rd_indices_torch_scheme_seeded_sorted_and_none_when_no_reduction():
    i1, i2 = rd_indices(448, 100, 1024, scheme="torch"), rd_indices(448, 100, 1024, scheme="torch")
    assert torch.equal(i1, i2) and len(i1) == 100 and len(set(i1.tolist())) == 100
    assert torch.all(i1[1:] > i1[:-1])
    assert not torch.equal(i1, rd_indices(448, 100, 7, scheme="torch"))
    gen = torch.Generator().manual_seed(1024)
    assert torch.equal(i1, torch.randperm(448, generator=gen)[:100].sort().values)
    for scheme in RD_SCHEMES:
        assert rd_indices(64, None, scheme=scheme) is None and rd_indices(64, 64, scheme=scheme) is None
        with pytest.raises(ValueError, match="d=0"):
            rd_indices(64, 0, scheme=scheme)


@pytest.mark.parametrize(("total", "d"), [(448, 100), (1792, 550)])
def test_rd_indices_reference_scheme_is_the_padim_reference_draw(total, d):
    """The PaDiM reference code: random.seed(1024); idx = random.sample(range(0, t_d), d), used unsorted."""
    state = random.getstate()
    try:
        random.seed(1024)
        expected = random.sample(range(0, total), d)
        random.seed(99)
        after_reseed = random.random()
        random.seed(99)
        got = rd_indices(total, d, 1024, scheme="reference")
        assert random.random() == after_reseed  # the global random state is not touched
    finally:
        random.setstate(state)
    assert got.dtype == torch.long and got.tolist() == expected
    assert torch.equal(rd_indices(total, d, 1024), got)  # the default scheme
    assert DEFAULT_RD_SCHEME == "reference"


def test_rd_indices_unknown_scheme_names_it_and_the_valid_ones():
    with pytest.raises(ValueError, match="'numpy'.*reference, torch"):
        rd_indices(448, 100, 1024, scheme="numpy")


def test_kernel_has_33_taps_for_sigma_4():
    assert gaussian_kernel1d(4.0).numel() == 33


@pytest.mark.parametrize("shape", [(40, 50), (9, 7)])
def test_blur_equals_scipy_gaussian_filter(shape):
    rng = np.random.default_rng(0)
    x = rng.random((2, *shape)).astype(np.float32)
    ours = gaussian_blur(torch.from_numpy(x), 4.0).numpy()
    ref = np.stack([gaussian_filter(m.astype(np.float64), 4.0, mode="reflect", truncate=4.0) for m in x])
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("grid, size, sigma", [((7, 7), (28, 28), 4.0), ((7, 9), (30, 50), 4.0),
                                               ((28, 28), (224, 224), 4.0), ((5, 6), (5, 6), 2.0),
                                               ((6, 4), (24, 16), 0.0)])
def test_patch_scores_to_map_bilinear_then_blur(grid, size, sigma):
    s = torch.rand(2, *grid)
    up = torch.nn.functional.interpolate(s[:, None], size=size, mode="bilinear", align_corners=False)[:, 0].double()
    ref = np.stack([gaussian_filter(u.numpy(), sigma, mode="reflect", truncate=4.0) if sigma else u.numpy()
                    for u in up])
    np.testing.assert_allclose(patch_scores_to_map(s, size, sigma).numpy(), ref, atol=1e-5)


def test_store_roundtrip_replaces_rows_and_rejects_unknown_columns(tmp_path):
    db = tmp_path / "r.sqlite"
    with ResultStore(db) as s:
        s.record_job({"job_id": "j1", "status": "done", "layers": ["layer1"]}, [{"method": "padim", "rd_seed": 1, "image_auroc": 0.5}])
        s.record_job({"job_id": "j1", "status": "done", "layers": ["layer1"]}, [{"method": "padim", "rd_seed": 1, "image_auroc": 0.75}],
                     [{"method": "padim", "rd_seed": 1, "idx": 0, "amap": np.ones((3, 3), np.float16), "mask": np.zeros((3, 3), bool)}])
        s.record_job({"job_id": "j2", "status": "failed", "error": "boom"})
        with pytest.raises(KeyError, match="bogus"):
            s.record_job({"job_id": "j3", "bogus": 1})
    with ResultStore(db) as s:
        rows = s.rows()
        assert [r["image_auroc"] for r in rows] == [0.75]
        assert rows[0]["layers"] == '["layer1"]'
        assert s.done_job_ids() == {"j1"}
        assert s.jobs("failed")[0]["error"] == "boom"
        ex = s.examples("j1", "padim", 1)
        assert ex[0]["amap"].dtype == np.float16 and ex[0]["mask"].shape == (3, 3)
