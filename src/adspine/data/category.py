"""What every dataset reader produces (``Sample``, ``CategoryData``) and the checks they share; imports no torch.

Mask semantics: a good image needs no mask; a defective image with ``mask_path`` None has no mask (image level only).
A category whose defective test images all lack masks is valid (image metrics only; pixel metrics are stored as
absent). A partial mix (masks for some defects, not for others) is refused under ``masks="required"`` with one line
naming the first defect folder (or image) without masks, and accepted under ``masks="optional"``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from adspine.data.images import MASK_THRESHOLD, DatasetError, open_decoded

DATASET_FILE = "adspine_dataset.json"
KINDS = ("texture", "object")
MASK_MODES = ("required", "optional")
MVTEC_AD_KINDS = {
    **{name: "texture" for name in ("carpet", "grid", "leather", "tile", "wood")},
    **{
        name: "object"
        for name in (
            "bottle", "cable", "capsule", "hazelnut", "metal_nut",
            "pill", "screw", "toothbrush", "transistor", "zipper",
        )
    },
}


@dataclass
class Sample:
    """One image: label 0 = good, 1 = defective; ``mask_path`` is None for good images and for defective images
    without a mask; masks are binarised at > ``mask_threshold`` on the 8-bit scale (127; VisA: 0)."""

    path: Path
    label: int
    defect: str
    mask_path: Path | None
    mask_threshold: int = MASK_THRESHOLD

    @property
    def has_mask(self) -> bool:
        """True when the pixel ground truth is known: a good image (all normal) or a defective image with a mask."""
        return self.label == 0 or self.mask_path is not None


@dataclass
class CategoryData:
    """A validated category: train (good only) and test samples, sorted (good first, then by defect and file name).

    ``format`` is the layout it was read from; ``skipped`` lists broken or looping symbolic links met while scanning.
    """

    root: Path
    name: str
    kind: str | None
    train: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)
    format: str = "mvtec"
    skipped: list[Path] = field(default_factory=list)

    @property
    def has_mask(self) -> np.ndarray:
        """bool per test sample: good -> True, defective -> it has a mask (which pixel metrics may use)."""
        return np.array([s.has_mask for s in self.test], dtype=bool)

    @property
    def pixel_level(self) -> bool:
        """True when every defective test image has a mask (pixel metrics apply)."""
        return bool(self.has_mask.all())

    @property
    def masks(self) -> str:
        """``"yes"`` (every defective test image has a mask), ``"no"`` (none has) or ``"partial"``."""
        defective = [s.mask_path is not None for s in self.test if s.label == 1]
        return "yes" if all(defective) else "no" if not any(defective) else "partial"


def check_mask_mode(masks: str) -> None:
    if masks not in MASK_MODES:
        raise DatasetError(f"masks={masks!r}: unknown mask mode (valid: {', '.join(MASK_MODES)})")


def enforce_mask_policy(
    test: list[Sample], masks: str, where: Callable[[str], str], expected: Callable[[Sample], str] | None = None
) -> None:
    """Refuse a partial mix of masked and unmasked defective images unless ``masks == "optional"``.

    ``where(defect)`` names a defect's folder (or CSV and defect) in the message; ``expected(sample)`` names the mask
    file a defective image lacks, used when a defect type has masks for some of its images but not for all.
    """
    check_mask_mode(masks)
    defective = [s for s in test if s.label == 1]
    with_mask = [s for s in defective if s.mask_path is not None]
    if masks == "optional" or not with_mask or len(with_mask) == len(defective):
        return
    for defect in sorted({s.defect for s in defective}):
        group = [s for s in defective if s.defect == defect]
        missing = [s for s in group if s.mask_path is None]
        if missing and len(missing) < len(group):
            hint = f" (expected {expected(missing[0])})" if expected else ""
            raise DatasetError(f"{missing[0].path}: defect image has no mask{hint}; other {defect!r} images have "
                               "masks (set masks: optional to accept)")
    first = next(d for d in sorted({s.defect for s in defective}) if all(
        s.mask_path is None for s in defective if s.defect == d))
    raise DatasetError(f"{where(first)}: defect {first!r} has no masks while other defects have them "
                       "(set masks: optional to accept a partial mix)")


def sort_samples(samples: list[Sample]) -> list[Sample]:
    """Good first, then by defect name, then by file name (the order every reader returns)."""
    return sorted(samples, key=lambda s: (s.label, s.defect, s.path.name, str(s.path)))


def _decoded_size(path: Path) -> tuple[int, int]:
    return open_decoded(path).size


def check_files(samples: list[Sample], workers: int | None = None, listed_at: dict[Path, str] | None = None) -> None:
    """Decode every image and mask fully (threads: Pillow releases the GIL) and compare mask and image sizes;
    ``listed_at`` (path -> where a list names it, e.g. ``<csv>:<line>``) is added to the error about that path."""
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    paths = [s.path for s in samples] + [s.mask_path for s in samples if s.mask_path is not None]
    listed_at = listed_at or {}

    def decoded_size(path: Path) -> tuple[int, int]:
        try:
            return _decoded_size(path)
        except DatasetError as exc:
            if path not in listed_at:
                raise
            raise DatasetError(f"{exc} (listed at {listed_at[path]})") from None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        sizes = dict(zip(paths, pool.map(decoded_size, paths)))
    for s in samples:
        if s.mask_path is not None and sizes[s.mask_path] != sizes[s.path]:
            (mw, mh), (iw, ih) = sizes[s.mask_path], sizes[s.path]
            listed = f" (listed at {listed_at[s.path]})" if s.path in listed_at else ""
            raise DatasetError(f"{s.mask_path}: mask size {mw}x{mh} differs from its image {s.path} ({iw}x{ih})"
                               + listed)


def read_dataset_file(root: Path) -> dict | None:
    """The parsed ``<root>/adspine_dataset.json``, or None when there is none."""
    path = root / DATASET_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: unreadable dataset description ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("categories", {}), dict):
        raise DatasetError(f"{path}: expected an object with a 'categories' object")
    return meta


def kinds_for(root: Path, names: list[str]) -> dict[str, str | None]:
    """Kind of each named category: from ``<root>/adspine_dataset.json``, else the MVTec AD list, else None."""
    meta = read_dataset_file(root) if root.is_dir() else None
    declared = meta.get("categories", {}) if meta else {}
    kinds: dict[str, str | None] = {}
    for name in names:
        entry = declared.get(name)
        kind = entry["kind"] if isinstance(entry, dict) and "kind" in entry else MVTEC_AD_KINDS.get(name)
        if kind is not None and kind not in KINDS:
            raise DatasetError(
                f"{root / DATASET_FILE}: category {name!r} has kind {kind!r} (valid: {', '.join(KINDS)})"
            )
        kinds[name] = kind
    return kinds


def prepare_output(out: Path, dataset_name: str, entries: list[str], overwrite: bool) -> None:
    """Make ``out`` ready for a generated dataset: it must be absent or empty, or (with ``overwrite``) hold an
    earlier dataset named ``dataset_name``, whose ``entries`` (relative names) are then removed."""
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out}: output path exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        return
    meta = None
    try:
        meta = read_dataset_file(out)
    except DatasetError:
        pass
    if not overwrite or not meta or meta.get("name") != dataset_name:
        hint = " (pass --overwrite to replace it)" if meta and meta.get("name") == dataset_name else ""
        raise DatasetError(f"{out}: output folder is not empty{hint}")
    for entry in entries:
        target = out / entry
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
