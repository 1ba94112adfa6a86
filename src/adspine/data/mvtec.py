"""MVTec AD-format datasets: scan and validate a category, and serve preprocessed items as a torch Dataset.

Layout: ``<root>/<category>/train/good/*``, ``<category>/test/good/*``, ``<category>/test/<defect>/*`` and
``<category>/ground_truth/<defect>/<stem>_mask.png``. Category kinds come from ``<root>/adspine_dataset.json``
(``{"name": ..., "categories": {"<cat>": {"kind": "texture"}}}``), else from the built-in MVTec AD list, else None.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from adspine.data.images import IMAGE_EXTENSIONS, DatasetError, list_images, load_mask, load_rgb, open_decoded

__all__ = [
    "DATASET_FILE",
    "KINDS",
    "MVTEC_AD_KINDS",
    "PROTOCOLS",
    "CategoryData",
    "DatasetError",
    "ImageDataset",
    "Sample",
    "category_kinds",
    "read_dataset_file",
    "list_categories",
    "mask_path_for",
    "paper_resize_size",
    "prepare_output",
    "preprocess",
    "scan_category",
]

DATASET_FILE = "adspine_dataset.json"
KINDS = ("texture", "object")
PROTOCOLS = ("paper", "resize")
MVTEC_AD_KINDS = {
    **{name: "texture" for name in ("carpet", "grid", "leather", "tile", "wood")},
    **{
        name: "object"
        for name in (
            "bottle", "cable", "capsule", "hazelnut", "metal_nut",
            "pill", "screw", "toothbrush", "transistor", "zipper",
        )
    },
}


@dataclass
class Sample:
    """One image: label 0 = good, 1 = defective; ``mask_path`` is None for good images."""

    path: Path
    label: int
    defect: str
    mask_path: Path | None


@dataclass
class CategoryData:
    """A validated category: its train (good only) and test samples, sorted by defect then file name."""

    root: Path
    name: str
    kind: str | None
    train: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)


def read_dataset_file(root: Path) -> dict | None:
    """The parsed ``<root>/adspine_dataset.json``, or None when there is none."""
    path = root / DATASET_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: unreadable dataset description ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("categories", {}), dict):
        raise DatasetError(f"{path}: expected an object with a 'categories' object")
    return meta


def category_kinds(root: Path | str) -> dict[str, str | None]:
    """Kind ("texture", "object" or None) of every category under ``root``."""
    root = Path(root)
    meta = read_dataset_file(root)
    declared = meta.get("categories", {}) if meta else {}
    kinds: dict[str, str | None] = {}
    for name in list_categories(root):
        entry = declared.get(name)
        kind = entry["kind"] if isinstance(entry, dict) and "kind" in entry else MVTEC_AD_KINDS.get(name)
        if kind is not None and kind not in KINDS:
            raise DatasetError(
                f"{root / DATASET_FILE}: category {name!r} has kind {kind!r} (valid: {', '.join(KINDS)})"
            )
        kinds[name] = kind
    return kinds


def list_categories(root: Path | str) -> list[str]:
    """Sorted names of the sub-folders of ``root`` that hold a ``train`` or ``test`` folder."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root not found (expected <root>/<category>/train/good)")
    names = sorted(
        p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and
        ((p / "train").is_dir() or (p / "test").is_dir())
    )
    if not names:
        raise DatasetError(f"{root}: no categories found (expected <root>/<category>/train/good)")
    return names


def mask_path_for(category_dir: Path, defect: str, image_path: Path) -> Path | None:
    """The mask of a defect image: ``ground_truth/<defect>/<stem>_mask.png`` (or another image extension, or
    ``<stem>.<ext>`` as some MVTec-format datasets name them); None if there is none."""
    folder = category_dir / "ground_truth" / defect
    stem = image_path.stem
    candidates = [folder / f"{stem}_mask.png"]
    candidates += [folder / f"{stem}_mask{ext}" for ext in IMAGE_EXTENSIONS if ext != ".png"]
    candidates += [folder / f"{stem}{ext}" for ext in IMAGE_EXTENSIONS]
    return next((c for c in candidates if c.is_file()), None)


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: missing folder")
    images = list_images(folder)
    if not images:
        raise DatasetError(f"{folder}: empty split (no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images)")
    return images


def _decoded_size(path: Path) -> tuple[int, int]:
    return open_decoded(path).size


def _check_files(samples: list[Sample], workers: int) -> None:
    """Decode every image and mask fully (threads: Pillow releases the GIL) and compare mask and image sizes."""
    paths = [s.path for s in samples] + [s.mask_path for s in samples if s.mask_path is not None]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        sizes = dict(zip(paths, pool.map(_decoded_size, paths)))
    for s in samples:
        if s.mask_path is not None and sizes[s.mask_path] != sizes[s.path]:
            (mw, mh), (iw, ih) = sizes[s.mask_path], sizes[s.path]
            raise DatasetError(f"{s.mask_path}: mask size {mw}x{mh} differs from its image {s.path} ({iw}x{ih})")


