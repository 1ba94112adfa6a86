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
- final timing (``final_timing``, spec ``timing.final``): at the end of a study every distinct backbone
  configuration of its finished jobs is built once and all are timed round-robin in ONE ``time_interleaved`` call
  (batch 1 and batch N of each per round), so a burst of load hits every configuration alike; the 1-minute load
  before and after and the usable cores are recorded beside the figures. The report's speed statements use these;
  the per-job backbone figures stay in the job rows and methods' latency stays the per-job minimum.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask; all logical CPUs where the OS has no such call)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


FINAL_MIN_ROUNDS = 5  # interleaved rounds of the final timing at least (capped by the spec's ``timing.repeats``)


@dataclass(frozen=True)
class BackboneConfig:
    """What decides a backbone's speed in a job (threads are the final timing's own, one value for all)."""

    backbone: str
    init: str
    init_seed: int | None
    layers: str | tuple[str, ...]
    image_size: tuple[int, int]
    precision: str
    device: str

    @classmethod
    def of(cls, job) -> "BackboneConfig":
        return cls(job.backbone, job.init, job.init_seed, job.layers, tuple(job.image_size), job.precision,
                   job.device)


def backbone_configs(jobs: Sequence) -> dict[BackboneConfig, Any]:
    """Distinct backbone configurations of ``jobs`` (plan ``Job``s) in order, each with its first job."""
    out: dict[BackboneConfig, Any] = {}
    for job in jobs:
        out.setdefault(BackboneConfig.of(job), job)
    return out


def _build(spec, job):
    """The job's extractor, built as ``job.run_job`` builds it (int8: calibrated on its normal training images)."""
    from adspine.backbones import build_extractor
    from adspine.study.job import int8_extractor
    from adspine.study.plan import scan

    layers = job.layers if isinstance(job.layers, str) else list(job.layers)
    extractor = build_extractor(job.backbone, init=job.init, layers=layers, device=job.device,
                                precision="fp32" if job.precision == "int8" else job.precision,
                                **({"init_seed": job.init_seed} if job.init_seed is not None else {}))
    if job.precision == "int8":
        extractor = int8_extractor(extractor, scan(job, verify=False).train, spec)
    return extractor


def final_timing(spec, jobs: Sequence, seed: int = 0) -> tuple[list[dict[str, Any]], list[str]]:
    """Re-time the backbone of every distinct configuration of ``jobs`` round-robin in this process.

    Each configuration is built once; batch 1 and batch ``timing.batch_n`` of every configuration are timed in ONE
    ``time_interleaved`` call (``timing.warmup`` rounds, at least one, then at least ``FINAL_MIN_ROUNDS`` rounds up to
    ``timing.repeats``, more while ``timing.final_budget_s`` lasts) on seeded random images of the job's size (the
    speed of these networks does not depend on pixel values), with ``timing.threads`` torch threads. Returns the
    rows for the store's ``final_timing`` table (one per configuration that could be built) and one line per
    configuration that could not (it keeps its per-job figures)."""
    t = spec.timing
    threads = t.threads or spec.threads or torch.get_num_threads()
    bn = t.batch_n
    built, problems = [], []
    for config, job in backbone_configs(jobs).items():
        try:
            built.append((config, _build(spec, job)))
        except Exception as e:  # noqa: BLE001 - that configuration keeps its per-job figures
            problems.append(f"{job.label()}: final timing skipped ({type(e).__name__}: {e})".splitlines()[0])
    if not built:
        return [], problems
    gen = torch.Generator().manual_seed(seed)
    images: dict[tuple, torch.Tensor] = {}
    for config, _ in built:
        key = (config.image_size, config.device)
        if key not in images:
            images[key] = torch.rand(bn, 3, *config.image_size, generator=gen).to(config.device)
    fns, per = [], []
    for config, extractor in built:
        x = images[(config.image_size, config.device)]
        fns += [lambda m=extractor, x=x: m(x[:1]), lambda m=extractor, x=x: m(x)]
        per += [1, bn]
    device = built[0][0].device
    with torch_threads(threads), torch.inference_mode():
        load_before, start = load_average(), time.perf_counter()
        lat = time_interleaved(fns, max(t.warmup, 1), min(t.repeats, FINAL_MIN_ROUNDS), t.final_budget_s, t.repeats,
                               device, per=per)  # fresh networks: at least one untimed round
        wall_s, load_after = time.perf_counter() - start, load_average()
    cores, when = usable_cores(), _now()
    rows = []
    for k, (config, extractor) in enumerate(built):
        b1, b_n = lat[2 * k], lat[2 * k + 1]
        h, w = config.image_size
        rows.append({
            "study": spec.name, "timed_at": when, "backbone": config.backbone, "init": config.init,
            "init_seed": config.init_seed, "precision": config.precision,
            "layers": json.dumps([r.name for r in extractor.layer_info(config.image_size)]),
            "image_height": h, "image_width": w, "device": config.device, "threads": threads, "batch_n": bn,
            "backbone_ms_b1_min": b1.min, "backbone_ms_b1": b1.median, "backbone_ms_bn_min": b_n.min,
            "backbone_ms_bn": b_n.median, "repeats": b1.repeats, "configurations": len(built), "wall_s": wall_s,
            "load_before": load_before, "load_after": load_after, "cores": cores, "host_cpu": host_cpu(),
            "host_gpu": host_gpu(config.device),
        })
    return rows, problems


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


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
