"""OpenVINO export of a fitted detector beside ONNX: backbone + method head in one graph (image in, score and map
out, as ``onnx_export.DetectorGraph``), saved as an IR (``.xml`` + ``.bin``, weights kept f32). The backbone is
converted from torch (``openvino_backend``), the head (``onnx_export.HEADS``) through the ONNX exporter, and the two
joined; ``OpenVinoDetector`` runs one, like ``OnnxDetector``.

Precision: ``fp32`` and ``bf16`` are the same IR compiled with ``INFERENCE_PRECISION_HINT`` f32 or bf16. ``int8``
quantizes the backbone (NNCF post-training static quantization, activation ranges from normal training images; the
head stays f32) and refits the method and its thresholds on that quantized backbone's features of the training
images: a Gaussian or memory bank fitted on fp32 features judges int8 features badly (PaDiM's Mahalanobis distance
magnifies the quantization error along low-variance directions: maps moved by 70-80 % on the demo). The IR's
``rt_info`` holds the ONNX export's metadata plus the precision, library versions and, for int8, the calibration
images. Each export is checked against its reference (the fp32 torch detector; for int8 the refitted detector on the
same quantized backbone) on two seeded random images and the calibration images: maps within
``TOLERANCES[precision]`` (max |difference| over the reference map's max |value|) and the same image verdicts at the
saved threshold, else a ``DetectorError``.
"""

from __future__ import annotations

import copy
import json
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from adspine.backbones.openvino_backend import Calibration, OpenVinoExtractor, compile_model, openvino_backbone
from adspine.backbones.precision import check_precision
from adspine.detector.detector import Detector, DetectorError
from adspine.detector.onnx_export import HEADS, OPSET, TOLERANCE, OnnxDetector, metadata

# measured on random-init ResNet-18 and ImageNet EfficientNet-Lite0 PaDiM / PatchCore detectors (64-96 px demo data):
# fp32 ~1e-6, bf16 ~1e-2 of the map's maximum; int8 against its refitted reference (the same quantized backbone,
# compiled alone and joined to the head: the CPU plugin fuses the two differently) 5e-7 to 5e-3
TOLERANCES = {"fp32": TOLERANCE, "bf16": 0.05, "int8": 0.02}
RT_INFO_KEY = "adspine"


def openvino_path(model: Path) -> Path | None:
    """The IR a ``predict`` argument names: an ``.xml`` file, or a folder holding exactly one ``.xml`` and no saved
    detector (``detector.json``); None otherwise."""
    model = Path(model)
    if model.suffix.lower() == ".xml":
        return model
    if model.is_dir() and not (model / "detector.json").exists():
        found = sorted(model.glob("*.xml"))
        if len(found) == 1:
            return found[0]
    return None


