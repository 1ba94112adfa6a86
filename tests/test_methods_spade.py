"""SPADE: image neighbours, patch galleries and maps against a brute-force numpy sort; K clipping; persistence."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import methods_fixtures as mf  # noqa: E402

from adspine.methods import knn  # noqa: E402
from adspine.methods.postprocess import gaussian_blur  # noqa: E402
from adspine.methods.spade import SPADE, SPADEError, nearest_patch_sq_dist  # noqa: E402

SIZE = (32, 32)


@pytest.fixture(autouse=True)
def _threads():
    mf.set_threads()


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Brute-force Euclidean distances (len(a), len(b)) in float64."""
    return np.sqrt(((a[:, None, :].astype(np.float64) - b[None, :, :].astype(np.float64)) ** 2).sum(-1))


def test_knn_helper_matches_bruteforce():
    rng = np.random.default_rng(0)
    base, queries = rng.normal(size=(200, 16)), rng.normal(size=(30, 16))
    dist, idx = knn.knn(base, queries, 7)
    full = _pairwise(queries, base)
    order = np.argsort(full, axis=1)[:, :7]
    np.testing.assert_array_equal(idx, order)
    np.testing.assert_allclose(dist, np.take_along_axis(full, order, axis=1), rtol=1e-4)
    with pytest.raises(ValueError, match="k=201"):
        knn.knn(base, queries, 201)


@pytest.mark.parametrize("threads, block", [(1, 256), (2, 7), (3, 64)])
def test_nearest_patch_search_matches_float64_bruteforce(threads, block):
    """Features far from the origin (all-positive, offset 50, like ReLU maps) and a gallery holding near-duplicates
    of some queries: the centred float32 GEMM search stays within 1e-4 of float64 brute force."""
    gen = torch.Generator().manual_seed(0)
    train = torch.rand(6, 30, 16, generator=gen) * 4 + 50
    queries = torch.rand(45, 16, generator=gen) * 4 + 50
    queries[:5] = train[2, :5] + 1e-3 * torch.randn(5, 16, generator=gen)
    centre = train.mean(dim=(0, 1))
    images = [4, 2, 0]
    g = train - centre
    got = nearest_patch_sq_dist(queries - centre, g, g.square().sum(2), images, threads, block).sqrt()
    want = _pairwise(queries.numpy(), train[images].reshape(-1, 16).numpy()).min(axis=1)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4 * want[5:].min())


def _fitted(k=4, n=12, seed=0):
    train = mf.random_maps(n, seed=seed)
    model = SPADE(k=k).fit([m[i : i + 5] for m in train] for i in range(0, n, 5))  # uneven batches
    return model, train, mf.random_maps(3, seed=seed + 50)


def test_image_neighbours_and_score_match_bruteforce_sort():
    model, train, test = _fitted(k=4)
    pooled_train = train[-1].mean(dim=(2, 3)).numpy()
    pooled_test = test[-1].mean(dim=(2, 3)).numpy()
    full = _pairwise(pooled_test, pooled_train)
    order = np.argsort(full, axis=1)[:, :4]
    dist, idx = model.nearest_images(torch.from_numpy(pooled_test))
    np.testing.assert_array_equal(idx, order)
    want = np.take_along_axis(full, order, axis=1)
    np.testing.assert_allclose(dist, want, rtol=1e-5)
    np.testing.assert_allclose(model.predict(test, SIZE).scores, want.mean(axis=1), rtol=1e-5)


def test_pixel_map_matches_bruteforce_gallery():
    model, train, test = _fitted(k=4)
    pooled_train = train[-1].mean(dim=(2, 3)).numpy()
    pooled_test = test[-1].mean(dim=(2, 3)).numpy()
    order = np.argsort(_pairwise(pooled_test, pooled_train), axis=1)[:, :4]
    layer_maps = []
    for tr, te in zip(train, test):
        c, h, w = tr.shape[1:]
        per_image = []
        for b in range(3):
            gallery = tr[order[b]].permute(0, 2, 3, 1).reshape(-1, c).numpy()  # every patch of the K images
            queries = te[b].permute(1, 2, 0).reshape(-1, c).numpy()
            per_image.append(_pairwise(queries, gallery).min(axis=1).reshape(h, w))
        up = F.interpolate(torch.tensor(np.stack(per_image)).unsqueeze(1), size=SIZE, mode="bilinear")
        layer_maps.append(up.squeeze(1))
    want = gaussian_blur(torch.stack(layer_maps).mean(0).float(), 4.0).numpy()
    got = model.predict(test, SIZE).maps
    assert got.shape == (3, *SIZE) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_k_is_clipped_to_training_set_and_recorded(tmp_path):
    model, _, test = _fitted(k=50, n=6)
    assert model.k_effective_ == 6
    assert model.extra_state()["notes_"] == ["k=50 clipped to the 6 training images"]
    mf.check_roundtrip(model, test, SIZE, tmp_path / "clipped")


def test_rejects_mismatched_features():
    model, _, test = _fitted()
    with pytest.raises(ValueError, match="layer1 has shape"):
        model.predict([test[0], test[1][:, :3], test[2]], SIZE)
    with pytest.raises(SPADEError, match="k must be"):
        SPADE(k=0)


def test_rectangular_grid_finds_a_defect_where_it_is():
    """Grids 6 x 10 and 3 x 5 (input 48 x 80): a patch changed at row 4, column 7 of layer 0 in one test image is
    where its map peaks, and that image's map peak is above the other's."""
    grids = ((6, 10), (3, 5))
    train = mf.random_maps(8, channels=(6, 8), grids=grids, seed=1)
    test = mf.random_maps(2, channels=(6, 8), grids=grids, seed=2)
    test[0][0, :, 4, 7] += 8.0
    model = SPADE(k=3, sigma=1.0).fit([train])
    pred = model.predict(test, (48, 80))
    assert pred.maps.shape == (2, 48, 80)
    row, col = np.unravel_index(pred.maps[0].argmax(), (48, 80))
    assert (row // 8, col // 8) == (4, 7)
    assert pred.maps[0].max() > pred.maps[1].max()


def test_save_load_roundtrip_and_corruption(tmp_path):
    model, _, test = _fitted()
    mf.check_roundtrip(model, test, SIZE, tmp_path / "ok")
    for name in ("train.0", "centre.0", "pooled"):
        mf.check_corruption(model, tmp_path / name, name)


def test_separates_synthetic_defects():
    img, pix = mf.check_separation(SPADE(k=10), min_image_auroc=0.65)  # measured 0.71 (pixel 0.98)
    print(f"SPADE R18 random init: image AUROC {img:.3f}, pixel AUROC {pix:.3f}")
