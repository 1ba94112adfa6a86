"""LabelMe JSON polygons -> binary masks (0 / 255 PNG), plus a ``labels.csv`` ready to become a manifest.

Every ``*.json`` under the source (or the one file given) is read: ``imageHeight``, ``imageWidth``, ``imagePath`` and
``shapes[]`` with ``label``, ``points`` and ``shape_type``. Shapes are rasterised as LabelMe itself does (Pillow
``ImageDraw``, outline and fill): ``polygon`` (>= 3 points), ``rectangle`` (two corners), ``circle`` (centre and a
point on the rim); other shape types (line, point, ...) are skipped and counted. One mask per JSON file is written to
``<out>/<relative path>.png``. Labels: an image with shapes is defective, its defect named after the shape label (or
``combined`` when shapes carry several labels); an image without shapes gets an empty mask and counts as good, unless
one of its ``flags`` other than good/ok/normal is true (then it is defective at image level: no mask is listed).
Labels must be plain names (they become folder names in other layouts).

Images: ``imagePath`` is stored as the annotator saved it (often a bare file name, or a Windows path), so it is looked
up relative to the JSON file first, then by file name in ``images`` (a photos folder, searched recursively); without
``imagePath``, ``<json stem>.<image extension>``. Every image must exist and have the annotated size
(``imageWidth`` x ``imageHeight``); all JSON files are checked before anything is written.
``labels.csv`` has the columns ``path`` (the image, relative to ``out``), ``label``, ``mask``; it is an input of
``adspine data split`` (or add a ``split`` column to use it as a manifest).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from adspine.data.images import IMAGE_EXTENSIONS, DatasetError, image_size, is_image_file
from adspine.data.paths import plain_name, safe_join

SHAPES = ("polygon", "rectangle", "circle")
GOOD_FLAGS = ("good", "ok", "normal")
LABELS_FILE = "labels.csv"
MIN_POINTS = {"polygon": 3, "rectangle": 2, "circle": 2}
SHOWN = 5  # problems named in an error line


def _points(shape: dict, index: int, where: str) -> tuple[str, list[tuple[float, float]] | None]:
    """(shape type, its points) for a supported shape, (type, None) for a skipped one; bad points raise."""
    kind = shape.get("shape_type") or "polygon"
    if kind not in SHAPES:
        return kind, None
    try:
        points = [(float(x), float(y)) for x, y in shape["points"]]
    except (KeyError, TypeError, ValueError):
        raise DatasetError(f"{where}: shape {index} has no valid points [[x, y], ...]") from None
    if len(points) < MIN_POINTS[kind]:
        raise DatasetError(f"{where}: shape {index} ({kind}) has {len(points)} point(s), needs {MIN_POINTS[kind]}")
    return kind, points


def rasterise(shapes: list[dict], height: int, width: int, where: str = "") -> tuple[Image.Image, Counter]:
    """An ``L`` image (0 / 255) of the supported shapes and a count per shape type (``skipped:<type>`` for others)."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    counts: Counter = Counter()
    for index, shape in enumerate(shapes):
        kind, points = _points(shape, index, where)
        if points is None:
            counts[f"skipped:{kind}"] += 1
            continue
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
    if not isinstance(meta.get("imagePath") or "", str):
        raise DatasetError(f"{path}: imagePath is not a string ({meta['imagePath']!r})")
    return meta


