"""OpenVINO backend and export: fp32 features equal torch's, int8 features follow fp32 with a recorded calibration,
the exported detector equals torch (fp32) or its int8 refit, and ``adspine predict`` runs an exported IR."""

from __future__ import annotations

import importlib.metadata
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from adspine.backbones import build_extractor  # noqa: E402
from adspine.backbones.openvino_backend import build_openvino_extractor, calibration_set  # noqa: E402
from study_fixtures import tiny_fabric  # noqa: E402
from adspine.detector.cli import app  # noqa: E402
from adspine.detector.detector import Detector, DetectorError  # noqa: E402
from adspine.detector.onnx_export import TOLERANCE  # noqa: E402
from adspine.detector.openvino_export import TOLERANCES, OpenVinoDetector, export_openvino  # noqa: E402

SIZE = 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def extractor():
    return build_extractor("resnet18", init="random", layers="thesis")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_fabric(tmp_path_factory.mktemp("synth"), SIZE)


@pytest.fixture(scope="module")
def padim(data, tmp_path_factory) -> tuple[Detector, Path]:
    det = Detector("resnet18", "random", "thesis", "padim", image_size=SIZE, d=40).fit(data)
    return det, det.save(tmp_path_factory.mktemp("model") / "padim")


def _relative(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(a).max())


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten().numpy(), b.double().flatten().numpy()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# -- backbone --------------------------------------------------------------------------------------------------------
def test_fp32_features_equal_torch(extractor, images):
    ov_ex = build_openvino_extractor(extractor, "fp32")
    ref, out = extractor(images), ov_ex(images)
    assert [o.shape for o in out] == [r.shape for r in ref] and all(o.dtype == torch.float32 for o in out)
    for r, o in zip(ref, out):
        assert _relative(r, o) <= TOLERANCE  # measured ~1.5e-6
    assert ov_ex.layer_info(SIZE) == extractor.layer_info(SIZE) and ov_ex.info["precision"] == "fp32"
    assert ov_ex.record["versions"]["openvino"].startswith(importlib.metadata.version("openvino"))


def test_bf16_features_close_to_torch(extractor, images):
    for r, o in zip(extractor(images), build_openvino_extractor(extractor, "bf16")(images)):
        assert _relative(r, o) <= 0.05 and _cosine(r, o) > 0.999  # measured ~7e-3 and 0.99998


def test_int8_follows_fp32_and_records_its_calibration(extractor, images, data):
    paths = sorted((data / "train" / "good").glob("*.png"))
    calib = calibration_set(paths, "resize", SIZE, limit=5, seed=3)
    drawn = sorted(random.Random(3).sample(range(len(paths)), 5))
    assert calib.names == tuple(paths[i].name for i in drawn) and calib.images.shape == (5, 3, SIZE, SIZE)
    ov_ex = build_openvino_extractor(extractor, "int8", calib)
    for r, o in zip(extractor(images), ov_ex(images)):
        assert _cosine(r, o) > 0.9  # measured 0.9996-0.9999 (random init, 64 px)
    rec = ov_ex.record
    assert rec["precision"] == "int8" and rec["calibration"]["images"] == list(calib.names)
    assert rec["calibration"]["count"] == 5 and rec["calibration"]["seed"] == 3
    assert rec["calibration"]["drawn_from"] == len(paths)
    assert rec["versions"]["nncf"] == importlib.metadata.version("nncf")


def test_int8_without_calibration_is_refused(extractor):
    with pytest.raises(ValueError, match="calibration"):
        build_openvino_extractor(extractor, "int8")
    with pytest.raises(ValueError, match="int4"):
        build_openvino_extractor(extractor, "int4")


def test_detector_runs_on_the_openvino_extractor(padim, data):
    det, _ = padim
    test = sorted((data / "test").rglob("*.png"))
    ref_scores, ref_maps = det.predict(test)
    torch_extractor = det.extractor
    try:
        det.extractor = build_openvino_extractor(torch_extractor, "fp32")
        scores, maps = det.predict(test)
    finally:
        det.extractor = torch_extractor
    assert _relative(ref_maps, maps) <= TOLERANCE
    np.testing.assert_array_equal(det.flag(scores), det.flag(ref_scores))


# -- export ----------------------------------------------------------------------------------------------------------
def test_exported_fp32_equals_torch_and_predict_runs_it(padim, data, tmp_path):
    det, folder = padim
    res = CliRunner().invoke(app, ["export", str(folder), "--format", "openvino", "--out", str(tmp_path / "d.xml")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "d.bin").exists() and "map max difference" in res.output
    test = sorted((data / "test").rglob("*.png"))
    ov_det = OpenVinoDetector(tmp_path / "d.xml")
    s_ref, m_ref = det.predict(test)
    s_ov, m_ov = ov_det.predict(test)
    assert _relative(m_ref, m_ov) <= TOLERANCE
    np.testing.assert_allclose(s_ov, s_ref, rtol=TOLERANCE)
    assert ov_det.threshold == det.threshold and ov_det.protocol == det.protocol and ov_det.precision == "fp32"
    # predict on the IR file and on its folder: the torch detector's verdicts
    expected = ["anomalous" if f else "good" for f in det.flag(s_ref)]
    for target in (tmp_path / "d.xml", tmp_path):
        out = CliRunner().invoke(app, ["predict", str(target), *map(str, test), "--no-progress"])
        verdicts = [line.split()[0] for line in out.output.splitlines() if line.split() and
                    line.split()[-1].endswith(".png")]
        assert verdicts == expected, out.output


def test_int8_export_refits_on_the_quantized_backbone(padim, data, tmp_path):
    det, _ = padim
    paths = sorted((data / "train" / "good").glob("*.png"))
    calib = calibration_set(paths, det.protocol, SIZE, limit=8)
    res = export_openvino(det, tmp_path / "q.xml", "int8", calib, fit_images=paths)
    assert res["relative_diff"] <= TOLERANCES["int8"] and res["verdicts_differ"] == 0 and res["checked"] == 2 + 8
    import openvino as ov

    meta = json.loads(ov.Core().read_model(str(tmp_path / "q.xml")).get_rt_info(["adspine"]).astype(str))
    assert meta["precision"] == "int8" and meta["calibration"]["images"] == list(calib.names)
    assert meta["versions"]["nncf"] == importlib.metadata.version("nncf") and meta["threshold"] == res["threshold"]
    quantized = ov.Core().read_model(str(tmp_path / "q.xml"))
    assert any(op.get_type_name() == "FakeQuantize" for op in quantized.get_ops())


def test_export_errors_are_one_line(padim, tmp_path):
    _, folder = padim
    for args, message in ((["--format", "openvino", "--precision", "int8"], "needs --calibration"),
                          (["--precision", "int8"], "use --format openvino"),
                          (["--format", "openvino", "--precision", "fp16"], "fp16")):
        res = CliRunner().invoke(app, ["export", str(folder), *args, "--out", str(tmp_path / "x.xml")])
        assert res.exit_code != 0 and message in res.output, res.output
    with pytest.raises(DetectorError, match="not an adspine OpenVINO detector"):
        (tmp_path / "bad.xml").write_text("<net/>")
        OpenVinoDetector(tmp_path / "bad.xml")
