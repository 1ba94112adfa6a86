"""Property tests of the exact searches against a float64 brute force, on data made to break rounding bounds: heavy
tails (Student-t, 1 to 3 degrees of freedom), one dominant coordinate, queries equal to bank rows, near-ties, scales
1e-4 to 1e5, rank-deficient data, sizes around block edges. PatchCore's ``NearestBank`` in both precisions (bfloat16
forced on any CPU: the GEMM is emulated where the hardware lacks it), its per-layer projection, SPADE's screened and
float32 paths; non-finite queries stay on their own rows."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
import methods_fixtures as mf  # noqa: E402

from adspine.methods import screen as scr  # noqa: E402
from adspine.methods.knn import PRECISIONS, NearestBank  # noqa: E402
from adspine.methods.patchcore import _assemble, _layer_parts, project_parts  # noqa: E402
from adspine.methods.spade import nearest_patch_sq_dist, screened_sq_dist  # noqa: E402

FAMILIES = ("heavy", "dominant", "equal", "near_tie", "rank_deficient", "scaled")
PROPS = settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@pytest.fixture(autouse=True)
def _threads():
    mf.set_threads()


def _rows(family: str, n: int, d: int, rng: np.random.Generator, df: float, scale: float) -> np.ndarray:
    """``n`` rows of ``d`` features of one adversarial family (float64, before the float32 cast)."""
    if family == "heavy":
        x = rng.standard_t(df, (n, d))
    elif family == "dominant":  # one coordinate carries nearly all of every difference
        x = rng.standard_normal((n, d)) * 1e-3
        x[:, rng.integers(d)] = rng.standard_t(df, n) * 10
    elif family == "rank_deficient":
        x = rng.standard_t(df, (n, max(1, d // 16))) @ rng.standard_normal((max(1, d // 16), d))
    else:  # equal / near_tie / scaled: heavy-tailed, offset like ReLU features
        x = np.abs(rng.standard_t(df, (n, d))) + 0.5
    return x * scale


def _data(family: str, m: int, nq: int, d: int, seed: int, df: float, scale: float):
    """Bank (m, d) and queries (nq, d), float32: half the queries copy or nearly copy bank rows where the family
    asks for it."""
    rng = np.random.default_rng(seed)
    bank = _rows(family, m, d, rng, df, scale)
    queries = _rows(family, nq, d, rng, df, scale)
    pick = rng.integers(m, size=nq)
    if family in ("equal", "heavy", "dominant"):  # queries equal to bank rows
        queries[::2] = bank[pick[::2]]
    elif family == "near_tie":  # rows in near-duplicate pairs, queries halfway between two rows
        half = m // 2
        bank[half : 2 * half] = bank[:half] + 1e-4 * scale * rng.standard_normal((half, d))
        j = pick % max(half, 1)
        queries[::2] = (bank[j] + bank[j + half])[::2] / 2
    return torch.from_numpy(bank).float(), torch.from_numpy(queries).float()


def _brute(bank: torch.Tensor, queries: torch.Tensor) -> np.ndarray:
    """(Q, M) float64 squared distances, from the differences."""
    q, b = queries.double().numpy(), bank.double().numpy()
    return np.concatenate([((q[i : i + 8, None, :] - b[None]) ** 2).sum(-1) for i in range(0, len(q), 8)])


def _check_nearest(d2: torch.Tensor, idx: torch.Tensor, full: np.ndarray) -> None:
    """Distances within 1e-5 of the true minimum; the index is a row at that minimum (the first one unless two
    rows tie within float64 rounding)."""
    want = full.min(axis=1)
    got_idx = idx.numpy()
    assert d2.dtype == torch.float64 and (got_idx >= 0).all() and np.isfinite(d2.numpy()).all()
    np.testing.assert_allclose(d2.numpy(), want, rtol=1e-5, atol=1e-30)
    at = full[np.arange(len(want)), got_idx]
    assert (at <= want * (1 + 1e-12)).all()
    first = full.argmin(axis=1)
    clear = full[np.arange(len(want)), first] < np.partition(full, 1, axis=1)[:, 1] * (1 - 1e-12)
    assert (got_idx[clear] == first[clear]).all()


bank_cases = st.tuples(
    st.sampled_from(FAMILIES), st.integers(0, 10**6),
    st.sampled_from([31, 32, 33, 255, 257, 300]),  # rows around tile, band and block edges
    st.sampled_from([16, 100, 1024]), st.sampled_from([1.0, 1.5, 2.0, 3.0]),
    st.sampled_from([1e-4, 1.0, 1e5]),
)


@pytest.mark.parametrize("precision", PRECISIONS)
@PROPS
@given(case=bank_cases)
def test_nearest_bank_equals_float64_bruteforce(precision, case):
    family, seed, m, d, df, scale = case
    bank, queries = _data(family, m, 40, d, seed, df, scale)
    search = NearestBank(bank, components=min(24, d), leaf=8, block=17, precision=precision)  # blocks cut short
    d2, idx = search.search(queries)
    _check_nearest(d2, idx, _brute(bank, queries))


@PROPS
@given(case=bank_cases)
def test_nearest_bank_with_a_callers_projection_equals_float64_bruteforce(case):
    """The bfloat16 search with PatchCore's per-layer projection of two heavy-tailed layers (the second resized)."""
    family, seed, _, d, df, scale = case
    rng = np.random.default_rng(seed)
    maps = [torch.from_numpy(np.abs(rng.standard_t(df, (2, c, h, w))) * scale).float()
            for c, (h, w) in ((12, (6, 4)), (20, (3, 2)))]
    target = 64
    parts = _layer_parts(maps, target)
    emb = _assemble(parts, (6, 4), target).reshape(-1, target)
    bank = torch.cat([emb[::2], torch.from_numpy(_rows(family, 40, target, rng, df, scale)).float()])
    search = NearestBank(bank, components=16, leaf=8, precision="bfloat16")
    proj, err = project_parts(parts, (6, 4), search.centre, search.basis)
    exact = (emb.double() - search.centre.double()) @ search.basis.double()
    assert float((proj.double() - exact).norm(dim=1).max()) <= err
    d2, idx = search.search(emb, proj, err)
    _check_nearest(d2, idx, _brute(bank, emb))


