"""The plan between a spec and a run: every job resolved and everything checked before any work.

``plan(spec)`` expands a spec into jobs (one per dataset category x backbone x init x precision, with the spec's
layers, protocol and size) and checks, before anything runs: dataset roots, categories and their files (the dataset
readers' validation), backbone names and layer names, that pretrained weights can be had (cached, packaged or
downloadable; offline and missing -> the file and how to provide it), the device, the method settings and that int8
can run. All problems are reported together, one line each (``PlanError``); ``Plan.notes`` says where bf16 runs
emulated. ``Plan.run(db)`` runs it; ``Plan.estimate()`` prices it.

A job's id is a stable hash of everything that changes its results (not timing knobs such as threads or batch size),
so rerunning a spec skips finished jobs while a changed spec reruns what it changed. The precision enters the key
only when it is not fp32, so stores written before precisions existed keep their job ids.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adspine.backbones.init_names import SEEDED_INITS, parse_init
from adspine.study.spec import StudySpec, expand_backbone, load_spec


class PlanError(ValueError):
    """Problems found before any work; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(dict.fromkeys(problems))
        super().__init__("\n".join(self.problems))


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
    image_size: tuple[int, int]  # (height, width)
    device: str
    format: str = "auto"
    masks: str = "required"
    mask_pattern: str | None = None
    precision: str = "fp32"  # the backbone's (adspine.backbones.precision); methods always get float32 features

    @property
    def layer_preset(self) -> str:
        return self.layers if isinstance(self.layers, str) else "explicit"

    def label(self) -> str:
        precision = "" if self.precision == "fp32" else f" {self.precision}"
        return f"{self.dataset}/{self.category} {self.backbone} [{self.init}]{precision}"


def job_key(spec: StudySpec, ds, category: str, backbone: str, init: str, layers,
            precision: str = "fp32") -> dict[str, Any]:
    """Everything that changes a job's results (not timing knobs such as threads, batch size or repeats); the
    precision only when it is not fp32 (the ids of earlier fp32 jobs stay)."""
    key = {
        "dataset": ds.label,
        "format": ds.format,
        "masks": ds.masks,
        "mask_pattern": ds.mask_pattern,
        "category": category,
        "backbone": backbone,
        "init": init,
        "init_seed": spec.init_seed if parse_init(init)[0] in SEEDED_INITS else None,
        "layers": layers if isinstance(layers, str) else list(layers),
        "protocol": spec.protocol,
        "image_size": list(spec.size_hw),
        "device": spec.device,
        "methods": [{"name": m.name, "settings": m.settings} for m in spec.methods],
        "rd_seeds": list(spec.rd_seeds),
        "rd": spec.rd,
        "seed": spec.seed,
    }
    return key if precision == "fp32" else {**key, "precision": precision}


def job_id_of(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- data access through the dataset readers ----------------------------------------------------------------------
def list_categories(root: str | Path, fmt: str = "auto") -> list[str]:
    from adspine import data

    return list(data.list_categories(root, format=fmt))


def scan(job: Job, verify: bool = True):
    """The job's validated ``CategoryData``."""
    from adspine import data

    return data.scan(job.root, job.category, format=job.format, masks=job.masks, mask_pattern=job.mask_pattern,
                     verify=verify)


# -- the plan ---------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """A checked study: its spec and jobs in run order. ``run(db)`` executes it, ``estimate()`` prices it."""

    spec: StudySpec
    jobs: list[Job] = field(default_factory=list)
    skipped_links: dict[str, int] = field(default_factory=dict)  # 'dataset/category' -> broken or looping links
    notes: list[str] = field(default_factory=list)  # one line each, e.g. bf16 emulated on this CPU

    def spec_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.spec.model_dump(mode="json"), sort_keys=False)

    def estimate(self) -> list[dict[str, Any]]:
        from adspine.study.estimate import estimate_jobs

        return estimate_jobs(self.spec, self.jobs)

    def run(self, db: str | Path, executor: str | Any = "inprocess", address: str | None = None,
            show_progress: bool = False, console=None, retry_killed: bool = False):
        from adspine.study.run import run_plan

        return run_plan(self, db, executor=executor, address=address, show_progress=show_progress,
                        console=console, retry_killed=retry_killed)


