"""bfloat16 screen of the exact nearest-patch search: its candidates always hold the nearest row (float64 brute force),
on galleries made to be hard for it (offsets, unequal scales, near and exact duplicates, channel counts that force
dropped coordinates, tiles cut short)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import methods_fixtures as mf  # noqa: E402

from adspine.methods import screen as scr  # noqa: E402
from adspine.methods.spade import SPADE, nearest_patch_sq_dist, screened_sq_dist  # noqa: E402


@pytest.fixture(autouse=True)
def _threads(monkeypatch):
    mf.set_threads()
    monkeypatch.setattr(scr, "MIN_MACS", 0)  # screen even these small searches
    monkeypatch.setattr(scr, "MAX_KEPT", 1.0)  # and every query (the fallback has its own test)


def test_bound_holds_for_this_builds_gemm():
    assert scr.probe_ok()  # (SPADE falls back to the float32 search where it does not)


def _brute(queries: torch.Tensor, rows: torch.Tensor) -> np.ndarray:
    """Squared distance (Q,) to the nearest of ``rows`` (R, C), float64 from differences."""
    q, r = queries.double().numpy(), rows.double().numpy()
    return ((q[:, None, :] - r[None, :, :]) ** 2).sum(-1).min(axis=1)


def _gallery(n, p, c, seed, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    scales = torch.rand(c, generator=gen) * 3 + 0.01
    rows = torch.randn(n, p, c, generator=gen) * scales + offset
    queries = torch.randn(70, c, generator=gen) * scales + offset
    k = min(6, p)
    queries[:k] = rows[n // 2, :k] + 1e-4 * torch.randn(k, c, generator=gen)  # near-duplicates
    queries[6 : 6 + min(3, p)] = rows[n - 1, -3:]  # exact duplicates (distance 0)
    if p > 5:
        rows[0, 5] = rows[0, 4]  # a repeated gallery row
    centre = rows.mean(dim=(0, 1))
    return rows - centre, queries - centre


@pytest.mark.parametrize("call_s", [0.0, 1.0])  # pass 2 tile by tile / whole images
@pytest.mark.parametrize("n, p, c", [(4, 300, 16), (3, 257, 64), (5, 49, 30), (2, 600, 100), (3, 130, 128),
                                     (2, 70, 320), (1, 1, 3)])
def test_candidates_hold_the_nearest_row(n, p, c, call_s, monkeypatch):
    monkeypatch.setattr(scr, "TILE_CALL_S", call_s)
    rows, queries = _gallery(n, p, c, seed=c + p, offset=40.0)
    screen = scr.GalleryScreen(rows)
    images = list(range(n))[::-1]
    got, unscreened = screened_sq_dist(queries, screen, images)
    assert unscreened.numel() == 0
    got = got.double().numpy()
    want = _brute(queries, rows[images].reshape(-1, c))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    qi, flat_rows, _ = screen.candidates(queries, images)
    assert qi.numel() < 0.25 * len(queries) * n * p or n * p < 300  # it screens, not only passes everything


def test_queries_in_chunks_give_the_exact_nearest(monkeypatch):
    rows, queries = _gallery(3, 120, 20, seed=5)
    monkeypatch.setattr(scr, "QUERY_CHUNK", 16)  # 70 queries: 5 chunks, the last one short
    got = screened_sq_dist(queries, scr.GalleryScreen(rows), [0, 1, 2])[0].double().numpy()
    np.testing.assert_allclose(got, _brute(queries, rows.reshape(-1, 20)), rtol=1e-6, atol=1e-9)


def test_subset_of_images_only_searches_those_images():
    rows, queries = _gallery(5, 200, 24, seed=3)
    screen = scr.GalleryScreen(rows)
    qi, flat_rows, _ = screen.candidates(queries, [3, 1])
    assert set((flat_rows // 200).tolist()) <= {1, 3}
    got = screened_sq_dist(queries, screen, [3, 1])[0].double().numpy()
    np.testing.assert_allclose(got, _brute(queries, rows[[3, 1]].reshape(-1, 24)), rtol=1e-6, atol=1e-9)


def test_nearest_patch_search_is_the_same_with_and_without_the_screen():
    rows, queries = _gallery(6, 150, 40, seed=7, offset=50.0)
    sq = rows.square().sum(2)
    plain = nearest_patch_sq_dist(queries, rows, sq, [5, 0, 2], threads=2)
    screened = nearest_patch_sq_dist(queries, rows, sq, [5, 0, 2], threads=2, screen=scr.GalleryScreen(rows))
    want = _brute(queries, rows[[5, 0, 2]].reshape(-1, 40))
    np.testing.assert_allclose(screened.double().numpy(), want, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(plain.double().numpy(), want, rtol=1e-4, atol=1e-6)


def test_spade_maps_equal_with_and_without_the_screen():
    train, test = mf.random_maps(10, channels=(40, 64, 70), seed=1), mf.random_maps(3, channels=(40, 64, 70), seed=9)
    model = SPADE(k=4).fit([train])
    model._screens = [scr.GalleryScreen(t) for t in model.train_]
    screened = model.predict(test, (32, 32))
    model._screens = [None] * len(model.train_)
    plain = model.predict(test, (32, 32))
    np.testing.assert_allclose(screened.maps, plain.maps, rtol=2e-5, atol=1e-6)
    np.testing.assert_array_equal(screened.scores, plain.scores)


def test_features_without_structure_fall_back_to_the_float32_search(monkeypatch):
    """i.i.d. noise in 64-d: all distances alike, the screen keeps most tiles; those queries come back unscreened
    and the float32 search answers them, exactly as without the screen."""
    monkeypatch.setattr(scr, "MAX_KEPT", 0.05)
    gen = torch.Generator().manual_seed(11)
    rows, queries = torch.randn(6, 512, 64, generator=gen), torch.randn(80, 64, generator=gen)
    screen = scr.GalleryScreen(rows)
    _, _, unscreened = screen.candidates(queries, range(6))
    assert unscreened.numel() > 40
    got = nearest_patch_sq_dist(queries, rows, rows.square().sum(2), list(range(6)), threads=2, screen=screen)
    np.testing.assert_allclose(got.double().numpy(), _brute(queries, rows.reshape(-1, 64)), rtol=1e-4, atol=1e-6)
