"""MVTec AD-format datasets (also BTAD and MPDD): list and scan categories; imports no torch.

Layout: ``<root>/<category>/train/<good>/*``, ``<category>/test/<good>/*``, ``<category>/test/<defect>/*`` and
masks ``<category>/ground_truth/<defect>/<mask_pattern>``. ``<good>`` is ``good`` (MVTec AD, MPDD) or ``ok`` (BTAD,
whose defect folder is ``ko``). Mask names: ``{stem}_mask.png`` (MVTec AD, MPDD), ``{stem}.png`` / ``{stem}.bmp``
(BTAD); with ``mask_pattern=None`` the common variants are tried (``{stem}_mask.<ext>``, ``{stem}.<ext>`` for every
image extension) and a defect image matching two of them is refused as ambiguous. Defect folders without any mask
(no ``ground_truth/<defect>``) are image-level (see ``adspine.data.category`` for the mask rules). Category kinds come
from ``<root>/adspine_dataset.json`` (``{"name": ..., "categories": {"<cat>": {"kind": "texture"}}}``), else from the
built-in MVTec AD list, else None.

``ImageDataset``, ``preprocess`` (torch) live in ``adspine.data.transforms``; they are importable from here too.
"""

from __future__ import annotations

from pathlib import Path

from adspine.data.category import (
    DATASET_FILE,
    KINDS,
    MVTEC_AD_KINDS,
    CategoryData,
    Sample,
    check_files,
    check_mask_mode,
    enforce_mask_policy,
    kinds_for,
    prepare_output,
    read_dataset_file,
    sort_samples,
)
from adspine.data.geometry import PROTOCOLS, paper_resize_size
from adspine.data.images import IMAGE_EXTENSIONS, DatasetError, list_images, list_images_and_broken_links

__all__ = [
    "DATASET_FILE",
    "DEFAULT_MASK_PATTERN",
    "GOOD_FOLDERS",
    "KINDS",
    "MVTEC_AD_KINDS",
    "PROTOCOLS",
    "CategoryData",
    "DatasetError",
    "Sample",
    "category_kinds",
    "list_categories",
    "mask_path_for",
    "paper_resize_size",
    "prepare_output",
    "read_dataset_file",
    "scan_category",
]

DEFAULT_MASK_PATTERN = "{stem}_mask.png"
GOOD_FOLDERS = ("good", "ok")
MASK_PATTERNS = tuple(
    [DEFAULT_MASK_PATTERN] + [f"{{stem}}_mask{ext}" for ext in IMAGE_EXTENSIONS if ext != ".png"]
    + [f"{{stem}}{ext}" for ext in IMAGE_EXTENSIONS]
)


