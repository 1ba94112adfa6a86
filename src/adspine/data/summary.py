"""Dataset summary, any layout: per category, counts per split and defect type, masks, image sizes, skipped links."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from adspine.data.category import read_dataset_file
from adspine.data.images import image_size
from adspine.data.readers import detect_format, list_categories, scan


def summarize(
    root: Path | str, verify: bool = True, format: str = "auto", masks: str = "optional",
    mask_pattern: str | None = None,
) -> list[dict]:
    """One validated dict per category: ``category, kind, format, train, test_good, test_defective, defects`` (count
    per defect type), ``masks`` (``yes`` / ``no`` / ``partial``), ``skipped`` (broken or looping links), ``images``
    (all), ``sizes`` (count per distinct ``"WxH"``), ``width`` and ``height`` ([min, max])."""
    fmt = detect_format(root) if format == "auto" else format
    rows = []
    for name in list_categories(root, fmt):
        data = scan(root, name, fmt, masks, mask_pattern, verify)
        sizes = Counter(image_size(s.path) for s in data.train + data.test)
        defects = Counter(s.defect for s in data.test if s.label == 1)
        rows.append({
            "category": name,
            "kind": data.kind,
            "format": data.format,
            "train": len(data.train),
            "test_good": sum(1 for s in data.test if s.label == 0),
            "test_defective": sum(defects.values()),
            "defects": dict(sorted(defects.items())),
            "masks": data.masks,
            "skipped": len(data.skipped),
            "images": len(data.train) + len(data.test),
            "sizes": {f"{w}x{h}": n for (w, h), n in sorted(sizes.items())},
            "width": [min(w for w, _ in sizes), max(w for w, _ in sizes)],
            "height": [min(h for _, h in sizes), max(h for _, h in sizes)],
        })
    return rows


def dataset_name(root: Path | str) -> str | None:
    """The ``name`` recorded in ``adspine_dataset.json``, if any."""
    root = Path(root)
    meta = read_dataset_file(root) if root.is_dir() else None
    return meta.get("name") if meta else None


def size_text(row: dict) -> str:
    """``"128x128"`` for one size, else ``"103-632 x 222-403 (N sizes)"`` (width range x height range)."""
    if len(row["sizes"]) == 1:
        return next(iter(row["sizes"]))
    (w0, w1), (h0, h1) = row["width"], row["height"]
    return f"{w0}-{w1} x {h0}-{h1} ({len(row['sizes'])} sizes)"
