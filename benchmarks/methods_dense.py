"""Benchmark of SPADE, PaDiM and CFLOW on CPU (not a test): speed and fit memory, optionally against an older copy.

Features are computed once (synthetic ``wood`` category, ``paper`` protocol at 224, random-init torchvision backbones,
layers 1-3) and saved; every measurement then runs in its own subprocess (memory peaks do not mix) with the code
under ``src/`` ("after") and, with ``--before SRC``, the code of another checkout ("before", e.g. a worktree of HEAD:
``git worktree add /tmp/adspine-before HEAD`` then ``--before /tmp/adspine-before/src``), side by side.

- ``spade``: ResNet-18, K=50, 50 training images; method seconds per test image (batch 1; minimum and median of the
  repeats); maps compared with a float64 brute-force reference of the same pipeline (max relative difference).
- ``padim``: WRN50-2, d=550, 40 training images in batches of 8; fit seconds and the fit's memory high-water mark
  (``/proc/self/clear_refs`` <- 5, then ``VmHWM`` of ``/proc/self/status``: the kernel's exact peak, no sampling) over
  the RSS before fit, against the float32 model (mean + whitening factors). Needs about 6-10 GB for "before".
- ``calibrate``: each method's cost-model FLOPs divided by its measured seconds and by the conv FLOP/s of
  ``adspine.study.timing.conv_flops_per_second`` = the ``efficiency`` of its ``MethodInfo``.

    .venv/bin/python benchmarks/methods_dense.py --parts spade calibrate --before /tmp/adspine-before/src
    .venv/bin/python benchmarks/methods_dense.py --parts padim --before /tmp/adspine-before/src
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
SIZE = 224


def _features(out: Path, backbone: str, n_train: int, n_test: int, threads: int) -> Path:
    """Save layer-1..3 features of the synthetic category (train and test) as safetensors; returns the file."""
    import torch
    from safetensors.torch import save_file

    from adspine.backbones.extractor import build_extractor
    from adspine.data.mvtec import ImageDataset, scan_category
    from adspine.data.synth import generate

    torch.set_num_threads(threads)
    path = out / f"{backbone}-{n_train}-{n_test}.safetensors"
    if path.exists():
        return path
    root = generate(out / "synth", seed=0, size=SIZE, n_train=max(n_train, 8), n_test_good=n_test, n_per_defect=1,
                    categories=["wood"], overwrite=True)
    data = scan_category(root, "wood")
    extract = build_extractor(backbone, init="random", init_seed=0)
    tensors = {}
    for split, samples, n in (("train", data.train, n_train), ("test", data.test, n_test)):
        images = ImageDataset(samples[:n], protocol="paper", size=SIZE)
        for a in range(0, n, 8):
            batch = torch.stack([images[i]["image"] for i in range(a, min(a + 8, n))])
            with torch.inference_mode():
                for li, m in enumerate(extract(batch)):
                    tensors[f"{split}.{a // 8}.{li}"] = m.contiguous()
    save_file(tensors, str(path))
    return path


def _load(path: str) -> tuple[list[list], list[list]]:
    from safetensors.torch import load_file

    t = load_file(path)
    out = {}
    for split in ("train", "test"):
        nb = 1 + max(int(k.split(".")[1]) for k in t if k.startswith(split))
        nl = 1 + max(int(k.split(".")[2]) for k in t if k.startswith(split))
        out[split] = [[t[f"{split}.{b}.{li}"] for li in range(nl)] for b in range(nb)]
    return out["train"], out["test"]


def _hwm_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


# -- workers (run in a subprocess with PYTHONPATH = the code under test) --------------------------------------------
def work_spade(job: dict) -> dict:
    import faiss
    import numpy as np
    import torch

    torch.set_num_threads(job["threads"])
    faiss.omp_set_num_threads(job["threads"])
    from adspine.methods.spade import SPADE

    train, test = _load(job["features"])
    model = SPADE(k=job["k"]).fit(train)
    test_images = [[m[i : i + 1] for m in test[0]] for i in range(job["n_images"])]
    times, maps = [], []
    for r in range(job["repeats"]):
        for img in test_images:
            t0 = time.perf_counter()
            pred = model.predict(img, (SIZE, SIZE))
            times.append(time.perf_counter() - t0)
            if r == 0:
                maps.append(pred.maps[0])
    np.save(job["maps_out"], np.stack(maps))
    return {"s_per_image_min": min(times), "s_per_image_median": statistics.median(times), "n": len(times)}


def work_padim(job: dict) -> dict:
    import torch

    torch.set_num_threads(job["threads"])
    from adspine.methods.padim import PaDiM

    train, test = _load(job["features"])
    rss0 = _status_mb("VmRSS")
    _hwm_reset()
    t0 = time.perf_counter()
    model = PaDiM(d=job["d"], rd_seed=1024).fit(train)
    fit_s = time.perf_counter() - t0
    peak = _status_mb("VmHWM")
    whiten = getattr(model, "whiten_", None)
    whiten = model.whiten if whiten is None else whiten
    mean = getattr(model, "mean_", None)
    mean = model.mean if mean is None else mean
    model_mb = (whiten.numel() * whiten.element_size() + mean.numel() * mean.element_size()) / 2**20
    t0 = time.perf_counter()
    model.predict(test[0], (SIZE, SIZE))
    predict_s = (time.perf_counter() - t0) / test[0][0].shape[0]
    return {"fit_s": fit_s, "rss_before_fit_mb": rss0, "fit_hwm_mb": peak, "fit_peak_over_rss0_mb": peak - rss0,
            "model_mb": model_mb, "peak_over_model": (peak - rss0) / model_mb, "predict_s_per_image": predict_s}


def work_calibrate(job: dict) -> dict:
    """Seconds and cost-model FLOPs of PaDiM (R18, d=100, fit + predict of 4 images), SPADE (K=50, fit + predict of
    one image) and CFLOW (8 training images, 1 epoch, fit + predict of 4 images)."""
    import torch

    torch.set_num_threads(job["threads"])
    from adspine.methods import build_method
    from adspine.methods.base import CostShape
    from adspine.study.timing import conv_flops_per_second

    rate = conv_flops_per_second(job["threads"])
    train, test = _load(job["features"])
    shape = lambda n_train, n_test: CostShape(  # noqa: E731
        n_train=n_train, n_test=n_test, positions=[m.shape[2] * m.shape[3] for m in train[0]],
        channels=[m.shape[1] for m in train[0]], d=100, backbone_flops=0.0)
    out = {"conv_gflops": rate / 1e9}
    one = [m[:1] for m in test[0]]
    for name, settings, tr, te in (("padim", {"d": 100}, train, test[0]), ("spade", {"k": 50}, train, one),
                                   ("cflow", {"epochs": 1}, train[:1], test[0])):
        method = build_method(name, **settings)
        n_train = sum(b[0].shape[0] for b in tr)
        t0 = time.perf_counter()
        method.fit(tr)
        method.predict(te, (SIZE, SIZE))
        seconds = time.perf_counter() - t0
        flops = type(method).info.cost(shape(n_train, te[0].shape[0]), method.settings())
        out[name] = {"seconds": seconds, "gflop": flops / 1e9, "efficiency": flops / seconds / rate}
    return out


def _run(part: str, job: dict, src: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", part, json.dumps(job)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{part} worker ({src}) failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def spade_reference(features: str, k: int, n_images: int):
    """Float64 brute force of the SPADE map pipeline (pooled kNN, nearest patch over the K images, average, blur)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from adspine.methods.postprocess import gaussian_blur

    train, test = _load(features)
    layers = [torch.cat([b[li] for b in train]).double() for li in range(len(train[0]))]
    pooled = layers[-1].mean(dim=(2, 3))
    maps = []
    for i in range(n_images):
        q = [m[i : i + 1].double() for m in test[0]]
        nn = torch.cdist(q[-1].mean(dim=(2, 3)), pooled)[0].argsort()[:k]
        acc = torch.zeros(1, SIZE, SIZE, dtype=torch.float64)
        for tr, te in zip(layers, q):
            c, h, w = te.shape[1:]
            gal = tr[nn].permute(0, 2, 3, 1).reshape(-1, c)
            centre = gal.mean(dim=0)  # float64 |q|^2 + |g|^2 - 2 q.g on centred data: ~1e-16 relative
            gal, qq = gal - centre, te[0].permute(1, 2, 0).reshape(-1, c) - centre
            gsq = gal.square().sum(1)
            best = torch.cat([(torch.addmm(gsq, qq[a : a + 64], gal.T, alpha=-2.0).amin(1)
                               + qq[a : a + 64].square().sum(1)).clamp(min=0).sqrt()
                              for a in range(0, qq.shape[0], 64)])
            acc += F.interpolate(best.view(1, 1, h, w), size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0]
        maps.append(gaussian_blur((acc / len(layers)).float(), 4.0)[0].numpy())
    return np.stack(maps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["spade", "calibrate"], choices=["spade", "padim", "calibrate"])
    ap.add_argument("--before", type=Path, help="src folder of the code to compare against")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "adspine-methods-dense")
    args = ap.parse_args()
    import numpy as np

    args.cache.mkdir(parents=True, exist_ok=True)
    codes = [("after", SRC)] + ([("before", args.before)] if args.before else [])
    print(f"threads {args.threads}, load average {os.getloadavg()[0]:.1f}")
    if "spade" in args.parts or "calibrate" in args.parts:
        feats = str(_features(args.cache, "resnet18", 50, 4, args.threads))
    if "spade" in args.parts:
        ref = spade_reference(feats, 50, 2)
        for code, src in codes:
            job = {"features": feats, "k": 50, "threads": args.threads, "repeats": args.repeats if code == "after"
                   else 1, "n_images": 4 if code == "after" else 2, "maps_out": str(args.cache / f"spade-{code}.npy")}
            r = _run("spade", job, src)
            maps = np.load(job["maps_out"])[:2]
            rel = float(np.abs(maps - ref).max() / np.abs(ref).max())
            print(f"SPADE R18 K=50 224px {code:6s}: {r['s_per_image_min']:.3f} s/img min, "
                  f"{r['s_per_image_median']:.3f} median ({r['n']} calls); max |map - float64 ref| / max ref "
                  f"{rel:.1e}")
    if "calibrate" in args.parts:
        r = _run("calibrate", {"features": feats, "threads": args.threads}, SRC)
        print(f"conv {r['conv_gflops']:.1f} GFLOP/s; " + "; ".join(
            f"{m} {r[m]['gflop']:.1f} GFLOP in {r[m]['seconds']:.1f} s -> efficiency {r[m]['efficiency']:.3f}"
            for m in ("padim", "spade", "cflow")))
    if "padim" in args.parts:
        feats = str(_features(args.cache, "wide_resnet50_2", 40, 8, args.threads))
        for code, src in codes:
            r = _run("padim", {"features": feats, "d": 550, "threads": args.threads}, src)
            print(f"PaDiM WRN50 d=550 40 img {code:6s}: fit {r['fit_s']:.1f} s, RSS before fit "
                  f"{r['rss_before_fit_mb']:.0f} MB, fit high-water {r['fit_hwm_mb']:.0f} MB "
                  f"(+{r['fit_peak_over_rss0_mb']:.0f} MB = {r['peak_over_model']:.2f} x model {r['model_mb']:.0f} MB)"
                  f", predict {r['predict_s_per_image']:.2f} s/img")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        result = {"spade": work_spade, "padim": work_padim, "calibrate": work_calibrate}[sys.argv[2]](
            json.loads(sys.argv[3]))
        print(json.dumps(result))
    else:
        main()
