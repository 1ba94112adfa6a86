"""Non-finite values never pass silently and images never affect each other (issue 21.4): the method boundary marks
images with NaN / inf features invalid and leaves the others bit-identical; the detector and ``predict`` say
``invalid``; a study job fails naming the image; the held-out image that set the threshold is not flagged again."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from adspine.data.synth import generate
from study_fixtures import tiny_fabric
from adspine.detector import threshold as th
from adspine.detector.cli import app
from adspine.detector.detector import Detector, DetectorWarning
from adspine.methods import build_method
from adspine.methods.base import AnomalyMethod, MethodInfo, Prediction

SIZE = 64
SETTINGS = {"padim": {"d": 12}, "patchcore": {"coreset_ratio": 0.5, "target_dim": 16, "proj_dim": 8},
            "spade": {"k": 3}}
DETECTOR_SETTINGS = {"padim": {"d": 40}, "patchcore": {"coreset_ratio": 0.5, "target_dim": 64, "proj_dim": 16}}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _features(n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 8, 8, 8, generator=gen), torch.randn(n, 16, 4, 4, generator=gen)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_fabric(tmp_path_factory.mktemp("synth"), SIZE)


@pytest.fixture(scope="module")
def padim(data, tmp_path_factory) -> tuple[Detector, Path]:
    det = Detector("resnet18", "random", "thesis", "padim", image_size=SIZE, **DETECTOR_SETTINGS["padim"]).fit(data)
    return det, det.save(tmp_path_factory.mktemp("model") / "padim")


# -- the method boundary -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SETTINGS))
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_one_nonfinite_image_leaves_the_others_bit_identical(name, bad_value):
    method = build_method(name, **SETTINGS[name]).fit([_features(6, 0)])
    clean = _features(8, 1)
    ref = method.predict(clean, (32, 32))
    assert ref.invalid == {} and ref.valid.all()
    dirty = [m.clone() for m in clean]
    dirty[1][3, 2, 3, 1] = bad_value  # one value of image 3's second layer
    pred = method.predict(dirty, (32, 32))
    assert list(pred.invalid) == [3] and "layer1" in pred.invalid[3]
    assert pred.valid.tolist() == [True, True, True, False, True, True, True, True]
    others = [0, 1, 2, 4, 5, 6, 7]
    assert np.array_equal(pred.scores[others], ref.scores[others])  # bit-identical, not merely close
    assert np.array_equal(pred.maps[others], ref.maps[others])
    assert np.isnan(pred.scores[3]) and np.isnan(pred.maps[3]).all()


def test_an_all_invalid_batch_never_reaches_the_method():
    method = build_method("padim", **SETTINGS["padim"]).fit([_features(6, 0)])
    method._predict = None  # would raise if called
    feats = [torch.full_like(m, float("nan")) for m in _features(2, 1)]
    pred = method.predict(feats, (16, 16))
    assert sorted(pred.invalid) == [0, 1] and pred.maps.shape == (2, 16, 16) and np.isnan(pred.scores).all()


class _NanOutput(AnomalyMethod):
    """Finite features in, a NaN score out for image 1 (an overflow inside a method)."""

    info = MethodInfo("nan_output", "NaN output")

    def _fit(self, batches) -> None:
        for _ in batches:
            pass

    def _predict(self, maps, image_size) -> Prediction:
        b = maps[0].shape[0]
        scores = np.arange(b, dtype=np.float64)
        scores[1] = np.nan
        return Prediction(np.zeros((b, *image_size), np.float32), scores)


def test_a_nonfinite_method_output_is_invalid_too():
    pred = _NanOutput().fit([_features(2, 0)]).predict(_features(3, 1), (8, 8))
    assert list(pred.invalid) == [1] and "not finite" in pred.invalid[1]
    assert pred.scores[0] == 0.0 and pred.scores[2] == 2.0 and np.isnan(pred.maps[1]).all()


# -- the detector and predict ----------------------------------------------------------------------------------------
def test_detector_predict_marks_the_nan_image_invalid(data, padim):
    det, _ = padim
    from adspine.detector.detector import load_image

    x = torch.stack([load_image(p, det.protocol, det.image_size) for p in sorted((data / "test").rglob("*.png"))[:8]])
    ref = det.inspect(x)
    x[5, :, 10:20, 10:20] = float("nan")
    res = det.inspect(x)
    assert list(res.invalid) == [5] and "non-finite" in res.invalid[5]
    keep = [0, 1, 2, 3, 4, 6, 7]
    assert np.array_equal(res.scores[keep], ref.scores[keep]) and np.array_equal(res.maps[keep], ref.maps[keep])
    assert det.flag(res.scores)[5]  # an invalid image never passes as good
    with pytest.warns(DetectorWarning, match="image 5: invalid"):
        det.predict(x)


def test_predict_cli_says_invalid_and_scores_the_rest(data, padim, tmp_path, monkeypatch):
    import adspine.detector.detector as detector_module

    images = sorted((data / "test" / "good").glob("*.png"))
    real = detector_module.read_image

    def nan_for_second(item):
        raw = real(item)
        return np.full_like(raw, np.nan) if Path(item) == images[1] else raw

    monkeypatch.setattr(detector_module, "read_image", nan_for_second)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["predict", str(padim[1]), *map(str, images), "--out", str(out), "--no-progress"])
    assert res.exit_code == 1, res.output
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["verdict"] == "invalid" for r in rows] == [False, True, False]
    assert rows[1]["score"] == "" and "non-finite" in rows[1]["reason"]
    scores, _ = padim[0].predict([images[0], images[2]])
    np.testing.assert_allclose([float(rows[0]["score"]), float(rows[2]["score"])], scores, rtol=1e-5)
    assert "1 invalid" in res.output


def test_fit_names_a_training_image_with_nan_features(data, monkeypatch):
    import adspine.detector.detector as detector_module

    real = detector_module.read_image
    victim = sorted((data / "train" / "good").glob("*.png"))[0]
    monkeypatch.setattr(detector_module, "read_image",
                        lambda item: np.full_like(real(item), np.nan) if Path(item) == victim else real(item))
    with pytest.raises(ValueError, match=f"{victim}: non-finite feature values"):
        Detector("resnet18", "random", "thesis", "padim", image_size=SIZE, holdout_seed=3, d=20).fit(data)


# -- batch independence of the threshold -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["padim", "patchcore"])
def test_held_out_images_are_not_flagged_in_other_batches(data, method):
    det = Detector("resnet18", "random", "thesis", method, image_size=SIZE, **DETECTOR_SETTINGS[method]).fit(data)
    held = [data / "train" / "good" / f for f in det.holdout_record["files"]]
    others = sorted((data / "test").rglob("*.png"))
    for i, path in enumerate(held):
        alone = det.predict([path])[0]
        mixed = det.predict([path, *others[: 2 + i]])[0][:1]
        assert not det.flag(alone).any() and not det.flag(mixed).any()
    assert th.REL_TOLERANCE <= 1e-4  # a margin of float32 rounding, not of anomaly scores


def test_above_applies_the_relative_margin():
    t = 10.0
    values = np.array([t, t * (1 + 0.5 * th.REL_TOLERANCE), t * (1 + 2 * th.REL_TOLERANCE), np.nan, np.inf, -np.inf])
    assert th.above(values, t).tolist() == [False, False, True, True, True, True]


# -- the study -----------------------------------------------------------------------------------------------------
def test_study_job_fails_naming_the_nan_image(tmp_path, monkeypatch):
    import yaml

    import adspine.data.mvtec as mvtec
    from adspine.study.job import execute_job
    from adspine.study.plan import plan

    root = tmp_path / "data"
    generate(root, seed=4, size=SIZE, n_train=6, n_test_good=2, n_per_defect=1, categories=["fabric"])
    spec = {"name": "nan", "datasets": [{"root": str(root), "categories": "all"}],
            "backbones": [{"names": ["resnet18"], "inits": ["random"]}],
            "methods": [{"name": "padim", "settings": {"d": 20}}], "rd_seeds": [1], "protocol": "resize",
            "image_size": SIZE, "threads": 1, "batch_size": 4, "timing": {"warmup": 0, "repeats": 1, "batch_n": 2},
            "examples": {"count": 1, "size": 16}, "uncertainty": {"n_boot": 0}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    p = plan(tmp_path / "spec.yaml")
    victim = sorted((root / "fabric" / "test").rglob("*.png"))[2]
    real = mvtec.ImageDataset.__getitem__

    def getitem(self, i):
        item = real(self, i)
        if Path(item["path"]) == victim:
            item["image"] = torch.full_like(item["image"], float("nan"))
        return item

    monkeypatch.setattr(mvtec.ImageDataset, "__getitem__", getitem)
    row = execute_job(p.spec, p.jobs[0])["job"]
    assert row["status"] == "failed" and str(victim) in row["error"] and "non-finite" in row["error"]
    assert "\n" not in row["error"]
