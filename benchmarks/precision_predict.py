"""End-to-end predict latency per precision: adspine's own ``Detector.predict`` (backbone + method) at bf16 against
fp32, the issue-23 target being bf16 <= 0.5x fp32 for PaDiM ResNet-18 and PatchCore WRN50-2 (batch 8, 224 px).

    .venv/bin/python benchmarks/precision_predict.py [--configs padim:resnet18,patchcore:wide_resnet50_2]
        [--size 224] [--batch 8] [--train 24] [--repeats 5] [--threads 2]

Per configuration one Detector is fitted per precision (random-init backbone: latency does not depend on the
weights) on one synthetic category; then, round-robin in one process (``study.timing.time_interleaved``), the
same batch of ``--batch`` preprocessed test images goes through fp32 and bf16 ``predict`` and, to tell where the
time goes, through each one's backbone alone and method alone (its own features). Prints ms per batch (min and
median) and the bf16 / fp32 ratios of the minima and of the medians. The method always runs in float32, so only the
backbone part can speed up: ratio = (bf16 backbone + method) / (fp32 backbone + method).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import torch

TARGET = 0.5  # issue 23: end-to-end bf16 predict <= 0.5x fp32


def fitted(method: str, backbone: str, precision: str, folder: Path, size: int, batch: int):
    from adspine.detector.detector import Detector

    det = Detector(backbone, "random", "thesis", method, image_size=size, batch_size=batch, precision=precision)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return det.fit(folder)


def test_batch(folder: Path, size: int, batch: int) -> torch.Tensor:
    """``batch`` test images of the category through the study's preprocessing (repeated if there are fewer)."""
    from adspine.data.images import load_rgb
    from adspine.data.transforms import preprocess

    paths = sorted((folder / "test").rglob("*.png"))
    return torch.stack([preprocess(load_rgb(paths[i % len(paths)]), None, "resize", size)[0] for i in range(batch)])


def run_config(method: str, backbone: str, folder: Path, args) -> None:
    from adspine.study.timing import time_interleaved

    x = test_batch(folder, args.size, args.batch)
    dets = {p: fitted(method, backbone, p, folder, args.size, args.batch) for p in ("fp32", "bf16")}
    size = (args.size, args.size)
    with torch.no_grad():  # not inference_mode: PatchCore's search threads write into tensors outside it
        feats = {p: d.extractor(x) for p, d in dets.items()}
        fns = {}
        for p, d in dets.items():
            fns[f"predict {p}"] = lambda d=d: d.predict(x)
            fns[f"backbone {p}"] = lambda d=d: d.extractor(x)
            fns[f"method {p}"] = lambda d=d, f=feats[p]: d.method.predict(f, size)
        lat = dict(zip(fns, time_interleaved(list(fns.values()), warmup=1, min_repeats=args.repeats, budget_s=0.0,
                                             max_repeats=args.repeats)))
    for part in ("predict", "backbone", "method"):
        a, b = lat[f"{part} fp32"], lat[f"{part} bf16"]
        mark = ""
        if part == "predict":
            mark = "  target met" if b.min / a.min <= TARGET else f"  target {TARGET:.2f} missed"
        print(f"{method:10s} {backbone:18s} {part:9s} {a.min:9.1f} {a.median:9.1f} {b.min:9.1f} {b.median:9.1f} "
              f"{b.min / a.min:8.3f} {b.median / a.median:8.3f}{mark}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="padim:resnet18,patchcore:wide_resnet50_2",
                        help="method:backbone pairs, comma-separated")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--train", type=int, default=24, help="normal training images of the synthetic category")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from precision import cpu_flags

    from adspine.backbones.precision import precision_note
    from adspine.data.synth import generate
    from adspine.study.timing import host_cpu, load_average

    print(f"{host_cpu()}, {args.threads} threads; torch {torch.__version__}; load average {load_average()}")
    print(f"CPU flags: {cpu_flags()}; {precision_note('bf16') or 'bf16 runs on bf16 hardware here'}")
    print(f"batch {args.batch}, {args.size} px, {args.train} training images, {args.repeats} round-robin repeats; "
          "ms per batch")
    print(f"{'method':10s} {'backbone':18s} {'part':9s} {'fp32 min':>9s} {'median':>9s} {'bf16 min':>9s} "
          f"{'median':>9s} {'ratio min':>8s} {'ratio med':>8s}")
    with tempfile.TemporaryDirectory(prefix="adspine-precision-predict-") as tmp:
        root = generate(Path(tmp) / "data", n_train=args.train, n_test_good=4, n_per_defect=1, size=args.size,
                        categories=["fabric"])
        for pair in args.configs.split(","):
            method, backbone = pair.split(":")
            run_config(method, backbone, root / "fabric", args)


if __name__ == "__main__":
    main()
