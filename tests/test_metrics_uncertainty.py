"""Uncertainty of the metrics against independent references: O(m n) DeLong, brute-force image bootstraps with
scikit-learn / the exact pixel metrics, and hand-computed Holm values."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from adspine.metrics import aupro, auroc_ci, delong_paired, holm, pixel_auroc, pixel_bootstrap_ci
from adspine.metrics.uncertainty import PixelCounts

Z95 = 1.959963984540054  # standard normal 97.5% quantile

# ----------------------------------------------------------------------------------------------- references


def brute_force_delong(y: np.ndarray, *score_sets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs and DeLong covariance from the pairwise kernel psi(x, y) = 1 (x > y), 1/2 (x = y), 0, in O(m n)."""
    v10, v01 = [], []
    for s in score_sets:
        pos, neg = s[y == 1], s[y == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    v10, v01 = np.array(v10), np.array(v01)
    aucs = v10.mean(axis=1)
    cov = np.atleast_2d(np.cov(v10)) / v10.shape[1] + np.atleast_2d(np.cov(v01)) / v01.shape[1]
    return aucs, cov


def stratified_resamples(rng: np.random.Generator, y: np.ndarray, n: int) -> list[np.ndarray]:
    """n index arrays, each drawing the positives and the negatives with replacement to their own counts."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    return [np.concatenate([rng.choice(neg, neg.size), rng.choice(pos, pos.size)]) for _ in range(n)]


def bootstrap_aucs(rng: np.random.Generator, y: np.ndarray, *score_sets: np.ndarray, n: int = 4000) -> np.ndarray:
    """(len(score_sets), n) AUCs of stratified image resamples: with multiplicities c_pos, c_neg of the drawn images,
    AUC = c_pos^T psi c_neg / (m n), psi the pairwise kernel (the Mann-Whitney count, as roc_auc_score computes)."""
    pos, neg = y == 1, y == 0
    m, k = int(pos.sum()), int(neg.sum())
    c_pos = rng.multinomial(m, np.full(m, 1 / m), size=n)
    c_neg = rng.multinomial(k, np.full(k, 1 / k), size=n)
    out = []
    for s in score_sets:
        psi = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        assert psi.mean() == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        out.append(np.einsum("bi,ij,bj->b", c_pos, psi, c_neg) / (m * k))
    return np.array(out)


def synthetic_scores(seed: int, m: int, n: int, shift: float, ties: bool = False):
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(n, int), np.ones(m, int)]
    s = rng.standard_normal(m + n) + shift * y
    return y, (np.round(s, 1) if ties else s), rng


def blob_data(seed: int, n: int = 30, size: int = 32):
    """Masks with a few blobs on the odd images; maps = noise + an image-specific strength inside the blobs, so that
    images differ (the source of image-level uncertainty)."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((n, size, size)), sigma=(0, 2, 2))
    masks = noise > 1.3 * noise.std()
    masks[::2] = False
    strength = rng.uniform(0.0, 1.5, n)[:, None, None]
    maps = rng.random((n, size, size)) + strength * masks + 0.3 * rng.random((n, 1, 1))
    return masks, maps


# ----------------------------------------------------------------------------------------------- DeLong


@pytest.mark.parametrize(("seed", "shift", "ties"), [(0, 1.0, False), (1, 0.3, True), (2, 2.5, False)])
def test_auroc_ci_equals_brute_force_delong(seed, shift, ties):
    y, s, _ = synthetic_scores(seed, 25, 35, shift, ties)
    aucs, cov = brute_force_delong(y, s)
    se = np.sqrt(cov[0, 0])
    auc, lo, hi = auroc_ci(y, s)
    assert auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert aucs[0] == pytest.approx(auc, abs=1e-12)
    assert lo == pytest.approx(max(0.0, auc - Z95 * se), abs=1e-10)
    assert hi == pytest.approx(min(1.0, auc + Z95 * se), abs=1e-10)
    assert auroc_ci(y, s, level=0.8)[2] - auc < hi - auc or hi == 1.0


@pytest.mark.parametrize(("seed", "m", "n", "shift"), [(3, 40, 60, 1.0), (4, 30, 30, 0.4), (5, 20, 50, 1.5)])
def test_delong_std_agrees_with_stratified_bootstrap(seed, m, n, shift):
    y, s, rng = synthetic_scores(seed, m, n, shift)
    boot = bootstrap_aucs(rng, y, s)[0]
    auc, lo, hi = auroc_ci(y, s)
    delong_std = (hi - lo) / (2 * Z95)
    assert delong_std == pytest.approx(np.std(boot), rel=0.15)


def test_auroc_ci_perfect_separation_collapses_to_one():
    y = np.array([0, 0, 0, 1, 1, 1])
    assert auroc_ci(y, [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]) == (1.0, 1.0, 1.0)


def test_delong_paired_equals_brute_force():
    y, a, rng = synthetic_scores(5, 30, 40, 1.0)
    b = a + rng.standard_normal(a.size) * 0.8
    aucs, cov = brute_force_delong(y, a, b)
    diff, p = delong_paired(y, a, b)
    assert diff == pytest.approx(aucs[0] - aucs[1], abs=1e-12)
    z = abs(aucs[0] - aucs[1]) / np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert p == pytest.approx(2 * norm.sf(z), abs=1e-10)
    assert delong_paired(y, a, a) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("case", "seed", "noise_b"),
    [("clearly different", 6, None), ("clearly alike", 6, 0.3), ("borderline", 7, 0.7)],
)
def test_delong_paired_agrees_with_paired_bootstrap(case, seed, noise_b):
    """b = a noisy copy of a (paired, correlated) or, for noise_b None, unrelated scores without signal. The
    reference p-value: two-sided normal test of the AUC difference with its stratified paired-bootstrap std."""
    y, s_a, rng = synthetic_scores(seed, 40, 40, 1.5)
    s_b = rng.standard_normal(s_a.size) if noise_b is None else s_a + noise_b * rng.standard_normal(s_a.size)
    diff, p = delong_paired(y, s_a, s_b)
    boot = bootstrap_aucs(rng, y, s_a, s_b)
    p_boot = 2 * norm.sf(abs(diff) / np.std(boot[0] - boot[1]))
    if case == "clearly different":
        assert p < 0.01 and p_boot < 0.01
    elif case == "clearly alike":
        assert p > 0.5 and p_boot > 0.5
    else:
        assert 0.01 < p < 0.1
        assert p == pytest.approx(p_boot, abs=0.02)


