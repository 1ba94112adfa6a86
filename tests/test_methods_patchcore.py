"""PatchCore: coreset against a naive greedy loop, feature aggregation against a manual computation, scores against
brute force (squared and Euclidean, incl. Eq. 7 re-weighting), the pruned exact search against float64 brute force
(weak and strong pruning, ties), rectangular grids, layer fallback, persistence, separation."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import methods_fixtures as mf  # noqa: E402

from adspine.methods.patchcore import (  # noqa: E402
    PatchCore,
    PatchCoreSettingError,
    _assemble,
    _disjoint,
    _gather_rows,
    _layer_parts,
    aggregate,
    greedy_coreset,
    project_parts,
)
from adspine.methods.knn import PRECISIONS, NearestBank  # noqa: E402
from adspine.methods.postprocess import patch_scores_to_map  # noqa: E402

SIZE = (32, 32)


@pytest.fixture(autouse=True)
def _threads():
    mf.set_threads()


def naive_greedy(x: np.ndarray, n: int, starts: list[int]) -> list[int]:
    """Textbook greedy k-center in float64, one explicit difference per step."""
    x = x.astype(np.float64)
    min_d = np.mean([np.linalg.norm(x - x[s], axis=1) for s in starts], axis=0)
    picked = []
    for _ in range(n):
        j = int(np.argmax(min_d))
        picked.append(j)
        min_d = np.minimum(min_d, np.linalg.norm(x - x[j], axis=1))
    return picked


@pytest.mark.parametrize("starts", [[17], [3, 99, 250, 7, 311, 42, 0, 128, 64, 200]])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_coreset_equals_naive_greedy_loop(starts, dtype):
    gen = torch.Generator().manual_seed(1)
    scale = torch.rand(400, 1, generator=gen, dtype=torch.float64)
    x = torch.randn(400, 24, generator=gen, dtype=torch.float64) * scale
    got = greedy_coreset(x.to(dtype), 60, torch.tensor(starts))
    assert got.tolist() == naive_greedy(x.numpy(), 60, starts)
    assert len(set(got.tolist())) == 60


def _bruteforce(bank: torch.Tensor, queries: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Float64 squared distances to the nearest row and its first index (numpy argmin)."""
    d2 = ((queries.double().numpy()[:, None, :] - bank.double().numpy()[None]) ** 2).sum(-1)
    return d2.min(1), d2.argmin(1)


def _low_rank(n: int, gen: torch.Generator, basis: torch.Tensor, noise: float) -> torch.Tensor:
    return torch.randn(n, basis.shape[0], generator=gen) @ basis + noise * torch.randn(n, basis.shape[1], generator=gen)


def _search_data(kind: str):
    gen = torch.Generator().manual_seed(7)
    if kind == "isotropic":  # no principal direction: the bound prunes little
        return torch.randn(300, 48, generator=gen), torch.randn(200, 48, generator=gen)
    basis = torch.randn(4, 48, generator=gen)
    bank = _low_rank(300, gen, basis, 1e-3)
    queries = torch.cat([_low_rank(100, gen, basis, 1e-3), _low_rank(50, gen, basis, 0.0), bank[::7]])
    if kind == "low_rank_offset":  # far from the origin: |x|^2 >> |x - y|^2 without the centring
        bank, queries = bank + 1000.0, queries + 1000.0
    return bank, queries  # queries: off-subspace, exactly in the subspace, bank rows (distance 0)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kind", ["isotropic", "low_rank", "low_rank_offset"])
def test_pruned_search_equals_float64_bruteforce(kind, precision):
    bank, queries = _search_data(kind)
    search = NearestBank(bank, components=8, leaf=8, block=64, precision=precision)  # 3 blocks, a short last run
    d2, idx = search.search(queries)
    want_d2, want_idx = _bruteforce(bank, queries)
    assert idx.tolist() == want_idx.tolist()
    np.testing.assert_allclose(d2.numpy(), want_d2, rtol=1e-5, atol=1e-9)
    assert d2.dtype == torch.float64 and idx.dtype == torch.int64
    if kind == "low_rank":  # the bound leaves a few candidates per query out of 300 rows
        assert search.last_candidates < 30, search.last_candidates