def expand(spec: StudySpec, problems: list[str] | None = None) -> list[Job]:
    """Every job of the study in run order (dataset, category, backbone group, backbone, init, precision),
    de-duplicated.
    Category listing problems are appended to ``problems`` (raised at once when None)."""
    jobs: dict[str, Job] = {}
    for ds in spec.datasets:
        root = Path(ds.root).expanduser()
        if ds.categories == "all":
            try:
                cats = list_categories(root, ds.format)
            except (OSError, ValueError) as e:
                if problems is None:
                    raise
                problems.append(_line(e, root))
                continue
        else:
            cats = list(ds.categories)
        for cat in cats:
            for group in spec.backbones:
                layers = group.layers if isinstance(group.layers, str) else tuple(group.layers)
                for entry in group.names:
                    for bb in expand_backbone(entry):
                        for init, precision in itertools.product(group.inits or spec.inits, spec.precisions):
                            key = job_key(spec, ds, cat, bb, init, layers, precision)
                            jid = job_id_of(key)
                            jobs.setdefault(jid, Job(jid, ds.label, str(root.resolve()), cat, bb, init,
                                                     key["init_seed"], layers, spec.protocol, spec.size_hw,
                                                     spec.device, ds.format, ds.masks, ds.mask_pattern, precision))
    return list(jobs.values())


def _line(e: BaseException, where: Any = None) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if where is not None and str(where) not in msg:
        msg = f"{where}: {msg}"
    return msg


def check_jobs(spec: StudySpec, jobs: list[Job], verify_data: bool = True,
               skipped_links: dict[str, int] | None = None) -> list[str]:
    """Everything that can be checked without running: one line per problem (empty when all is well). Broken or
    looping links the readers skipped are counted per 'dataset/category' into ``skipped_links``."""
    problems: list[str] = []
    if spec.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            problems.append("device: the spec asks for cuda but torch sees no CUDA device; use device: cpu")
    if "int8" in spec.precisions:
        from adspine.backbones.precision import int8_problem

        if int8_problem():
            problems.append(f"precisions: {int8_problem()}")
    seen_data, seen_layers, seen_weights = set(), set(), set()
    for job in jobs:
        key = (job.root, job.category, job.format, job.masks, job.mask_pattern)
        if key not in seen_data:
            seen_data.add(key)
            if not Path(job.root).exists():  # a folder, or a manifest CSV
                problems.append(f"{job.root}: dataset folder not found (set it in the spec or with --data-root)")
            else:
                try:
                    data = scan(job, verify=verify_data)
                except (OSError, ValueError) as e:
                    problems.append(_line(e))
                else:
                    if data.skipped and skipped_links is not None:
                        skipped_links[f"{job.dataset}/{job.category}"] = len(data.skipped)
        if (job.backbone, job.layers) not in seen_layers:
            seen_layers.add((job.backbone, job.layers))
            try:
                _check_layers(job)
            except (KeyError, ValueError) as e:
                problems.append(f"{job.backbone}: {_line(e)}")
        if (job.backbone, job.init) not in seen_weights:
            seen_weights.add((job.backbone, job.init))
            try:
                _check_weights(job)
            except (OSError, ValueError) as e:
                problems.append(f"{job.backbone} [{job.init}]: {_line(e)}")
    return problems


def _check_layers(job: Job) -> None:
    from adspine.backbones.extractor import probe, resolve_layers
    from adspine.backbones.registry import get_spec

    bspec = get_spec(job.backbone)
    layers = job.layers if isinstance(job.layers, str) else list(job.layers)
    resolve_layers(bspec, layers, probe(bspec, min(job.image_size)))


def _check_weights(job: Job) -> None:
    from adspine.backbones import check_weights

    check_weights(job.backbone, job.init)


def plan(spec: StudySpec | str | Path, data_root: str | Path | None = None, check: bool = True,
         verify_data: bool = True) -> Plan:
    """Resolve a spec (object, file or preset name) into a checked ``Plan``; raise ``PlanError`` listing every
    problem (spec errors are ``SpecError``)."""
    if not isinstance(spec, StudySpec):
        spec = load_spec(spec, data_root=data_root)
    problems: list[str] = []
    skipped_links: dict[str, int] = {}
    jobs = expand(spec, problems)
    if check:
        problems += check_jobs(spec, jobs, verify_data, skipped_links)
    if problems:
        raise PlanError(problems)
    return Plan(spec, jobs, skipped_links, precision_notes(spec))


def precision_notes(spec: StudySpec) -> list[str]:
    """One line per requested precision that runs differently here than its name promises (bf16 emulated)."""
    from adspine.backbones.precision import precision_note

    return [n for n in (precision_note(p, spec.device) for p in spec.precisions) if n]
