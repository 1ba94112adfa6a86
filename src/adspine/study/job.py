"""One job: features once, then every method and Rd seed on them, each result handed over as soon as it ends.

Inside a job the backbone features of every train and test image are computed once (kept on the CPU in float32:
about 5.6 MB per image for WRN50 layers 1-3 at 224 px) and shared by all methods and Rd seeds. Figures: backbone
latency at batch 1 and batch N (interleaved repeats, minimum and median), FLOPs and parameters of the truncated
network, per method fit seconds, predict latency (method part, minimum and median per image), the kernel's memory
high-water mark during the method and its increment, model size on disk, metrics with intervals, example maps.
A method that raises is recorded as a failed result beside the others; the job goes on.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import logging
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adspine.study import timing
from adspine.study.plan import Job, scan
from adspine.study.spec import StudySpec
from adspine.study.store import StoreError, is_disk_full

log = logging.getLogger(__name__)
ProgressFn = Callable[[int, int], None]  # (images done, images total) within a job
ResultFn = Callable[[dict[str, Any], list[dict[str, Any]]], None]  # (result row, example rows)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def base_row(spec: StudySpec, job: Job) -> dict[str, Any]:
    """Job columns known before any work (also the row of a job that fails early)."""
    from adspine.methods.base import library_versions

    h, w = job.image_size
    return {
        "job_id": job.job_id,
        "study": spec.name,
        "dataset": job.dataset,
        "dataset_root": job.root,
        "dataset_format": job.format,
        "category": job.category,
        "backbone": job.backbone,
        "init": job.init,
        "init_seed": job.init_seed,
        "precision": job.precision,
        "layer_preset": job.layer_preset,
        "layers": json.dumps(list(job.layers)) if not isinstance(job.layers, str) else None,
        "protocol": job.protocol,
        "image_size": h if h == w else None,
        "image_height": h,
        "image_width": w,
        "device": job.device,
        "threads": torch.get_num_threads(),
        "host_cpu": timing.host_cpu(),
        "host_gpu": timing.host_gpu(job.device),
        "versions": json.dumps(library_versions()),
        "started_at": now(),
    }


def _detach(maps) -> list[torch.Tensor]:
    # clone outside inference mode: methods may train on these (CFLOW) and inference tensors cannot join autograd
    return [m.detach().to("cpu").clone() for m in maps]


def _extract(extractor, samples, spec: StudySpec, device: str, tick: Callable[[int], None]):
    from torch.utils.data import DataLoader

    from adspine.data.mvtec import ImageDataset

    ds = ImageDataset(samples, protocol=spec.protocol, size=spec.size_hw)
    dl = DataLoader(ds, batch_size=spec.batch_size, shuffle=False, num_workers=spec.num_workers)
    feats, labels, masks, has_mask, paths, defects = [], [], [], [], [], []
    mask_paths = [None if s.mask_path is None else str(s.mask_path) for s in samples]
    for batch in dl:
        with torch.inference_mode():
            maps = extractor(batch["image"].to(device))
        feats.append(_detach(maps))
        labels.extend(int(x) for x in batch["label"])
        masks.append(batch["mask"].numpy().astype(bool))
        has_mask.extend(bool(x) for x in batch.get("has_mask", torch.ones(len(batch["label"]), dtype=torch.bool)))
        paths.extend(batch["path"])
        defects.extend(batch["defect"])
        tick(len(batch["label"]))
    h, w = spec.size_hw
    return {
        "feats": feats,
        "labels": np.asarray(labels, dtype=np.int64),
        "masks": np.concatenate(masks) if masks else np.zeros((0, h, w), bool),
        "has_mask": np.asarray(has_mask, dtype=bool),
        "paths": paths,
        "mask_paths": mask_paths,
        "defects": defects,
    }


def check_finite(part: dict, layers) -> None:
    """Raise naming the first image whose backbone features hold NaN or inf (``AnomalyMethod``'s check)."""
    from adspine.methods.base import nonfinite_feature_images

    start = 0
    for batch in part["feats"]:
        bad = nonfinite_feature_images(batch, layers)
        if bad:
            i, reason = next(iter(bad.items()))
            raise ValueError(f"{part['paths'][start + i]}: {reason} ({len(bad)} image(s) of this batch)")
        start += int(batch[0].shape[0])


def _timing_batch(samples, spec: StudySpec, n: int) -> torch.Tensor:
    from adspine.data.mvtec import ImageDataset

    ds = ImageDataset(samples[: max(1, min(n, len(samples)))], protocol=spec.protocol, size=spec.size_hw)
    imgs = [ds[i]["image"] for i in range(len(ds))]
    while len(imgs) < n:
        imgs.extend(imgs[: n - len(imgs)])
    return torch.stack(imgs[:n])


def method_runs(spec: StudySpec, dim_a: int, default_d: int | None) -> Iterator[tuple[str, dict[str, Any], int | None]]:
    """(method name, constructor settings, rd_seed or None) for every result of a job, from each method's
    descriptor: methods that draw Rd get ``d`` (the backbone's default when not set, capped at ``dim_a``, the
    channels actually available), ``rd_seed`` and ``rd_scheme``; the seed setting gets the study's ``seed``; methods
    with a ``device`` setting get the spec's device."""
    from adspine.methods import get_method_class

    for m in spec.methods:
        klass = get_method_class(m.name)
        info, params = klass.info, set(klass.param_names())
        settings = dict(m.settings)
        if info.seed_setting and info.seed_setting not in settings:
            settings[info.seed_setting] = spec.seed
        if "device" in params and "device" not in settings:
            settings["device"] = spec.device
        if not info.draws_rd:
            yield m.name, settings, None
            continue
        d = settings.get("d", "default")
        d = default_d if d == "default" else d
        d = None if d is None or int(d) >= dim_a else int(d)  # store the d actually used
        settings["d"] = d
        if "rd_scheme" in params:
            settings["rd_scheme"] = spec.rd
        if d is None:  # no channel dropped: the seed has no effect, one result
            settings["rd_seed"] = int(spec.rd_seeds[0])
            yield m.name, settings, None
        else:
            for s in spec.rd_seeds:
                yield m.name, {**settings, "rd_seed": int(s)}, int(s)


def pick_examples(labels: np.ndarray, scores: np.ndarray, count: int) -> list[int]:
    """Test indices to keep: most / least confident defective, highest-scored (false alarm) / lowest-scored good."""
    order = np.argsort(scores, kind="stable")
    bad = [int(i) for i in order if labels[i] == 1]
    good = [int(i) for i in order if labels[i] == 0]
    picks: list[int] = []
    for cand in (bad[-1:], bad[:1], good[-1:], good[:1]):
        for i in cand:
            if i not in picks:
                picks.append(i)
    rest = [int(i) for i in order[::-1] if int(i) not in picks]
    return (picks + rest)[:count]


def example_size(size: int, hw: tuple[int, int]) -> tuple[int, int]:
    """Stored example map size: ``size`` on the short side, the model's aspect ratio kept."""
    h, w = hw
    return (size, max(1, round(size * w / h))) if h <= w else (max(1, round(size * h / w)), size)


def _small(a: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    t = torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)[None, None]
    if mode == "nearest":
        return torch.nn.functional.interpolate(t, size=size, mode="nearest")[0, 0].numpy() > 0.5
    small = torch.nn.functional.interpolate(t, size=size, mode="area")[0, 0].numpy()
    return np.clip(small, -65504, 65504).astype(np.float16)  # float16 range


def json_safe(x: Any) -> Any:
    return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def format_error(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}{where}"


def _metrics(spec: StudySpec, test: dict, scores: np.ndarray, maps: np.ndarray) -> dict[str, Any]:
    """The study's metrics with intervals; pixel metrics NULL where the category has no masks."""
    from adspine.metrics import evaluate
    from adspine.metrics.localisation import max_in_mask, pixel_bootstrap
    from adspine.metrics.uncertainty import auroc_ci

    labels, has_mask = test["labels"], test["has_mask"]
    pixel = bool(has_mask[labels == 1].any()) if (labels == 1).any() else False
    masks = test["masks"] if pixel else None
    out = dict(evaluate(labels, scores, masks, maps if pixel else None, has_mask=has_mask))
    u = spec.uncertainty
    if min((labels == 0).sum(), (labels == 1).sum()) >= 2:  # DeLong needs two of each
        _, out["image_auroc_lo"], out["image_auroc_hi"] = auroc_ci(labels, scores, level=u.level)
    boot = None
    if pixel:
        out["max_in_mask"] = max_in_mask(masks, maps, labels=labels, has_mask=has_mask)
    if pixel and u.n_boot > 0:  # intervals, and the replicates for the report's paired localisation tests
        intervals, boot = pixel_bootstrap(masks, maps, has_mask=has_mask, n_boot=u.n_boot, seed=u.seed,
                                          level=u.level, labels=labels)
        out.update(intervals)
    out = {k: (None if v is None else float(v)) for k, v in out.items()}
    if boot is not None:
        out.update(pixel_boot=boot, pixel_boot_seed=int(u.seed))
    return out


def _run_method(spec: StudySpec, job: Job, name: str, settings: dict[str, Any], rd_seed: int | None, extractor,
                layers, train: dict, test: dict, info: dict, row: dict) -> tuple[dict[str, Any], list[dict]]:
    """Fit and evaluate one method on the job's features; returns its result row and example rows."""
    from adspine.methods import build_method

    device = job.device
    size = job.image_size
    method = build_method(name, **settings)
    gc.collect()
    with timing.KernelPeak() as mem:
        sw = timing.Stopwatch(device)
        with sw:
            method.fit([[t.to(device) for t in b] for b in train["feats"]], layers=layers)
        fit_s = sw.total
        maps, scores = [], []
        for b in test["feats"]:
            pred = method.predict([t.to(device) for t in b], size)
            if pred.invalid:
                i, reason = next(iter(pred.invalid.items()))
                raise ValueError(f"{test['paths'][sum(len(s) for s in scores) + i]}: {reason}")
            maps.append(np.asarray(pred.maps, dtype=np.float32))
            scores.append(np.asarray(pred.scores, dtype=np.float64))
    maps_np, scores_np = np.concatenate(maps), np.concatenate(scores)
    one = [t[:1].to(device) for t in test["feats"][0]]
    with timing.torch_threads(spec.timing.threads):
        lat = timing.time_interleaved([lambda: method.predict(one, size)], warmup=1,
                                      min_repeats=min(spec.timing.repeats, 3), budget_s=spec.timing.budget_s,
                                      max_repeats=spec.timing.repeats, device=device)[0]
    prov = {
        "backbone": info,
        "layers": [r.as_dict() for r in layers],
        "protocol": spec.protocol,
        "image_size": list(size),
        "rd_seed": rd_seed,
        "rd_scheme": settings.get("rd_scheme"),
        "seeds": {k: settings[k] for k in ("seed", "coreset_seed") if k in settings},
        "torch_seed": spec.seed,  # torch.manual_seed at the start of the job
        "init_seed": row.get("init_seed"),
    }
    with tempfile.TemporaryDirectory(prefix="adspine-model-") as tmp:
        method.save(tmp, provenance=json_safe(prov))
        model_bytes = timing.folder_bytes(tmp)
    metrics = _metrics(spec, test, scores_np, maps_np)
    result = {
        "method": name,
        "status": "done",
        "rd_seed": rd_seed,
        "d": settings.get("d") if settings.get("d") is not None else (
            sum(r.channels for r in layers) if "d" in settings else None),  # channels actually used
        "rd_scheme": settings.get("rd_scheme"),
        "settings": json.dumps(json_safe(method.settings())),
        **metrics,
        "fit_s": fit_s,
        "predict_ms": lat.median,
        "predict_ms_min": lat.min,
        "peak_rss_mb": mem.peak_mb,
        "method_peak_mb": mem.increment_mb,
        "memory_source": mem.source,
        "model_bytes": int(model_bytes),
        "test_labels": test["labels"].astype(np.int8),
        "test_scores": scores_np,
        "provenance": json.dumps(json_safe({
            **prov,
            "method": getattr(method, "provenance", {}),
            "extra_state": method.extra_state(),
            "rss_before_method_mb": mem.baseline_mb,
            "memory_note": f"{mem.source}: process peak during fit + predict; method_peak_mb = peak - RSS before",
            "predict_repeats": lat.repeats,
        })),
        "finished_at": now(),
    }
    ex_size = example_size(spec.examples.size, size)
    examples = [
        {
            "method": name,
            "rd_seed": rd_seed,
            "idx": k,
            "image_path": test["paths"][i],
            "mask_path": test["mask_paths"][i],
            "label": int(test["labels"][i]),
            "defect": test["defects"][i],
            "score": float(scores_np[i]),
            "amap": _small(maps_np[i], ex_size, "area"),
            "mask": _small(test["masks"][i], ex_size, "nearest"),
        }
        for k, i in enumerate(pick_examples(test["labels"], scores_np, spec.examples.count))
    ]
    return result, examples


def run_job(spec: StudySpec, job: Job, progress: ProgressFn | None = None, row: dict | None = None,
            on_result: ResultFn | None = None) -> dict[str, Any]:
    """Run one job; every method's result goes to ``on_result`` as it ends; returns the final job row (status
    'done', or 'failed' when every method failed). Raises on failures before the methods (data, backbone)."""
    from adspine.backbones import build_extractor

    row = row if row is not None else base_row(spec, job)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    row["threads"] = torch.get_num_threads()
    device = job.device
    torch.manual_seed(spec.seed)

    data = scan(job)
    labels_known = [s.label for s in data.test]
    row.update(category_kind=data.kind, n_train=len(data.train), n_test=len(labels_known),
               pixel_level=int(all(s.mask_path is not None for s in data.test if s.label == 1)))
    layers_arg = job.layers if isinstance(job.layers, str) else list(job.layers)
    extractor = build_extractor(job.backbone, init=job.init, layers=layers_arg, device=device,
                                precision="fp32" if job.precision == "int8" else job.precision,
                                **({"init_seed": job.init_seed} if job.init_seed is not None else {}))
    if job.precision == "int8":
        extractor = int8_extractor(extractor, data.train, spec)
    layers = extractor.layer_info(job.image_size)
    info = dict(getattr(extractor, "info", {}) or {})
    dim_a = int(sum(r.channels for r in layers))
    row.update(
        family=info.get("family"),
        weights_tag=info.get("weights_tag") or job.init,  # the random scheme / file when nothing was pretrained
        init_seed=info.get("init_seed", job.init_seed),
        imagenet_top1=info.get("imagenet_top1"),
        layers=json.dumps([r.name for r in layers]),
        dim_a=dim_a,
        params=int(extractor.truncated_params()),
    )

    total, done = len(data.train) + len(data.test), 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    train = _extract(extractor, data.train, spec, device, tick)
    test = _extract(extractor, data.test, spec, device, tick)
    for part in (train, test):
        check_finite(part, layers)

    # backbone figures: FLOPs of the truncated network, latency at batch 1 and batch N (interleaved repeats)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    bn = spec.timing.batch_n
    imgs = _timing_batch(data.test, spec, bn).to(device)
    row["flops"] = timing.count_flops(getattr(extractor, "extractor", extractor), imgs[:1])  # int8: its torch net
    row["load_avg"] = timing.load_average()
    with timing.torch_threads(spec.timing.threads):
        b1, bN = timing.forward_latency(extractor, [imgs[:1], imgs], spec.timing.warmup,
                                        min(spec.timing.repeats, 3), spec.timing.budget_s, device,
                                        max_repeats=spec.timing.repeats)
        row["timing_threads"] = torch.get_num_threads()
    row.update(backbone_ms_b1=b1.median, backbone_ms_b1_min=b1.min, backbone_ms_bn=bN.median,
               backbone_ms_bn_min=bN.min, timing_repeats=b1.repeats, batch_n=bn)
    if device == "cuda":
        row["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    del imgs

    ok = failed = 0
    for name, settings, rd_seed in method_runs(spec, dim_a, getattr(extractor, "default_d", None)):
        try:
            result, examples = _run_method(spec, job, name, settings, rd_seed, extractor, layers, train, test,
                                           info, row)
            ok += 1
        except Exception as e:  # noqa: BLE001 - recorded beside the other methods; the job goes on
            if is_disk_full(e):  # no later result could be kept: the study stops
                raise
            log.warning("%s: %s failed: %s", job.label(), name, format_error(e))
            failed += 1
            result = {"method": name, "status": "failed", "error": format_error(e), "rd_seed": rd_seed,
                      "d": settings.get("d"), "rd_scheme": settings.get("rd_scheme"),
                      "settings": json.dumps(json_safe(settings)), "finished_at": now()}
            examples = []
            gc.collect()
        if on_result is not None:
            on_result(result, examples)
    status = "done" if ok else "failed"
    error = None if not failed else f"{failed} of {ok + failed} method run(s) failed"
    row.update(status=status, error=error, finished_at=now())
    return row


def int8_extractor(extractor, train, spec: StudySpec):
    """``extractor`` quantized to int8 by the OpenVINO backend, calibrated on a seeded subset of the normal
    training images only; its record (calibration images, library versions) goes into ``info``."""
    from adspine.backbones.openvino_backend import build_openvino_extractor, calibration_set

    calibration = calibration_set([s.path for s in train], spec.protocol, spec.size_hw, seed=spec.seed)
    quantized = build_openvino_extractor(extractor, "int8", calibration=calibration)
    quantized.info["openvino"] = quantized.record
    return quantized


def execute_job(spec: StudySpec, job: Job, progress: ProgressFn | None = None,
                on_result: ResultFn | None = None) -> dict[str, Any]:
    """``run_job`` that turns any exception (incl. MemoryError, CUDA OOM) into a ``failed`` job row whose error
    names the layers; Ctrl-C, a full disk and a store that cannot be written pass. Returns ``{"job": row,
    "results": [...]}`` where ``results`` collects what went to ``on_result`` when none was given (Ray workers send
    them back with the job)."""
    row = base_row(spec, job)
    collected: list[tuple[dict, list]] = []
    sink = on_result if on_result is not None else (lambda r, e: collected.append((r, e)))
    try:
        row = run_job(spec, job, progress, row, sink)
    except Exception as e:  # noqa: BLE001 - every failure is recorded, the study goes on
        if isinstance(e, StoreError) or is_disk_full(e):  # nothing more can be kept: the study stops
            raise
        layers = job.layers if isinstance(job.layers, str) else ",".join(job.layers)
        row.update(status="failed", error=f"{format_error(e)} [layers {layers}]", finished_at=now())
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"job": row, "results": collected}
