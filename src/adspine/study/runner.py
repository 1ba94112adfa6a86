"""Study execution: expand a spec into jobs, run one job (features once, every method and Rd seed on them), drive
an executor and commit each finished job to the results store.

A job is one (dataset category, backbone, init, layers, protocol/size) combination. Its id is a stable hash of that
key plus everything else that changes its results (methods and their settings, Rd seeds, seeds, device), so rerunning
the same spec skips finished jobs while a changed spec reruns what it changed.

Inside a job the backbone features of every train and test image are computed once (kept on the CPU in float32:
about 5.6 MB per image for WRN50 layers 1-3 at 224 px) and shared by all methods and Rd seeds. Timings: backbone
latency per image at batch 1 and batch N (``timing`` module), method fit seconds and predict ms per image (method
part only: the features are already computed), peak RSS as a process high-water mark, model size = bytes of the
saved model folder.
"""

from __future__ import annotations

import datetime as _dt
import gc
import hashlib
import json
import math
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adspine.study.spec import RANDOM_SCHEMES, StudySpec, expand_backbone, method_params
from adspine.study.store import ResultStore
from adspine.study import timing

SEED_SETTINGS = ("seed", "coreset_seed")  # method settings that receive the spec's ``seed``
ProgressFn = Callable[[int, int], None]  # (images done, images total) within a job


@dataclass(frozen=True)
class Job:
    job_id: str
    dataset: str
    root: str
    category: str
    backbone: str
    init: str
    init_seed: int | None
    layers: str | tuple[str, ...]  # 'thesis', 'stride' or explicit module names
    protocol: str
    image_size: int
    device: str

    @property
    def layer_preset(self) -> str:
        return self.layers if isinstance(self.layers, str) else "explicit"

    def label(self) -> str:
        return f"{self.dataset}/{self.category} {self.backbone} [{self.init}]"


def job_key(spec: StudySpec, dataset: str, category: str, backbone: str, init: str, layers) -> dict[str, Any]:
    """Everything that changes a job's results (not timing knobs such as threads or batch size)."""
    return {
        "dataset": dataset,
        "category": category,
        "backbone": backbone,
        "init": init,
        "init_seed": spec.init_seed if init in RANDOM_SCHEMES else None,
        "layers": layers if isinstance(layers, str) else list(layers),
        "protocol": spec.protocol,
        "image_size": spec.image_size,
        "device": spec.device,
        "methods": [{"name": m.name, "settings": m.settings} for m in spec.methods],
        "rd_seeds": list(spec.rd_seeds),
        "seed": spec.seed,
    }


