"""Metrics against independent references: scikit-learn, brute-force threshold loops, hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from adspine.metrics import (
    METRIC_KEYS,
    aupro,
    evaluate,
    f1_max,
    image_auroc,
    mean_over_categories,
    pixel_auroc,
    pixel_f1_max,
    pro_curve,
)

# ----------------------------------------------------------------------------------------------- references


def brute_force_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """Threshold-by-threshold PRO curve with per-component loops, then a plain trapezoid with interpolation."""
    components = []  # (image index, bool region)
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3), dtype=int))
        components += [(i, lab == k) for k in range(1, n + 1)]
    negatives = ~masks
    xs, ys = [0.0], [0.0]
    for t in sorted(np.unique(maps), reverse=True):
        pred = maps >= t
        overlaps = [pred[i][region].sum() / region.sum() for i, region in components]
        ys.append(float(np.mean(overlaps)))
        xs.append((pred & negatives).sum() / negatives.sum())
    area = 0.0
    for k in range(1, len(xs)):
        x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:  # linear interpolation at the limit
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += 0.5 * (y0 + y1) * (x1 - x0)
    return area / fpr_limit


def brute_force_f1_max(y: np.ndarray, s: np.ndarray) -> float:
    """max over every distinct score t (and one above the maximum) of F1 of the prediction s >= t."""
    best = 0.0
    for t in np.append(np.unique(s), np.inf):
        pred = s >= t
        tp = np.sum(pred & y)
        fp = np.sum(pred & ~y)
        fn = np.sum(~pred & y)
        if tp:
            best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def blob_masks(rng: np.random.Generator, n: int, size: int, level: float = 1.2) -> np.ndarray:
    """Irregular masks of several components (thresholded smoothed noise); image 0 is left good (all False)."""
    noise = ndimage.gaussian_filter(rng.standard_normal((n, size, size)), sigma=(0, 1.5, 1.5))
    masks = noise > level * noise.std()
    masks[0] = False
    return masks


# ----------------------------------------------------------------------------------------------- AUROC


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_auroc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 40)
    y[:2] = [0, 1]
    s = np.round(rng.random(40) + 0.3 * y, 1)  # ties on purpose
    assert image_auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, np.int64])
def test_pixel_auroc_matches_sklearn_with_ties(seed, dtype):
    rng = np.random.default_rng(seed)
    masks = blob_masks(rng, 5, 16)
    maps = (rng.integers(0, 12, masks.shape) + 3 * masks * rng.random(masks.shape)).astype(dtype)
    ref = roc_auc_score(masks.ravel(), maps.ravel())
    assert abs(pixel_auroc(masks, maps) - ref) < 1e-9


def test_pixel_auroc_hand_case():
    # positives {3, 1}, negatives {1, 0}: pairs (3>1) (3>0) (1=1 -> 1/2) (1>0) -> 3.5 / 4
    masks = np.array([[[True, True, False, False]]])
    maps = np.array([[[3.0, 1.0, 1.0, 0.0]]])
    assert pixel_auroc(masks, maps) == 0.875


# ----------------------------------------------------------------------------------------------- AUPRO


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_brute_force(seed, fpr_limit):
    rng = np.random.default_rng(seed)
    masks = blob_masks(rng, 4, 12)
    maps = rng.random(masks.shape) + 0.6 * masks * rng.random(masks.shape)
    if seed % 2:
        maps = np.round(maps * 8) / 8  # heavy ties
    assert masks.any()
    assert abs(aupro(masks, maps, fpr_limit) - brute_force_aupro(masks, maps, fpr_limit)) < 1e-9


def test_aupro_hand_computed_two_regions():
    """Two regions in two images, 10 negative pixels.

    Image 0: region A = 2 pixels with scores 0.9, 0.5; negatives 0.7, 0.3, 0.1 x4.
    Image 1: region B = 4 pixels with scores 0.8, 0.8, 0.3, 0.3; negatives 0.6, 0.1 x3.
    Thresholds (descending) -> (FPR, PRO = mean of A and B coverage):
      0.9 -> (0.0, (1/2 + 0)/2 = 0.25)     0.8 -> (0.0, (1/2 + 2/4)/2 = 0.5)
      0.7 -> (0.1, 0.5)                    0.6 -> (0.2, 0.5)
      0.5 -> (0.2, (1 + 1/2)/2 = 0.75)     0.3 -> (0.3, 1.0)  (B complete and one more negative, a tie)
      0.1 -> (1.0, 1.0)
    Area to 0.3: 0.1 * 0.5 + 0.1 * 0.5 + 0.1 * (0.75 + 1) / 2 = 0.1875 -> / 0.3 = 0.625.
    Area to 0.25: PRO(0.25) interpolated on (0.2, 0.75)-(0.3, 1.0) = 0.875;
      0.1 + 0.05 * (0.75 + 0.875) / 2 = 0.140625 -> / 0.25 = 0.5625.
    """
    masks = np.zeros((2, 2, 4), dtype=bool)
    maps = np.zeros((2, 2, 4))
    masks[0, 0, :2] = True
    maps[0] = [[0.9, 0.5, 0.7, 0.3], [0.1, 0.1, 0.1, 0.1]]
    masks[1, :, 2:] = True
    maps[1] = [[0.6, 0.1, 0.8, 0.8], [0.1, 0.1, 0.3, 0.3]]
    assert aupro(masks, maps) == pytest.approx(0.625, abs=1e-12)
    assert aupro(masks, maps, fpr_limit=0.25) == pytest.approx(0.5625, abs=1e-12)
    fpr, pro = pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0, 0, 0, 0.1, 0.2, 0.2, 0.3, 1.0], atol=1e-12)
    np.testing.assert_allclose(pro, [0, 0.25, 0.5, 0.5, 0.5, 0.75, 1.0, 1.0], atol=1e-12)


def test_aupro_uses_8_connectivity():
    """(0,0) touches (1,1) only diagonally, so {(0,0), (1,1), (1,2)} is ONE component of 3 pixels.

    Only (0,0) scores high (1.0); the rest of the component scores 0 and every negative 0.5. The curve is
    (0, 0) -> (0, 1/3) -> (1, 1/3) -> ..., so AUPRO = 1/3. With 4-connectivity ({(0,0)} and {(1,1),(1,2)}) PRO would
    be (1 + 0) / 2 = 0.5 instead.
    """
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = True
    maps = np.where(masks, 0.0, 0.5)
    maps[0, 0, 0] = 1.0
    assert aupro(masks, maps) == pytest.approx(1 / 3, abs=1e-12)
    assert ndimage.label(masks[0])[1] == 2  # the 4-connected reading really differs


def test_aupro_components_do_not_connect_across_images():
    """Same pixel position in two images = two components; PRO averages them equally."""
    masks = np.zeros((2, 3, 3), dtype=bool)
    masks[0, 1, 1] = True
    masks[1, :2, :2] = True  # 4 pixels
    maps = np.where(masks, 0.0, 0.5)
    maps[0, 1, 1] = 1.0  # first component fully found above every negative
    # curve (0,0) -> (0, (1 + 0)/2) -> (1, 1/2): AUPRO = 0.5 (one merged 5-pixel component would give 0.2)
    assert aupro(masks, maps) == pytest.approx(0.5, abs=1e-12)


def test_perfect_maps_give_one():
    rng = np.random.default_rng(5)
    masks = blob_masks(rng, 6, 20)
    maps = masks.astype(np.float32) + 0.01 * rng.random(masks.shape)  # every positive above every negative
    assert aupro(masks, maps) == pytest.approx(1.0, abs=1e-12)
    assert pixel_auroc(masks, maps) == 1.0
    assert pixel_f1_max(masks, maps) == 1.0


def test_random_maps_give_chance_values():
    rng = np.random.default_rng(11)
    masks = blob_masks(rng, 20, 64, level=1.0)
    maps = rng.random(masks.shape)
    assert pixel_auroc(masks, maps) == pytest.approx(0.5, abs=0.03)
    assert aupro(masks, maps) == pytest.approx(0.15, abs=0.03)


# ----------------------------------------------------------------------------------------------- F1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f1_max_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 50).astype(bool)
    y[:2] = [False, True]
    s = np.round(rng.random(50) + 0.4 * y, 1)
    assert f1_max(y, s) == pytest.approx(brute_force_f1_max(y, s), abs=1e-12)
    masks = blob_masks(rng, 4, 12)
    maps = np.round(rng.random(masks.shape) + 0.5 * masks, 1)
    assert pixel_f1_max(masks, maps) == pytest.approx(brute_force_f1_max(masks.ravel(), maps.ravel()), abs=1e-12)


# ----------------------------------------------------------------------------------------------- evaluate


def test_evaluate_combines_and_skips_pixel_metrics():
    rng = np.random.default_rng(7)
    masks = blob_masks(rng, 6, 16)
    maps = rng.random(masks.shape) + masks
    labels = masks.reshape(6, -1).any(axis=1).astype(int)
    scores = maps.reshape(6, -1).max(axis=1)
    res = evaluate(labels, scores, masks, maps)
    assert tuple(res) == METRIC_KEYS
    assert res == pytest.approx(
        {
            "image_auroc": roc_auc_score(labels, scores),
            "pixel_auroc": roc_auc_score(masks.ravel(), maps.ravel()),
            "aupro": brute_force_aupro(masks, maps, 0.3),
            "image_f1_max": brute_force_f1_max(labels.astype(bool), scores),
            "pixel_f1_max": brute_force_f1_max(masks.ravel(), maps.ravel()),
        },
        abs=1e-9,
    )
    no_gt = evaluate(labels, scores, None, None)
    empty = evaluate(labels, scores, np.zeros_like(masks), maps)
    for r in (no_gt, empty):
        assert r["pixel_auroc"] is r["aupro"] is r["pixel_f1_max"] is None
        assert r["image_auroc"] == res["image_auroc"]


def test_evaluate_image_level_dataset_and_has_mask():
    """Defective images without a mask leave the pixel metrics; good images stay in them as all-normal."""
    rng = np.random.default_rng(8)
    masks = blob_masks(rng, 8, 16)
    masks[1::2] = False  # odd images: good
    maps = rng.random(masks.shape) + 0.5 * masks * rng.random(masks.shape)
    labels = masks.reshape(8, -1).any(axis=1).astype(int)
    scores = maps.reshape(8, -1).max(axis=1) + 0.3 * rng.random(8)
    has_mask = np.ones(8, bool)
    has_mask[[2, 4]] = False  # two defective images without pixel ground truth
    has_mask[1] = False  # a good image: kept (its ground truth is known to be all-normal)
    keep = np.array([True, True, False, True, False, True, True, True])
    assert labels.tolist() == [0, 0, 1, 0, 1, 0, 1, 0]
    res = evaluate(labels, scores, masks, maps, has_mask=has_mask)
    assert res == pytest.approx(
        {
            "image_auroc": roc_auc_score(labels, scores),  # image metrics over all images
            "pixel_auroc": roc_auc_score(masks[keep].ravel(), maps[keep].ravel()),
            "aupro": brute_force_aupro(masks[keep], maps[keep], 0.3),
            "image_f1_max": brute_force_f1_max(labels.astype(bool), scores),
            "pixel_f1_max": brute_force_f1_max(masks[keep].ravel(), maps[keep].ravel()),
        },
        abs=1e-9,
    )
    assert res["pixel_auroc"] != pytest.approx(evaluate(labels, scores, masks, maps)["pixel_auroc"], abs=1e-6)
    image_level = evaluate(labels, scores, masks, maps, has_mask=labels == 0)  # no defective image has a mask
    assert image_level["pixel_auroc"] is image_level["aupro"] is image_level["pixel_f1_max"] is None
    assert image_level["image_auroc"] == res["image_auroc"]
    with pytest.raises(ValueError, match="has_mask: length 3 differs"):
        evaluate(labels, scores, masks, maps, has_mask=[True] * 3)


# ----------------------------------------------------------------------------------------------- means


def test_mean_over_categories():
    rows = {
        "carpet": {"image_auroc": 0.9, "aupro": 0.8},
        "grid": {"image_auroc": 0.7, "aupro": 0.6},
        "bottle": {"image_auroc": 1.0, "aupro": None},
        "mystery": {"image_auroc": 0.5, "aupro": 0.5},
    }
    kinds = {"carpet": "texture", "grid": "texture", "bottle": "object", "mystery": None}
    out = mean_over_categories(rows, kinds)
    assert out["all"]["n_categories"] == 4
    assert out["all"]["image_auroc"] == pytest.approx((0.9 + 0.7 + 1.0 + 0.5) / 4)
    assert out["all"]["aupro"] is None  # bottle has no pixel metric: no mean over a different set of categories
    assert out["texture"] == pytest.approx({"n_categories": 2, "image_auroc": 0.8, "aupro": 0.7})
    assert out["object"] == {"n_categories": 1, "image_auroc": 1.0, "aupro": None}
    only_all = mean_over_categories({"a": {"x": 1.0}, "b": {"x": 3.0}})
    assert only_all == {"all": {"n_categories": 2, "x": 2.0}}


# ----------------------------------------------------------------------------------------------- errors


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: image_auroc([1, 1, 1], [0.1, 0.2, 0.3]), "only class 1"),
        (lambda: image_auroc([0, 1, 2], [0.1, 0.2, 0.3]), "found 2"),
        (lambda: image_auroc([0, 1], [0.1, 0.2, 0.3]), "length 3"),
        (lambda: f1_max([0, 1], [0.1, float("nan")]), "scores: 1 non-finite"),
        (lambda: pixel_auroc(np.zeros((1, 2, 2), bool), np.zeros((1, 2, 2))), "no defective pixel"),
        (lambda: pixel_auroc(np.ones((1, 2, 2), bool), np.zeros((1, 2, 2))), "all 4 pixels"),
        (lambda: aupro(np.zeros((2, 3, 3), bool), np.zeros((2, 3, 3))), "no defective pixel"),
        (lambda: aupro(np.eye(3, dtype=bool)[None], np.zeros((1, 3, 4))), "shape (1, 3, 4)"),
        (lambda: aupro(np.eye(3, dtype=bool), np.zeros((3, 3))), "got shape (3, 3)"),
        (lambda: aupro(np.eye(3)[None] * 0.5, np.zeros((1, 3, 3))), "found 0.5"),
        (lambda: aupro(np.eye(3, dtype=bool)[None], np.full((1, 3, 3), np.inf)), "maps: 9 non-finite"),
        (lambda: aupro(np.eye(3, dtype=bool)[None], np.zeros((1, 3, 3)), fpr_limit=0), "fpr_limit: 0"),
        (lambda: pixel_f1_max(np.eye(3, dtype=bool)[None], np.array([["a"] * 3] * 3)[None]), "dtype <U1"),
        (lambda: evaluate([0, 1], [0.1, 0.2], np.eye(3, dtype=bool)[None], None), "maps: None"),
        (lambda: evaluate([0, 1], [0.1, 0.2], np.eye(3, dtype=bool)[None], np.ones((1, 3, 3))), "1 masks for 2"),
        (lambda: mean_over_categories({}), "rows"),
        (lambda: mean_over_categories({"a": {"x": 1.0}}, {"a": "fabric"}), "'fabric'"),
        (lambda: mean_over_categories({"a": {"x": float("nan")}}), "rows['a']['x']"),
    ],
)
def test_bad_input_one_clear_line(call, needle):
    with pytest.raises(ValueError) as excinfo:
        call()
    assert needle in _one_line(excinfo)
