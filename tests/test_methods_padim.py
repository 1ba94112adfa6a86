"""PaDiM: statistics and Mahalanobis distances against numpy/scipy, streaming fit, persistence, separation."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis

sys.path.insert(0, str(Path(__file__).parent))
import methods_fixtures as mf  # noqa: E402

from adspine.features import fuse, rd_indices  # noqa: E402
from adspine.methods import build_method  # noqa: E402
from adspine.methods.padim import GaussianAccumulator, PaDiM, select_and_fuse  # noqa: E402
from adspine.methods.postprocess import patch_scores_to_map  # noqa: E402

N, D, EPS = 14, 10, 0.01
SIZE = (32, 32)


@pytest.fixture(autouse=True)
def _threads():
    mf.set_threads()


def numpy_embedding(maps: list[torch.Tensor], idx: np.ndarray) -> np.ndarray:
    """(B, P, d) embedding built with numpy: integer-factor nearest upsampling = np.repeat."""
    h, w = maps[0].shape[-2:]
    parts = []
    for m in maps:
        a = m.numpy().astype(np.float64)
        a = np.repeat(np.repeat(a, h // a.shape[2], axis=2), w // a.shape[3], axis=3)
        parts.append(a)
    x = np.concatenate(parts, axis=1)[:, idx]
    return x.reshape(x.shape[0], x.shape[1], -1).transpose(0, 2, 1)


def _data(seed=0):
    train = mf.random_maps(N, seed=seed)
    # correlated channels and a per-position offset, so the covariances are far from identity
    mix = torch.randn(6, 6, generator=torch.Generator().manual_seed(7))
    train[0] = torch.einsum("ij,bjhw->bihw", mix, train[0]) + torch.linspace(0, 3, 64).view(1, 1, 8, 8)
    return train, mf.random_maps(3, seed=seed + 100)


def test_select_and_fuse_equals_fuse_then_index():
    maps = mf.random_maps(2)
    for d in (3, 10, 24):
        idx = rd_indices(24, d, seed=5)
        got = select_and_fuse(maps, idx)
        want = fuse(maps, "nearest") if idx is None else fuse(maps, "nearest")[:, idx]
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # a draw that takes no channel of the first layer still lives on the first layer's grid
    only_deep = torch.tensor([20, 23])
    assert select_and_fuse(maps, only_deep).shape == (2, 2, 8, 8)


def test_accumulator_matches_numpy_mean_and_cov():
    train, _ = _data()
    idx = rd_indices(24, D, 1024).numpy()
    x = numpy_embedding(train, idx)  # (N, P, d)
    acc = GaussianAccumulator(x.shape[1], D, chunk=20)  # chunks that do not divide P
    for i in range(N):  # stream one image at a time
        acc.update(torch.from_numpy(x[i : i + 1]).permute(1, 0, 2))
    np.testing.assert_allclose(acc.mean().numpy(), x.mean(axis=0), rtol=1e-10, atol=1e-12)
    cov = torch.cat([acc.covariance(c) for c in range(len(acc.ranges))]).numpy()
    for p in range(x.shape[1]):
        np.testing.assert_allclose(cov[p], np.cov(x[:, p], rowvar=False, ddof=1), rtol=1e-9, atol=1e-12)


def test_fit_mean_precision_and_mahalanobis_match_scipy():
    train, test = _data()
    model = PaDiM(d=D, rd_seed=1024, eps=EPS).fit([train])
    idx = rd_indices(24, D, 1024).numpy()
    np.testing.assert_array_equal(model.rd_idx.numpy(), idx)
    x = numpy_embedding(train, idx)
    xt = numpy_embedding(test, idx)
    got_dist = model.mahalanobis(select_and_fuse(test, torch.from_numpy(idx))).reshape(3, -1).numpy()
    for p in range(x.shape[1]):
        mu = x[:, p].mean(axis=0)
        cov = np.cov(x[:, p], rowvar=False, ddof=1) + EPS * np.eye(D)
        prec = np.linalg.inv(cov)
        np.testing.assert_allclose(model.mean[p].numpy(), mu, rtol=1e-5, atol=1e-6)
        w = model.whiten[p].numpy().astype(np.float64)
        assert np.allclose(np.triu(w, 1), 0)  # lower triangular L^-1
        np.testing.assert_allclose(w.T @ w, prec, rtol=1e-5, atol=1e-5 * np.abs(prec).max())
        for b in range(3):
            want = mahalanobis(xt[b, p], mu, prec)
            np.testing.assert_allclose(got_dist[b, p], want, rtol=1e-5)


def test_predict_map_is_postprocessed_mahalanobis_and_score_is_max():
    train, test = _data()
    model = PaDiM(d=D, eps=EPS).fit([train])
    pred = model.predict(test, SIZE)
    assert pred.maps.shape == (3, *SIZE) and pred.maps.dtype == np.float32 and pred.scores.dtype == np.float64
    dist = model.mahalanobis(select_and_fuse(test, model.rd_idx))
    np.testing.assert_array_equal(pred.maps, patch_scores_to_map(dist, SIZE, 4.0).numpy())
    np.testing.assert_array_equal(pred.scores, pred.maps.reshape(3, -1).max(axis=1))


@pytest.mark.parametrize("d", [D, None])
def test_streaming_fit_equals_one_shot(d):
    train, test = _data()
    one_shot = PaDiM(d=d).fit([train])
    streamed = PaDiM(d=d).fit(([m[i : i + 1] for m in train] for i in range(N)))  # generator of batches of 1
    assert streamed.n_train == one_shot.n_train == N
    torch.testing.assert_close(streamed.mean, one_shot.mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(streamed.whiten, one_shot.whiten, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(streamed.predict(test, SIZE).maps, one_shot.predict(test, SIZE).maps, rtol=1e-5)


def test_chunking_over_positions_does_not_change_results(monkeypatch):
    import adspine.methods.padim as padim

    train, test = _data()
    whole = PaDiM(d=D).fit([train])
    monkeypatch.setattr(padim, "POSITION_CHUNK", 7)  # 64 positions -> 10 chunks of sums, the last one partial
    monkeypatch.setattr(padim, "SCORE_BUFFER_ELEMENTS", 3 * D * 5)  # 3 images -> 5 positions per scoring chunk
    chunked = PaDiM(d=D).fit([train])
    torch.testing.assert_close(chunked.whiten, whole.whiten, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(chunked.predict(test, SIZE).maps, whole.predict(test, SIZE).maps, rtol=1e-5)


def test_without_rd_keeps_all_channels_and_rejects_other_features():
    train, test = _data()
    model = build_method("padim").fit([train])
    assert model.mean.shape == (64, 24) and model.whiten.shape == (64, 24, 24)
    with pytest.raises(ValueError, match="channels"):
        model.predict([test[0][:, :5], test[1], test[2]], SIZE)
    with pytest.raises(ValueError, match="at least 2"):
        PaDiM().fit([[m[:1] for m in train]])


def test_singular_covariance_without_eps_is_a_clear_error():
    train, _ = _data()
    train[1] = torch.zeros_like(train[1])  # constant channels: zero variance
    with pytest.raises(ValueError, match="not positive definite"):
        PaDiM(eps=0.0).fit([train])


def test_save_load_roundtrip_and_corruption(tmp_path):
    train, test = _data()
    model = PaDiM(d=D, rd_seed=3).fit([train])
    mf.check_roundtrip(model, test, SIZE, tmp_path / "ok")
    for name in ("whiten", "rd_indices"):
        mf.check_corruption(model, tmp_path / name, name)


def test_separates_synthetic_defects():
    img, pix = mf.check_separation(PaDiM(d=100, rd_seed=1024), min_image_auroc=0.85)  # measured 0.98
    print(f"PaDiM R18 random init: image AUROC {img:.3f}, pixel AUROC {pix:.3f}")
