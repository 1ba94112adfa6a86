"""Timing and memory helpers: kernel high-water mark per block, interleaved latency with minimum and median."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from adspine.study import timing


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel high-water mark is Linux-only")
def test_kernel_peak_sees_a_temporary_allocation_exactly():
    # a 256 MiB block touched and freed inside the block: the kernel keeps the peak, no sampling involved
    with timing.KernelPeak() as mem:
        block = np.ones(256 * 2**20 // 8)
        block[::512] = 2.0
        del block
    assert mem.source == "VmHWM"
    assert mem.increment_mb >= 250
    assert mem.peak_mb >= mem.baseline_mb + 250


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel high-water mark is Linux-only")
def test_kernel_peak_is_reset_per_block():
    with timing.KernelPeak() as big:
        block = np.ones(128 * 2**20 // 8)
        del block
    with timing.KernelPeak() as small:
        x = np.ones(1024)
        del x
    assert big.increment_mb >= 120
    assert small.increment_mb < 60  # the earlier 128 MiB peak does not leak into the next block


def test_time_interleaved_counts_rounds_and_reports_min_below_median():
    calls = {"a": 0, "b": 0}

    def a():
        calls["a"] += 1

    def b():
        calls["b"] += 1

    la, lb = timing.time_interleaved([a, b], warmup=3, min_repeats=25, budget_s=0.0, per=[1, 4])
    assert calls == {"a": 28, "b": 28}  # 3 warm-up + 25 timed rounds, one call of each per round
    assert la.repeats == lb.repeats == 25
    assert la.min <= la.median and lb.min <= lb.median
    assert lb.min == min(lb.times_ms) / 4


def test_same_timing_twice_agrees_on_the_minimum_within_a_loose_factor():
    # the minimum is the figure least disturbed by other processes: two runs of the same work stay close even when
    # the machine is busy (loose factor on purpose: this checks the estimator, not the machine)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3))
    x = torch.rand(1, 3, 32, 32)
    first = timing.forward_latency(net, [x], warmup=2, min_repeats=30, budget_s=0.2)[0]
    second = timing.forward_latency(net, [x], warmup=2, min_repeats=30, budget_s=0.2)[0]
    ratio = max(first.min, second.min) / min(first.min, second.min)
    assert ratio < 5.0
