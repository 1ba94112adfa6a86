"""Study specification: a YAML file (or a shipped preset) validated with pydantic v2.

Every error is one line ``FILE: field.path: message``; all errors of a spec are reported at once, one per line.
Relative dataset roots are resolved against the current
working directory (``--data-root`` replaces the root of the spec's dataset).

Seeds: ``init_seed`` seeds random initializations; ``rd_seeds`` are the Rd channel-selection seeds given to every
method that takes an ``rd_seed`` setting (one result per seed, so reports can show mean and std); methods that draw no
Rd (no ``rd_seed`` setting, or ``d`` is None / >= dim a) run once and are stored with ``rd_seed`` NULL; ``seed`` is
passed to methods that take a ``seed`` or ``coreset_seed`` setting (CFLOW's init, PatchCore's coreset start) unless
their settings name one (the seed setting each method declares in its ``MethodInfo``). A method ``d`` left out (or ``default``) is the registry's default d of each backbone; a
method ``device`` left out is the spec's device. Every seed used is written into each result's provenance.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

class SpecError(ValueError):
    """An invalid study specification; the message is one line naming the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetSpec(_Strict):
    root: str
    name: str | None = None  # default: folder name of the root
    categories: Literal["all"] | list[str] = "all"
    format: Literal["auto", "mvtec", "visa", "folder", "manifest"] = "auto"
    masks: Literal["required", "optional"] = "required"  # optional: some defect types may lack pixel masks
    mask_pattern: str | None = None  # mvtec-like layouts: mask file name, e.g. '{stem}_mask.png', '{stem}.bmp'

    @property
    def label(self) -> str:
        return self.name or Path(self.root).name


def _check_init(v: str) -> str:
    from adspine.backbones.init_names import parse_init

    parse_init(v)  # InitError (a ValueError) lists the valid forms
    return v


InitStr = Annotated[str, AfterValidator(_check_init)]


class BackboneGroup(_Strict):
    """Registry names or ``family:NAME`` entries sharing a layer preset and (optionally) their own inits."""

    names: list[str] = Field(min_length=1)
    layers: Literal["thesis", "stride"] | list[str] = "thesis"
    inits: list[InitStr] | None = Field(None, min_length=1)  # default: the spec's top-level ``inits``

    @field_validator("names")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        for n in names:
            expand_backbone(n)  # raises ValueError naming the entry
        return names

    @field_validator("layers")
    @classmethod
    def _layers(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("explicit layer list is empty")
        return v


class MethodSpec(_Strict):
    name: str
    settings: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self) -> "MethodSpec":
        from adspine.methods import METHODS, get_method_class

        if self.name not in METHODS:
            raise ValueError(f"unknown method '{self.name}'; valid: {', '.join(sorted(METHODS))}")
        if "rd_seed" in self.settings:
            raise ValueError("set Rd seeds with the top-level 'rd_seeds' list, not in method settings")
        if "rd_scheme" in self.settings:
            raise ValueError("set the Rd scheme with the top-level 'rd' field, not in method settings")
        try:
            klass = get_method_class(self.name)
        except ImportError as e:
            raise ValueError(f"method '{self.name}' is not available here ({e})") from None
        check_settings(klass, self.settings)
        return self


def check_settings(klass, settings: dict[str, Any]) -> None:
    """Setting names and value types against the method constructor's signature and annotations; then build it
    once, so a bad value stops the spec (``d: default`` stands for the registry's d of each backbone)."""
    import typing

    from pydantic import TypeAdapter

    params = set(klass.param_names())
    unknown = sorted(set(settings) - params)
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)} for method '{klass.name}'; valid: "
                         f"{', '.join(sorted(params))}")
    hints = typing.get_type_hints(klass.__init__)
    given = {k: v for k, v in settings.items() if not (k == "d" and v == "default")}
    for k, v in given.items():
        if k in hints:
            try:
                TypeAdapter(hints[k]).validate_python(v, strict=False)
            except ValidationError as e:
                raise ValueError(f"settings.{k}: {v!r} is not a valid {_type_name(hints[k])} "
                                 f"({e.errors()[0]['msg']})") from None
    try:
        klass(**given)
    except (TypeError, ValueError) as e:
        raise ValueError(f"settings: {e}") from None


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