def _torch_reference(detector: Detector, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The fp32 torch path's scores and maps (the detector's own precision restored afterwards); the int8 refit's
    (an OpenVINO backbone) as they are."""
    fitted = getattr(detector, "precision", "fp32")
    if fitted == "fp32" or not hasattr(detector.extractor, "set_precision"):
        return detector.predict(x)
    try:
        return detector.set_precision("fp32").predict(x)
    finally:
        detector.set_precision(fitted)


class _Head(nn.Module):
    """The method head of ``onnx_export`` on the backbone's maps at the detector's input size."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        name = detector.method.name
        if name not in HEADS:
            raise DetectorError(f"OpenVINO export supports {', '.join(sorted(HEADS))}; {name} cannot be exported "
                                f"(use the saved detector folder with adspine predict)")
        self.head, self.size = HEADS[name](detector.method), tuple(detector._input_size())

    def forward(self, *maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(list(maps), self.size)


def detector_model(detector: Detector, backbone):
    """The ``openvino.Model`` image -> (score, map): ``backbone`` (an ``openvino_backbone`` model, consumed) joined
    to the detector's head, exported through ONNX (inputs ``map<i>``; maps the head does not read are pruned)."""
    import openvino as ov

    h, w = detector._input_size()
    maps = detector._features(torch.full((1, 3, h, w), 0.5))
    names = [f"map{i}" for i in range(len(maps))]
    with tempfile.TemporaryDirectory(prefix="adspine-ov-") as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        onnx_file = Path(tmp) / "head.onnx"
        torch.onnx.export(_Head(detector).eval(), tuple(maps), str(onnx_file), dynamo=False, opset_version=OPSET,
                          input_names=names, output_names=["score", "map"],
                          dynamic_axes={**{n: {0: "batch"} for n in names}, "score": {0: "batch"},
                                        "map": {0: "batch"}})
        head = ov.convert_model(str(onnx_file))
    sources = [result.input_value(0) for result in backbone.get_results()]
    for param in head.get_parameters():
        for target in list(param.output(0).get_target_inputs()):
            target.replace_source_output(sources[names.index(param.get_friendly_name())])
    return ov.Model(head.get_results(), backbone.get_parameters(), "adspine_detector")


def export_openvino(detector: Detector, path: str | Path, precision: str = "fp32",
                    calibration: Calibration | None = None, check: bool = True, seed: int = 0,
                    fit_images: Sequence[str | Path] | None = None) -> dict:
    """Write the IR ``path`` (``.xml``, its ``.bin`` beside) in ``precision``; int8 needs ``calibration`` (normal
    training images at the detector's input size) and refits on ``fit_images`` (default the calibration images'
    files). With ``check``, compare with the reference; returns ``{"path", "precision", "max_abs_diff",
    "relative_diff", "score_relative_diff", "checked", "verdicts_differ", "tolerance", "threshold"}`` (see
    ``check_against_torch``)."""
    import openvino as ov

    check_precision(precision)
    path = Path(path)
    if path.suffix.lower() != ".xml":
        raise DetectorError(f"{path}: an OpenVINO model is written as a .xml file (its weights go to the .bin beside)")
    if precision == "int8" and calibration is None:
        raise DetectorError("int8 export needs calibration images: give the detector's normal training images")
    size = detector._input_size()
    if calibration is not None and tuple(calibration.images.shape[-2:]) != tuple(size):
        raise DetectorError(f"calibration images are {tuple(calibration.images.shape[-2:])}, the detector's input is "
                            f"{tuple(size)}; preprocess them with its protocol and size")
    _Head(detector)  # an unsupported method fails before any conversion
    backbone, record = openvino_backbone(detector.extractor, precision, calibration)
    if precision == "int8":
        images = fit_images if fit_images is not None else calibration.paths
        if not images:
            raise DetectorError("int8 export refits on the normal training images; none were given")
        detector = copy.copy(detector)
        detector.extractor = OpenVinoExtractor(detector.extractor, compile_model(backbone, precision), precision,
                                               record)
        detector.method = detector.method.clone()
        detector.fit(list(images))
    model = detector_model(detector, backbone)
    meta = {**metadata(detector), "precision": precision, **{k: v for k, v in record.items() if k != "precision"}}
    model.set_rt_info(json.dumps(meta), [RT_INFO_KEY])
    path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(path), compress_to_fp16=False)
    result = {"path": str(path), "precision": precision, "tolerance": TOLERANCES[precision],
              "threshold": detector.threshold}
    if check:
        result.update(check_against_torch(detector, OpenVinoDetector(path), calibration, seed))
        if result["relative_diff"] > TOLERANCES[precision]:
            raise DetectorError(f"{path}: OpenVINO {precision} maps differ from the reference by "
                                f"{result['relative_diff']:.2e} (relative), above {TOLERANCES[precision]:g}")
        if result["verdicts_differ"]:
            raise DetectorError(f"{path}: OpenVINO {precision} changes {result['verdicts_differ']} of "
                                f"{result['checked']} image verdicts against the reference")
    return result


