"""Dataset summary: per category, counts per split and defect type, and image sizes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from adspine.data.images import image_size
from adspine.data.mvtec import read_dataset_file, list_categories, scan_category


def summarize(root: Path | str, verify: bool = True) -> list[dict]:
    """One validated dict per category: ``category, kind, train, test_good, test_defective, defects`` (count per
    defect type), ``images`` (all), ``sizes`` (count per distinct ``"WxH"``), ``width`` and ``height`` ([min, max])."""
    root = Path(root)
    rows = []
    for name in list_categories(root):
        data = scan_category(root, name, verify=verify)
        sizes = Counter(image_size(s.path) for s in data.train + data.test)
        defects = Counter(s.defect for s in data.test if s.label == 1)
        rows.append({
            "category": name,
            "kind": data.kind,
            "train": len(data.train),
            "test_good": sum(1 for s in data.test if s.label == 0),
            "test_defective": sum(defects.values()),
            "defects": dict(sorted(defects.items())),
            "images": len(data.train) + len(data.test),
            "sizes": {f"{w}x{h}": n for (w, h), n in sorted(sizes.items())},
            "width": [min(w for w, _ in sizes), max(w for w, _ in sizes)],
            "height": [min(h for _, h in sizes), max(h for _, h in sizes)],
        })
    return rows


def dataset_name(root: Path | str) -> str | None:
    """The ``name`` recorded in ``adspine_dataset.json``, if any."""
    meta = read_dataset_file(Path(root))
    return meta.get("name") if meta else None


def size_text(row: dict) -> str:
    """``"128x128"`` for one size, else ``"103-632 x 222-403 (N sizes)"`` (width range x height range)."""
    if len(row["sizes"]) == 1:
        return next(iter(row["sizes"]))
    (w0, w1), (h0, h1) = row["width"], row["height"]
    return f"{w0}-{w1} x {h0}-{h1} ({len(row['sizes'])} sizes)"
