"""Forward latency of registry backbones truncated after their last needed layer, with parameters and FLOPs.

Usage: .venv/bin/python benchmarks/backbones.py resnet18 efficientnet_b0 [--layers thesis] [--size 224]
       [--batches 1 8] [--warmup 2] [--repeats 5] [--threads N] [--init random] [--csv backbones_benchmark.csv]

Each variant is built with ``build_extractor`` (random init by default: latency does not depend on the weights and
needs no download), run ``warmup`` times, then timed ``repeats`` times per batch size on uniform random images
(normalisation included); the median is reported. FLOPs (2 per multiply-add) and parameters are those of the
truncated network. The torch thread count is recorded with every row.
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import time
from pathlib import Path

import torch

from adspine.backbones import build_extractor

COLUMNS = ("backbone", "layers", "init", "size", "batch", "threads", "warmup", "repeats", "median_ms", "ms_per_image",
           "min_ms", "truncated_params_m", "full_params_m", "gflops_per_image", "dim_a", "torch", "machine")


def full_params(name: str) -> int:
    """Parameters of the whole network (meta build, no memory)."""
    from adspine.backbones.extractor import meta_model
    from adspine.backbones.registry import get_spec

    return sum(p.numel() for p in meta_model(get_spec(name)).parameters())


def bench(name: str, args: argparse.Namespace) -> list[dict]:
    ext = build_extractor(name, init=args.init, layers=args.layers)
    gflops = ext.flops(args.size, 1) / 1e9
    rows = []
    for batch in args.batches:
        x = torch.rand(batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
        for _ in range(args.warmup):
            ext(x)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ext(x)
            times.append((time.perf_counter() - t0) * 1e3)
        med = statistics.median(times)
        rows.append({"backbone": name, "layers": ",".join(ext.layer_names), "init": args.init, "size": args.size,
                     "batch": batch, "threads": torch.get_num_threads(), "warmup": args.warmup,
                     "repeats": args.repeats, "median_ms": round(med, 2), "ms_per_image": round(med / batch, 2),
                     "min_ms": round(min(times), 2), "truncated_params_m": round(ext.truncated_params() / 1e6, 3),
                     "full_params_m": round(full_params(name) / 1e6, 3), "gflops_per_image": round(gflops, 3),
                     "dim_a": sum(ext.channels), "torch": torch.__version__,
                     "machine": platform.processor() or platform.machine()})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="*", default=["resnet18", "efficientnet_b0"])
    ap.add_argument("--layers", default="thesis")
    ap.add_argument("--init", default="random")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    ap.add_argument("--csv", type=Path, default=Path("backbones_benchmark.csv"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = [r for name in args.variants for r in bench(name, args)]
    with args.csv.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"{'backbone':18s} {'batch':>5s} {'ms/img':>8s} {'median ms':>10s} {'params M':>9s} {'GFLOPs/img':>10s}  "
          f"threads={torch.get_num_threads()} size={args.size} layers={args.layers}")
    for r in rows:
        print(f"{r['backbone']:18s} {r['batch']:5d} {r['ms_per_image']:8.2f} {r['median_ms']:10.2f} "
              f"{r['truncated_params_m']:9.3f} {r['gflops_per_image']:10.3f}")
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