@pytest.mark.parametrize("precision", PRECISIONS)
def test_pruned_search_ties_and_duplicates_give_the_exact_minimum_and_first_index(precision):
    gen = torch.Generator().manual_seed(3)
    base = torch.randint(-4, 5, (40, 16), generator=gen).float()  # integers: every distance exact in float32
    bank = torch.cat([base, base[:10], base[5:15]])[torch.randperm(60, generator=gen)]  # duplicated rows
    mid = base[:8].clone()
    mid[:, 0] += 1.0  # at distance 1 from base[i]; a copy at distance 1 on the other side ties with it
    twin = base[:8].clone()
    twin[:, 0] += 2.0
    bank = torch.cat([bank, twin])
    queries = torch.cat([base, mid, torch.zeros(3, 16)])
    d2, idx = NearestBank(bank, components=4, leaf=8, block=16, precision=precision).search(queries)
    want_d2, want_idx = _bruteforce(bank, queries)
    np.testing.assert_array_equal(d2.numpy(), want_d2)
    assert idx.tolist() == want_idx.tolist()


def _near_tie_data(n_bank: int = 700, dim: int = 96):
    """Non-negative, offset features (like ReLU maps) with rows a hair apart: bfloat16 cannot tell them apart."""
    gen = torch.Generator().manual_seed(11)
    bank = torch.relu(torch.randn(n_bank, dim, generator=gen) + 0.5) * (1 + torch.rand(n_bank, 1, generator=gen))
    bank[1::2] = bank[::2] + 1e-3 * torch.randn(n_bank // 2, dim, generator=gen)  # pairs of near-duplicates
    queries = bank[::2][:150] + 3e-4 * torch.randn(150, dim, generator=gen)
    return bank + 3.0, torch.cat([queries + 3.0, torch.relu(torch.randn(50, dim, generator=gen)) + 3.0])


def test_bfloat16_search_on_offset_near_duplicates_equals_float64_bruteforce():
    bank, queries = _near_tie_data()
    search = NearestBank(bank, components=60, leaf=32, block=128, precision="bfloat16")  # 2 bands, 2 blocks
    d2, idx = search.search(queries)
    want_d2, want_idx = _bruteforce(bank, queries)
    assert idx.tolist() == want_idx.tolist()
    np.testing.assert_allclose(d2.numpy(), want_d2, rtol=1e-5, atol=1e-9)


def test_bfloat16_search_without_its_error_bound_misses_nearest_rows(monkeypatch):
    """The data above needs the bound: with the rounding allowance set to zero the screen drops true neighbours (they
    are found again by the exact fallback, which is switched off here to see it)."""
    from adspine.methods import screen

    monkeypatch.setattr(NearestBank, "_exhaustive", lambda self, q: (torch.zeros(len(q), dtype=torch.float64),
                                                                     torch.full((len(q),), -1)))
    monkeypatch.setattr(screen, "U", 0.0)
    monkeypatch.setattr(screen, "bound_coefficients", lambda *args, **kwargs: (0.0, 0.0, 0.0))
    bank, queries = _near_tie_data()
    _, idx = NearestBank(bank, components=60, leaf=32, block=128, precision="bfloat16").search(queries)
    assert idx.tolist() != _bruteforce(bank, queries)[1].tolist()


def _perturbed_projection(search: NearestBank, queries: torch.Tensor, size: float) -> torch.Tensor:
    """The queries' exact projection plus an error of norm ``size`` per row (float64 reference, float32 result)."""
    exact = (queries.double() - search.centre.double()) @ search.basis.double()
    noise = torch.randn(exact.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return (exact + size * noise / noise.norm(dim=1, keepdim=True)).float()


def test_bfloat16_search_with_the_callers_projection_honours_its_error_bound(monkeypatch):
    bank, queries = _near_tie_data()
    search = NearestBank(bank, components=60, leaf=32, block=128, precision="bfloat16")
    proj = _perturbed_projection(search, queries, 1.0)
    want = _bruteforce(bank, queries)
    d2, idx = search.search(queries, proj, proj_err=1.0)
    assert idx.tolist() == want[1].tolist()
    np.testing.assert_allclose(d2.numpy(), want[0], rtol=1e-5, atol=1e-9)
    _, idx = search.search(queries, proj, proj_err=0.0)  # the same error, not declared: some winners are not
    assert idx.tolist() == want[1].tolist() and search.last_fallback > 0  # certified, the exact search finds them
    monkeypatch.setattr(NearestBank, "_exhaustive", lambda self, q: (torch.zeros(len(q), dtype=torch.float64),
                                                                     torch.full((len(q),), -1)))
    _, idx = search.search(queries, proj, proj_err=0.0)  # without that fallback true neighbours are lost
    assert idx.tolist() != want[1].tolist()
    with pytest.raises(ValueError, match=r"proj must be \(200, 60\)"):
        search.search(queries, proj[:, :5])


@pytest.mark.parametrize(
    "channels, grids, target",
    [
        ((128, 256), ((28, 28), (14, 14)), 1024),  # ResNet-18 at 224 px
        ((12, 20), ((6, 10), (3, 5)), 64),  # rectangular
        ((5, 7, 3), ((8, 6), (4, 3), (2, 2)), 48),  # three layers, each its own third of the columns
    ],
)
def test_projection_per_layer_grid_equals_projection_of_the_embedding(channels, grids, target):
    """Projected per layer on its own grid then resized = the assembled embedding projected, within the bound."""
    gen = torch.Generator().manual_seed(2)
    maps = [torch.relu(torch.randn(2, c, h, w, generator=gen)) + 2.0 for c, (h, w) in zip(channels, grids)]
    parts = _layer_parts(maps, target)
    assert _disjoint(parts, target)
    emb = _assemble(parts, grids[0], target).reshape(-1, target)
    torch.testing.assert_close(emb, aggregate(maps, target).reshape(-1, target), rtol=0, atol=0)
    centre = emb.mean(dim=0) + 0.5
    basis = torch.linalg.qr(torch.randn(target, 24, generator=gen, dtype=torch.float64))[0].float()
    proj, err = project_parts(parts, grids[0], centre, basis)
    want = (emb.double() - centre.double()) @ basis.double()
    gap = float((proj.double() - want).norm(dim=1).max())
    assert proj.shape == (emb.shape[0], 24) and gap <= err, (gap, err)
    assert err < 1e-3 * float(emb.norm(dim=1).max()), err  # a float32 rounding allowance, not a blanket


def test_pruned_search_precision_choice():
    from adspine.methods.screen import fast_bf16

    bank = torch.randn(50, 8)
    assert NearestBank(bank).precision == ("bfloat16" if fast_bf16() else "float32")
    with pytest.raises(ValueError, match="precision must be auto, float32 or bfloat16, got 'half'"):
        NearestBank(bank, precision="half")


def test_pruned_search_rejects_wrong_query_width():
    with pytest.raises(ValueError, match=r"queries must be \(Q, 8\)"):
        NearestBank(torch.randn(20, 8)).search(torch.randn(3, 5))


def _pool1d(v: np.ndarray, out: int) -> np.ndarray:
    """Adaptive average pooling by its definition: bin i covers [floor(i L / out), ceil((i + 1) L / out))."""
    n = len(v)
    return np.array([v[(i * n) // out : math.ceil((i + 1) * n / out)].mean() for i in range(out)])


def _neighbourhood(m: np.ndarray, y: int, x: int) -> np.ndarray:
    """Flattened (C, 3, 3) neighbourhood with zero padding."""
    c, h, w = m.shape
    out = np.zeros((c, 3, 3))
    for dy in range(3):
        for dx in range(3):
            yy, xx = y + dy - 1, x + dx - 1
            if 0 <= yy < h and 0 <= xx < w:
                out[:, dy, dx] = m[:, yy, xx]
    return out.reshape(-1)


def _bilinear(grid: np.ndarray, y: int, x: int, out_hw: tuple[int, int]) -> np.ndarray:
    """Value of grid (h, w, T) at output pixel (y, x), align_corners=False."""
    h, w = grid.shape[:2]

    def src(i, n_in, n_out):
        s = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(s)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        return i0, i1, s - i0

    y0, y1, fy = src(y, h, out_hw[0])
    x0, x1, fx = src(x, w, out_hw[1])
    top = (1 - fx) * grid[y0, x0] + fx * grid[y0, x1]
    bottom = (1 - fx) * grid[y1, x0] + fx * grid[y1, x1]
    return (1 - fy) * top + fy * bottom


def test_aggregation_shape_and_value_match_manual_computation():
    l2, l3 = mf.random_maps(2, channels=(5, 7), grids=((6, 6), (3, 3)), seed=3)
    target = 16
    got = aggregate([l2, l3], target)
    assert got.shape == (2, 6, 6, target)
    a2, a3 = l2.numpy().astype(np.float64), l3.numpy().astype(np.float64)
    b = 1
    pooled3 = np.stack([[_pool1d(_neighbourhood(a3[b], y, x), target) for x in range(3)] for y in range(3)])
    for y, x in [(0, 0), (2, 3), (5, 4)]:  # border and interior positions
        v2 = _pool1d(_neighbourhood(a2[b], y, x), target)
        v3 = _bilinear(pooled3, y, x, (6, 6))
        want = _pool1d(np.concatenate([v2, v3]), target)
        np.testing.assert_allclose(got[b, y, x].numpy(), want, rtol=1e-5, atol=1e-6)


def _authors_aggregate(maps: list[torch.Tensor], target: int) -> torch.Tensor:
    """The authors' aggregation in float64, literally: per layer unfold + adaptive_avg_pool1d, resize to the first
    grid, stack layer-major, pool again."""
    import torch.nn.functional as F

    ref = maps[0].shape[-2:]
    per_layer = []
    for m in maps:
        b, c, h, w = m.shape
        u = F.unfold(m.double(), kernel_size=3, stride=1, padding=1).transpose(1, 2).reshape(b * h * w, 1, c * 9)
        p = F.adaptive_avg_pool1d(u, target).reshape(b, h, w, target).permute(0, 3, 1, 2)
        if p.shape[-2:] != ref:
            p = F.interpolate(p, size=tuple(ref), mode="bilinear", align_corners=False)
        per_layer.append(p.permute(0, 2, 3, 1))
    x = torch.stack(per_layer, dim=3)
    b, h, w = x.shape[:3]
    return F.adaptive_avg_pool1d(x.reshape(b * h * w, 1, -1), target).reshape(b, h, w, target)


@pytest.mark.parametrize(
    "channels, grids, target",
    [
        ((128, 256), ((28, 28), (14, 14)), 1024),  # ResNet-18 layers 2-3 at 224 px: grouped kernels
        ((12, 20), ((6, 10), (3, 5)), 64),  # rectangular grids
        ((7,), ((5, 9),), 16),  # one layer, pooling bins straddling channels
        ((5, 7, 3), ((8, 6), (4, 3), (2, 2)), 16),  # three layers: final bins straddle layers
        ((3, 6), ((4, 4), (7, 5)), 40),  # target above 9 * channels; deeper grid larger than the first
        ((6, 10), ((5, 5), (3, 3)), 33),  # odd target: the final bins do not split evenly
    ],
)
def test_aggregation_equals_authors_unfold_pool_resize_stack_pool(channels, grids, target):
    gen = torch.Generator().manual_seed(sum(channels) + target)
    maps = [torch.randn(2, c, h, w, generator=gen) for c, (h, w) in zip(channels, grids)]
    got = aggregate(maps, target)
    want = _authors_aggregate(maps, target)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-5
    got64 = aggregate([m.double() for m in maps], target)
    torch.testing.assert_close(got64, want, rtol=1e-12, atol=1e-12)


def test_gather_rows_equals_concatenate_then_index():
    chunks = [torch.randn(n, 3) for n in (5, 1, 7, 4)]
    rows = torch.tensor([16, 0, 5, 6, 12, 3, 11])
    torch.testing.assert_close(_gather_rows(chunks, rows), torch.cat(chunks)[rows], rtol=0, atol=0)


def _fitted(**kw):
    train = mf.random_maps(6, seed=0)
    model = PatchCore(target_dim=32, proj_dim=8, **kw).fit([m[i : i + 2] for m in train] for i in range(0, 6, 2))
    return model, train, mf.random_maps(3, seed=9)


def test_bank_is_the_coreset_of_the_aggregated_features():
    model, train, _ = _fitted(coreset_ratio=0.25, coreset_seed=4)
    emb = aggregate([train[1], train[2]], 32).reshape(-1, 32)
    n = emb.shape[0]
    assert model.n_patches_ == n and model.bank_.shape == (int(n * 0.25), 32)
    proj = torch.randn(32, 8, generator=torch.Generator().manual_seed(4)) / math.sqrt(8)
    starts = torch.randperm(n, generator=torch.Generator().manual_seed(5))[:10].tolist()
    picked = naive_greedy((emb @ proj).numpy(), int(n * 0.25), starts)
    torch.testing.assert_close(model.bank_, emb[picked], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bf16", [True, False], ids=["bfloat16-search", "float32-search"])
@pytest.mark.parametrize("distance", ["squared", "euclidean"])
def test_patch_and_image_scores_match_bruteforce(distance, bf16, monkeypatch):
    from adspine.methods import screen

    monkeypatch.setattr(screen, "fast_bf16", lambda: bf16)  # both searches on any CPU (bfloat16: per-layer projection)
    model, _, test = _fitted(distance=distance)
    assert model._nearest().precision == ("bfloat16" if bf16 else "float32")
    pred = model.predict(test, SIZE)
    emb = aggregate([test[1], test[2]], 32).numpy().astype(np.float64)
    bank = model.bank_.numpy().astype(np.float64)
    full = ((emb[..., None, :] - bank) ** 2).sum(-1)  # (B, h, w, M) squared distances
    patch = full.min(-1) if distance == "squared" else np.sqrt(full.min(-1))
    np.testing.assert_allclose(pred.scores, patch.reshape(3, -1).max(1), rtol=1e-5)
    want_maps = patch_scores_to_map(torch.tensor(patch, dtype=torch.float32), SIZE, 4.0).numpy()
    np.testing.assert_allclose(pred.maps, want_maps, rtol=1e-5, atol=1e-5)
    assert pred.maps.dtype == np.float32


def test_rectangular_grid_lights_up_the_defect_where_it_is():
    """Non-square maps (h != w): a patch of layer-2 features altered at a known place scores highest there."""
    grids = ((12, 20), (6, 10), (3, 5))
    train = mf.random_maps(6, grids=grids, seed=0)
    model = PatchCore(target_dim=32, proj_dim=8, coreset_ratio=0.5).fit([train])
    test = mf.random_maps(1, grids=grids, seed=0)  # a training image: distances 0 except where altered
    test[1][0, :, 4, 7] += 25.0  # layer-2 cell (4, 7) of the 6 x 10 grid = input rows 32-47, columns 56-63 of 48 x 80
    pred = model.predict(test, (48, 80))
    assert pred.maps.shape == (1, 48, 80)
    y, x = np.unravel_index(int(np.argmax(pred.maps[0])), (48, 80))
    assert 28 <= y <= 52 and 52 <= x <= 68, (y, x)
    emb = aggregate([test[1], test[2]], 32).numpy().astype(np.float64)[0]  # (12, 20, 32)
    bank = model.bank_.numpy().astype(np.float64)
    patch = ((emb[..., None, :] - bank) ** 2).sum(-1).min(-1)
    np.testing.assert_allclose(pred.scores[0], patch.max(), rtol=1e-5)


def test_invalid_distance_is_one_clear_error():
    with pytest.raises(PatchCoreSettingError, match="distance.*'cosine'"):
        PatchCore(distance="cosine")


def test_reweighting_follows_eq7():
    model, _, test = _fitted(reweight=True, num_neighbors=4, distance="euclidean")
    pred = model.predict(test, SIZE)
    emb = aggregate([test[1], test[2]], 32).reshape(3, -1, 32).numpy().astype(np.float64)
    bank = model.bank_.numpy().astype(np.float64)
    for b in range(3):
        d = np.sqrt(((emb[b][:, None, :] - bank) ** 2).sum(-1))  # (hw, M)
        worst = int(np.argmax(d.min(1)))
        m_star = int(np.argmin(d[worst]))
        s_star = d[worst, m_star]
        support = np.argsort(np.sqrt(((bank - bank[m_star]) ** 2).sum(-1)))[:4]  # N_b(m*), m* first
        assert support[0] == m_star
        e = np.exp(d[worst, support] - d[worst, support].max())
        want = (1 - e[0] / e.sum()) * s_star
        np.testing.assert_allclose(pred.scores[b], want, rtol=1e-5)


def test_fewer_layers_uses_what_exists_and_records_it(tmp_path):
    train = mf.random_maps(4, channels=(5, 7), grids=((6, 6), (3, 3)))
    model = PatchCore(target_dim=16, layers=(1, 2)).fit([train])
    assert model.layers_used_ == [1]
    assert "used [1]" in model.extra_state()["notes_"][0]
    mf.check_roundtrip(model, mf.random_maps(2, channels=(5, 7), grids=((6, 6), (3, 3)), seed=2), SIZE, tmp_path)


def test_save_load_roundtrip_and_corruption(tmp_path):
    model, _, test = _fitted(reweight=True)
    mf.check_roundtrip(model, test, SIZE, tmp_path / "ok")
    mf.check_corruption(model, tmp_path / "bank", "bank_")
    with pytest.raises(ValueError, match="expected"):
        model.predict([test[0], test[1][:, :4], test[2]], SIZE)


def test_separates_synthetic_defects():
    img, pix = mf.check_separation(PatchCore(), min_image_auroc=0.85)  # measured 1.0
    print(f"PatchCore R18 random init: image AUROC {img:.3f}, pixel AUROC {pix:.3f}")


@pytest.mark.parametrize("name, settings", [("patchcore", {"coreset_ratio": 0.5}), ("spade", {"k": 2})])
def test_predict_inside_inference_mode_equals_predict_outside(name, settings):
    """Autograd modes are per thread: the search threads must run under the caller's (in-place updates of tensors
    made under inference_mode are refused outside it)."""
    from adspine.methods import build_method

    gen = torch.Generator().manual_seed(0)
    maps = [torch.randn(4, 8, 16, 16, generator=gen), torch.randn(4, 16, 8, 8, generator=gen),
            torch.randn(4, 32, 4, 4, generator=gen)]
    method = build_method(name, **settings)
    method.fit([maps])
    queries = [torch.randn(3, *m.shape[1:], generator=gen) for m in maps]
    old = torch.get_num_threads()
    torch.set_num_threads(2)  # two search threads, whatever the machine (the work is split per torch thread)
    try:
        with torch.no_grad():
            plain = method.predict(queries, (64, 64))
        with torch.inference_mode():
            inside = method.predict([q.clone() for q in queries], (64, 64))
    finally:
        torch.set_num_threads(old)
    np.testing.assert_array_equal(inside.scores, plain.scores)