def job_id_of(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dataset_categories(root: str | Path, categories) -> list[str]:
    from adspine.data.mvtec import list_categories

    if categories != "all":
        return list(categories)
    if not Path(root).is_dir():
        raise FileNotFoundError(f"{root}: dataset folder not found (set it in the spec or with --data-root)")
    return list(list_categories(root))


def plan_jobs(spec: StudySpec) -> list[Job]:
    """Every job of the study in run order (dataset, category, backbone group, backbone, init), de-duplicated."""
    jobs: dict[str, Job] = {}
    for ds in spec.datasets:
        for cat in dataset_categories(ds.root, ds.categories):
            for group in spec.backbones:
                layers = group.layers if isinstance(group.layers, str) else tuple(group.layers)
                for entry in group.names:
                    for bb in expand_backbone(entry):
                        for init in group.inits or spec.inits:
                            key = job_key(spec, ds.label, cat, bb, init, layers)
                            jid = job_id_of(key)
                            jobs.setdefault(
                                jid,
                                Job(jid, ds.label, str(Path(ds.root).resolve()), cat, bb, init, key["init_seed"],
                                    layers, spec.protocol, spec.image_size, spec.device),
                            )
    return list(jobs.values())


# -- one job ---------------------------------------------------------------------------------------------------
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    from adspine.methods.base import library_versions

    return library_versions()


def base_row(spec: StudySpec, job: Job) -> dict[str, Any]:
    """Job columns known before any work (also the row of a job that fails early)."""
    return {
        "job_id": job.job_id,
        "study": spec.name,
        "dataset": job.dataset,
        "dataset_root": job.root,
        "category": job.category,
        "backbone": job.backbone,
        "init": job.init,
        "init_seed": job.init_seed,
        "layer_preset": job.layer_preset,
        "layers": json.dumps(list(job.layers)) if not isinstance(job.layers, str) else None,
        "protocol": job.protocol,
        "image_size": job.image_size,
        "device": job.device,
        "threads": torch.get_num_threads(),
        "host_cpu": timing.host_cpu(),
        "host_gpu": timing.host_gpu(job.device),
        "versions": json.dumps(_versions()),
        "started_at": _now(),
    }


def _extractor_builder():
    try:
        from adspine.backbones import build_extractor
    except ImportError:  # the package may not re-export it
        from adspine.backbones.extractor import build_extractor
    return build_extractor


def _build_extractor(job: Job):
    import inspect

    build_extractor = _extractor_builder()

    layers = job.layers if isinstance(job.layers, str) else list(job.layers)
    kwargs: dict[str, Any] = {"init": job.init, "layers": layers, "device": job.device}
    if job.init_seed is not None and "init_seed" in inspect.signature(build_extractor).parameters:
        kwargs["init_seed"] = job.init_seed
    return build_extractor(job.backbone, **kwargs)


def _detach(maps) -> list[torch.Tensor]:
    # clone outside inference mode: methods may train on these (CFLOW) and inference tensors cannot join autograd
    return [m.detach().to("cpu").clone() for m in maps]


def _extract(extractor, samples, spec: StudySpec, device: str, tick: Callable[[int], None]):
    from torch.utils.data import DataLoader

    from adspine.data.mvtec import ImageDataset

    ds = ImageDataset(samples, protocol=spec.protocol, size=spec.image_size)
    dl = DataLoader(ds, batch_size=spec.batch_size, shuffle=False, num_workers=spec.num_workers)
    feats, labels, masks, paths, defects = [], [], [], [], []
    for batch in dl:
        with torch.inference_mode():
            maps = extractor(batch["image"].to(device))
        feats.append(_detach(maps))
        labels.extend(int(x) for x in batch["label"])
        masks.append(batch["mask"].numpy().astype(bool))
        paths.extend(batch["path"])
        defects.extend(batch["defect"])
        tick(len(batch["label"]))
    return feats, np.asarray(labels), np.concatenate(masks) if masks else np.zeros((0, 0, 0), bool), paths, defects


def _timing_batch(samples, spec: StudySpec, n: int) -> torch.Tensor:
    from adspine.data.mvtec import ImageDataset

    ds = ImageDataset(samples[: max(1, min(n, len(samples)))], protocol=spec.protocol, size=spec.image_size)
    imgs = [ds[i]["image"] for i in range(len(ds))]
    while len(imgs) < n:
        imgs.extend(imgs[: n - len(imgs)])
    return torch.stack(imgs[:n])


def method_runs(spec: StudySpec, extractor) -> Iterator[tuple[str, dict[str, Any], int | None]]:
    """(method name, constructor settings, rd_seed or None) for every result of a job."""
    from adspine.methods import get_method_class

    dim_a = int(sum(extractor.channels))
    for m in spec.methods:
        params = method_params(get_method_class(m.name))
        takes = (lambda k: True) if params is None else (lambda k: k in params)
        settings = dict(m.settings)
        if takes("d") and settings.get("d", "default") == "default":
            settings["d"] = getattr(extractor, "default_d", None)
        for k in SEED_SETTINGS:  # the method's own randomness (coreset start, flow init) gets the spec's seed
            if takes(k) and k not in settings and params is not None:
                settings[k] = spec.seed
        if takes("device") and "device" not in settings and params is not None:
            settings["device"] = spec.device
        d = settings.get("d")
        draws_rd = takes("rd_seed") and d is not None and int(d) < dim_a
        if draws_rd:
            for s in spec.rd_seeds:
                yield m.name, {**settings, "rd_seed": int(s)}, int(s)
        else:
            if takes("rd_seed") and params is not None:
                settings["rd_seed"] = int(spec.rd_seeds[0])  # no channel is dropped: the seed has no effect
            yield m.name, settings, None


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


def _small(a: np.ndarray, size: int, mode: str) -> np.ndarray:
    t = torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)[None, None]
    if mode == "nearest":
        return torch.nn.functional.interpolate(t, size=(size, size), mode="nearest")[0, 0].numpy() > 0.5
    small = torch.nn.functional.interpolate(t, size=(size, size), mode="area")[0, 0].numpy()
    return np.clip(small, -65504, 65504).astype(np.float16)  # float16 range