# ----------------------------------------------------------------------------------------------- Holm


def test_holm_hand_computed():
    # sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> running max 0.06)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-15)
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # 2 x 0.5 = 1, then max(1, 0.6)
    assert holm([0.2]) == [0.2] and holm([]) == []


# ----------------------------------------------------------------------------------------------- pixel bootstrap


def test_binned_counts_exact_when_few_distinct_values_under_any_weighting():
    rng = np.random.default_rng(7)
    masks, maps = blob_data(7, n=12, size=20)
    maps = np.round(maps * 6) / 6  # few distinct values: every value becomes a threshold
    counts = PixelCounts(masks, maps)
    weights = np.vstack([np.ones(12), rng.integers(0, 4, 12)])
    weights[1, :2] = 1  # image 0 good, image 1 defective: both classes present
    auroc, aupro_values = counts.metrics(weights)
    for k, w in enumerate(weights.astype(int)):
        rep_m, rep_a = np.repeat(masks, w, axis=0), np.repeat(maps, w, axis=0)
        assert auroc[k] == pytest.approx(roc_auc_score(rep_m.ravel(), rep_a.ravel()), abs=1e-12)
        assert aupro_values[k] == pytest.approx(aupro(rep_m, rep_a), abs=1e-12)


@pytest.mark.parametrize("fpr_limit", [0.3, 0.05])
def test_binned_point_estimate_within_1e3_of_exact(fpr_limit):
    masks, maps = blob_data(8, n=40, size=48)
    counts = PixelCounts(masks, maps.astype(np.float32), fpr_limit=fpr_limit)
    assert counts.edges.size < masks.size // 10  # really binned
    auroc, aupro_values = counts.metrics(np.ones((1, 40)))
    assert abs(auroc[0] - pixel_auroc(masks, maps.astype(np.float32))) < 1e-3
    assert abs(aupro_values[0] - aupro(masks, maps.astype(np.float32), fpr_limit)) < 1e-3


