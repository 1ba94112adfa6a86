"""Do exported detectors give torch's verdicts? Fits a Detector per method on a category's normal training images,
exports it to ONNX and to OpenVINO fp32, predicts every test image with torch, onnxruntime and OpenVINO, and counts
image verdicts (score above the threshold) and pixel verdicts that differ from torch's.

    .venv/bin/python benchmarks/export_verdicts.py [--data /tmp/demo-out/data] [--categories fabric,chip]
        [--methods padim,patchcore] [--backbone tf_efficientnet_lite0] [--init imagenet] [--size 96]

Without ``--data`` the synthetic demo data is generated in a temporary folder (``adspine data synth``'s defaults).
``margin`` is the smallest |score - threshold| / threshold over the test images under torch: how close the nearest
verdict came to flipping.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch


def compare(det, category: Path, tmp: Path) -> list[tuple[str, dict]]:
    from adspine.data import scan
    from adspine.detector.onnx_export import OnnxDetector, export_onnx
    from adspine.detector.openvino_export import OpenVinoDetector, export_openvino

    paths = [s.path for s in scan(category.parent, category.name).test]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores, maps = det.predict(paths)
        onnx_path, ov_path = tmp / "detector.onnx", tmp / "openvino" / "detector.xml"
        export_onnx(det, onnx_path)
        export_openvino(det, ov_path, "fp32")
        runs = {"onnxruntime fp32": OnnxDetector(onnx_path), "openvino fp32": OpenVinoDetector(ov_path)}
    flags, pixel_flags = det.flag(scores), det.flag_pixels(maps)
    out = []
    for label, exported in runs.items():
        s, m = exported.predict(paths)
        out.append((label, {
            "images": len(paths), "image_differ": int((exported.flag(s) != flags).sum()),
            "pixels": maps.size, "pixel_differ": int((exported.flag_pixels(m) != pixel_flags).sum()),
            "score_rel": float(np.abs(s - scores).max() / np.abs(scores).max()),
            "margin": float(np.abs(scores - det.threshold).min() / abs(det.threshold)),
            "flagged": int(flags.sum())}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="an MVTec-layout root (default: fresh synthetic data)")
    parser.add_argument("--categories", default="fabric,chip")
    parser.add_argument("--methods", default="padim,patchcore")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--init", default="imagenet")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime
    import openvino

    from adspine.data.synth import generate
    from adspine.detector.detector import Detector

    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__}; "
          f"{args.backbone} {args.init}, {args.size} px")
    print(f"{'category':10s} {'method':10s} {'runtime':18s} {'images':>6s} {'flagged':>7s} {'verdicts differ':>15s} "
          f"{'pixel verdicts differ':>22s} {'score rel diff':>14s} {'margin':>7s}")
    with tempfile.TemporaryDirectory(prefix="adspine-verdicts-") as tmp:
        tmp = Path(tmp)
        root = args.data or generate(tmp / "data")
        for cat in args.categories.split(","):
            for method in args.methods.split(","):
                det = Detector(args.backbone, args.init, "thesis", method, image_size=args.size)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    det.fit(root / cat)
                for label, r in compare(det, root / cat, tmp / f"{cat}-{method}"):
                    print(f"{cat:10s} {method:10s} {label:18s} {r['images']:6d} {r['flagged']:7d} "
                          f"{r['image_differ']:15d} {r['pixel_differ']:>12d} of {r['pixels']:<7d} "
                          f"{r['score_rel']:14.2e} {r['margin']:7.3f}", flush=True)


if __name__ == "__main__":
    main()
