"""The ``folder`` layout (what anomalib calls Folder): good and bad photos in folders, masks optional; no torch.

One category: ``<dir>/train/good/*``, ``<dir>/test/good/*``, ``<dir>/test/<any defect name>/*`` and optional masks
``<dir>/masks/<defect>/<stem>.<ext>`` (``<stem>_mask.<ext>`` also found). The root is itself one category, named
after the root folder, when it holds ``train/``; otherwise each sub-folder holding ``train/`` or ``test/`` is a
category. Defect folders without masks are image-level (see ``adspine.data.category`` for the mask rules).
"""

from __future__ import annotations

from pathlib import Path

from adspine.data.category import CategoryData, kinds_for
from adspine.data.images import DatasetError
from adspine.data.mvtec import list_categories as list_subfolder_categories
from adspine.data.mvtec import scan_tree

MASK_FOLDER = "masks"


def is_single_category(root: Path) -> bool:
    """True when ``root`` itself is the category (it holds ``train/``)."""
    return (root / "train").is_dir()


def list_categories(root: Path | str) -> list[str]:
    """``[root.name]`` for a single-category root, else the sorted sub-folders holding ``train/`` or ``test/``."""
    root = Path(root)
    if root.is_dir() and is_single_category(root):
        return [root.name]
    return list_subfolder_categories(root)


def scan(
    root: Path | str,
    category: str | None = None,
    masks: str = "required",
    mask_pattern: str | None = None,
    verify: bool = True,
    workers: int | None = None,
) -> CategoryData:
    """Read one category (``category`` may be omitted, or be the root's own name, for a single-category root)."""
    root = Path(root)
    names = list_categories(root)
    single = is_single_category(root)
    name = category if category is not None else names[0] if single else None
    if name is None:
        raise DatasetError(f"{root}: holds several categories; name one (valid: {', '.join(names)})")
    if name not in names:
        raise DatasetError(f"{root / name}: unknown category {name!r} (valid: {', '.join(names)})")
    category_dir = root if single else root / name
    kind = kinds_for(category_dir.parent if single else root, [name])[name]
    data = scan_tree(category_dir, name, kind, "folder", MASK_FOLDER, masks, mask_pattern, verify, workers)
    data.root = root
    return data
