"""Where a detector's images come from: a plain folder of normal images, an MVTec category or a manifest CSV's train
rows (fit), files / folders / globs (predict), an MVTec category, a ``good/`` + defect-folders tree with optional
masks or a manifest CSV's test rows (evaluate)."""

from __future__ import annotations

import glob
from pathlib import Path

from adspine.data.images import DatasetError, is_image_file, list_images


def is_manifest(source: Path) -> bool:
    """A manifest CSV (``adspine.data.manifest``) rather than a folder."""
    return Path(source).suffix.lower() == ".csv"


def manifest_category(source: Path, category: str | None = None):
    """One category of a manifest CSV (``category`` may be omitted when it holds one); masks optional."""
    from adspine.data.manifest import scan

    return scan(Path(source), category, masks="optional")


def normal_images(source: Path, category: str | None = None) -> list[Path]:
    """Training images: the train rows of a manifest CSV (of ``category`` when it holds several),
    ``<category>/train/good`` of an MVTec category, else the images directly in ``source``."""
    source = Path(source)
    if is_manifest(source):
        return [s.path for s in manifest_category(source, category).train]
    if category is not None:
        raise DatasetError(f"{source}: a category is only chosen in a manifest CSV; give the category's folder")
    if not source.is_dir():
        raise DatasetError(f"{source}: training folder or manifest CSV not found")
    folder = source / "train" / "good" if (source / "train" / "good").is_dir() else source
    images = list_images(folder)
    if not images:
        raise DatasetError(f"{folder}: no images (expected a folder of normal images or an MVTec category)")
    return images


def collect_images(specs: list[str]) -> list[Path]:
    """Files, folders (their images and those of their sub-folders, sorted) and glob patterns, in the order given,
    without repeats."""
    out: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if is_image_file(q))
        elif p.exists():
            found = [p]  # an unreadable file is reported per image by the caller
        elif not glob.has_magic(spec):
            raise DatasetError(f"{spec}: no such file or folder")
        else:
            found = sorted(Path(m) for m in glob.glob(spec, recursive=True) if is_image_file(Path(m)))
        if not found:
            raise DatasetError(f"{spec}: no images found")
        out.extend(found)
    return list(dict.fromkeys(out))


def labelled_samples(source: Path, category: str | None = None):
    """Test samples with labels: a manifest CSV's test rows (of ``category`` when it holds several), an MVTec
    (``ground_truth/``) or folder-layout (``masks/``) category's ``test/``, or a folder holding ``good/`` and one
    sub-folder per defect type with masks in ``ground_truth/<defect>/`` or ``masks/<defect>/`` where present.
    Returns (samples, pixel_level): pixel metrics apply only when every defective image has a mask."""
    from adspine.data.mvtec import Sample, mask_path_for, scan_category, sort_samples

    source = Path(source)
    if is_manifest(source):
        data = manifest_category(source, category)
        return data.test, data.pixel_level
    if category is not None:
        raise DatasetError(f"{source}: a category is only chosen in a manifest CSV; give the category's folder")
    if not source.is_dir():
        raise DatasetError(f"{source}: test folder or manifest CSV not found")
    mask_folder = "masks" if (source / "masks").is_dir() else "ground_truth"
    if (source / "train").is_dir() and (source / "test").is_dir():
        if mask_folder == "masks":
            from adspine.data.folder import scan

            data = scan(source, masks="optional")
        else:
            data = scan_category(source.parent, source.name, masks="optional")
        return data.test, data.pixel_level
    good = source / "good"
    if not good.is_dir():
        raise DatasetError(f"{source}: expected an MVTec category or a good/ folder beside one folder per defect type")
    samples = [Sample(p, 0, "good", None) for p in list_images(good)]
    defects = sorted(p.name for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")
                     and p.name not in ("good", "ground_truth", "masks"))
    if not defects:
        raise DatasetError(f"{source}: no defect folders beside good/")
    for defect in defects:
        samples += [Sample(p, 1, defect, mask_path_for(source, defect, p, None, mask_folder))
                    for p in list_images(source / defect)]
    return sort_samples(samples), all(s.mask_path is not None for s in samples if s.label == 1)
