"""Timing and resource helpers: forward latency (warm-up, median of repeats, CUDA-synchronized), FLOPs, memory.

Conventions recorded with every result:
- latency = median over ``repeats`` timed calls after ``warmup`` untimed ones, divided by the batch size (ms/image);
  on CUDA each call is bracketed by ``torch.cuda.synchronize()``.
- FLOPs = ``torch.utils.flop_counter.FlopCounterMode`` total for one image (a multiply-add counts as 2 FLOPs; only
  convolutions and matrix products are counted, as is usual).
- peak RSS of a method = the largest resident set size sampled (psutil, every 5 ms, in a background thread) while
  that method fits and predicts (``PeakRSS``). It includes what the job already holds (backbone, cached features),
  which is the same for every method of a job. The process high-water mark (``ru_maxrss``), which can only grow over
  a study, is recorded in the provenance as well.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def sync(device: str | torch.device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class Stopwatch:
    """Accumulates wall time of ``with sw:`` blocks, synchronizing CUDA around each."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = device
        self.total = 0.0

    def __enter__(self) -> "Stopwatch":
        sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.total += time.perf_counter() - self._t0


def median_ms(fn: Callable[[], object], warmup: int, repeats: int, device: str | torch.device = "cpu") -> float:
    """Median wall time of ``fn()`` in milliseconds after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


@torch.inference_mode()
def forward_ms_per_image(
    model: Callable, images: torch.Tensor, warmup: int = 2, repeats: int = 5, device: str | torch.device = "cpu"
) -> float:
    """Median forward latency per image of ``model(images)`` (``images`` already on ``device``)."""
    return median_ms(lambda: model(images), warmup, repeats, device) / images.shape[0]


@torch.inference_mode()
def count_flops(model: Callable, image: torch.Tensor) -> float:
    """FLOPs of one forward call on ``image`` (1, 3, H, W) counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(image)
    return float(counter.get_total_flops())


def peak_rss_mb() -> float:
    """Process peak resident set size so far (high-water mark), in MiB."""
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / (1024 * 1024) if sys.platform == "darwin" else ru / 1024  # bytes on macOS, KiB on Linux


class PeakRSS:
    """Context manager sampling this process's RSS in a background thread; ``peak_mb`` is the largest sample."""

    def __init__(self, interval_s: float = 0.005):
        import threading

        self.interval_s, self.peak_mb = interval_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        proc = psutil.Process()
        while True:
            self.peak_mb = max(self.peak_mb, proc.memory_info().rss / (1024 * 1024))
            if self._stop.wait(self.interval_s):
                break

    def __enter__(self) -> "PeakRSS":
        self.peak_mb = rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())


def rss_mb() -> float:
    """Current resident set size in MiB (psutil)."""
    import psutil

    return psutil.Process().memory_info().rss / (1024 * 1024)


def folder_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def host_cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical)"


def host_gpu(device: str) -> str | None:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return None


_RATE: dict[int, float] = {}


def conv_flops_per_second(threads: int | None = None) -> float:
    """Measured FLOP/s of a ResNet-like 3x3 convolution on this CPU (cached), used by dry-run estimates."""
    key = threads or torch.get_num_threads()
    if key not in _RATE:
        old = torch.get_num_threads()
        torch.set_num_threads(key)
        try:
            conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False)
            x = torch.randn(2, 64, 56, 56)
            flops = 2 * 64 * 64 * 9 * 56 * 56 * 2
            with torch.inference_mode():
                ms = median_ms(lambda: conv(x), 2, 5)
            _RATE[key] = flops / (ms / 1e3)
        finally:
            torch.set_num_threads(old)
    return _RATE[key]
