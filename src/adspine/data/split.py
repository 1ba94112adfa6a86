"""A seeded train / test split of a labelled pool of images -> a manifest CSV (``adspine data split``); no torch.

Pools (``source``):

- a folder holding ``good/`` (normal images) and one folder per defect type, masks optional in
  ``masks/<defect>/<stem>.*`` or ``ground_truth/<defect>/<stem>_mask.*`` (the evaluate command's layout);
- a folder of LabelMe JSON files with its photos (``images``, default the same folder; see ``adspine.data.labelme``):
  photos without a JSON are normal, the masks are rasterised into ``out/masks/``;
- a CSV with the columns ``path``, ``label`` (``good`` / ``ok`` / ``normal`` / ``0`` for normal images; ``1``,
  ``defective``, ``bad``, ``anomaly`` or a defect name otherwise) and optional ``mask`` and ``defect``; relative
  paths are relative to the CSV (``labels.csv`` of ``data masks-from-labelme`` is one).

Amounts are counts (``40``) or fractions (``0.8``) of the pool they come from: ``train`` and ``test_good`` of the
normal images (``test_good`` None: all that train leaves), ``test_defective`` of the defective ones, stratified by
defect type (largest-remainder shares of the count, so each type keeps its proportion). Defective images never go to
train. The draw: ``numpy.random.default_rng(seed)``, one permutation of the normal images (sorted by path; the first
ones train, the next ones test), then one per defect type in name order. Output: ``out/<name>.csv`` (a manifest: paths
inside ``out`` relative, others absolute) and ``out/<name>.split.json`` (seed, amounts, counts, unused images).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adspine.data.images import DatasetError, image_size, is_image_file, list_images
from adspine.data.manifest import read_csv, resolve
from adspine.data.paths import plain_name, safe_join

GOOD_LABELS = ("good", "ok", "normal", "0")
DEFECTIVE_LABELS = ("1", "defective", "bad", "anomaly", "anomalous", "ng")
GENERIC_DEFECT = "defective"
MASKS_FOLDER = "masks"
SIDECAR_SUFFIX = ".split.json"
SHOWN = 5


@dataclass(frozen=True)
class Item:
    """One pool image: ``defect`` is ``good`` for normal images; ``where`` names its origin for messages."""

    path: Path
    defect: str
    mask: Path | None
    where: str


def parse_amount(text: str | int | float | None, option: str) -> int | float | None:
    """A count (``40``) or a fraction in (0, 1] (``0.8``); None stays None."""
    if text is None or isinstance(text, (int, float)):
        value = text
    else:
        try:
            value = float(text) if any(c in text for c in ".eE") else int(text)
        except ValueError:
            raise DatasetError(f"{option}={text!r}: expected a count (e.g. 40) or a fraction (e.g. 0.8)") from None
    if isinstance(value, float) and not 0 < value <= 1:
        raise DatasetError(f"{option}={text!r}: a fraction must lie in (0, 1]")
    if isinstance(value, int) and value < 0:
        raise DatasetError(f"{option}={text!r}: a count must be >= 0")
    return value


def amount(value: int | float, pool: int) -> int:
    """The count an amount asks of a pool of ``pool`` images (fractions rounded half up)."""
    return value if isinstance(value, int) else math.floor(value * pool + 0.5)


def shares(total: int, sizes: dict[str, int]) -> dict[str, int]:
    """``total`` split over the groups in proportion to ``sizes`` (largest remainder; ties to the first name)."""
    whole = sum(sizes.values())
    floors = {k: total * n // whole for k, n in sizes.items()}
    left = total - sum(floors.values())
    order = sorted(sizes, key=lambda k: (-(total * sizes[k] % whole), k))
    return {k: floors[k] + (k in order[:left]) for k in sizes}


# -- pools -----------------------------------------------------------------------------------------------------------
def pool_from_folder(root: Path) -> list[Item]:
    """``good/`` plus one folder per defect type, masks optional."""
    from adspine.data.mvtec import mask_path_for

    mask_folder = MASKS_FOLDER if (root / MASKS_FOLDER).is_dir() else "ground_truth"
    items = [Item(p, "good", None, str(p)) for p in list_images(root / "good")]
    defects = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                     and p.name not in ("good", "ground_truth", MASKS_FOLDER))
    for defect in defects:
        items += [Item(p, defect, mask_path_for(root, defect, p, None, mask_folder), str(p))
                  for p in list_images(root / defect)]
    return items


def pool_from_csv(path: Path) -> list[Item]:
    """Rows ``path, label[, mask][, defect]``."""
    items = []
    for line, row in read_csv(path, ("path", "label")):
        where = f"{path}:{line}"
        if not row["path"]:
            raise DatasetError(f"{where}: empty path")
        label, defect = row["label"], row.get("defect", "")
        good = label.lower() in GOOD_LABELS
        if not label:
            raise DatasetError(f"{where}: empty label (good, or a defect name)")
        if good and (row.get("mask") or defect not in ("", "good")):
            raise DatasetError(f"{where}: a good image with a mask or defect; good images need neither")
        if not good:
            defect = defect or (GENERIC_DEFECT if label.lower() in DEFECTIVE_LABELS else label)
            plain_name(defect, "defect", where)
        mask = resolve(path.parent, row["mask"]) if row.get("mask") else None
        items.append(Item(resolve(path.parent, row["path"]), "good" if good else defect, mask, where))
    if not items:
        raise DatasetError(f"{path}: no rows")
    return items


def pool_from_labelme(src: Path, images: Path | None):
    """Items of a LabelMe folder (masks to be written) and the annotations behind the defective ones."""
    from adspine.data.labelme import images_by_name, mask_name, read_annotations

    photos = images if images is not None else (src if src.is_dir() else src.parent)
    annotations = read_annotations(src, photos)
    annotated = {a.image.resolve() for a in annotations}
    items, masks = [], {}
    for a in annotations:
        if a.kind == "defective":
            name = f"{MASKS_FOLDER}/{mask_name(a, src)}"
            masks[name] = a
            items.append(Item(a.image, a.label, Path(name), str(a.json_path)))
        else:
            items.append(Item(a.image, a.label, None, str(a.json_path)))
    for found in images_by_name(photos).values():
        items += [Item(p, "good", None, str(p)) for p in found if p.resolve() not in annotated]
    return items, masks


def _check(items: list[Item], source: Path, masks_written: set[Path]) -> None:
    """Each image listed once and present, each mask present (or to be written) and of its image's size."""
    seen: dict[Path, str] = {}
    missing, mismatched = [], []
    for item in items:
        key = item.path.resolve()
        if key in seen:
            raise DatasetError(f"{item.where}: {item.path} listed twice (first at {seen[key]})")
        seen[key] = item.where
        if not is_image_file(item.path):
            missing.append(str(item.path))
        elif item.mask is not None and item.mask not in masks_written:
            if not item.mask.is_file():
                missing.append(str(item.mask))
            elif image_size(item.mask) != image_size(item.path):
                mismatched.append(f"{item.mask} ({'x'.join(map(str, image_size(item.mask)))}) vs {item.path} "
                                  f"({'x'.join(map(str, image_size(item.path)))})")
    for what, found in (("listed files not found (or not images)", missing),
                        ("masks differ in size from their image", mismatched)):
        if found:
            shown = "; ".join(found[:SHOWN]) + (f"; ... ({len(found) - SHOWN} more)" if len(found) > SHOWN else "")
            raise DatasetError(f"{source}: {len(found)} {what}: {shown}")