def scan_category(root: Path | str, name: str, verify: bool = True, workers: int | None = None) -> CategoryData:
    """Find and validate one category; with ``verify`` every image and mask is fully decoded and size-checked.

    Raises DatasetError (message starts with the offending path) for: unknown category, missing ``train/good`` or
    ``test``, an empty split, an unreadable or truncated image, a defect image without a mask, a mask whose size
    differs from its image. Stray non-image and hidden files are skipped.
    """
    root = Path(root)
    categories = list_categories(root)
    if name not in categories:
        raise DatasetError(f"{root / name}: unknown category {name!r} (valid: {', '.join(categories)})")
    kind = category_kinds(root)[name]
    cat_dir = root / name
    train = [Sample(p, 0, "good", None) for p in _images_in(cat_dir / "train" / "good")]
    test_dir = cat_dir / "test"
    if not test_dir.is_dir():
        raise DatasetError(f"{test_dir}: missing folder")
    test = [Sample(p, 0, "good", None) for p in _images_in(test_dir / "good")]
    defects = sorted(
        p.name for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "good"
    )
    if not defects:
        raise DatasetError(f"{test_dir}: no defect folders (expected test/<defect>/ beside test/good/)")
    for defect in defects:
        for image_path in _images_in(test_dir / defect):
            mask = mask_path_for(cat_dir, defect, image_path)
            if mask is None:
                expected = cat_dir / "ground_truth" / defect / f"{image_path.stem}_mask.png"
                raise DatasetError(f"{image_path}: defect image has no mask (expected {expected})")
            test.append(Sample(image_path, 1, defect, mask))
    if verify:
        _check_files(train + test, workers if workers is not None else min(4, os.cpu_count() or 1))
    return CategoryData(root=root, name=name, kind=kind, train=train, test=test)


def paper_resize_size(size: int) -> int:
    """Side of the square resize before the centre crop in the ``paper`` protocol (256 for 224)."""
    return round(size * 256 / 224)


def _check_protocol(protocol: str, size: int) -> None:
    if protocol not in PROTOCOLS:
        raise DatasetError(f"{protocol!r}: unknown protocol (valid: {', '.join(PROTOCOLS)})")
    if not isinstance(size, int) or isinstance(size, bool) or size < 8:
        raise DatasetError(f"size={size!r}: image size must be an integer >= 8")


def preprocess(
    image: np.ndarray, mask: np.ndarray | None, protocol: str = "paper", size: int = 224
) -> tuple[torch.Tensor, torch.Tensor]:
    """float (H, W, 3) image and bool (H, W) mask (or None) -> (FloatTensor (3, S, S) in [0, 1], BoolTensor (S, S)).

    ``paper``: resize to ``round(size * 256 / 224)`` square, then centre-crop ``size``; ``resize``: resize to ``size``
    square. Images: bilinear with antialiasing (torchvision); masks: nearest with pixel-centre alignment
    (``NEAREST_EXACT``, as Pillow's nearest), then the same crop.
    """
    _check_protocol(protocol, size)
    side = paper_resize_size(size) if protocol == "paper" else size
    img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
    img = TF.resize(img, [side, side], interpolation=InterpolationMode.BILINEAR, antialias=True).clamp_(0.0, 1.0)
    if mask is None:
        msk = torch.zeros(1, side, side, dtype=torch.uint8)
    else:
        msk = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8))[None]
        msk = TF.resize(msk, [side, side], interpolation=InterpolationMode.NEAREST_EXACT, antialias=False)
    if protocol == "paper":
        img, msk = TF.center_crop(img, [size, size]), TF.center_crop(msk, [size, size])
    return img.contiguous(), msk[0].bool()


class ImageDataset(Dataset):
    """Samples -> dicts ``{"image": (3, S, S) float in [0, 1] (not normalised), "mask": (S, S) bool, "label": int,
    "defect": str, "path": str}`` under the ``paper`` or ``resize`` protocol."""

    def __init__(self, samples: list[Sample], protocol: str = "paper", size: int = 224):
        _check_protocol(protocol, size)
        self.samples = list(samples)
        self.protocol = protocol
        self.size = size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        image = load_rgb(sample.path)
        mask = None
        if sample.mask_path is not None:
            mask = load_mask(sample.mask_path)
            if mask.shape != image.shape[:2]:
                raise DatasetError(
                    f"{sample.mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from its image "
                    f"{sample.path} ({image.shape[1]}x{image.shape[0]})"
                )
        img, msk = preprocess(image, mask, self.protocol, self.size)
        return {
            "image": img, "mask": msk, "label": int(sample.label), "defect": sample.defect, "path": str(sample.path)
        }


def prepare_output(out: Path, dataset_name: str, entries: list[str], overwrite: bool) -> None:
    """Make ``out`` ready for a generated dataset: it must be absent or empty, or (with ``overwrite``) hold an
    earlier dataset named ``dataset_name``, whose ``entries`` (relative names) are then removed."""
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out}: output path exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        return
    meta = None
    try:
        meta = read_dataset_file(out)
    except DatasetError:
        pass
    if not overwrite or not meta or meta.get("name") != dataset_name:
        hint = " (pass --overwrite to replace it)" if meta and meta.get("name") == dataset_name else ""
        raise DatasetError(f"{out}: output folder is not empty{hint}")
    for entry in entries:
        target = out / entry
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
