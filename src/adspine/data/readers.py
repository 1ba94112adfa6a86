"""One entry point for every dataset layout: ``scan``, ``list_categories``, ``detect_format``; imports no torch.

Formats (each reader returns the same ``CategoryData``):

- ``mvtec``: ``<root>/<category>/{train,test,ground_truth}`` (also BTAD: ``ok``/``ko``, masks ``{stem}.png|.bmp``;
  MPDD); see ``adspine.data.mvtec``;
- ``visa``: ``<root>/split_csv/1cls.csv``; see ``adspine.data.visa``;
- ``folder``: ``train/good``, ``test/good``, ``test/<defect>``, optional ``masks/<defect>/<stem>.*``; the root is
  one category when it holds ``train/``, else each sub-folder is one; see ``adspine.data.folder``;
- ``manifest``: the root is a CSV file (``path, split, label[, mask][, category]``); see ``adspine.data.manifest``.

``format="auto"`` picks the layout when the root says it unambiguously (a ``.csv`` file -> manifest; a
``split_csv/1cls.csv`` -> visa; a root holding ``train/`` -> folder; category folders with ``ground_truth/`` ->
mvtec, with ``masks/`` -> folder, with neither -> mvtec (image-level: both readers agree)).
"""

from __future__ import annotations

from pathlib import Path

from adspine.data import folder, manifest, mvtec, visa
from adspine.data.category import CategoryData
from adspine.data.images import DatasetError

FORMATS = ("mvtec", "visa", "folder", "manifest")


def _check_format(format: str) -> None:
    if format != "auto" and format not in FORMATS:
        raise DatasetError(f"format={format!r}: unknown dataset format (valid: auto, {', '.join(FORMATS)})")


def detect_format(root: Path | str) -> str:
    """The layout of ``root`` (one of FORMATS); a one-line DatasetError naming the root and what was found when
    it is unknown or ambiguous."""
    root = Path(root)
    if root.is_file():
        if root.suffix.lower() == ".csv":
            return "manifest"
        raise DatasetError(f"{root}: a file that is not a .csv manifest (expected a dataset folder or a CSV)")
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root not found")
    if (root / visa.SPLIT_CSV).is_file():
        return "visa"
    if folder.is_single_category(root):
        if (root / "ground_truth").is_dir():
            raise DatasetError(f"{root}: looks like one MVTec-format category (train/ and ground_truth/); pass its "
                               "parent folder as the root")
        return "folder"
    subfolders = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    categories = [p for p in subfolders if (p / "train").is_dir() or (p / "test").is_dir()]
    if not categories:
        csvs = sorted(p.name for p in root.glob("*.csv"))
        found = f"CSV files {', '.join(csvs)} (pass the CSV itself for a manifest)" if csvs else (
            f"{len(subfolders)} folder(s) without train/ or test/")
        raise DatasetError(f"{root}: unknown dataset layout: found {found}; expected <category>/train/good "
                           "(mvtec, folder), split_csv/1cls.csv (visa) or a manifest .csv")
    with_gt = [p.name for p in categories if (p / "ground_truth").is_dir()]
    with_masks = [p.name for p in categories if (p / folder.MASK_FOLDER).is_dir()]
    if with_gt and with_masks:
        raise DatasetError(f"{root}: ambiguous layout: ground_truth/ in {with_gt[0]} (mvtec) and masks/ in "
                           f"{with_masks[0]} (folder); pass format explicitly")
    return "folder" if with_masks else "mvtec"


def list_categories(root: Path | str, format: str = "auto") -> list[str]:
    """Sorted category names of a dataset in any layout."""
    _check_format(format)
    fmt = detect_format(root) if format == "auto" else format
    return {"mvtec": mvtec.list_categories, "visa": visa.list_categories, "folder": folder.list_categories,
            "manifest": manifest.list_categories}[fmt](root)


def scan(
    root: Path | str,
    category: str | None = None,
    format: str = "auto",
    masks: str = "required",
    mask_pattern: str | None = None,
    verify: bool = True,
    workers: int | None = None,
) -> CategoryData:
    """Read and validate one category of a dataset in any layout (``CategoryData.format`` records which).

    ``masks``: ``required`` refuses a partial mix of masked and unmasked defect types, ``optional`` accepts it; a
    category without any mask is image-level and valid in both. ``mask_pattern`` (``mvtec``, ``folder``): the mask
    file name, e.g. ``"{stem}_mask.png"``; None tries the common variants. ``category`` may be None for a
    single-category ``folder`` root or manifest."""
    _check_format(format)
    fmt = detect_format(root) if format == "auto" else format
    if mask_pattern is not None and fmt in ("visa", "manifest"):
        raise DatasetError(f"mask_pattern={mask_pattern!r}: only for the mvtec and folder formats (the {fmt} format "
                           "lists its mask paths)")
    if fmt == "mvtec":
        if category is None:
            names = mvtec.list_categories(root)
            raise DatasetError(f"{root}: name a category (valid: {', '.join(names)})")
        return mvtec.scan_category(root, category, verify, workers, masks, mask_pattern)
    if fmt == "folder":
        return folder.scan(root, category, masks, mask_pattern, verify, workers)
    if fmt == "visa":
        if category is None:
            raise DatasetError(f"{root}: name a category (valid: {', '.join(visa.list_categories(root))})")
        return visa.scan(root, category, masks, verify, workers)
    return manifest.scan(root, category, masks, verify, workers)
