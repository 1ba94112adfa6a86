"""PatchCore benchmark on CPU (not a test): this tree beside an older one (``--before SRC``), side by side.

Per backbone (random init) and code version, ``--repeats`` fresh subprocesses each: stream the training images of a
synthetic category through the backbone into ``fit``, predict the test images batch by batch, save the model.
Printed: fit seconds, coreset seconds (``greedy_coreset`` wrapped and timed), backbone and method ms per test image
(after one untimed warm-up pass over the test images, the minimum over ``--passes`` timed passes that time the
backbone and the method batch by batch side by side, as the study's latency does), the method/backbone ratio, RSS
before fit, peak memory of fit and of predict (kernel high-water mark ``VmHWM``, reset by writing 5 to
``/proc/self/clear_refs`` before each stage; no sampling), model size; minimum and median over the repeats. Then whether both versions picked the same coreset and how far their image scores differ (squared
scores are compared through their square root with older Euclidean ones).

    .venv/bin/python benchmarks/methods.py --before /tmp/adspine-before/src      # ResNet-18 and WRN50-2, 224 px
    .venv/bin/python benchmarks/methods.py --backbones resnet18 --repeats 1
    .venv/bin/python benchmarks/methods.py --backbones resnet18 --float32-search   # as on CPUs without bfloat16
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

CATEGORY = "wood"
BATCH = 8


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def worker(job: dict) -> dict:
    """One measurement in this interpreter (whose ``adspine`` is the version under test)."""
    import torch

    torch.set_num_threads(job["threads"])
    import faiss

    faiss.omp_set_num_threads(job["threads"])
    import adspine.methods.patchcore as pc

    if job["float32_search"]:  # as on CPUs without bfloat16 hardware: NearestBank's float32 bound
        import adspine.methods.screen as screen

        screen.fast_bf16 = lambda: False
    from adspine.backbones.extractor import build_extractor
    from adspine.data.mvtec import ImageDataset, scan_category
    from adspine.methods import build_method

    data = scan_category(job["root"], CATEGORY, verify=False)
    train = ImageDataset(data.train[: job["n_train"]], protocol="paper", size=job["size"])
    test = ImageDataset(data.test[: job["n_test"]], protocol="paper", size=job["size"])
    extractor = build_extractor(job["backbone"], init="random", init_seed=0)
    method = build_method("patchcore", coreset_ratio=0.1, coreset_seed=0)
    coreset = {}
    original = pc.greedy_coreset

    def timed_coreset(*args, **kw):
        t = time.perf_counter()
        out = original(*args, **kw)
        coreset["s"], coreset["selected"] = time.perf_counter() - t, out.tolist()
        return out

    pc.greedy_coreset = timed_coreset
    backbone_s = 0.0

    def batches(ds):
        nonlocal backbone_s
        for i in range(0, len(ds), BATCH):
            images = torch.stack([ds[j]["image"] for j in range(i, min(i + BATCH, len(ds)))])
            t = time.perf_counter()
            feats = extractor(images)
            backbone_s += time.perf_counter() - t
            yield feats

    out = {"rss_before_mb": _status_mb("VmRSS")}
    _reset_peak()
    t0 = time.perf_counter()
    method.fit(batches(train))
    out.update(fit_s=time.perf_counter() - t0, coreset_s=coreset["s"], fit_peak_mb=_status_mb("VmHWM"))
    images = [torch.stack([test[j]["image"] for j in range(i, min(i + BATCH, len(test)))])
              for i in range(0, len(test), BATCH)]
    _reset_peak()
    scores, passes = [], []
    for p in range(job["passes"] + 1):  # pass 0 warms up both (every batch shape), like the study's timing
        backbone_s = method_s = 0.0
        for batch in images:
            t = time.perf_counter()
            feats = extractor(batch)
            t1 = time.perf_counter()
            pred = method.predict(feats, (job["size"], job["size"]))
            method_s += time.perf_counter() - t1
            backbone_s += t1 - t
            if p == 0:
                scores += pred.scores.tolist()
        if p:
            passes.append((1000 * backbone_s / len(test), 1000 * method_s / len(test)))
    bb, meth = (min(x) for x in zip(*passes))
    out.update(predict_peak_mb=_status_mb("VmHWM"), backbone_ms=bb, method_ms=meth)
    with tempfile.TemporaryDirectory() as tmp:
        method.save(tmp)
        out["model_mb"] = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 2**20
    out.update(selected=coreset["selected"], scores=scores, squared=getattr(method, "distance", "") == "squared")
    return out


def run_job(job: dict, src: str | None) -> dict:
    """``worker(job)`` in a fresh interpreter, with ``src`` first on the path (None: this tree)."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


