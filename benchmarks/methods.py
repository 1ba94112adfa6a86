"""Benchmark of PaDiM, SPADE and PatchCore on CPU (not a test): speed, peak memory and model size.

For each backbone (random init) and method, one subprocess (so memory peaks do not mix) streams the training images
of a synthetic category through the backbone into ``fit``, predicts a few test images and saves the model. Printed per
row: fit seconds (of which backbone), predict ms per image split into backbone and method, peak resident memory
(``ru_maxrss``) after fit and overall, the process RSS before fitting (backbone + data + libraries), and the model size
on disk. Then PaDiM's fit peak memory at 50 and 400 training images (it streams, so it should barely change).

    .venv/bin/python benchmarks/methods.py                      # ResNet-18 and WRN50-2, 50 train images, 224 px
    .venv/bin/python benchmarks/methods.py --backbones resnet18 --n-train 20
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CATEGORY = "wood"
BATCH = 8


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(job: dict) -> dict:
    """One measurement: build backbone + method, fit on streamed features, predict, save. Returns figures."""
    import torch

    torch.set_num_threads(job["threads"])
    import faiss

    faiss.omp_set_num_threads(job["threads"])
    from adspine.backbones.extractor import build_extractor
    from adspine.data.mvtec import ImageDataset, scan_category
    from adspine.methods import build_method

    data = scan_category(job["root"], CATEGORY, verify=False)
    train = ImageDataset(data.train[: job["n_train"]], protocol="paper", size=job["size"])
    test = ImageDataset(data.test[: job["n_test"]], protocol="paper", size=job["size"])
    extractor = build_extractor(job["backbone"], init="random", init_seed=0)
    settings = dict(job["settings"])
    if job["method"] == "padim" and settings.get("d") == "default":
        settings["d"] = extractor.default_d
    method = build_method(job["method"], **settings)
    rss_before = _rss_mb()
    backbone_s = 0.0

    def batches(ds):
        nonlocal backbone_s
        for i in range(0, len(ds), BATCH):
            images = torch.stack([ds[j]["image"] for j in range(i, min(i + BATCH, len(ds)))])
            t = time.perf_counter()
            feats = extractor(images)
            backbone_s += time.perf_counter() - t
            yield feats

    t0 = time.perf_counter()
    method.fit(batches(train))
    fit_s = time.perf_counter() - t0
    out = {"fit_s": fit_s, "fit_backbone_s": backbone_s, "rss_before_mb": rss_before, "fit_peak_mb": _peak_mb()}
    if job["n_test"]:
        extractor(torch.stack([test[i]["image"] for i in range(min(BATCH, len(test)))]))  # warm up this batch shape
        backbone_s, method_s, n, n_method = 0.0, 0.0, 0, 0
        for feats in batches(test):
            n += feats[0].shape[0]
            take = min(feats[0].shape[0], job["n_method"] - n_method)  # slow methods score only the first images
            if take > 0:
                t = time.perf_counter()
                method.predict([f[:take] for f in feats], (job["size"], job["size"]))
                method_s += time.perf_counter() - t
                n_method += take
        out.update(predict_backbone_ms=1000 * backbone_s / n, predict_method_ms=1000 * method_s / n_method)
        with tempfile.TemporaryDirectory() as tmp:
            method.save(tmp, {"backbone": job["backbone"], **extractor.info})
            out["model_mb"] = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 2**20
    out["peak_mb"] = _peak_mb()
    out["settings"] = method.settings()
    return out


def run_job(job: dict) -> dict:
    """Run ``worker(job)`` in a fresh interpreter and return its JSON result."""
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True, env=os.environ
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="resnet18,wide_resnet50_2")
    ap.add_argument("--methods", default="padim,spade,patchcore")
    ap.add_argument("--n-train", type=int, default=50)
    ap.add_argument("--n-test", type=int, default=8, help="test images through the backbone (and the method)")
    ap.add_argument("--n-test-spade", type=int, default=2, help="SPADE scores only this many (its search is slow)")
    ap.add_argument("--memory-n", default="50,400", help="PaDiM fit-memory runs (ResNet-18); empty to skip")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    from adspine.data.synth import generate

    memory_n = [int(n) for n in args.memory_n.split(",") if n]
    n_train = max([args.n_train, *memory_n])
    side = round(args.size * 256 / 224)
    settings = {
        "padim": {"d": "default", "rd_seed": 1024},
        "spade": {"k": 50},
        "patchcore": {"coreset_ratio": 0.1, "coreset_seed": 0},
    }
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        root = generate(Path(tmp) / "synth", seed=0, size=side, n_train=n_train, n_test_good=4, n_per_defect=2,
                        categories=[CATEGORY])
        print(f"synthetic '{CATEGORY}' ({n_train} train images, {side} px, paper crop {args.size}) generated in "
              f"{time.perf_counter() - t:.0f} s; {args.threads} threads; random-init backbones\n")
        header = (f"{'backbone':<16} {'method':<10} {'fit s':>7} {'(bb s)':>7} {'bb ms/img':>9} {'meth ms/img':>11} "
                  f"{'RSS0 MB':>8} {'fit peak MB':>11} {'peak MB':>8} {'model MB':>9}")
        print(header)
        print("-" * len(header))
        for backbone in args.backbones.split(","):
            for method in args.methods.split(","):
                n_method = min(args.n_test_spade, args.n_test) if method == "spade" else args.n_test
                job = {"backbone": backbone, "method": method, "settings": settings[method], "root": str(root),
                       "n_train": args.n_train, "n_test": args.n_test, "n_method": n_method, "size": args.size,
                       "threads": args.threads}
                r = run_job(job)
                if "error" in r:
                    print(f"{backbone:<16} {method:<10} FAILED: {r['error']}")
                    continue
                print(f"{backbone:<16} {method:<10} {r['fit_s']:7.1f} {r['fit_backbone_s']:7.1f} "
                      f"{r['predict_backbone_ms']:9.0f} {r['predict_method_ms']:11.0f} {r['rss_before_mb']:8.0f} "
                      f"{r['fit_peak_mb']:11.0f} {r['peak_mb']:8.0f} {r['model_mb']:9.1f}   {r['settings']}",
                      flush=True)
        if memory_n:
            print("\nPaDiM fit peak memory vs training-set size (resnet18, d=100, streamed in batches of 8):")
            for n in memory_n:
                job = {"backbone": "resnet18", "method": "padim", "settings": settings["padim"], "root": str(root),
                       "n_train": n, "n_test": 0, "n_method": 0, "size": args.size, "threads": args.threads}
                r = run_job(job)
                if "error" in r:
                    print(f"  n_train={n}: FAILED: {r['error']}")
                    continue
                print(f"  n_train={n:4d}: fit {r['fit_s']:6.1f} s, RSS before fit {r['rss_before_mb']:6.0f} MB, "
                      f"fit peak {r['fit_peak_mb']:6.0f} MB", flush=True)


if __name__ == "__main__":
    main()
