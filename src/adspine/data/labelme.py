"""LabelMe JSON polygons -> binary masks (0 / 255 PNG), plus a ``labels.csv`` ready to become a manifest.

Every ``*.json`` under the source (or the one file given) is read: ``imageHeight``, ``imageWidth``, ``imagePath`` and
``shapes[]`` with ``label``, ``points`` and ``shape_type``. Shapes are rasterised as LabelMe itself does (Pillow
``ImageDraw``, outline and fill): ``polygon`` (>= 3 points), ``rectangle`` (two corners), ``circle`` (centre and a
point on the rim); other shape types (line, point, ...) are skipped and counted. One mask per JSON file is written to
``<out>/<relative path>.png``. Labels: an image with shapes is defective, its defect named after the shape label (or
``combined`` when shapes carry several labels); an image without shapes gets an empty mask and counts as good, unless
one of its ``flags`` other than good/ok/normal is true (then it is defective at image level: no mask is listed).
``labels.csv`` has the columns ``path`` (the image, relative to ``out``), ``label``, ``mask``; add a ``split``
column to use it as a manifest.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw

from adspine.data.images import DatasetError

SHAPES = ("polygon", "rectangle", "circle")
GOOD_FLAGS = ("good", "ok", "normal")
LABELS_FILE = "labels.csv"
MIN_POINTS = {"polygon": 3, "rectangle": 2, "circle": 2}


def rasterise(shapes: list[dict], height: int, width: int, where: str = "") -> tuple[Image.Image, Counter]:
    """An ``L`` image (0 / 255) of the supported shapes and a count per shape type (``skipped:<type>`` for others)."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    counts: Counter = Counter()
    for index, shape in enumerate(shapes):
        kind = shape.get("shape_type") or "polygon"
        if kind not in SHAPES:
            counts[f"skipped:{kind}"] += 1
            continue
        try:
            points = [(float(x), float(y)) for x, y in shape["points"]]
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"{where}: shape {index} has no valid points [[x, y], ...]") from None
        if len(points) < MIN_POINTS[kind]:
            raise DatasetError(f"{where}: shape {index} ({kind}) has {len(points)} point(s), needs "
                               f"{MIN_POINTS[kind]}")
        if kind == "polygon":
            draw.polygon(points, outline=255, fill=255)
        elif kind == "rectangle":
            (x0, y0), (x1, y1) = points[:2]
            draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=255, fill=255)
        else:
            (cx, cy), (px, py) = points[:2]
            r = math.hypot(px - cx, py - cy)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=255, fill=255)
        counts[kind] += 1
    return canvas, counts


def _json_files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise DatasetError(f"{src}: LabelMe source not found (a folder of .json files or one .json file)")
    found = [Path(d) / f for d, _, files in os.walk(src) for f in files
             if f.lower().endswith(".json") and not f.startswith(".")]
    if not found:
        raise DatasetError(f"{src}: no LabelMe .json files found")
    return sorted(found)


def _read(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: unreadable LabelMe JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: expected a LabelMe object with shapes, imageHeight, imageWidth")
    for key in ("imageHeight", "imageWidth"):
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DatasetError(f"{path}: {key} missing or not a positive integer ({value!r})")
    if not isinstance(meta.get("shapes", []), list):
        raise DatasetError(f"{path}: shapes is not a list")
    return meta


def masks_from_labelme(src: Path | str, out: Path | str) -> dict:
    """Rasterise every LabelMe JSON under ``src`` into ``out``; returns the counts: ``files``, ``defective``
    (with a mask), ``good`` (empty mask), ``image_level`` (flagged defective, no shapes), ``shapes`` (per type,
    ``skipped:<type>`` for unsupported ones), ``defects`` (images per defect name)."""
    src, out = Path(src), Path(out)
    files = _json_files(src)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out}: output folder is not empty")
    out.mkdir(parents=True, exist_ok=True)
    base = src if src.is_dir() else src.parent
    counts = {"files": 0, "defective": 0, "good": 0, "image_level": 0, "shapes": Counter(), "defects": Counter()}
    rows = []
    for path in files:
        meta = _read(path)
        image, shape_counts = rasterise(meta.get("shapes", []), meta["imageHeight"], meta["imageWidth"], str(path))
        mask_path = out / path.relative_to(base).with_suffix(".png")
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        image.save(mask_path)
        drawn = [s.get("label") or "defect" for s in meta.get("shapes", []) if (s.get("shape_type") or "polygon")
                 in SHAPES]
        flags = [k for k, v in (meta.get("flags") or {}).items() if v is True and k.lower() not in GOOD_FLAGS]
        if drawn:
            label, mask, key = (drawn[0] if len(set(drawn)) == 1 else "combined"), mask_path, "defective"
        elif flags:
            label, mask, key = (flags[0] if len(flags) == 1 else "combined"), None, "image_level"
        else:
            label, mask, key = "good", None, "good"
        counts["files"] += 1
        counts[key] += 1
        counts["shapes"].update(shape_counts)
        if label != "good":
            counts["defects"][label] += 1
        image_path = path.parent / (meta.get("imagePath") or path.with_suffix(".png").name)
        rows.append([os.path.relpath(image_path, out), label, mask.relative_to(out).as_posix() if mask else ""])
    with (out / LABELS_FILE).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "mask"])
        writer.writerows(rows)
    for key in ("shapes", "defects"):
        counts[key] = dict(sorted(counts[key].items()))
    return counts
