"""The ``manifest`` layout: one CSV lists every image, the escape hatch for any other layout; no torch.

Columns (header row required, order free): ``path``, ``split`` (``train`` / ``test``), ``label`` (``good`` or a defect
name), optional ``mask`` (mask path, may be empty) and optional ``category``. Relative paths are relative to the CSV's
folder. With a ``category`` column each distinct value is a category; without it the whole CSV is one category named
after the file stem (``parts.csv`` -> ``parts``). Category and label values must be plain names (folder names in the
other layouts: no ``/``, ``\\``, NUL, ``.`` or ``..``); a path may point anywhere, the file must decode as an image.
Train rows must be good. The dataset root passed to ``scan`` is the CSV file itself. Masks are binarised at > 127 on
the 8-bit scale.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from adspine.data.category import (
    CategoryData,
    Sample,
    check_files,
    check_mask_mode,
    enforce_mask_policy,
    kinds_for,
    sort_samples,
)
from adspine.data.images import MASK_THRESHOLD, DatasetError, is_broken_link
from adspine.data.paths import plain_name

REQUIRED_COLUMNS = ("path", "split", "label")
SPLITS = ("train", "test")
GOOD = "good"


@dataclass
class Row:
    """One listed image, already resolved: ``where`` is ``<csv>:<line>`` for messages."""

    where: str
    category: str
    split: str
    label: int
    defect: str
    path: Path
    mask_path: Path | None


def read_csv(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row dict) for every non-empty row of a CSV with a header holding ``required`` columns."""
    if not path.is_file():
        raise DatasetError(f"{path}: CSV file not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in reader.fieldnames or []]
            missing = [c for c in required if c not in header]
            if missing:
                raise DatasetError(f"{path}: missing column(s) {', '.join(missing)} (header: {', '.join(header)})")
            rows = []
            for row in reader:
                clean = {(k or "").strip(): (v or "").strip() for k, v in row.items() if not isinstance(v, list)}
                if any(clean.values()):
                    rows.append((reader.line_num, clean))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: unreadable CSV ({exc})") from None
    return rows


def resolve(base: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else base / path


def build_category(
    rows: list[Row],
    root: Path,
    name: str,
    kind: str | None,
    format: str,
    source: Path,
    masks: str = "required",
    mask_threshold: int = MASK_THRESHOLD,
    verify: bool = True,
    workers: int | None = None,
) -> CategoryData:
    """Validate the rows of one category (files exist, train is good, both splits present) into CategoryData;
    listed images that are broken or looping links are skipped and counted."""
    check_mask_mode(masks)
    skipped: list[Path] = []
    train: list[Sample] = []
    test: list[Sample] = []
    seen: dict[Path, str] = {}
    for row in rows:
        if row.path in seen:
            raise DatasetError(f"{row.where}: {row.path} listed twice (first at {seen[row.path]})")
        seen[row.path] = row.where
        if is_broken_link(row.path):
            skipped.append(row.path)
            continue
        if not row.path.is_file():
            raise DatasetError(f"{row.path}: file not found (listed at {row.where})")
        if row.mask_path is not None and not row.mask_path.is_file():
            raise DatasetError(f"{row.mask_path}: mask file not found (listed at {row.where})")
        if row.split == "train" and row.label:
            raise DatasetError(f"{row.where}: defective image {row.path} in the train split (train must be good)")
        sample = Sample(row.path, row.label, row.defect, row.mask_path if row.label else None, mask_threshold)
        (train if row.split == "train" else test).append(sample)
    for what, samples in (("train", train), ("test good", [s for s in test if not s.label]),
                          ("test defective", [s for s in test if s.label])):
        if not samples:
            raise DatasetError(f"{source}: category {name!r} has no {what} images")
    enforce_mask_policy(test, masks, where=lambda defect: f"{source} (category {name!r}, defect {defect!r})")
    if verify:
        listed_at = {p: row.where for row in rows for p in (row.path, row.mask_path) if p is not None}
        check_files(train + test, workers, listed_at)
    return CategoryData(root=root, name=name, kind=kind, train=sorted(train, key=lambda s: (s.path.name, str(s.path))),
                        test=sort_samples(test), format=format, skipped=skipped)


def _rows(path: Path) -> list[Row]:
    base = path.parent
    rows = []
    for line, row in read_csv(path, REQUIRED_COLUMNS):
        where = f"{path}:{line}"
        if row["split"] not in SPLITS:
            raise DatasetError(f"{where}: split {row['split']!r} (valid: {', '.join(SPLITS)})")
        if not row["path"]:
            raise DatasetError(f"{where}: empty path")
        if not row["label"]:
            raise DatasetError(f"{where}: empty label (use {GOOD!r} or a defect name)")
        category = plain_name(row.get("category") or path.stem, "category", where)
        label = int(plain_name(row["label"], "label", where) != GOOD)
        mask = resolve(base, row["mask"]) if row.get("mask") else None
        if mask is not None and not label:
            raise DatasetError(f"{where}: a good image has a mask ({mask}); good images need none")
        rows.append(Row(where, category, row["split"], label, row["label"], resolve(base, row["path"]), mask))
    if not rows:
        raise DatasetError(f"{path}: no rows")
    return rows


def list_categories(root: Path | str) -> list[str]:
    """Sorted category names of a manifest CSV (its stem when there is no ``category`` column)."""
    return sorted({row.category for row in _rows(Path(root))})


def scan(
    root: Path | str,
    category: str | None = None,
    masks: str = "required",
    verify: bool = True,
    workers: int | None = None,
) -> CategoryData:
    """Read one category of a manifest CSV (``category`` may be omitted when the CSV holds only one)."""
    path = Path(root)
    rows = _rows(path)
    names = sorted({row.category for row in rows})
    if category is None and len(names) > 1:
        raise DatasetError(f"{path}: holds several categories; name one (valid: {', '.join(names)})")
    name = category if category is not None else names[0]
    if name not in names:
        raise DatasetError(f"{path}: unknown category {name!r} (valid: {', '.join(names)})")
    kind = kinds_for(path.parent, [name])[name]
    return build_category([r for r in rows if r.category == name], path, name, kind, "manifest", path, masks,
                          MASK_THRESHOLD, verify, workers)