def __getattr__(name: str):
    """Torch-backed names, imported on first use so that scanning a dataset never imports torch."""
    if name in ("ImageDataset", "preprocess"):
        from adspine.data import transforms

        return getattr(transforms, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def category_kinds(root: Path | str) -> dict[str, str | None]:
    """Kind ("texture", "object" or None) of every category under ``root``."""
    root = Path(root)
    return kinds_for(root, list_categories(root))


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


def _check_pattern(pattern: str) -> None:
    if not isinstance(pattern, str) or "{stem}" not in pattern or "/" in pattern or "\\" in pattern:
        raise DatasetError(f"mask_pattern={pattern!r}: must be a file name containing {{stem}} (e.g. "
                           f"{DEFAULT_MASK_PATTERN!r}, '{{stem}}.png', '{{stem}}.bmp')")
    try:
        pattern.format(stem="x")
    except (KeyError, IndexError, ValueError):
        raise DatasetError(f"mask_pattern={pattern!r}: only the {{stem}} placeholder is allowed") from None


def mask_path_for(
    category_dir: Path,
    defect: str,
    image_path: Path,
    mask_pattern: str | None = None,
    mask_folder: str = "ground_truth",
) -> Path | None:
    """The mask of a defect image in ``<category_dir>/<mask_folder>/<defect>/``, or None if there is none.

    ``mask_pattern`` (``{stem}`` = the image's file name without extension) names it; None tries ``MASK_PATTERNS``
    and refuses a file matched by two of them as ambiguous."""
    folder = category_dir / mask_folder / defect
    patterns = (mask_pattern,) if mask_pattern is not None else MASK_PATTERNS
    found = [folder / p.format(stem=image_path.stem) for p in patterns]
    found = [c for c in found if c.is_file()]
    if len(found) > 1:
        names = ", ".join(c.name for c in found)
        raise DatasetError(f"{image_path}: ambiguous mask ({names} in {folder}); pass a mask_pattern such as "
                           f"{DEFAULT_MASK_PATTERN!r} or '{{stem}}.png'")
    return found[0] if found else None


def images_in(folder: Path, skipped: list[Path]) -> list[Path]:
    """Images of one split folder (broken links are appended to ``skipped``); a missing or empty folder is an
    error naming it."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: missing folder")
    images, broken = list_images_and_broken_links(folder)
    skipped.extend(broken)
    if not images:
        raise DatasetError(f"{folder}: empty split (no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images)")
    return images


def good_folder(category_dir: Path) -> str:
    """``good`` (MVTec AD, MPDD) or ``ok`` (BTAD): the defect-free folder name, as found in ``test/``."""
    present = [g for g in GOOD_FOLDERS if (category_dir / "test" / g).is_dir()]
    if len(present) > 1:
        raise DatasetError(f"{category_dir / 'test'}: both good/ and ok/ present (one defect-free folder expected)")
    return present[0] if present else GOOD_FOLDERS[0]


def scan_tree(
    category_dir: Path,
    name: str,
    kind: str | None,
    format: str = "mvtec",
    mask_folder: str = "ground_truth",
    masks: str = "required",
    mask_pattern: str | None = None,
    verify: bool = True,
    workers: int | None = None,
) -> CategoryData:
    """Scan a ``train/<good>``, ``test/<good>``, ``test/<defect>`` tree with masks under ``<mask_folder>/<defect>``
    (shared by the ``mvtec`` and ``folder`` readers)."""
    check_mask_mode(masks)
    if mask_pattern is not None:
        _check_pattern(mask_pattern)
    skipped: list[Path] = []
    good = good_folder(category_dir)
    train = [Sample(p, 0, "good", None) for p in images_in(category_dir / "train" / good, skipped)]
    test_dir = category_dir / "test"
    if not test_dir.is_dir():
        raise DatasetError(f"{test_dir}: missing folder")
    test = [Sample(p, 0, "good", None) for p in images_in(test_dir / good, skipped)]
    defects = sorted(
        p.name for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != good
    )
    if not defects:
        raise DatasetError(f"{test_dir}: no defect folders (expected test/<defect>/ beside test/{good}/)")
    for defect in defects:
        samples = [Sample(p, 1, defect, mask_path_for(category_dir, defect, p, mask_pattern, mask_folder))
                   for p in images_in(test_dir / defect, skipped)]
        mask_dir = category_dir / mask_folder / defect
        if all(s.mask_path is None for s in samples) and mask_dir.is_dir() and list_images(mask_dir):
            pattern = mask_pattern or " / ".join(MASK_PATTERNS[:1] + ("{stem}.<ext>",))
            raise DatasetError(f"{mask_dir}: holds masks but none is named after a {defect!r} image by "
                               f"{pattern} (e.g. {list_images(mask_dir)[0].name}); pass mask_pattern")
        test.extend(samples)

    def expected(sample: Sample) -> Path:
        pattern = mask_pattern or DEFAULT_MASK_PATTERN
        return category_dir / mask_folder / sample.defect / pattern.format(stem=sample.path.stem)

    enforce_mask_policy(test, masks, where=lambda defect: str(test_dir / defect), expected=expected)
    if verify:
        check_files(train + test, workers)
    return CategoryData(root=category_dir.parent, name=name, kind=kind, train=train, test=sort_samples(test),
                        format=format, skipped=skipped)


def scan_category(
    root: Path | str,
    name: str,
    verify: bool = True,
    workers: int | None = None,
    masks: str = "required",
    mask_pattern: str | None = None,
) -> CategoryData:
    """Find and validate one category; with ``verify`` every image and mask is fully decoded and size-checked.

    Raises DatasetError (message starts with the offending path) for: unknown category, missing ``train/good`` or
    ``test``, an empty split, an unreadable or truncated image, a partial mix of masked and unmasked defect images
    (unless ``masks="optional"``), an ambiguous mask name, a mask whose size differs from its image. Stray non-image
    and hidden files are skipped; broken or looping links are skipped and listed in ``CategoryData.skipped``.
    """
    root = Path(root)
    categories = list_categories(root)
    if name not in categories:
        raise DatasetError(f"{root / name}: unknown category {name!r} (valid: {', '.join(categories)})")
    kind = category_kinds(root)[name]
    return scan_tree(root / name, name, kind, "mvtec", "ground_truth", masks, mask_pattern, verify, workers)
