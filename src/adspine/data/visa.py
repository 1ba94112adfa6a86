"""The VisA layout (Zou et al., ECCV 2022): ``<root>/split_csv/1cls.csv`` lists every image; no torch.

CSV columns ``object`` (the category), ``split`` (``train`` / ``test``), ``label`` (``normal`` / ``anomaly``),
``image`` and ``mask`` (paths relative to the root; ``mask`` empty for normal images); an ``object`` must be a plain
folder name. Masks are not stored as 0/255: a pixel is defective when its value is > 0. Every anomaly has the
defect name ``anomaly`` (VisA records no types).
"""

from __future__ import annotations

from pathlib import Path

from adspine.data.category import CategoryData, kinds_for
from adspine.data.images import DatasetError
from adspine.data.manifest import Row, build_category, read_csv, resolve
from adspine.data.paths import plain_name

SPLIT_CSV = Path("split_csv") / "1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = {"normal": 0, "anomaly": 1}
DEFECT = "anomaly"
MASK_THRESHOLD = 0


def _rows(root: Path) -> list[Row]:
    path = root / SPLIT_CSV
    if not path.is_file():
        raise DatasetError(f"{path}: VisA split file not found (expected <root>/split_csv/1cls.csv)")
    rows = []
    for line, row in read_csv(path, COLUMNS):
        where = f"{path}:{line}"
        if row["split"] not in ("train", "test"):
            raise DatasetError(f"{where}: split {row['split']!r} (valid: train, test)")
        if row["label"] not in LABELS:
            raise DatasetError(f"{where}: label {row['label']!r} (valid: {', '.join(LABELS)})")
        if not row["object"] or not row["image"]:
            raise DatasetError(f"{where}: empty object or image")
        plain_name(row["object"], "object", where)
        label = LABELS[row["label"]]
        mask = resolve(root, row["mask"]) if row["mask"] and label else None
        defect = DEFECT if label else "good"
        rows.append(Row(where, row["object"], row["split"], label, defect, resolve(root, row["image"]), mask))
    if not rows:
        raise DatasetError(f"{path}: no rows")
    return rows


def list_categories(root: Path | str) -> list[str]:
    """Sorted ``object`` values of ``split_csv/1cls.csv``."""
    return sorted({row.category for row in _rows(Path(root))})


def scan(
    root: Path | str, category: str, masks: str = "required", verify: bool = True, workers: int | None = None
) -> CategoryData:
    """Read one VisA category (an ``object`` value)."""
    root = Path(root)
    rows = _rows(root)
    names = sorted({row.category for row in rows})
    if category not in names:
        raise DatasetError(f"{root / category}: unknown category {category!r} (valid: {', '.join(names)})")
    kind = kinds_for(root, [category])[category]
    return build_category([r for r in rows if r.category == category], root, category, kind, "visa",
                          root / SPLIT_CSV, masks, MASK_THRESHOLD, verify, workers)
