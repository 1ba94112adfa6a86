"""The one preprocessing function (``preprocess``) and the torch Dataset built on it; the geometry of each protocol
is in ``adspine.data.geometry``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from adspine.data.category import Sample
from adspine.data.geometry import check_protocol, resize_shape
from adspine.data.images import DatasetError, load_mask, load_rgb


def preprocess(
    image: np.ndarray, mask: np.ndarray | None, protocol: str = "paper", size: int | tuple[int, int] = 224
) -> tuple[torch.Tensor, torch.Tensor]:
    """float (h, w, 3) image and bool (h, w) mask (or None) -> (FloatTensor (3, H, W) in [0, 1], BoolTensor (H, W)).

    Resize to ``resize_shape(protocol, size, (h, w))`` then centre-crop (H, W) (see ``geometry``). Images: bilinear
    with antialiasing (torchvision); masks: nearest with pixel-centre alignment (``NEAREST_EXACT``, as Pillow's
    nearest), then the same crop.
    """
    out_hw = list(check_protocol(protocol, size))
    resized = list(resize_shape(protocol, size, image.shape[:2]))
    img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
    img = TF.resize(img, resized, interpolation=InterpolationMode.BILINEAR, antialias=True).clamp_(0.0, 1.0)
    if mask is None:
        msk = torch.zeros(1, *resized, dtype=torch.uint8)
    else:
        msk = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8))[None]
        msk = TF.resize(msk, resized, interpolation=InterpolationMode.NEAREST_EXACT, antialias=False)
    if resized != out_hw:
        img, msk = TF.center_crop(img, out_hw), TF.center_crop(msk, out_hw)
    return img.contiguous(), msk[0].bool()


def preprocess_file(path: Path | str, protocol: str = "paper", size: int | tuple[int, int] = 224) -> np.ndarray:
    """An image file as the methods see it: float32 (H, W, 3) in [0, 1] (for overlays and single-image detection)."""
    img, _ = preprocess(load_rgb(path), None, protocol, size)
    return img.permute(1, 2, 0).numpy()


def load_sample(sample: Sample) -> tuple[np.ndarray, np.ndarray | None]:
    """(image float (h, w, 3), mask bool (h, w) or None) of one sample, checking that their sizes agree."""
    image = load_rgb(sample.path)
    if sample.mask_path is None:
        return image, None
    mask = load_mask(sample.mask_path, sample.mask_threshold)
    if mask.shape != image.shape[:2]:
        raise DatasetError(
            f"{sample.mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from its image "
            f"{sample.path} ({image.shape[1]}x{image.shape[0]})"
        )
    return image, mask


class ImageDataset(Dataset):
    """Samples -> dicts ``{"image": (3, H, W) float in [0, 1] (not normalised), "mask": (H, W) bool, "has_mask":
    bool, "label": int, "defect": str, "path": str}`` under a protocol of ``geometry.PROTOCOLS``.

    ``has_mask`` is False for a defective image without a mask (its ``mask`` is then all False and must not be used
    by pixel metrics)."""

    def __init__(self, samples: list[Sample], protocol: str = "paper", size: int | tuple[int, int] = 224):
        self.image_size = check_protocol(protocol, size)
        self.samples = list(samples)
        self.protocol = protocol
        self.size = size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        img, msk = preprocess(*load_sample(sample), self.protocol, self.image_size)
        return {
            "image": img, "mask": msk, "has_mask": sample.has_mask, "label": int(sample.label),
            "defect": sample.defect, "path": str(sample.path),
        }
