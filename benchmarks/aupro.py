"""Wall time of AUPRO and pixel AUROC on N random S x S maps with blob masks (median of R runs).

Usage: .venv/bin/python benchmarks/aupro.py [--n 100] [--size 224] [--repeats 3] [--seed 0]

Half of the images are good (empty mask); the others get 1-3 elliptic blobs. Maps are float32 uniform noise plus 0.5
inside the blobs, so every pixel score is distinct (the worst case for the exact curve: one threshold per pixel).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

from adspine.metrics import aupro, evaluate, pixel_auroc, pixel_f1_max


def make_data(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """labels (n,), masks bool (n, size, size) with elliptic blobs on odd images, maps float32 (n, size, size)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(1, n, 2):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0.1, 0.9, 2) * size
            ry, rx = rng.uniform(0.02, 0.12, 2) * size
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    maps = rng.random((n, size, size), dtype=np.float32) + np.float32(0.5) * masks
    labels = masks.reshape(n, -1).any(axis=1).astype(int)
    return labels, masks, maps


def timed(fn, repeats: int) -> tuple[float, float]:
    """(median seconds, last result) over ``repeats`` calls."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    labels, masks, maps = make_data(args.n, args.size, args.seed)
    scores = maps.reshape(args.n, -1).max(axis=1)
    print(
        f"{args.n} maps of {args.size}x{args.size} ({maps.size / 1e6:.1f} M pixels, "
        f"{masks.mean() * 100:.2f}% defective), median of {args.repeats}, {platform.processor() or platform.machine()}"
    )
    for name, fn in [
        ("aupro", lambda: aupro(masks, maps)),
        ("pixel_auroc", lambda: pixel_auroc(masks, maps)),
        ("pixel_f1_max", lambda: pixel_f1_max(masks, maps)),
        ("evaluate (all 5)", lambda: evaluate(labels, scores, masks, maps)),
    ]:
        sec, value = timed(fn, args.repeats)
        shown = f"{value:.4f}" if isinstance(value, float) else ", ".join(f"{k}={v:.4f}" for k, v in value.items())
        print(f"{name:>17}: {sec:7.3f} s  -> {shown}")


if __name__ == "__main__":
    main()