gallery_cases = st.tuples(
    st.sampled_from(FAMILIES), st.integers(0, 10**6), st.sampled_from([1, 255, 257]),
    st.sampled_from([3, 64, 100, 1024]), st.sampled_from([1.0, 1.5, 3.0]), st.sampled_from([1e-4, 1.0, 1e5]),
)


@pytest.mark.parametrize("screened", [True, False], ids=["bfloat16-screen", "float32"])
@PROPS
@given(case=gallery_cases)
def test_spade_nearest_patch_equals_float64_bruteforce(screened, case, monkeypatch):
    """Both SPADE searches meet the 1e-5 target on squared distances for any channel count."""
    monkeypatch.setattr(scr, "MIN_MACS", 0)  # screen even these small searches
    monkeypatch.setattr(scr, "MAX_KEPT", 1.0)
    family, seed, p, c, df, scale = case
    bank, queries = _data(family, 3 * p, 30, c, seed, df, scale)
    centre = bank.mean(dim=0)
    rows, queries = (bank - centre).view(3, p, c), queries - centre
    images = [2, 0]
    want = _brute(rows[images].reshape(-1, c), queries).min(axis=1)
    if screened:
        got, unscreened = screened_sq_dist(queries, scr.GalleryScreen(rows), images)
        assert unscreened.numel() == 0
    else:
        got = nearest_patch_sq_dist(queries, rows, rows.square().sum(2), images, block=100)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_non_finite_queries_get_inf_or_nan_and_leave_the_others_alone(precision):
    bank, queries = _data("heavy", 300, 40, 64, 1, 1.5, 1.0)
    search = NearestBank(bank, components=16, leaf=8, precision=precision)
    clean = search.search(queries)
    bad = queries.clone()
    bad[3, 5], bad[7, 0], bad[8, :] = float("nan"), float("inf"), -float("inf")
    d2, idx = search.search(bad)
    assert torch.isnan(d2[3]) and torch.isinf(d2[7]) and torch.isinf(d2[8]) and idx[[3, 7, 8]].tolist() == [0, 0, 0]
    keep = [i for i in range(40) if i not in (3, 7, 8)]
    torch.testing.assert_close(d2[keep], clean[0][keep], rtol=0, atol=0)
    assert idx[keep].tolist() == clean[1][keep].tolist()
    with pytest.raises(ValueError, match="bank row 2 holds NaN or inf"):
        NearestBank(torch.cat([bank[:2], bad[3:4], bank]), precision=precision)


def test_float64_bank_is_cast_and_recorded():
    bank, queries = _data("heavy", 100, 10, 16, 2, 2.0, 1.0)
    search = NearestBank(bank.double(), components=8, precision="float32")
    assert search.cast == "float64 -> float32" and NearestBank(bank, precision="float32").cast is None
    _check_nearest(*search.search(queries.double()), _brute(bank, queries))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("family", ["heavy", "dominant"])
def test_nearest_bank_at_the_issues_scale(family, precision):
    """1024-d Student-t (df 1.5) or dominant-coordinate banks of 1,000 rows, 800 queries (half equal to bank rows):
    where the earlier bfloat16 bound (half the operand rounding, no accumulation term) missed nearest rows."""
    bank, queries = _data(family, 1000, 800, 1024, 0, 1.5, 1.0)
    d2, idx = NearestBank(bank, components=24, precision=precision).search(queries)
    _check_nearest(d2, idx, _brute(bank, queries))
