"""Dry-run estimate: seconds per job from FLOP counts and this CPU's measured 3x3-conv FLOP/s.

Backbone: exact FLOPs of the truncated network (weight-free meta build) x (train + test + timing images), at the
backbone efficiency measured on this machine. Each method prices itself through its descriptor
(``MethodInfo.cost(shape, settings)`` FLOPs at ``MethodInfo.efficiency``); a method without one counts as three
backbone passes per image. Plus fixed overheads per job and per result. Constants were calibrated on the demo
(see ``docs/ARCHITECTURE.md``); other processes, BLAS and faiss efficiency still vary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adspine.study.plan import Job
from adspine.study.spec import StudySpec

# Calibrated with benchmarks/estimate.py on the demo (2 threads; efficiencies are fractions of the measured conv rate;
# each method's own efficiency sits in its MethodInfo).
FIRST_JOB_S = 3.0  # imports and warm-up of the first job a process runs
JOB_OVERHEAD_S = 2.0  # build and trace the network, load weights, scan the dataset
RESULT_OVERHEAD_S = 0.5  # save the model, metrics and intervals, examples
BACKBONE_EFFICIENCY = 0.2  # whole network vs one dense 3x3 conv (depthwise, memory-bound layers)
MVTEC_MEAN_IMAGES = (242, 115)  # assumed when the dataset folder is not there yet


@dataclass
class BackboneShape:
    """What an estimate needs of a truncated backbone at the job's image size."""

    flops: float | None  # per image
    positions: list[int]  # h * w per layer, shallow to deep
    channels: list[int]
    default_d: int | None


def backbone_shape(job: Job) -> BackboneShape:
    """Layer shapes and FLOPs from a weight-free (meta) build; no weights, no compute."""
    import torch

    from adspine.backbones.extractor import probe, resolve_layers, truncate
    from adspine.backbones.init import construct
    from adspine.backbones.registry import get_spec
    from adspine.study import timing

    try:
        h, w = job.image_size
        layers = job.layers if isinstance(job.layers, str) else list(job.layers)
        bspec = get_spec(job.backbone)
        outputs = probe(bspec, min(h, w))
        names = resolve_layers(bspec, layers, outputs)
        with torch.device("meta"):
            body = truncate(construct(bspec, zero_init_last=False if bspec.zero_init_kw else None), names)
            x = torch.zeros(1, 3, h, w)
            shapes = [tuple(t.shape) for t in body(x).values()]
        flops = timing.count_flops(body, torch.zeros(1, 3, h, w, device="meta"))
        return BackboneShape(flops, [s[-2] * s[-1] for s in shapes], [s[1] for s in shapes], bspec.d)
    except Exception:  # noqa: BLE001 - an estimate only: fall back to a ResNet-18-like guess
        g = (min(job.image_size) // 4) ** 2
        return BackboneShape(None, [g, g // 4, g // 16], [64, 128, 256], 100)


def count_images(job: Job) -> tuple[int, int, bool]:
    """(n_train, n_test, found) from the dataset reader without decoding images; MVTec AD means when missing."""
    from adspine.study.plan import scan

    if not Path(job.root).exists():
        return (*MVTEC_MEAN_IMAGES, False)
    try:
        data = scan(job, verify=False)
    except (OSError, ValueError):
        return (*MVTEC_MEAN_IMAGES, False)
    return len(data.train), len(data.test), True


def timing_seconds(spec: StudySpec, round_s: float) -> float:
    """Time the latency measurement of one thing takes: warm-up rounds, then rounds until ``budget_s`` has passed
    (at least 3, at most ``repeats``), as ``timing.time_interleaved`` does."""
    t = spec.timing
    rounds_s = min(t.repeats * round_s, max(t.budget_s, min(3, t.repeats) * round_s))
    return t.warmup * round_s + rounds_s


def estimate_jobs(spec: StudySpec, jobs: list[Job]) -> list[dict[str, Any]]:
    """Rough seconds per job: ``[{"job", "n_train", "n_test", "data_found", "flops", "seconds"}]``."""
    from adspine.methods import get_method_class
    from adspine.methods.base import CostShape
    from adspine.study import timing

    rate = timing.conv_flops_per_second(spec.threads)
    shapes: dict[tuple, BackboneShape] = {}
    counts: dict[tuple, tuple[int, int, bool]] = {}
    out = []
    for job in jobs:
        key = (job.backbone, str(job.layers), job.image_size)
        if key not in shapes:
            shapes[key] = backbone_shape(job)
        bs = shapes[key]
        if (job.root, job.category) not in counts:
            counts[(job.root, job.category)] = count_images(job)
        n, t, found = counts[(job.root, job.category)]
        bflops = bs.flops or 5e9
        per_image_s = bflops / (rate * BACKBONE_EFFICIENCY)
        seconds = JOB_OVERHEAD_S + per_image_s * (n + t) + timing_seconds(spec, per_image_s * (1 + spec.timing.batch_n))
        a = sum(bs.channels)
        for m in spec.methods:
            klass = get_method_class(m.name)
            info = klass.info
            d = m.settings.get("d", "default")
            d = bs.default_d if d == "default" else d
            d = a if d is None else min(int(d), a)
            runs = len(spec.rd_seeds) if info.draws_rd and d < a else 1
            shape = CostShape(n, t, bs.positions, bs.channels, d, bflops)
            settings = {**klass.defaults(), **m.settings}
            if info.cost is not None:
                flops, eff = float(info.cost(shape, settings)), info.efficiency
            else:
                flops, eff = 3 * bflops * (n + t), BACKBONE_EFFICIENCY
            method_s = flops / (rate * eff)
            predict_one_s = method_s / max(1, n + t)  # a rough share: one image's part of fit + predict
            seconds += runs * (method_s + timing_seconds(spec, predict_one_s) + RESULT_OVERHEAD_S)
        out.append({"job": job, "n_train": n, "n_test": t, "data_found": found, "flops": bs.flops,
                    "seconds": seconds + (FIRST_JOB_S if not out else 0.0)})
    return out


def human_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"
