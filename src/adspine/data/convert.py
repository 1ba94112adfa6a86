"""Write one category of any readable dataset again in another layout (the same image files, copied byte for byte).

Used to build test fixtures for every layout from the synthetic MVTec-format data, and to move a user's data into a
layout adspine reads. Masks are copied, except for ``visa`` where they are rewritten with the values 0 / 1 (VisA's
masks are not 0 / 255; its reader binarises at > 0). Returns the root to pass to ``readers.scan``:

- ``mvtec``: ``out`` (category ``out/<category>``);
- ``visa``: ``out`` (``out/split_csv/1cls.csv``, images ``out/<category>/Data/Images/{Normal,Anomaly}``, masks
  ``out/<category>/Data/Masks/Anomaly``; anomalies are named ``<defect>_<stem>``, normal ones ``<split>_<stem>``);
- ``folder``: ``out/<category>`` (a single-category root);
- ``manifest``: ``out/<category>.csv`` (images under ``out/<category>/``, paths relative to the CSV).

Every input image and mask is decoded first (a listed file that is no image is refused, naming its CSV row); every
target is then checked (a plain category or defect name, inside ``out`` once resolved, no two sources on one file)
before the first file is written, so a refused export writes nothing.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from adspine.data.category import CategoryData, Sample
from adspine.data.images import MASK_THRESHOLD, DatasetError, load_mask
from adspine.data.paths import plain_name, safe_join
from adspine.data.readers import FORMATS, scan

SPLITS = ("train", "test")


@dataclass(frozen=True)
class _Write:
    """One file to write: ``source`` copied byte for byte (``mask_scale`` None) or decoded as a mask (binarised at
    > ``threshold``) and saved as a PNG holding 0 / ``mask_scale``."""

    source: Path
    target: Path
    mask_scale: int | None = None
    threshold: int = MASK_THRESHOLD


class _Plan:
    """Every file an export will write, each checked before any is written."""

    def __init__(self, out: Path):
        self.out = out
        self.writes: list[_Write] = []
        self.sources: dict[Path, Path] = {}

    def target(self, where: object, *names: str) -> Path:
        """``out/<names...>``, refused unless each name is plain and the result stays inside ``out``."""
        for name in names:
            plain_name(name, "file or folder name", str(where))
        return safe_join(self.out, *names, where=str(where))

    def add(self, source: Path, *names: str, mask_scale: int | None = None, threshold: int = MASK_THRESHOLD) -> Path:
        target = self.target(source, *names)
        key = target.resolve()
        if key in self.sources:
            raise DatasetError(f"{source}: would be written to {target}, like {self.sources[key]} (file names must "
                               "differ within a split and defect)")
        self.sources[key] = source
        self.writes.append(_Write(source, target, mask_scale, threshold))
        return target

    def add_mask(self, s: Sample, *names: str) -> Path:
        """A 0/255-style mask is copied (keeping its extension), another threshold's mask is rewritten as 0/255 PNG;
        ``names`` end with the target's stem."""
        *folders, stem = names
        if s.mask_threshold == MASK_THRESHOLD:
            return self.add(s.mask_path, *folders, stem + s.mask_path.suffix)
        return self.add(s.mask_path, *folders, stem + ".png", mask_scale=255, threshold=s.mask_threshold)

    def write(self) -> None:
        for w in self.writes:
            w.target.parent.mkdir(parents=True, exist_ok=True)
            if w.mask_scale is None:
                shutil.copyfile(w.source, w.target)
            else:
                values = load_mask(w.source, w.threshold).astype(np.uint8) * w.mask_scale
                Image.fromarray(values).save(w.target, format="PNG")


def _samples(data: CategoryData) -> list[tuple[str, Sample]]:
    """(split, sample) for every sample, its defect name checked as a plain name."""
    pairs = [(split, s) for split, samples in zip(SPLITS, (data.train, data.test)) for s in samples]
    for _, s in pairs:
        plain_name(s.defect, "defect", str(s.path))
    return pairs


def _tree(data: CategoryData, name: str, plan: _Plan, mask_folder: str, mask_name: str) -> None:
    for split, s in _samples(data):
        plan.add(s.path, name, split, s.defect, s.path.name)
        if s.mask_path is not None:
            plan.add_mask(s, name, mask_folder, s.defect, mask_name.format(stem=s.path.stem))


def _visa(data: CategoryData, plan: _Plan) -> tuple[Path, list[list[str]]]:
    """Plans the images and masks; returns the split CSV (appended to) and its new rows."""
    rows = []
    for split, s in _samples(data):
        name = f"{s.defect}_{s.path.name}" if s.label else f"{split}_{s.path.name}"
        base = (data.name, "Data")
        image = plan.add(s.path, *base, "Images", "Anomaly" if s.label else "Normal", name)
        mask = ""
        if s.mask_path is not None:
            mask_path = plan.add(s.mask_path, *base, "Masks", "Anomaly", Path(name).stem + ".png", mask_scale=1,
                                 threshold=s.mask_threshold)
            mask = mask_path.relative_to(plan.out).as_posix()
        rows.append([data.name, split, "anomaly" if s.label else "normal", image.relative_to(plan.out).as_posix(),
                     mask])
    return plan.target(plan.out, "split_csv", "1cls.csv"), rows


def _manifest(data: CategoryData, plan: _Plan) -> tuple[Path, list[list[str]]]:
    """Plans the images and masks; returns the manifest CSV and its rows."""
    rows = []
    for split, s in _samples(data):
        image = plan.add(s.path, data.name, split, s.defect, s.path.name)
        mask = ""
        if s.mask_path is not None:
            mask = plan.add_mask(s, data.name, "masks", s.defect, s.mask_path.stem).relative_to(plan.out).as_posix()
        rows.append([image.relative_to(plan.out).as_posix(), split, s.defect, mask])
    return plan.target(plan.out, f"{data.name}.csv"), rows


def _write_csv(path: Path, header: list[str], rows: list[list[str]], append: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keep = append and path.is_file()
    with path.open("a" if keep else "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        if not keep:
            writer.writerow(header)
        writer.writerows(rows)


def export_layout(
    src_root: Path | str, category: str, out: Path | str, format: str, src_format: str = "auto"
) -> Path:
    """Write ``category`` of ``src_root`` into ``out`` in ``format``; returns the root for ``readers.scan``.

    ``out`` may already hold other exported categories of the same format (VisA's CSV is appended to)."""
    if format not in FORMATS:
        raise DatasetError(f"format={format!r}: unknown dataset format (valid: {', '.join(FORMATS)})")
    plain_name(category, "category", str(src_root))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out}: output path exists and is not a folder")
    data = scan(src_root, category, src_format, masks="optional", verify=True)
    plan = _Plan(out)
    csv_path, header, rows = None, [], []
    if format in ("mvtec", "folder"):
        _tree(data, category, plan, *(("ground_truth", "{stem}_mask") if format == "mvtec" else ("masks", "{stem}")))
        root = out if format == "mvtec" else out / category
    elif format == "visa":
        (csv_path, rows), header = _visa(data, plan), ["object", "split", "label", "image", "mask"]
        root = out
    else:
        (csv_path, rows), header = _manifest(data, plan), ["path", "split", "label", "mask"]
        root = csv_path
    out.mkdir(parents=True, exist_ok=True)
    plan.write()
    if csv_path is not None:
        _write_csv(csv_path, header, rows, append=format == "visa")
    return root
