"""Timing and resource helpers: latency that survives a busy machine, FLOPs, memory from the kernel.

Conventions recorded with every result:
- latency: after ``warmup`` untimed calls, many short timed repeats (at least ``min_repeats``, more while the
  ``budget_s`` lasts, at most ``max_repeats``); the store keeps the **minimum** (the figure least disturbed by other
  processes, used for ranking) and the median, per image. Batch 1 and batch N are timed interleaved (one of each per
  round), so a burst of load hits both alike. On CUDA each call is bracketed by ``torch.cuda.synchronize()``.
- FLOPs = ``torch.utils.flop_counter.FlopCounterMode`` total for one image (a multiply-add counts as 2 FLOPs; only
  convolutions and matrix products are counted, as is usual).
- memory of a method = the kernel's exact high-water mark: on Linux ``/proc/self/clear_refs`` is reset (write ``5``)
  before the method and ``VmHWM`` read from ``/proc/self/status`` after it (``KernelPeak``); the increment above the
  resident size just before the method is stored too. Where that is unavailable a 5 ms sampling thread is the fallback
  and the record says so (``source``).
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


@dataclass
class Latency:
    """Per-call wall times of one timed function, in ms (``per`` = items per call, e.g. the batch size)."""

    times_ms: list[float]
    per: int = 1

    @property
    def min(self) -> float:
        return min(self.times_ms) / self.per

    @property
    def median(self) -> float:
        return float(statistics.median(self.times_ms)) / self.per

    @property
    def repeats(self) -> int:
        return len(self.times_ms)


def time_interleaved(fns: Sequence[Callable[[], object]], warmup: int = 2, min_repeats: int = 20,
                     budget_s: float = 2.0, max_repeats: int = 200, device: str | torch.device = "cpu",
                     per: Sequence[int] | None = None) -> list[Latency]:
    """Time several functions round-robin (one call of each per round) after ``warmup`` rounds.

    Stops after ``min_repeats`` rounds once ``budget_s`` has passed (so a slow function still gets ``min_repeats``),
    or at ``max_repeats``. Returns one ``Latency`` per function."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    while True:
        for fn, out in zip(fns, times):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            out.append((time.perf_counter() - t0) * 1e3)
        n = len(times[0])
        if n >= max_repeats or (n >= min_repeats and time.perf_counter() - start >= budget_s):
            break
    per = list(per) if per is not None else [1] * len(fns)
    return [Latency(t, p) for t, p in zip(times, per)]


def median_ms(fn: Callable[[], object], warmup: int, repeats: int, device: str | torch.device = "cpu") -> float:
    """Median wall time of ``fn()`` in milliseconds after ``warmup`` untimed calls (exactly ``repeats`` calls)."""
    return time_interleaved([fn], warmup, repeats, 0.0, repeats, device)[0].median


@torch.inference_mode()
def forward_latency(model: Callable, batches: Sequence[torch.Tensor], warmup: int = 2, min_repeats: int = 20,
                    budget_s: float = 2.0, device: str | torch.device = "cpu", max_repeats: int = 200) -> list[Latency]:
    """Forward latency per image of ``model`` on each batch (already on ``device``), timed interleaved."""
    fns = [(lambda x=x: model(x)) for x in batches]
    return time_interleaved(fns, warmup, min_repeats, budget_s, max_repeats, device,
                            per=[int(x.shape[0]) for x in batches])


class torch_threads:
    """``with torch_threads(n):`` runs the block with ``n`` torch intra-op threads (None: unchanged)."""

    def __init__(self, n: int | None):
        self.n = n

    def __enter__(self) -> "torch_threads":
        self.old = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.old)


def load_average() -> float | None:
    """The machine's 1-minute load average (None where the OS has none)."""
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return None


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


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_mb(field: str) -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def release_free_memory() -> None:
    """Give memory that was freed but kept by the C allocator back to the OS (glibc ``malloc_trim``), so the
    resident size before a block counts live data only and the block's own allocations show as its increment."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def reset_high_water_mark() -> bool:
    """Reset the kernel's peak RSS of this process (Linux >= 4.0); False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    hwm, rss = _status_mb("VmHWM"), _status_mb("VmRSS")
    return hwm is not None and rss is not None


class KernelPeak:
    """Peak resident memory of a block, from the kernel: ``with KernelPeak() as m: ...`` then ``m.peak_mb`` (process
    peak during the block), ``m.baseline_mb`` (RSS at entry) and ``m.increment_mb`` (peak - baseline).

    Linux: the high-water mark is reset at entry and ``VmHWM`` read at exit (exact, no sampling). Elsewhere a 5 ms
    sampling thread stands in; ``source`` says which ('VmHWM' or 'sampler')."""

    def __enter__(self) -> "KernelPeak":
        release_free_memory()
        self.baseline_mb = rss_mb()
        self.source = "VmHWM" if reset_high_water_mark() else "sampler"
        self._sampler = None
        if self.source == "sampler":
            self._sampler = PeakRSS().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._sampler is not None:
            self._sampler.__exit__(*exc)
            self.peak_mb = self._sampler.peak_mb
        else:
            self.peak_mb = _status_mb("VmHWM") or rss_mb()
        self.increment_mb = max(0.0, self.peak_mb - self.baseline_mb)


class PeakRSS:
    """Fallback where the kernel's high-water mark cannot be reset: samples this process's RSS every ``interval_s``
    in a background thread; ``peak_mb`` is the largest sample (it can miss short allocations on a busy machine)."""

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


_RATE: dict[str, float] = {}


PARALLEL_EFFICIENCY = 0.84  # speed-up of each further thread (measured here: 2 threads = 1.84x one, quiet machine)


def conv_flops_per_second(threads: int | None = None) -> float:
    """FLOP/s of a ResNet-like 3x3 convolution on this CPU at ``threads`` threads, used by dry-run estimates.

    Measured on ONE thread (fastest of many short repeats) and scaled by ``PARALLEL_EFFICIENCY`` per further thread
    (up to the cores there are): a multi-threaded measurement is 2-7x slower whenever another process holds a core,
    so an estimate made on a busy machine would not describe the run."""
    if "one" not in _RATE:
        with torch_threads(1):
            conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False)
            x = torch.randn(2, 64, 56, 56)
            flops = 2 * 64 * 64 * 9 * 56 * 56 * 2
            with torch.inference_mode():
                lat = time_interleaved([lambda: conv(x)], warmup=2, min_repeats=10, budget_s=0.5, max_repeats=50)[0]
            _RATE["one"] = flops / (lat.min / 1e3)
    n = min(threads or torch.get_num_threads(), os.cpu_count() or 1)
    return _RATE["one"] * (1 + PARALLEL_EFFICIENCY * (n - 1))