FIGURES = [("fit_s", "fit s", 1), ("coreset_s", "coreset s", 2), ("backbone_ms", "bb ms/img", 1),
           ("method_ms", "meth ms/img", 1), ("ratio", "meth/bb", 2), ("rss_before_mb", "RSS0 MB", 0),
           ("fit_peak_mb", "fit peak MB", 0), ("predict_peak_mb", "pred peak MB", 0), ("model_mb", "model MB", 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="resnet18,wide_resnet50_2")
    ap.add_argument("--before", help="src folder of the older version (e.g. a git worktree of HEAD)")
    ap.add_argument("--n-train", type=int, default=40)
    ap.add_argument("--n-test", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--float32-search", action="store_true", help="PatchCore's search as on CPUs without bfloat16 "
                    "hardware (float32 bound)")
    ap.add_argument("--passes", type=int, default=5, help="timed passes over the test images per run (after one "
                    "untimed warm-up pass); backbone and method ms/img are the minima over the passes")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    from adspine.data.synth import generate

    versions = [("after", None)] + ([("before", args.before)] if args.before else [])
    side = round(args.size * 256 / 224)
    with tempfile.TemporaryDirectory() as tmp:
        root = generate(Path(tmp) / "synth", seed=0, size=side, n_train=args.n_train, n_test_good=8,
                        n_per_defect=3, categories=[CATEGORY])
        print(f"synthetic '{CATEGORY}': {args.n_train} train / {args.n_test} test images, {side} px, paper crop "
              f"{args.size}; {args.threads} threads; random-init backbones; {args.repeats} repeat(s), min / median\n")
        header = f"{'backbone':<17} {'version':<7} " + " ".join(f"{label:>17}" for _, label, _ in FIGURES)
        print(header)
        print("-" * len(header))
        for backbone in args.backbones.split(","):
            job = {"backbone": backbone, "root": str(root), "n_train": args.n_train, "n_test": args.n_test,
                   "size": args.size, "threads": args.threads, "passes": args.passes,
                   "float32_search": args.float32_search}
            results = {v: [] for v, _ in versions}
            for _ in range(args.repeats):  # interleaved, so both versions see the same machine load
                for v, src in versions:
                    r = run_job(job, src)
                    if "error" in r:
                        print(f"{backbone:<17} {v:<7} FAILED: {r['error']}")
                        continue
                    r["ratio"] = r["method_ms"] / r["backbone_ms"]
                    results[v].append(r)
            for v, _ in versions:
                rs = results[v]
                if not rs:
                    continue
                cells = []
                for key, _, digits in FIGURES:
                    vals = [r[key] for r in rs]
                    cells.append(f"{min(vals):8.{digits}f}/{statistics.median(vals):<8.{digits}f}")
                print(f"{backbone:<17} {v:<7} " + " ".join(cells), flush=True)
            if args.before and results["after"] and results["before"]:
                a, b = results["after"][0], results["before"][0]
                sa = [s**0.5 if a["squared"] else s for s in a["scores"]]
                sb = [s**0.5 if b["squared"] else s for s in b["scores"]]
                rel = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(sa, sb))
                print(f"{'':<17} same coreset: {a['selected'] == b['selected']}; image scores (Euclidean) max "
                      f"relative difference {rel:.2e}\n", flush=True)


if __name__ == "__main__":
    main()