def _json_safe(x: Any) -> Any:
    return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def run_job(spec: StudySpec, job: Job, progress: ProgressFn | None = None, row: dict | None = None) -> dict[str, Any]:
    """Run one job and return ``{"job": row, "results": [...], "examples": [...]}`` (raises on failure).

    ``row`` (optional) is filled in place as figures become known, so a caller can record a partial failed job.
    """
    from adspine.data.mvtec import scan_category
    from adspine.methods import build_method
    from adspine.metrics import evaluate

    row = row if row is not None else base_row(spec, job)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    row["threads"] = torch.get_num_threads()
    device = job.device
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("spec asks for device cuda but torch sees no CUDA device")
    torch.manual_seed(spec.seed)

    data = scan_category(job.root, job.category)
    row.update(category_kind=data.kind, n_train=len(data.train), n_test=len(data.test))
    extractor = _build_extractor(job)
    info = dict(getattr(extractor, "info", {}) or {})
    row.update(
        family=info.get("family"),
        weights_tag=info.get("weights_tag") or job.init,  # the random scheme / file when nothing was pretrained
        init_seed=info.get("init_seed", job.init_seed),
        imagenet_top1=info.get("imagenet_top1"),
        layers=json.dumps(list(extractor.layer_names)),
        dim_a=int(sum(extractor.channels)),
        params=int(extractor.truncated_params()),
    )

    total = len(data.train) + len(data.test)
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    train_feats, _, _, _, _ = _extract(extractor, data.train, spec, device, tick)
    test_feats, labels, masks, paths, defects = _extract(extractor, data.test, spec, device, tick)

    # backbone figures: FLOPs of the truncated network, latency at batch 1 and batch N
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    bn = spec.timing.batch_n
    imgs = _timing_batch(data.test, spec, bn).to(device)
    row["flops"] = (float(extractor.flops(spec.image_size)) if hasattr(extractor, "flops")
                    else timing.count_flops(extractor, imgs[:1]))
    warm, reps = spec.timing.warmup, spec.timing.repeats
    row["backbone_ms_b1"] = timing.forward_ms_per_image(extractor, imgs[:1], warm, reps, device)
    row["backbone_ms_bn"] = timing.forward_ms_per_image(extractor, imgs, warm, reps, device)
    row["batch_n"] = bn
    if device == "cuda":
        row["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    del imgs

    size = (spec.image_size, spec.image_size)
    results, examples = [], []
    for name, settings, rd_seed in method_runs(spec, extractor):
        method = build_method(name, **settings)
        gc.collect()
        rss_before = timing.rss_mb()
        with timing.PeakRSS() as mem:
            sw = timing.Stopwatch(device)
            with sw:
                method.fit(([t.to(device) for t in b] for b in train_feats))
            fit_s = sw.total
            rss_after_fit = timing.rss_mb()
            sw = timing.Stopwatch(device)
            maps, scores = [], []
            for b in test_feats:
                b = [t.to(device) for t in b]
                with sw:
                    pred = method.predict(b, size)
                maps.append(np.asarray(pred.maps, dtype=np.float32))
                scores.append(np.asarray(pred.scores, dtype=np.float64))
        maps_np, scores_np = np.concatenate(maps), np.concatenate(scores)
        peak = mem.peak_mb
        prov = {
            "backbone": info,
            "layers": list(extractor.layer_names),
            "protocol": spec.protocol,
            "image_size": spec.image_size,
            "rd_seed": rd_seed,
            "seeds": {k: settings[k] for k in SEED_SETTINGS if k in settings},
            "torch_seed": spec.seed,  # torch.manual_seed at the start of the job
            "init_seed": row["init_seed"],
        }
        with tempfile.TemporaryDirectory(prefix="adspine-model-") as tmp:
            method.save(tmp, provenance=_json_safe(prov))
            model_bytes = timing.folder_bytes(tmp)
        metrics = evaluate(labels, scores_np, masks, maps_np)
        results.append(
            {
                "method": name,
                "rd_seed": rd_seed,
                "d": settings.get("d"),
                "settings": json.dumps(_json_safe(method.settings() if hasattr(method, "settings") else settings)),
                **{k: float(v) for k, v in metrics.items()},
                "fit_s": fit_s,
                "predict_ms": sw.total * 1e3 / max(1, len(labels)),
                "peak_rss_mb": peak,
                "model_bytes": int(model_bytes),
                "provenance": json.dumps(
                    _json_safe(
                        {
                            **prov,
                            "method": getattr(method, "provenance", {}),
                            "extra_state": method.extra_state(),
                            "rss_before_fit_mb": rss_before,
                            "rss_after_fit_mb": rss_after_fit,
                            "process_high_water_mb": timing.peak_rss_mb(),
                            "peak_rss_note": "largest RSS sampled every 5 ms during this method's fit and predict",
                        }
                    )
                ),
            }
        )
        for k, i in enumerate(pick_examples(labels, scores_np, spec.examples.count)):
            examples.append(
                {
                    "method": name,
                    "rd_seed": rd_seed,
                    "idx": k,
                    "image_path": paths[i],
                    "label": int(labels[i]),
                    "defect": defects[i],
                    "score": float(scores_np[i]),
                    "amap": _small(maps_np[i], spec.examples.size, "area"),
                    "mask": _small(masks[i], spec.examples.size, "nearest"),
                }
            )
        del method, maps, maps_np
    row.update(status="done", error=None, finished_at=_now())
    return {"job": row, "results": results, "examples": examples}


def format_error(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    return f"{type(e).__name__}: {e}{where}"


def execute_job(spec: StudySpec, job: Job, progress: ProgressFn | None = None) -> dict[str, Any]:
    """``run_job`` that turns any exception (incl. MemoryError, CUDA OOM) into a ``failed`` job; Ctrl-C passes."""
    row = base_row(spec, job)
    try:
        return run_job(spec, job, progress, row)
    except Exception as e:  # noqa: BLE001 - every failure is recorded, the study goes on
        err = format_error(e)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        row.update(status="failed", error=err, finished_at=_now())
        return {"job": row, "results": [], "examples": []}


# -- the study ---------------------------------------------------------------------------------------------------
@dataclass
class StudySummary:
    planned: int
    skipped: int
    done: int
    failed: int
    db: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_study(
    spec: StudySpec,
    db: str | Path,
    executor: str | Any = "inprocess",
    address: str | None = None,
    show_progress: bool = True,
    console=None,
) -> StudySummary:
    """Run every unfinished job of ``spec`` and commit each to the store at ``db`` as it ends.

    Raises KeyboardInterrupt after Ctrl-C; jobs finished before it are already committed.
    """
    from adspine.study.executors import make_executor

    jobs = plan_jobs(spec)
    store = ResultStore(db)
    try:
        finished = store.done_job_ids()
        pending = [j for j in jobs if j.job_id not in finished]
        summary = StudySummary(len(jobs), len(jobs) - len(pending), 0, 0, str(db))
        ex = make_executor(executor, address=address)

        def on_done(out: dict[str, Any]) -> None:
            store.record_job(out["job"], out["results"], out["examples"])
            if out["job"]["status"] == "done":
                summary.done += 1
            else:
                summary.failed += 1
                if console is not None:
                    from rich.markup import escape

                    j = out["job"]
                    what = f"{j['category']} {j['backbone']} [{j['init']}]: {j['error']}"
                    console.print(f"[red]job failed[/red] {escape(what)}", soft_wrap=True)

        if not pending:
            return summary
        with _progress(show_progress, console) as prog:
            ex.run(spec, pending, on_done, prog)
        return summary
    finally:
        store.close()


class _Progress:
    """Rich progress bars for jobs and images (ETA from rich's TimeRemainingColumn); no-op when disabled."""

    def __init__(self, enabled: bool, console=None):
        self.enabled, self.console, self._p = enabled, console, None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console)
            self._p.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._p is not None:
            self._p.__exit__(*exc)

    def add(self, description: str, total: int | None) -> int | None:
        return self._p.add_task(description, total=total) if self._p else None

    def update(self, task: int | None, **kw) -> None:
        if self._p is not None and task is not None:
            self._p.update(task, **kw)


def _progress(enabled: bool, console=None) -> _Progress:
    return _Progress(enabled, console)


# -- dry run: list jobs and estimate time ------------------------------------------------------------------------
def _count_images(root: str, category: str) -> tuple[int, int, bool]:
    """(n_train, n_test, found) by counting image files; MVTec AD averages (242, 115) when the folder is missing."""
    exts = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
    cat = Path(root) / category
    if not cat.is_dir():
        return 242, 115, False
    n = lambda sub: sum(1 for p in (cat / sub).rglob("*") if p.suffix.lower() in exts)  # noqa: E731
    return n("train/good"), n("test"), True


@dataclass
class BackboneShape:
    """What a dry-run estimate needs of a truncated backbone at the job's image size."""

    flops: float | None  # per image
    grids: list[int]  # positions per layer (h * w), shallow to deep
    channels: list[int]
    default_d: int | None


def backbone_shape(job: Job) -> BackboneShape:
    """Layer shapes and FLOPs of the truncated backbone from a weight-free (meta) build; no weights, no compute."""
    try:
        from adspine.backbones.extractor import probe, resolve_layers, truncate
        from adspine.backbones.init import construct
        from adspine.backbones.registry import get_spec

        layers = job.layers if isinstance(job.layers, str) else list(job.layers)
        bspec = get_spec(job.backbone)
        outputs = probe(bspec, job.image_size)
        names = resolve_layers(bspec, layers, outputs)
        with torch.device("meta"):
            body = truncate(construct(bspec, zero_init_last=False if bspec.zero_init_kw else None), names)
        flops = timing.count_flops(body, torch.zeros(1, 3, job.image_size, job.image_size, device="meta"))
        shapes = [outputs[n].shape for n in names]
        return BackboneShape(flops, [h * w for *_, h, w in shapes], [s[1] for s in shapes], bspec.d)
    except Exception:  # noqa: BLE001 - an estimate only: fall back to a ResNet-18-like guess
        g = (job.image_size // 4) ** 2
        return BackboneShape(None, [g, g // 4, g // 16], [64, 128, 256], 100)


# calibration of the dry-run estimate (seconds = FLOPs / (rate * efficiency) + overheads)
JOB_OVERHEAD_S = 4.0  # build and trace the network, load weights, scan the dataset
RESULT_OVERHEAD_S = 1.0  # save the model, metrics (AUPRO), examples
SEARCH_EFFICIENCY = 1.0  # faiss (BLAS) nearest-neighbour search ran at about conv speed in the demo calibration
BACKBONE_EFFICIENCY = 0.3  # whole network vs one dense 3x3 conv (depthwise, memory-bound layers)


def estimate_jobs(spec: StudySpec, jobs: list[Job]) -> list[dict[str, Any]]:
    """Rough seconds per job from FLOP counts and this CPU's measured 3x3-conv FLOP/s.

    Backbone: exact FLOPs of the truncated network (meta build) x (train + test + timing images). Methods (N train,
    T test images, P_l positions and C_l channels of layer l, d = Rd channels): PaDiM 2*N*P_0*d^2 + P_0*d^3 +
    2*T*P_0*d^2 per Rd seed; SPADE sum_l 2*T*K*P_l^2*C_l (K = min(k, N)); PatchCore (grid of its first layer P_1, 1024
    dims) r*(N*P_1)^2*128*2 + 2*T*P_1*r*N*P_1*1024; other methods 3x the backbone pass. Plus fixed overheads per job
    and per result. An order of magnitude, not a promise: other processes, BLAS and faiss efficiency vary.
    """
    rate = timing.conv_flops_per_second(spec.threads)
    cache: dict[tuple, BackboneShape] = {}
    out = []
    for job in jobs:
        key = (job.backbone, str(job.layers), job.image_size)
        if key not in cache:
            cache[key] = backbone_shape(job)
        bs = cache[key]
        n, t, found = _count_images(job.root, job.category)
        timed = (spec.timing.batch_n + 1) * (spec.timing.warmup + spec.timing.repeats)  # latency runs
        seconds = JOB_OVERHEAD_S + (bs.flops or 5e9) * (n + t + timed) / (rate * BACKBONE_EFFICIENCY)
        a, p0 = sum(bs.channels), bs.grids[0]
        for m in spec.methods:
            runs = 1
            d = m.settings.get("d", "default")
            d = bs.default_d if d == "default" else d
            d = a if d is None else min(int(d), a)
            if m.name == "padim":
                runs = len(spec.rd_seeds) if d < a else 1
                flops, eff = runs * (2 * n * p0 * d * d + p0 * d**3 + 2 * t * p0 * d * d), 1.0
            elif m.name == "spade":
                k = min(int(m.settings.get("k", 50)), n)
                flops, eff = sum(2 * t * k * g * g * c for g, c in zip(bs.grids, bs.channels)), SEARCH_EFFICIENCY
            elif m.name == "patchcore":
                r, p1 = float(m.settings.get("coreset_ratio", 0.1)), bs.grids[min(1, len(bs.grids) - 1)]
                bank = n * p1
                flops, eff = 2 * r * bank * bank * 128 + 2 * t * p1 * r * bank * 1024, SEARCH_EFFICIENCY
            else:
                flops, eff = 3 * (bs.flops or 5e9) * (n + t), BACKBONE_EFFICIENCY
            seconds += flops / (rate * eff) + runs * RESULT_OVERHEAD_S
        out.append({"job": job, "n_train": n, "n_test": t, "data_found": found, "flops": bs.flops,
                    "seconds": seconds})
    return out


def human_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"
