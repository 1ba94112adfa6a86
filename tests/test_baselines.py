"""Trivial baselines (adspine.baselines), the max-in-mask hit rate and the bootstrap replicates
(adspine.metrics.localisation), the baselines table of the store and `adspine data baselines`."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy.spatial.distance import cdist
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from adspine import baselines as bl
from adspine.metrics.localisation import max_in_mask, pixel_bootstrap
from adspine.metrics.uncertainty import pixel_bootstrap_ci


def shortcut_dataset(root, size=64, n_train=10, n_good=6, n_bad=6, seed=0, shift=0.2, patch=True):
    """One MVTec-format category 'plate': noisy grey images; defective ones darker overall by ``shift`` (the global
    shortcut) plus a bright 10 x 10 square (the local defect, with its mask; drawn where ``patch``)."""
    rng = np.random.default_rng(seed)
    cat = root / "plate"
    for sub in ("train/good", "test/good", "test/dent", "ground_truth/dent"):
        (cat / sub).mkdir(parents=True)

    def base():
        return np.clip(0.55 + 0.08 * rng.standard_normal((size, size, 3)), 0, 1)

    def save(a, path):
        Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8)).save(path)

    for i in range(n_train):
        save(base(), cat / "train/good" / f"{i:03d}.png")
    for i in range(n_good):
        save(base(), cat / "test/good" / f"{i:03d}.png")
    for i in range(n_bad):
        img = base() - shift
        y, x = rng.integers(8, size - 20, 2)
        img[y:y + 10, x:x + 10] = 1.0 if patch else img[y:y + 10, x:x + 10]
        mask = np.zeros((size, size), np.uint8)
        mask[y:y + 10, x:x + 10] = 255
        save(img, cat / "test/dent" / f"{i:03d}.png")
        Image.fromarray(mask).save(cat / "ground_truth/dent" / f"{i:03d}_mask.png")
    return root


# -- features -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h, w", [(64, 64), (70, 45)])
def test_area_resize_is_the_block_mean(h, w):
    img = np.random.default_rng(0).uniform(0, 1, (h, w, 3))
    got = bl.area_resize(img, 32)
    ref = np.empty((32, 32, 3))
    for i in range(32):
        for j in range(32):
            rows = slice(i * h // 32, (i + 1) * h // 32)
            cols = slice(j * w // 32, (j + 1) * w // 32)
            ref[i, j] = img[rows, cols].reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    if h == 64:
        np.testing.assert_allclose(got, img.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3)), rtol=1e-12)
    with pytest.raises(ValueError, match="smaller than 32x32"):
        bl.area_resize(img[:20], 32)


def test_intensity_and_histogram_features_by_hand():
    img = np.zeros((2, 2, 3))
    img[0, 0] = [1.0, 0.0, 0.0]  # grey 0.299
    img[1, 1] = [0.0, 1.0, 1.0]  # grey 0.701
    mean, std = bl.BASELINES["intensity mean/std"][0](img)
    assert mean == pytest.approx((0.299 + 0.701) / 4)
    assert std == pytest.approx(np.std([0.299, 0.701, 0.0, 0.0]))
    hist = bl.BASELINES["colour histogram"][0](img)
    assert hist.shape == (3 * 16,)
    red, green = hist[:16], hist[16:32]
    assert red[0] == 0.75 and red[15] == 0.25 and red[1:15].sum() == 0  # 1.0 falls in the last bin
    assert green[0] == 0.75 and green[15] == 0.25


def test_distances_against_scipy():
    rng = np.random.default_rng(1)
    train, test = rng.normal(size=(12, 5)), rng.normal(size=(7, 5))
    np.testing.assert_allclose(bl.nearest_distance(train, test), cdist(test, train).min(axis=1), rtol=1e-12)
    np.testing.assert_allclose(bl.nearest_distance(train, test, ord=1),
                               cdist(test, train, "cityblock").min(axis=1), rtol=1e-12)
    feats_train, feats_test = rng.normal(size=(20, 2)) * [1.0, 0.1], rng.normal(size=(6, 2))
    vi = np.linalg.inv(np.cov(feats_train.T) + bl.RIDGE * np.eye(2))
    ref = cdist(feats_test, feats_train.mean(axis=0)[None], "mahalanobis", VI=vi)[:, 0]
    np.testing.assert_allclose(bl.mahalanobis(feats_train, feats_test), ref, rtol=1e-10)


def test_evaluate_gives_auroc_and_delong_interval():
    rng = np.random.default_rng(2)
    labels = np.array([0] * 8 + [1] * 8)
    scores = {"a": rng.normal(size=16) + labels, "b": rng.normal(size=16)}
    rows = {r["baseline"]: r for r in bl.evaluate(labels, scores)}
    for name, s in scores.items():
        assert rows[name]["image_auroc"] == pytest.approx(roc_auc_score(labels, s))
        assert rows[name]["image_auroc_lo"] <= rows[name]["image_auroc"] <= rows[name]["image_auroc_hi"]
    one_bad = bl.evaluate(np.array([0, 0, 1]), {"a": np.array([0.1, 0.2, 0.9])})[0]
    assert one_bad["image_auroc"] == 1.0 and one_bad["image_auroc_lo"] is None  # DeLong needs 2 of each


def test_category_baselines_find_the_global_shortcut(tmp_path):
    from adspine.data import scan

    root = shortcut_dataset(tmp_path / "data")
    rows = bl.category_baselines(scan(root, "plate"), "resize", 64)
    got = {r["baseline"]: r for r in rows}
    assert set(got) == set(bl.BASELINES)
    assert got["intensity mean/std"]["image_auroc"] == 1.0  # darker overall: the mean grey level separates
    assert all(r["n_train"] == 10 and r["n_test"] == 12 and r["image_height"] == 64 for r in rows)
    # nothing to find (no darkening, no square drawn): no baseline separates
    flat = bl.category_baselines(scan(shortcut_dataset(tmp_path / "flat", shift=0.0, patch=False), "plate"),
                                 "resize", 64)
    assert all(r["image_auroc"] < 0.9 for r in flat)


# -- max-in-mask and the bootstrap replicates -----------------------------------------------------------------------
def test_max_in_mask_by_hand():
    masks = np.zeros((4, 20, 20), bool)
    maps = np.zeros((4, 20, 20))
    masks[:3, 5:8, 5:8] = True  # three defective images, one good
    maps[0, 6, 6] = 1.0  # inside
    maps[1, 7, 11] = 1.0  # 4 px right of the mask's edge (column 7): a hit at the 4 px tolerance
    maps[2, 7, 13] = 1.0  # 6 px away: a miss
    maps[3, 0, 0] = 5.0  # good image: not counted
    assert max_in_mask(masks, maps) == pytest.approx(2 / 3)
    assert max_in_mask(masks, maps, tolerance=0) == pytest.approx(1 / 3)
    assert max_in_mask(masks, maps, tolerance=6) == pytest.approx(3 / 3)
    flat = np.ones_like(maps)  # every pixel is the maximum: no hit unless the whole image is near the defect
    assert max_in_mask(masks, flat) == 0.0
    tie = maps.copy()
    tie[0, 19, 19] = 1.0  # a second, far maximum
    assert max_in_mask(masks, tie) == pytest.approx(1 / 3)
    # a defective image without a mask is left out (has_mask False)
    assert max_in_mask(masks, maps, labels=[1, 1, 1, 0], has_mask=[True, True, False, False]) == 1.0
    assert max_in_mask(np.zeros_like(masks), maps) is None
    with pytest.raises(ValueError, match="tolerance"):
        max_in_mask(masks, maps, tolerance=-1)


def test_pixel_bootstrap_replicates_match_the_intervals():
    rng = np.random.default_rng(3)
    masks = np.zeros((10, 16, 16), bool)
    masks[5:, 4:9, 4:9] = True
    maps = rng.uniform(0, 1, masks.shape) + 0.8 * masks
    labels = np.array([0] * 5 + [1] * 5)
    ref = pixel_bootstrap_ci(masks, maps, n_boot=50, seed=4, labels=labels, has_mask=np.ones(10, bool))
    got, reps = pixel_bootstrap(masks, maps, n_boot=50, seed=4, labels=labels, has_mask=np.ones(10, bool))
    assert got == pytest.approx(ref)
    assert reps.shape == (50, 2) and reps.dtype == np.float32
    lo, hi = np.quantile(reps[:, 1].astype(float), [0.025, 0.975])
    assert (lo, hi) == pytest.approx((ref["aupro_lo"], ref["aupro_hi"]), abs=1e-6)
    close = maps + 0.05 * rng.uniform(0, 1, masks.shape)  # a second configuration, nearly the same maps
    _, same = pixel_bootstrap(masks, close, n_boot=50, seed=4, labels=labels, has_mask=np.ones(10, bool))
    _, other = pixel_bootstrap(masks, close, n_boot=50, seed=5, labels=labels, has_mask=np.ones(10, bool))
    paired, unpaired = (np.corrcoef(reps[:, 1], r[:, 1])[0, 1] for r in (same, other))
    assert paired > 0.9 and paired > unpaired  # the same resamples: the replicates move together
    assert pixel_bootstrap(np.zeros_like(masks), maps, n_boot=5)[1] is None


# -- store and CLI --------------------------------------------------------------------------------------------------
def test_store_keeps_baselines_and_reads_old_stores(tmp_path):
    import sqlite3

    from adspine.study.store import ResultStore

    old = tmp_path / "old.sqlite"
    con = sqlite3.connect(old)
    con.execute("CREATE TABLE jobs (job_id TEXT PRIMARY KEY, status TEXT, started_at TEXT)")
    con.execute("CREATE TABLE results (job_id TEXT, method TEXT, rd_seed INTEGER)")
    con.commit()
    con.close()
    with ResultStore(old, readonly=True) as s:
        assert s.baselines() == []  # a store from before the table existed
    row = {"dataset": "d", "dataset_root": "/x", "category": "c", "protocol": "paper", "image_height": 224,
           "image_width": 224, "baseline": "intensity mean/std", "image_auroc": 0.9, "image_auroc_lo": 0.8,
           "image_auroc_hi": 1.0, "n_train": 3, "n_test": 4, "test_labels": np.array([0, 0, 1, 1], np.int8),
           "test_scores": np.array([0.1, 0.2, 0.3, 0.4])}
    with ResultStore(old) as s:  # the upgrade adds the table in place
        s.record_baselines([row])
        s.record_baselines([{**row, "image_auroc": 0.95}])  # the same category and input: replaced
    with ResultStore(old, readonly=True) as s:
        (got,) = s.baselines("d")
        assert got["image_auroc"] == 0.95 and got["test_scores"].tolist() == [0.1, 0.2, 0.3, 0.4]
        assert s.baselines("other") == []


def test_data_baselines_cli(tmp_path):
    from adspine.cli import app

    root = shortcut_dataset(tmp_path / "data")
    res = CliRunner().invoke(app, ["data", "baselines", str(root), "--protocol", "resize", "--size", "64"])
    assert res.exit_code == 0, res.output
    for name in bl.BASELINES:
        assert name in res.output
    assert "100.0" in res.output  # the intensity statistics separate the darker defective images
    piped = [line.split("\t") for line in res.output.splitlines() if "\t" in line]  # CliRunner: not a terminal
    assert piped[0] == ["category", "baseline", "image AUROC %", "95 % CI"]
    assert {r[1] for r in piped[1:]} == set(bl.BASELINES) and all(r[0] == "plate" for r in piped[1:])
    bad = CliRunner().invoke(app, ["data", "baselines", str(root), "--category", "nope"])
    assert bad.exit_code == 2 and "nope" in bad.output and "Traceback" not in bad.output