# -- the draw --------------------------------------------------------------------------------------------------------
def draw(items: list[Item], train, test_good, test_defective, seed: int, source: Path) -> dict[str, list[Item]]:
    """``train``, ``test`` (good then defective) and ``unused`` items (see the module docstring for the rule)."""
    good = sorted((i for i in items if i.defect == "good"), key=lambda i: str(i.path))
    groups: dict[str, list[Item]] = {}
    for item in sorted((i for i in items if i.defect != "good"), key=lambda i: str(i.path)):
        groups.setdefault(item.defect, []).append(item)
    n_defective = sum(len(g) for g in groups.values())
    if not good or not groups:
        raise DatasetError(f"{source}: the pool has {len(good)} normal and {n_defective} defective image(s); "
                           "a split needs both")
    n_train = amount(train, len(good))
    n_test_good = len(good) - n_train if test_good is None else amount(test_good, len(good))
    n_test_defective = amount(test_defective, n_defective)
    if n_train + n_test_good > len(good):
        raise DatasetError(f"{source}: train {n_train} + test good {n_test_good} normal images asked, the pool has "
                           f"{len(good)}")
    if n_test_defective > n_defective:
        raise DatasetError(f"{source}: test defective {n_test_defective} asked, the pool has {n_defective}")
    for name, n in (("train", n_train), ("test good", n_test_good), ("test defective", n_test_defective)):
        if n < 1:
            raise DatasetError(f"{source}: the amounts leave no {name} images (pool: {len(good)} normal, "
                               f"{n_defective} defective)")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(good)).tolist()
    picked = {"train": [good[i] for i in order[:n_train]],
              "test": [good[i] for i in order[n_train:n_train + n_test_good]]}
    chosen = set(order[:n_train + n_test_good])
    unused = [g for i, g in enumerate(good) if i not in chosen]
    for defect, k in shares(n_test_defective, {d: len(g) for d, g in sorted(groups.items())}).items():
        take = set(rng.permutation(len(groups[defect]))[:k].tolist())
        picked["test"] += [g for i, g in enumerate(groups[defect]) if i in take]
        unused += [g for i, g in enumerate(groups[defect]) if i not in take]
    picked["train"].sort(key=lambda i: str(i.path))
    picked["test"] = sorted(picked["test"][:n_test_good], key=lambda i: str(i.path)) + picked["test"][n_test_good:]
    return {**picked, "unused": unused}