class TimingSpec(_Strict):
    """Latency: after ``warmup`` rounds, batch 1 and batch N are timed interleaved, round after round, until
    ``budget_s`` has passed (at least 3 rounds, at most ``repeats``); the store keeps minimum and median. A fast
    network gets many rounds, so its minimum is the undisturbed figure even on a busy machine."""

    warmup: int = Field(2, ge=0)
    repeats: int = Field(200, ge=1)
    budget_s: float = Field(2.0, gt=0)
    batch_n: int = Field(8, ge=1)  # the "batch N" of the batched latency
    # torch threads while timing: 1 by default, the figure least disturbed by other processes (several threads wait
    # for each other at every layer when the cores are shared) and comparable between machines; None = the job's
    threads: int | None = Field(1, ge=1)
    # at the end of a study, re-time every backbone configuration round-robin in one process (study.timing
    # .final_timing; the report's speed statements use it) for about ``final_budget_s`` after building them
    final: bool = True
    final_budget_s: float = Field(3.0, gt=0)


class UncertaintySpec(_Strict):
    """Intervals stored with each result: image AUROC by DeLong, pixel AUROC and AUPRO by a seeded bootstrap over
    test images (``n_boot`` resamples; 0 = no pixel intervals)."""

    level: float = Field(0.95, gt=0, lt=1)
    n_boot: int = Field(200, ge=0)
    seed: int = 0


class ExamplesSpec(_Strict):
    count: int = Field(4, ge=0)  # test images whose maps are kept per result (best/worst defective, best/worst good)
    size: int = Field(64, ge=8)  # stored map side (float16)


class StudySpec(_Strict):
    name: str
    description: str = ""
    datasets: list[DatasetSpec] = Field(min_length=1)
    backbones: list[BackboneGroup] = Field(min_length=1)
    inits: list[InitStr] = Field(default_factory=lambda: ["imagenet"], min_length=1)
    init_seed: int = 1024
    # backbone precisions: one job per backbone x init x precision (adspine.backbones.precision.PRECISIONS)
    precisions: list[str] = Field(default_factory=lambda: ["fp32"], min_length=1)
    methods: list[MethodSpec] = Field(min_length=1)
    rd_seeds: list[int] = Field(default_factory=lambda: [1024], min_length=1)
    rd: Literal["reference", "torch"] = "reference"  # Rd draw: Python random.sample (PaDiM reference code) or torch
    seed: int = 1024
    protocol: Literal["paper", "resize", "aspect-crop"] = "paper"
    image_size: int | tuple[int, int] = 224  # side, or [height, width]
    device: Literal["cpu", "cuda"] = "cpu"
    threads: int | None = Field(None, ge=1)  # torch intra-op threads per job (None = torch default)
    batch_size: int = Field(8, ge=1)
    num_workers: int = Field(0, ge=0)  # DataLoader workers
    timing: TimingSpec = Field(default_factory=TimingSpec)
    examples: ExamplesSpec = Field(default_factory=ExamplesSpec)
    uncertainty: UncertaintySpec = Field(default_factory=UncertaintySpec)
    # the report's ranking and recommendation: 'auto' = 'localisation' where masks exist, else 'image' (report.rank)
    rank_by: Literal["auto", "image", "localisation"] = "auto"
    baselines: bool = True  # trivial shortcut baselines (adspine.baselines) once per category, before the jobs

    @field_validator("image_size")
    @classmethod
    def _size(cls, v):
        sides = (v, v) if isinstance(v, int) else tuple(v)
        if any(int(x) < 32 for x in sides):
            raise ValueError(f"image sides must be >= 32 px, got {list(sides) if not isinstance(v, int) else v}")
        return v

    @property
    def size_hw(self) -> tuple[int, int]:
        """The image size as (height, width)."""
        return (self.image_size, self.image_size) if isinstance(self.image_size, int) else tuple(self.image_size)

    @field_validator("backbones", mode="before")
    @classmethod
    def _short_backbones(cls, v):
        # a bare string is a one-name group
        if isinstance(v, list):
            return [{"names": [x]} if isinstance(x, str) else x for x in v]
        return v

    @field_validator("methods", mode="before")
    @classmethod
    def _short_methods(cls, v):
        if isinstance(v, list):
            return [{"name": x} if isinstance(x, str) else x for x in v]
        return v

    @field_validator("precisions")
    @classmethod
    def _precisions(cls, v: list[str]) -> list[str]:
        from adspine.backbones.precision import check_precision

        for p in v:
            check_precision(p)  # PrecisionError (a ValueError) lists the valid ones
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate precisions in {v}")
        return v

    @field_validator("rd_seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate Rd seeds in {v}")
        return v


