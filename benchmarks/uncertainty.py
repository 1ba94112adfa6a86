"""Cost of the uncertainty figures of one category: image AUROC DeLong interval and paired test, and the pixel
AUROC / AUPRO image bootstrap (binned path vs the exact metrics). Median of R runs.

Usage: .venv/bin/python benchmarks/uncertainty.py [--n 100] [--size 224] [--n-boot 200] [--repeats 3] [--seed 0]

Data: ``make_data`` of benchmarks/aupro.py (half the images defective with elliptic blobs, float32 noise maps with
every pixel score distinct: the worst case for the binning).
"""

from __future__ import annotations

import argparse
import platform

import numpy as np

from adspine.metrics import aupro, auroc_ci, delong_paired, pixel_auroc, pixel_bootstrap_ci
from adspine.metrics.uncertainty import PixelCounts
from aupro import make_data, timed  # benchmarks/aupro.py, next to this script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    labels, masks, maps = make_data(args.n, args.size, args.seed)
    scores = maps.reshape(args.n, -1).mean(axis=1)  # image scores with some overlap between the classes
    other = scores + np.random.default_rng(args.seed).normal(0, scores.std(), args.n)
    print(f"{args.n} maps of {args.size}x{args.size} ({maps.size / 1e6:.1f} M pixels), n_boot={args.n_boot}, "
          f"median of {args.repeats}, {platform.processor() or platform.machine()}")

    sec, (auc, lo, hi) = timed(lambda: auroc_ci(labels, scores), args.repeats)
    print(f"{'auroc_ci':>26}: {sec * 1e3:8.2f} ms -> {auc:.4f} [{lo:.4f}, {hi:.4f}]")
    sec, (diff, p) = timed(lambda: delong_paired(labels, scores, other), args.repeats)
    print(f"{'delong_paired':>26}: {sec * 1e3:8.2f} ms -> diff {diff:+.4f}, p {p:.3g}")

    sec, counts = timed(lambda: PixelCounts(masks, maps), args.repeats)
    print(f"{'PixelCounts (once)':>26}: {sec:8.3f} s  -> {counts.edges.size} thresholds, "
          f"{counts.coverage.shape[0]} regions")
    sec, ci = timed(lambda: pixel_bootstrap_ci(masks, maps, n_boot=args.n_boot), args.repeats)
    print(f"{'pixel_bootstrap_ci':>26}: {sec:8.3f} s  -> "
          + ", ".join(f"{k}={v:.4f}" for k, v in ci.items()))
    sec, exact = timed(lambda: (pixel_auroc(masks, maps), aupro(masks, maps)), args.repeats)
    binned = counts.metrics(np.ones((1, args.n)))
    print(f"{'exact pixel_auroc + aupro':>26}: {sec:8.3f} s  -> {exact[0]:.6f}, {exact[1]:.6f}")
    print(f"{'binned - exact':>26}: pixel AUROC {binned[0][0] - exact[0]:+.2e}, AUPRO {binned[1][0] - exact[1]:+.2e}")


if __name__ == "__main__":
    main()
