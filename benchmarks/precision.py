"""Backbone latency per precision and backend, the machine's GEMM floors, and (``--quality``) PaDiM's AUROC per
precision on synthetic categories.

    .venv/bin/python benchmarks/precision.py [--backbones resnet18,wide_resnet50_2,tf_efficientnet_lite0,mobilenet_v2]
        [--size 224] [--batches 1,8] [--repeats 5] [--threads 2] [--compile] [--quality] [--quality-size 128]

Variants, timed round-robin in one process (``study.timing.time_interleaved``, ms per image, min and median):
torch fp32 eager, torch bf16 (autocast + channels_last), torch.compile fp32 (``--compile``), ONNX Runtime fp32 and
int8 (``quantize_static``, QDQ), OpenVINO fp32 / bf16 / int8 (NNCF); both int8 variants calibrated on the same
synthetic normal training images. Before timing, each variant's feature fidelity against torch fp32 is printed. The floors are torch.mm
(4096 x 4096) @ (4096 x 1024) in fp32 and bf16; ``x floor`` is ms/img over the backbone's FLOPs at that rate (fp32
variants against the fp32 floor, bf16 against the bf16 floor; int8 has no torch floor). Backbones are random-init
(latency does not depend on weights); ``--quality`` fits PaDiM (Detector, d=100) per precision on each synthetic
category and prints image / pixel AUROC with deltas against torch fp32.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

FLAGS = ("avx512_bf16", "amx_bf16", "avx512_vnni", "amx_int8")


def cpu_flags() -> str:
    try:
        words = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split())
    except (OSError, StopIteration):
        words = set()
    return "  ".join(f"{f}={'yes' if f in words else 'no'}" for f in FLAGS)


def gemm_floor(dtype: torch.dtype, repeats: int = 3) -> float:
    """GFLOP/s of torch.mm (4096 x 4096) @ (4096 x 1024), best of ``repeats``."""
    a, b = torch.randn(4096, 4096).to(dtype), torch.randn(4096, 1024).to(dtype)
    torch.mm(a, b)
    best = min(_seconds(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * 4096 * 4096 * 1024 / best / 1e9


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def calibration(size: int, root: Path):
    """Normal training images of one synthetic category (the int8 calibration set)."""
    from adspine.backbones.openvino_backend import calibration_set
    from adspine.data.synth import generate

    generate(root, n_train=16, n_test_good=2, n_per_defect=1, size=size, categories=["fabric"])
    return calibration_set(sorted((root / "fabric" / "train" / "good").glob("*.png")), "resize", size)


def onnx_runner(extractor, size: int, path: Path, threads: int):
    """The extractor (normalisation inside) exported to ONNX and run by onnxruntime."""
    from adspine.backbones.openvino_backend import _Normalised

    names = [f"map{i}" for i in range(len(extractor.layer_names))]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Normalised(extractor).eval(), (torch.rand(1, 3, size, size),), str(path), dynamo=False,
                          opset_version=17, input_names=["image"], output_names=names,
                          dynamic_axes={"image": {0: "batch"}, **{n: {0: "batch"} for n in names}})
    return ort_session(path, threads)


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"image": x.numpy()})


def ort_int8_runner(fp32_onnx: Path, calib, threads: int):
    """ONNX Runtime's post-training static quantisation (QDQ, per-channel weights, MinMax) of the exported backbone,
    calibrated on the same normal images as OpenVINO's int8: the alternative to NNCF, timed beside it."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"image": calib.images[i:i + 1].numpy()} for i in range(len(calib.images))])

        def get_next(self):
            return next(self.batches, None)

    prepared, out = fp32_onnx.with_suffix(".pre.onnx"), fp32_onnx.with_suffix(".int8.onnx")
    quant_pre_process(str(fp32_onnx), str(prepared))
    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return ort_session(out, threads)


def variants(name: str, size: int, calib, tmp: Path, threads: int, compiled: bool) -> dict:
    from adspine.backbones import build_extractor
    from adspine.backbones.openvino_backend import build_openvino_extractor

    fp32 = build_extractor(name, init="random", layers="thesis")
    bf16 = copy.deepcopy(fp32).set_precision("bf16")  # same weights (the extractor returns to eval mode itself)
    out = {"torch fp32": fp32, "torch bf16": bf16}
    if compiled:
        body = torch.compile(fp32.body)
        out["torch.compile fp32"] = lambda x: body((x - fp32._mean) / fp32._std)
    out["onnxruntime fp32"] = onnx_runner(fp32, size, tmp / f"{name}.onnx", threads)
    out["onnxruntime int8"] = ort_int8_runner(tmp / f"{name}.onnx", calib, threads)
    for p in ("fp32", "bf16", "int8"):
        out[f"openvino {p}"] = build_openvino_extractor(fp32, p, calib if p == "int8" else None, threads)
    return out