def expand_backbone(entry: str) -> list[str]:
    """``family:NAME`` -> every registry name of that family; a plain name -> [name] (must be in the registry)."""
    from adspine.backbones.registry import FAMILIES, get_spec, list_specs

    if entry.startswith("family:"):
        fam = entry.split(":", 1)[1]
        try:
            specs = list_specs(family=fam) if fam else []
        except (KeyError, ValueError):
            specs = []
        if not specs:
            raise ValueError(f"unknown backbone family '{fam}'; valid: {', '.join(FAMILIES)}")
        return [s.name for s in specs]
    try:
        get_spec(entry)
    except (KeyError, ValueError):
        names = [s.name for s in list_specs()]
        key = entry.lower().replace("-", "_")
        close = [n for n in names if key[:5] in n.lower()][:6]
        hint = f" (similar: {', '.join(close)})" if close else " (see `adspine backbones list`)"
        raise ValueError(f"unknown backbone '{entry}'{hint}") from None
    return [entry]


def _presets_dir():
    return resources.files("adspine.study") / "presets"


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in _presets_dir().iterdir() if p.name.endswith(".yaml"))


def resolve_spec_path(spec: str | Path) -> tuple[str, str]:
    """Return (label for messages, YAML text) for a file path or a preset name."""
    p = Path(spec)
    if p.is_file():
        return str(p), p.read_text()
    if str(spec) in preset_names():
        res = _presets_dir() / f"{spec}.yaml"
        return f"preset:{spec}", res.read_text()
    raise SpecError(f"{spec}: no such spec file or preset (presets: {', '.join(preset_names())})")


def _loc(loc: tuple) -> str:
    parts: list[str] = []
    for x in loc:
        if isinstance(x, int):
            parts.append(f"[{x}]")
        elif x in ("function-after", "function-before", "list[str]", "str", "int") or "[" in str(x) or "'" in str(x):
            continue  # pydantic union-branch tags, not field names
        else:
            parts.append(("." if parts else "") + str(x))
    return "".join(parts) or "(top level)"


def load_spec(spec: str | Path, data_root: str | Path | None = None) -> StudySpec:
    """Load and validate a spec file or preset name; raise SpecError with one line ``FILE: field: message``."""
    label, text = resolve_spec_path(spec)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "YAML"
        raise SpecError(f"{label}: {where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{label}: (top level): expected a mapping of study fields, got {type(raw).__name__}")
    if data_root is not None:
        ds = raw.get("datasets")
        if not isinstance(ds, list) or len(ds) != 1:
            raise SpecError(f"{label}: datasets: --data-root needs a spec with exactly one dataset")
        if isinstance(ds[0], dict):
            ds[0] = {**ds[0], "root": str(data_root)}
    try:
        return StudySpec.model_validate(raw)
    except ValidationError as e:
        lines: dict[str, str] = {}
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown field (not allowed here)"
            elif err["type"] == "literal_error" and "input" in err:
                msg = f"{msg} (got {err['input']!r})"
            lines.setdefault(_loc(err["loc"]), msg)  # union branches report one field twice: keep the first
        raise SpecError("\n".join(f"{label}: {field}: {msg}" for field, msg in lines.items())) from None
