"""Write one category of any readable dataset again in another layout (the same image files, copied byte for byte).

Used to build test fixtures for every layout from the synthetic MVTec-format data, and to move a user's data into a
layout adspine reads. Masks are copied, except for ``visa`` where they are rewritten with the values 0 / 1 (VisA's
masks are not 0 / 255; its reader binarises at > 0). Returns the root to pass to ``readers.scan``:

- ``mvtec``: ``out`` (category ``out/<category>``);
- ``visa``: ``out`` (``out/split_csv/1cls.csv``, images ``out/<category>/Data/Images/{Normal,Anomaly}``, masks
  ``out/<category>/Data/Masks/Anomaly``; anomalies are named ``<defect>_<stem>``, normal ones ``<split>_<stem>``);
- ``folder``: ``out/<category>`` (a single-category root);
- ``manifest``: ``out/<category>.csv`` (images under ``out/<category>/``, paths relative to the CSV).
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from adspine.data.category import CategoryData, Sample
from adspine.data.images import MASK_THRESHOLD, DatasetError, load_mask
from adspine.data.readers import FORMATS, scan


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def _write_mask(s: Sample, dst_stem: Path) -> Path:
    """Copy a 0/255-style mask (keeping its extension), or rewrite another threshold's mask as a 0/255 PNG."""
    if s.mask_threshold == MASK_THRESHOLD:
        return _copy(s.mask_path, dst_stem.with_name(dst_stem.name + s.mask_path.suffix))
    dst = dst_stem.with_name(dst_stem.name + ".png")
    dst.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(load_mask(s.mask_path, s.mask_threshold).astype(np.uint8) * 255).save(dst)
    return dst


def _tree(data: CategoryData, category_dir: Path, mask_folder: str, mask_name: str) -> None:
    for split, samples in (("train", data.train), ("test", data.test)):
        for s in samples:
            _copy(s.path, category_dir / split / s.defect / s.path.name)
            if s.mask_path is not None:
                _write_mask(s, category_dir / mask_folder / s.defect / mask_name.format(stem=s.path.stem))


def _visa(data: CategoryData, out: Path) -> None:
    base = Path(data.name) / "Data"
    rows = []

    def name(split: str, s: Sample) -> str:
        return f"{s.defect}_{s.path.name}" if s.label else f"{split}_{s.path.name}"

    for split, samples in (("train", data.train), ("test", data.test)):
        for s in samples:
            image = base / "Images" / ("Anomaly" if s.label else "Normal") / name(split, s)
            _copy(s.path, out / image)
            mask = ""
            if s.mask_path is not None:
                mask_rel = base / "Masks" / "Anomaly" / (Path(name(split, s)).stem + ".png")
                (out / mask_rel).parent.mkdir(parents=True, exist_ok=True)
                values = load_mask(s.mask_path, s.mask_threshold).astype(np.uint8)
                Image.fromarray(values).save(out / mask_rel)
                mask = mask_rel.as_posix()
            rows.append([data.name, split, "anomaly" if s.label else "normal", image.as_posix(), mask])
    path = out / "split_csv" / "1cls.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = path.is_file()
    with path.open("a", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        if not existing:
            writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)


def _manifest(data: CategoryData, out: Path) -> Path:
    path = out / f"{data.name}.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "split", "label", "mask"])
        for split, samples in (("train", data.train), ("test", data.test)):
            for s in samples:
                image = _copy(s.path, out / data.name / split / s.defect / s.path.name)
                mask = ""
                if s.mask_path is not None:
                    mask_path = _write_mask(s, out / data.name / "masks" / s.defect / s.mask_path.stem)
                    mask = mask_path.relative_to(out).as_posix()
                writer.writerow([image.relative_to(out).as_posix(), split, s.defect, mask])
    return path


def export_layout(
    src_root: Path | str, category: str, out: Path | str, format: str, src_format: str = "auto"
) -> Path:
    """Write ``category`` of ``src_root`` into ``out`` in ``format``; returns the root for ``readers.scan``.

    ``out`` may already hold other exported categories of the same format (VisA's CSV is appended to)."""
    if format not in FORMATS:
        raise DatasetError(f"format={format!r}: unknown dataset format (valid: {', '.join(FORMATS)})")
    data = scan(src_root, category, src_format, masks="optional", verify=False)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if format == "mvtec":
        _tree(data, out / category, "ground_truth", "{stem}_mask")
        return out
    if format == "folder":
        _tree(data, out / category, "masks", "{stem}")
        return out / category
    if format == "visa":
        _visa(data, out)
        return out
    return _manifest(data, out)