def test_pixel_interval_matches_brute_force_image_bootstrap():
    masks, maps = blob_data(9)
    rng = np.random.default_rng(123)
    has_defect = masks.any(axis=(1, 2)).astype(int)
    values = np.array([(pixel_auroc(masks[i], maps[i]), aupro(masks[i], maps[i]))
                       for i in stratified_resamples(rng, has_defect, 300)])
    ref_lo, ref_hi = np.quantile(values, [0.025, 0.975], axis=0)
    tol = 0.6 * values.std(axis=0)  # MC error of 2.5% / 97.5% quantiles of two independent 300-resample runs
    ci = pixel_bootstrap_ci(masks, maps, n_boot=300, seed=1)
    ours_lo = np.array([ci["pixel_auroc_lo"], ci["aupro_lo"]])
    ours_hi = np.array([ci["pixel_auroc_hi"], ci["aupro_hi"]])
    assert np.all(np.abs(ours_lo - ref_lo) < tol) and np.all(np.abs(ours_hi - ref_hi) < tol)
    assert ci == pixel_bootstrap_ci(masks, maps, n_boot=300, seed=1)  # seeded


def test_pixel_bootstrap_has_mask_and_image_level_data():
    masks, maps = blob_data(10, n=12, size=16)
    labels = masks.any(axis=(1, 2)).astype(int)
    has_mask = np.ones(12, bool)
    has_mask[[1, 3]] = False  # two defective images without a mask
    has_mask[0] = False  # a good image: kept anyway when labels are given
    keep = (labels == 0) | has_mask
    sub = pixel_bootstrap_ci(masks[keep], maps[keep], n_boot=50, seed=3)
    assert pixel_bootstrap_ci(masks, maps, has_mask, n_boot=50, seed=3, labels=labels) == sub
    assert pixel_bootstrap_ci(masks, maps, keep, n_boot=50, seed=3) == sub
    no_defect = pixel_bootstrap_ci(masks, maps, labels == 0, n_boot=50)
    assert set(no_defect) == {"pixel_auroc_lo", "pixel_auroc_hi", "aupro_lo", "aupro_hi"}
    assert all(v is None for v in no_defect.values())


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: auroc_ci([0, 1, 1], [0.1, 0.2, 0.3]), "at least 2 good and 2 defective"),
        (lambda: auroc_ci([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], level=1.0), "level: 1.0"),
        (lambda: delong_paired([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2]), "length 2"),
        (lambda: holm([0.1, 1.5]), "pvalues: 1.5"),
        (lambda: pixel_bootstrap_ci(np.eye(3, dtype=bool)[None], np.zeros((1, 3, 3)), n_boot=0), "n_boot: 0"),
        (lambda: pixel_bootstrap_ci(np.eye(3, dtype=bool)[None], np.zeros((1, 3, 3)), [True, False]), "has_mask"),
        (lambda: pixel_bootstrap_ci(np.eye(3, dtype=bool)[None], np.zeros((1, 3, 4))), "shape (1, 3, 4)"),
    ],
)
def test_bad_input_one_clear_line(call, needle):
    with pytest.raises(ValueError) as excinfo:
        call()
    assert needle in str(excinfo.value) and "\n" not in str(excinfo.value)
