"""Image and mask loading: any common Pillow mode -> float RGB in [0, 1]; masks -> bool.

Conventions (documented choices):
- greyscale (``1``, ``L``) is repeated to three channels;
- alpha (``LA``, ``RGBA``, ``PA``, palette transparency) is DROPPED, not composited: the colour values are kept as
  stored, which is what ``Image.convert("RGB")`` (torchvision, anomalib) and OpenCV's ``imread`` also do;
- palette (``P``) images are expanded through their palette;
- 16-bit greyscale (``I;16*``) and 32-bit integer (``I``) images are taken on the 16-bit scale (divided by 65535,
  clipped to [0, 1]);
- masks are binarised at > 127 on the 8-bit scale (VisA-style masks pass ``threshold=0``): 16-bit masks at
  > threshold * 257 (the same fraction of full scale), colour masks if any channel is above it, ``1``-mode masks as
  stored.

Broken or looping symbolic links are skipped by ``list_images`` and returned separately so that readers can count
them. Pillow's ``DecompressionBombWarning`` (a very large image) becomes one ``LargeImageWarning`` naming the file.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from adspine.data.errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
MASK_THRESHOLD = 127


class LargeImageWarning(UserWarning):
    """An image above Pillow's decompression-bomb limit was opened (once per file, naming it)."""


def is_image_file(path: Path) -> bool:
    """True for a visible regular file with an image extension (``.DS_Store``, ``Thumbs.db``, notes are skipped)."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def is_broken_link(path: Path) -> bool:
    """True for a symbolic link whose target is missing or loops (``exists()`` follows the link)."""
    return path.is_symlink() and not path.exists()


def list_images_and_broken_links(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, broken or looping links) directly inside ``folder``, each sorted by name."""
    entries = sorted(folder.iterdir(), key=lambda p: p.name)
    images = [p for p in entries if is_image_file(p)]
    broken = [p for p in entries if not p.name.startswith(".") and is_broken_link(p)]
    return images, broken


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name; stray non-image and hidden files and broken links are
    skipped."""
    return list_images_and_broken_links(folder)[0]


_OPEN_LOCK = threading.Lock()  # warnings.catch_warnings is process-wide: one header parse at a time


def _open(path: Path) -> Image.Image:
    """``Image.open`` with Pillow's DecompressionBombWarning replaced by one LargeImageWarning naming the file."""
    with _OPEN_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = Image.open(path)
    for item in caught:
        if issubclass(item.category, Image.DecompressionBombWarning):
            width, height = image.size
            warnings.warn(
                f"{path}: very large image ({width}x{height} = {width * height} pixels, above Pillow's "
                f"decompression-bomb limit {Image.MAX_IMAGE_PIXELS}); loaded anyway",
                LargeImageWarning, stacklevel=3,
            )
        else:
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
    return image


@contextlib.contextmanager
def _strict_decoding() -> Iterator[None]:
    """Make Pillow raise on truncated files even if some other library switched that off globally."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def open_decoded(path: Path | str) -> Image.Image:
    """Open and fully decode an image; unreadable or truncated files raise DatasetError naming the path."""
    path = Path(path)
    try:
        with _strict_decoding(), _open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: unreadable or truncated image ({type(exc).__name__}: {exc})") from None


def image_size(path: Path | str) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    path = Path(path)
    try:
        with _open(path) as image:
            return image.size
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from None


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Pillow image of any common mode -> float32 (H, W, 3) in [0, 1] (see the module docstring for the rules)."""
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES:
        grey = np.clip(np.asarray(image).astype(np.float32) / 65535.0, 0.0, 1.0)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "F":
        raise ValueError("floating-point images (mode F) are not supported")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode != "RGB":
        image = image.convert("RGB")  # drops alpha (LA, RGBA, PA); expands 1, L; converts CMYK, YCbCr, LAB
    return np.asarray(image, dtype=np.float32) / 255.0


def mask_from_image(image: Image.Image, threshold: int = MASK_THRESHOLD) -> np.ndarray:
    """Pillow mask image -> bool (H, W): > ``threshold`` on the 8-bit scale (16-bit scaled; colour: any channel)."""
    mode = image.mode
    if mode == "1":
        return np.asarray(image, dtype=bool).copy()
    if mode in SIXTEEN_BIT_MODES:
        return np.asarray(image).astype(np.int64) > threshold * 257
    if mode == "F":
        raise ValueError("floating-point masks (mode F) are not supported")
    if mode in ("L", "LA"):
        return np.asarray(image.convert("L")) > threshold
    return (np.asarray(image.convert("RGB")) > threshold).any(axis=2)


def load_rgb(path: Path | str) -> np.ndarray:
    """Read an image file -> float32 (H, W, 3) in [0, 1]."""
    image = open_decoded(path)
    try:
        return to_rgb_array(image)
    except ValueError as exc:
        raise DatasetError(f"{path}: {exc}") from None


def load_mask(path: Path | str, threshold: int = MASK_THRESHOLD) -> np.ndarray:
    """Read a mask file -> bool (H, W), binarised at > ``threshold`` (default 127) on the 8-bit scale."""
    image = open_decoded(path)
    try:
        return mask_from_image(image, threshold)
    except ValueError as exc:
        raise DatasetError(f"{path}: {exc}") from None
