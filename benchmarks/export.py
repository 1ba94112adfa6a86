"""Torch vs onnxruntime latency per image at batch 1 on CPU for exported detectors (PaDiM, PatchCore on random-init
ResNet-18 and offline-pretrained EfficientNet-Lite0), fitted on one synthetic category.

    .venv/bin/python benchmarks/export.py [--size 224] [--reps 20] [--threads 2]

Prints min and median ms per image of the whole detector (backbone + method + upsampling and blur) and the
relative map difference between the two paths.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _ms(fn, reps: int) -> tuple[float, float]:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train", type=int, default=16, help="synthetic training images")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from adspine.data.synth import generate
    from adspine.detector.detector import Detector
    from adspine.detector.onnx_export import OnnxDetector, export_onnx

    configs = [("resnet18", "random", "padim", {}), ("resnet18", "random", "patchcore", {}),
               ("tf_efficientnet_lite0", "imagenet", "padim", {}),
               ("tf_efficientnet_lite0", "imagenet", "patchcore", {})]
    with tempfile.TemporaryDirectory() as tmp:
        data = generate(Path(tmp) / "synth", n_train=args.train, n_test_good=1, n_per_defect=1,
                        categories=["fabric"]) / "fabric"
        print(f"batch 1, {args.size} px, {args.threads} thread(s), {args.reps} repeats; ms per image (min / median)")
        print(f"{'backbone':24s} {'method':10s} {'torch':>16s} {'onnxruntime':>16s} {'map rel. diff':>14s}")
        for backbone, init, method, settings in configs:
            det = Detector(backbone, init, "thesis", method, image_size=args.size, **settings).fit(data)
            res = export_onnx(det, Path(tmp) / f"{backbone}-{method}.onnx")
            ort_det = OnnxDetector(res["path"], threads=args.threads)
            x = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
            t_min, t_med = _ms(lambda: det.predict(x), args.reps)
            o_min, o_med = _ms(lambda: ort_det.run(x.numpy()), args.reps)
            print(f"{backbone:24s} {method:10s} {t_min:7.1f} / {t_med:6.1f} {o_min:7.1f} / {o_med:6.1f} "
                  f"{res['relative_diff']:14.1e}", flush=True)


if __name__ == "__main__":
    main()