def fidelity(name: str, runs: dict, calib) -> None:
    """Per variant, the worst layer's cosine similarity and relative error of its feature maps against torch fp32 on
    4 normal calibration images (what the int8 choice between NNCF and ONNX Runtime rests on, beside speed)."""
    x = calib.images[:4]
    with torch.inference_mode():
        ref = [np.asarray(m, np.float64) for m in runs["torch fp32"](x)]
        for label, run in runs.items():
            if label == "torch fp32":
                continue
            got = [np.asarray(m, np.float64) for m in run(x)]
            cos = min(float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum())) for a, b in zip(ref, got))
            rel = max(float(np.linalg.norm(a - b) / np.linalg.norm(a)) for a, b in zip(ref, got))
            print(f"{name:24s} fidelity {label:22s} cosine >= {cos:.5f}, relative error <= {rel:.4f}", flush=True)


def latency_table(args, calib, tmp: Path, floors: dict) -> None:
    from adspine.backbones import build_extractor
    from adspine.study.timing import time_interleaved

    print(f"\n{'backbone':24s} {'batch':>5s} {'variant':22s} {'min ms/img':>10s} {'median':>8s} {'x floor':>8s}")
    for name in args.backbones.split(","):
        gflop = build_extractor(name, init="random", layers="thesis").flops(args.size) / 1e9
        runs = variants(name, args.size, calib, tmp, args.threads, args.compile)
        fidelity(name, runs, calib)
        for batch in args.batch_list:
            x = torch.rand(batch, 3, args.size, args.size)
            fns = [(lambda f=f: f(x)) for f in runs.values()]
            with torch.inference_mode():
                lat = time_interleaved(fns, warmup=1, min_repeats=args.repeats, budget_s=0.0,
                                       max_repeats=args.repeats, per=[batch] * len(fns))
            for label, t in zip(runs, lat):
                kind = "bf16" if "bf16" in label else "fp32" if "fp32" in label else None
                ratio = f"{t.min / (1e3 * gflop / floors[kind]):8.2f}" if kind else f"{'-':>8s}"
                print(f"{name:24s} {batch:5d} {label:22s} {t.min:10.2f} {t.median:8.2f} {ratio}", flush=True)
        print(f"{name:24s} {'':5s} {'FLOPs (224 px, 1 img)':22s} {gflop:10.2f} GFLOP; floor ms/img fp32 "
              f"{1e3 * gflop / floors['fp32']:.2f}, bf16 {1e3 * gflop / floors['bf16']:.2f}", flush=True)


def quality_table(args, tmp: Path) -> None:
    from adspine.backbones.openvino_backend import build_openvino_extractor, calibration_set
    from adspine.data.synth import generate
    from adspine.detector.cli import evaluate_detector
    from adspine.detector.detector import Detector
    from adspine.detector.sources import normal_images

    root = tmp / "quality"
    categories = args.categories.split(",")
    generate(root, n_train=30, n_test_good=10, n_per_defect=5, size=args.quality_size, categories=categories)
    print(f"\nPaDiM (d=100, random-init backbones, {args.quality_size} px), AUROC and delta against torch fp32")
    print(f"{'backbone':24s} {'category':10s} {'precision':16s} {'image':>7s} {'d image':>8s} {'pixel':>7s} "
          f"{'d pixel':>8s}")
    for name in args.backbones.split(","):
        for cat in categories:
            folder = root / cat
            calib = calibration_set(normal_images(folder), "resize", args.quality_size)
            ref = None
            for label in ("torch fp32", "torch bf16", "openvino fp32", "openvino bf16", "openvino int8"):
                det = Detector(name, "random", "thesis", "padim", image_size=args.quality_size, d=100)
                backend, precision = label.split()
                if backend == "torch":
                    det.set_precision(precision)
                else:
                    det.extractor = build_openvino_extractor(det.extractor, precision, calib)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = evaluate_detector(det.fit(folder), folder)
                ref = ref or res
                print(f"{name:24s} {cat:10s} {label:16s} {res['image_auroc']:7.4f} "
                      f"{res['image_auroc'] - ref['image_auroc']:+8.4f} {res['pixel_auroc']:7.4f} "
                      f"{res['pixel_auroc'] - ref['pixel_auroc']:+8.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="resnet18,wide_resnet50_2,tf_efficientnet_lite0,mobilenet_v2")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action="store_true", help="also time torch.compile fp32 (slow to compile)")
    parser.add_argument("--quality", action="store_true", help="PaDiM AUROC per precision on synthetic data")
    parser.add_argument("--quality-size", type=int, default=128)
    parser.add_argument("--categories", default="fabric,nut")
    args = parser.parse_args()
    args.batch_list = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(args.threads)
    import nncf
    import onnxruntime
    import openvino

    from adspine.study.timing import host_cpu, load_average

    print(f"{host_cpu()}, {args.threads} threads; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
          f"openvino {openvino.__version__}, nncf {nncf.__version__}; load average {load_average()}")
    print(f"CPU flags: {cpu_flags()}")
    floors = {"fp32": gemm_floor(torch.float32), "bf16": gemm_floor(torch.bfloat16)}
    print(f"GEMM floor (torch.mm 4096x4096 @ 4096x1024): fp32 {floors['fp32']:.0f} GFLOP/s, "
          f"bf16 {floors['bf16']:.0f} GFLOP/s")
    with tempfile.TemporaryDirectory(prefix="adspine-precision-") as tmp:
        tmp = Path(tmp)
        latency_table(args, calibration(args.size, tmp / "calib"), tmp, floors)
        if args.quality:
            quality_table(args, tmp)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
