"""Magnetic Tile Defects (Huang, Qiu, Yuan, The Visual Computer 2020) -> one MVTec-format category ``magnetic_tile``.

Source layout: ``MT_<Class>/Imgs/<stem>.jpg`` with the mask ``<stem>.png`` beside it. A seeded subset of ``MT_Free``
becomes ``train/good``, the rest ``test/good``; each ``MT_<Defect>`` becomes ``test/<defect>`` with masks
``ground_truth/<defect>/<stem>_mask.png`` binarised at > 127 and stored as 0/255 (empty masks are kept: those images
are still defective at image level). Images are copied byte for byte (greyscale JPEGs of varying size). The split
(seed, counts and exact file lists) is written to ``split.json`` next to the category folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from adspine.data.category import DATASET_FILE, prepare_output
from adspine.data.images import DatasetError, load_mask, open_decoded

CATEGORY = "magnetic_tile"
DATASET_NAME = "magnetic-tile"
GOOD_FOLDER = "MT_Free"
CITATION = (
    'Y. Huang, C. Qiu, K. Yuan, "Surface defect saliency of magnetic tile", The Visual Computer, 2020. '
    "Data: github.com/abin24/Magnetic-tile-defect-datasets. (commit cc4eb53)."
)
SPLIT_FILE = "split.json"


def git_work_tree(path: Path) -> Path | None:
    """The git working tree that ``path`` (existing or not) would lie in, if any: data is never copied into one."""
    for p in [path, *path.parents]:
        if (p / ".git").exists():
            return p
    return None


def _class_folders(src: Path) -> dict[str, Path]:
    """``{"MT_Free": .../Imgs, "MT_Blowhole": ...}`` for every ``MT_*`` folder, validated."""
    if not src.is_dir():
        raise DatasetError(f"{src}: magnetic tile source folder not found")
    folders = {p.name: p / "Imgs" for p in sorted(src.iterdir()) if p.is_dir() and p.name.startswith("MT_")}
    if GOOD_FOLDER not in folders:
        raise DatasetError(f"{src / GOOD_FOLDER}: missing (expected MT_Free/Imgs/*.jpg)")
    if len(folders) < 2:
        raise DatasetError(f"{src}: no defect folders MT_<Defect>/Imgs found")
    for imgs in folders.values():
        if not imgs.is_dir():
            raise DatasetError(f"{imgs}: missing folder")
    return folders


def _pairs(imgs: Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of one class folder, sorted by name; every image must have its mask."""
    images = sorted(
        p for p in imgs.iterdir() if p.is_file() and p.suffix.lower() == ".jpg" and not p.name.startswith(".")
    )
    if not images:
        raise DatasetError(f"{imgs}: empty (no .jpg images)")
    pairs = []
    for image in images:
        mask = image.with_suffix(".png")
        if not mask.is_file():
            raise DatasetError(f"{image}: no mask (expected {mask})")
        pairs.append((image, mask))
    return pairs


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def convert(
    src: Path | str,
    out: Path | str,
    seed: int = 1024,
    train_fraction: float = 0.6,
    n_train: int | None = None,
    limit_per_class: int | None = None,
    overwrite: bool = False,
    n_test_good: int | None = None,
) -> Path:
    """Convert the dataset at ``src`` into ``out/magnetic_tile`` (+ ``adspine_dataset.json``, ``split.json``).

    ``n_train`` (a count) overrides ``train_fraction`` of MT_Free for train/good; ``limit_per_class`` keeps only that
    many images per source folder (a seeded choice, for quick tests); ``n_test_good`` keeps only the next that many
    MT_Free images of the same seeded permutation as test/good (default: all the rest), to bound a study's cost. Everything is validated (images and masks fully
    decoded, sizes compared) before anything is written. Returns ``out``.
    """
    src, out = Path(src), Path(out)
    if not 0 < train_fraction < 1:
        raise DatasetError(f"train_fraction={train_fraction!r}: must be between 0 and 1 (exclusive)")
    if limit_per_class is not None and limit_per_class < 1:
        raise DatasetError(f"limit_per_class={limit_per_class!r}: must be >= 1")
    out_resolved = out.resolve()
    if _inside(out_resolved, src.resolve()):
        raise DatasetError(f"{out}: output must not be inside the source folder {src}")
    repo = git_work_tree(out_resolved)
    if repo is not None:
        raise DatasetError(f"{out}: refusing to copy the magnetic tile data into the git repository {repo}; "
                           f"write it outside any repository")
    folders = _class_folders(src)
    rng = np.random.default_rng(seed)
    pairs = {}
    for name, imgs in folders.items():
        found = _pairs(imgs)
        if limit_per_class is not None and len(found) > limit_per_class:
            keep = np.sort(rng.choice(len(found), size=limit_per_class, replace=False))
            found = [found[i] for i in keep]
        pairs[name] = found

    free = pairs[GOOD_FOLDER]
    count = n_train if n_train is not None else round(train_fraction * len(free))
    if not 1 <= count < len(free):
        raise DatasetError(f"n_train={count}: must be between 1 and {len(free) - 1} (MT_Free has {len(free)} images)")
    if n_test_good is not None and not 1 <= n_test_good <= len(free) - count:
        raise DatasetError(f"n_test_good={n_test_good}: must be between 1 and {len(free) - count} "
                           f"(MT_Free has {len(free)} images, {count} of them for training)")
    order = rng.permutation(len(free))
    train_idx = set(order[:count].tolist())
    test_idx = set(order[count:count + n_test_good].tolist() if n_test_good else order[count:].tolist())
    splits: dict[str, list[tuple[Path, Path]]] = {
        "train/good": [p for i, p in enumerate(free) if i in train_idx],
        "test/good": [p for i, p in enumerate(free) if i in test_idx],
    }
    for name, found in pairs.items():
        if name != GOOD_FOLDER:
            splits[f"test/{name[3:].lower()}"] = found

    masks: dict[Path, np.ndarray] = {}
    for split, found in splits.items():
        for image, mask_file in found:
            size = open_decoded(image).size
            mask = load_mask(mask_file)
            if mask.shape[::-1] != size:
                raise DatasetError(
                    f"{mask_file}: mask size {mask.shape[1]}x{mask.shape[0]} differs from its image {image} "
                    f"({size[0]}x{size[1]})"
                )
            if split != "train/good" and split != "test/good":
                masks[image] = mask

    prepare_output(out, DATASET_NAME, [CATEGORY, DATASET_FILE, SPLIT_FILE], overwrite)
    cat = out / CATEGORY
    empty_masks = []
    for split, found in splits.items():
        folder = cat / split
        folder.mkdir(parents=True)
        gt = cat / "ground_truth" / split.split("/")[1]
        if split not in ("train/good", "test/good"):
            gt.mkdir(parents=True)
        for image, _ in found:
            shutil.copyfile(image, folder / image.name)
            if image in masks:
                Image.fromarray(masks[image].astype(np.uint8) * 255).save(gt / f"{image.stem}_mask.png")
                if not masks[image].any():
                    empty_masks.append(f"{split}/{image.name}")

    meta = {
        "name": DATASET_NAME,
        "citation": CITATION,
        "source": str(src.resolve()),
        "categories": {CATEGORY: {"kind": "texture"}},
    }
    (out / DATASET_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    split_info = {
        "dataset": DATASET_NAME,
        "source": str(src.resolve()),
        "seed": seed,
        "rng": "numpy.random.default_rng(seed): limit_per_class choice per folder (sorted order), then a "
        "permutation of the sorted MT_Free list; its first n_train entries are train/good",
        "train_fraction": None if n_train is not None else train_fraction,
        "n_train": count,
        "limit_per_class": limit_per_class,
        "n_test_good": len(splits["test/good"]),
        "mask_threshold": "> 127 (stored as 0/255 PNG)",
        "counts": {split: len(found) for split, found in splits.items()},
        "empty_masks": empty_masks,
        "files": {split: [image.name for image, _ in found] for split, found in splits.items()},
    }
    (out / SPLIT_FILE).write_text(json.dumps(split_info, indent=2) + "\n", encoding="utf-8")
    return out