def images_by_name(folder: Path) -> dict[str, list[Path]]:
    """Every image file under ``folder`` (recursively, hidden files skipped), by file name."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: images folder not found")
    found: dict[str, list[Path]] = {}
    for d, dirs, files in os.walk(folder):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        for name in sorted(files):
            if is_image_file(Path(d) / name):
                found.setdefault(name, []).append(Path(d) / name)
    return found


def _find_image(path: Path, meta: dict, photos: dict[str, list[Path]] | None) -> Path | None:
    """The image of one JSON file: ``imagePath`` relative to the JSON, else its file name in the photos folder."""
    stored = (meta.get("imagePath") or "").strip()
    if stored:
        relative = path.parent / stored.replace("\\", "/")
        if is_image_file(relative):
            return relative
        names = [stored.replace("\\", "/").rsplit("/", 1)[-1]]
    else:
        names = [path.stem + ext for ext in IMAGE_EXTENSIONS]
        beside = [path.with_name(n) for n in names if is_image_file(path.with_name(n))]
        if beside:
            return beside[0]
    candidates = [p for n in names for p in (photos or {}).get(n, [])]
    if len(candidates) > 1:
        raise DatasetError(f"{path}: image {names[0]!r} is ambiguous in the images folder ({candidates[0]}, "
                           f"{candidates[1]}); give the sub-folder that holds it")
    return candidates[0] if candidates else None


@dataclass
class Annotation:
    """One LabelMe file, read and checked: its image, label (``good``, a defect or ``combined``) and kind
    (``defective`` with a mask, ``image_level`` flagged without shapes, ``good``)."""

    json_path: Path
    image: Path
    label: str
    kind: str
    meta: dict
    shapes: Counter

    def mask(self) -> Image.Image:
        return rasterise(self.meta.get("shapes", []), self.meta["imageHeight"], self.meta["imageWidth"],
                         str(self.json_path))[0]


def _annotation(path: Path, meta: dict, image: Path) -> Annotation:
    shapes = meta.get("shapes", [])
    counts: Counter = Counter()
    drawn = []
    for index, shape in enumerate(shapes):
        if not isinstance(shape, dict):
            raise DatasetError(f"{path}: shape {index} is not an object")
        kind, points = _points(shape, index, str(path))
        counts[kind if points is not None else f"skipped:{kind}"] += 1
        if points is not None:
            drawn.append(str(shape.get("label") or "defect"))
    flags = [k for k, v in (meta.get("flags") or {}).items() if v is True and k.lower() not in GOOD_FLAGS]
    if drawn:
        label, kind = (drawn[0] if len(set(drawn)) == 1 else "combined"), "defective"
    elif flags:
        label, kind = (flags[0] if len(flags) == 1 else "combined"), "image_level"
    else:
        label, kind = "good", "good"
    plain_name(label, "label", str(path))
    return Annotation(path, image, label, kind, meta, counts)


def _problems(src: Path, what: str, found: list[str], total: int, hint: str = "") -> DatasetError:
    shown = "; ".join(found[:SHOWN]) + (f"; ... ({len(found) - SHOWN} more)" if len(found) > SHOWN else "")
    return DatasetError(f"{src}: {len(found)} of {total} LabelMe file(s) {what}: {shown}{hint}")


def read_annotations(src: Path | str, images: Path | str | None = None) -> list[Annotation]:
    """Read and check every LabelMe JSON under ``src``: shapes, labels (plain names), each image found (beside the
    JSON through ``imagePath``, else by file name in ``images``) and of the annotated size. Missing images and size
    mismatches are reported together (count and the first few) in one DatasetError."""
    src = Path(src)
    files = _json_files(src)
    photos = images_by_name(Path(images)) if images is not None else None
    annotations, missing, mismatched = [], [], []
    for path in files:
        meta = _read(path)
        image = _find_image(path, meta, photos)
        if image is None:
            missing.append(f"{path.name} -> {meta.get('imagePath') or path.stem + '.*'}")
            continue
        width, height = image_size(image)
        if (width, height) != (meta["imageWidth"], meta["imageHeight"]):
            rotated = " (EXIF-rotated?)" if (height, width) == (meta["imageWidth"], meta["imageHeight"]) else ""
            mismatched.append(f"{path.name} says {meta['imageWidth']}x{meta['imageHeight']}, {image} is "
                              f"{width}x{height}{rotated}")
            continue
        annotations.append(_annotation(path, meta, image))
    if missing:
        where = f"beside the JSON or in --images {images}" if images is not None else (
            "beside the JSON (pass --images DIR, the folder holding the photos)")
        raise _problems(src, f"name an image not found {where}", missing, len(files))
    if mismatched:
        raise _problems(src, "differ in size from their image (imageWidth x imageHeight vs the file)", mismatched,
                        len(files))
    return annotations


def write_mask(annotation: Annotation, root: Path, relative: str) -> Path:
    """Rasterise ``annotation`` to ``root/relative`` (refused unless it lies inside ``root``)."""
    target = safe_join(root, relative, where=str(annotation.json_path))
    target.parent.mkdir(parents=True, exist_ok=True)
    annotation.mask().save(target)
    return target


def mask_name(annotation: Annotation, src: Path) -> str:
    """The mask's path under the output folder: the JSON's path relative to ``src``, as ``.png``."""
    base = src if src.is_dir() else src.parent
    return annotation.json_path.relative_to(base).with_suffix(".png").as_posix()


def masks_from_labelme(src: Path | str, out: Path | str, images: Path | str | None = None) -> dict:
    """Rasterise every LabelMe JSON under ``src`` into ``out`` (images looked up as the module says); returns the
    counts: ``files``, ``defective`` (with a mask), ``good`` (empty mask), ``image_level`` (flagged defective, no
    shapes), ``shapes`` (per type, ``skipped:<type>`` for unsupported ones), ``defects`` (images per defect name).
    Everything is checked before anything is written."""
    src, out = Path(src), Path(out)
    annotations = read_annotations(src, images)
    names = [mask_name(a, src) for a in annotations]
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out}: output folder is not empty")
    for annotation, name in zip(annotations, names):
        safe_join(out, name, where=str(annotation.json_path))
    out.mkdir(parents=True, exist_ok=True)
    counts = {"files": 0, "defective": 0, "good": 0, "image_level": 0, "shapes": Counter(), "defects": Counter()}
    rows = []
    for annotation, name in zip(annotations, names):
        write_mask(annotation, out, name)
        counts["files"] += 1
        counts[annotation.kind] += 1
        counts["shapes"].update(annotation.shapes)
        if annotation.label != "good":
            counts["defects"][annotation.label] += 1
        listed = name if annotation.kind == "defective" else ""
        rows.append([os.path.relpath(annotation.image, out), annotation.label, listed])
    with (out / LABELS_FILE).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "mask"])
        writer.writerows(rows)
    for key in ("shapes", "defects"):
        counts[key] = dict(sorted(counts[key].items()))
    return counts