def check_against_torch(detector: Detector, exported: OpenVinoDetector, calibration: Calibration | None = None,
                        seed: int = 0) -> dict:
    """Map and score differences and image verdicts that differ between ``exported`` and its reference
    ``detector`` (fp32 torch, or the int8 refit) on two seeded random images and the calibration images."""
    h, w = detector._input_size()
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(seed))
    if calibration is not None:
        x = torch.cat([x, calibration.images.float()])
    ref_scores, ref_maps = _torch_reference(detector, x)
    scores, maps = exported.predict(x)
    diff = float(np.abs(maps - ref_maps).max())
    return {"max_abs_diff": diff, "relative_diff": diff / max(float(np.abs(ref_maps).max()), 1e-12),
            "score_relative_diff": float(np.abs(scores - ref_scores).max() / max(float(np.abs(ref_scores).max()),
                                                                                 1e-12)),
            "checked": len(x), "verdicts_differ": int((exported.flag(scores) != detector.flag(ref_scores)).sum())}


class OpenVinoDetector(OnnxDetector):
    """An exported OpenVINO IR run on the CPU in the precision it was exported for: ``predict(images) -> (scores,
    maps)``, ``flag``, ``flag_pixels`` like ``OnnxDetector``."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import openvino as ov

        path = Path(path)
        try:
            model = ov.Core().read_model(str(path))
            meta = json.loads(model.get_rt_info([RT_INFO_KEY]).astype(str))
            precision = check_precision(meta["precision"])
            self.set_metadata(path, meta)
            self.compiled = compile_model(model, precision, threads)
        except Exception as e:  # noqa: BLE001 - any reader failure is a bad file
            raise DetectorError(f"{path}: not an adspine OpenVINO detector ({type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
        self.precision = precision

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.compiled(np.ascontiguousarray(x, dtype=np.float32))
        score, amap = out[self.compiled.output("score")], out[self.compiled.output("map")]
        return np.asarray(score, dtype=np.float64), np.asarray(amap, dtype=np.float32)


def export_command(detector: Detector, model: Path, out: Path | None, precision: str | None,
                   calibration: Path | None, calibration_seed: int = 0) -> str:
    """``adspine export --format openvino``: write the IR (default ``MODEL/openvino-<precision>/detector.xml``;
    precision default the detector's own) and return the line that reports its check. int8 draws up to
    ``CALIBRATION_LIMIT`` images from ``calibration`` (a folder of normal images, an MVTec category or a manifest
    CSV's train rows)."""
    from adspine.backbones.openvino_backend import calibration_set
    from adspine.detector.sources import normal_images

    precision = check_precision(precision or getattr(detector, "precision", "fp32"))
    calib, train = None, None
    if calibration is not None:
        if precision != "int8":
            raise DetectorError(f"--calibration is for --precision int8 (this export is {precision})")
        train = normal_images(calibration)
        calib = calibration_set(train, detector.protocol, detector._input_size(), seed=calibration_seed)
    elif precision == "int8":
        raise DetectorError("--precision int8 needs --calibration: the detector's normal training images (a folder, "
                            "an MVTec category or a manifest CSV)")
    res = export_openvino(detector, out or model / f"openvino-{precision}" / "detector.xml", precision, calib,
                          fit_images=train)
    used = (f"; calibrated on {len(calib.names)} of {calib.drawn_from} images (seed {calib.seed}), method and "
            f"thresholds refitted on int8 features: threshold {res['threshold']:.6g} (fp32 {detector.threshold:.6g})"
            if calib else "")
    ref = "the int8 refit on OpenVINO" if calib else "torch fp32"
    return (f"wrote {res['path']} ({precision}{used}); OpenVINO vs {ref}: map max difference "
            f"{res['max_abs_diff']:.3g} ({res['relative_diff']:.2e} relative, limit {res['tolerance']:g}), score "
            f"{res['score_relative_diff']:.2e} relative, {res['checked']} image verdicts equal")