def _listed(path: Path, out: Path) -> str:
    """A manifest path: relative to ``out`` when inside it, else absolute."""
    absolute = Path(os.path.abspath(path))
    inside = absolute.is_relative_to(os.path.abspath(out))
    return absolute.relative_to(os.path.abspath(out)).as_posix() if inside else str(absolute)


def split_pool(source: Path | str, out: Path | str, images: Path | str | None = None, name: str | None = None,
               train: str | int | float = 0.8, test_good: str | int | float | None = None,
               test_defective: str | int | float = 1.0, seed: int = 0) -> dict:
    """Draw the split and write ``out/<name>.csv`` (+ sidecar, + LabelMe masks); returns the sidecar's record
    with ``manifest`` (the CSV's path). Everything is checked before anything is written."""
    source, out = Path(source), Path(out)
    name = plain_name(name if name is not None else out.name, "manifest name", "--name")
    amounts = {"train": parse_amount(train, "--train"), "test_good": parse_amount(test_good, "--test-good"),
               "test_defective": parse_amount(test_defective, "--test-defective")}
    labelme_masks: dict = {}
    if source.is_file() and source.suffix.lower() == ".csv":
        if images is not None:
            raise DatasetError(f"{source}: --images is for a LabelMe folder (a CSV lists its own paths)")
        kind, items = "csv", pool_from_csv(source)
    elif (source / "good").is_dir():
        if images is not None:
            raise DatasetError(f"{source}: --images is for a LabelMe folder (this one holds good/)")
        kind, items = "folders", pool_from_folder(source)
    elif source.is_dir() or source.suffix.lower() == ".json":
        kind = "labelme"
        items, labelme_masks = pool_from_labelme(source, Path(images) if images is not None else None)
    else:
        raise DatasetError(f"{source}: not a pool (expected a CSV, a folder with good/ and defect folders, or a "
                           "LabelMe folder)")
    mask_targets = {Path(n): safe_join(out, n, where=str(a.json_path)) for n, a in labelme_masks.items()}
    _check(items, source, set(mask_targets))
    picked = draw(items, amounts["train"], amounts["test_good"], amounts["test_defective"], seed, source)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out}: output folder is not empty")
    out.mkdir(parents=True, exist_ok=True)
    used_masks = {i.mask for i in picked["test"]}
    for relative, target in mask_targets.items():
        if relative in used_masks:  # LabelMe masks of the test images
            target.parent.mkdir(parents=True, exist_ok=True)
            labelme_masks[relative.as_posix()].mask().save(target)
    manifest = safe_join(out, f"{name}.csv", where="--name")

    def mask_of(item: Item) -> str:
        if item.mask is None:
            return ""
        return _listed(mask_targets.get(item.mask, item.mask), out)

    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "split", "label", "mask"])
        for split in ("train", "test"):
            writer.writerows([_listed(i.path, out), split, i.defect, mask_of(i)] for i in picked[split])
    test = picked["test"]
    record = {
        "seed": seed,
        "rng": "numpy.random.default_rng(seed): a permutation of the normal images sorted by path (first train, "
               "then test good), then one permutation per defect type in name order (its first share is test)",
        "source": {"kind": kind, "path": str(source.resolve()),
                   **({"images": str(Path(images).resolve())} if images is not None else {})},
        "amounts": dict(amounts),
        "counts": {"train": len(picked["train"]), "test_good": sum(i.defect == "good" for i in test),
                   "test_defective": dict(sorted(Counter(i.defect for i in test if i.defect != "good").items())),
                   "unused": len(picked["unused"])},
        "unused": sorted(_listed(i.path, out) for i in picked["unused"]),
    }
    safe_join(out, name + SIDECAR_SUFFIX, where="--name").write_text(json.dumps(record, indent=2) + "\n",
                                                                      encoding="utf-8")
    return {**record, "manifest": str(manifest)}
