"""Post-processing shared by every method: patch scores -> anomaly map at the input resolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_SIGMA = 4.0


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Normalised 1-D Gaussian, radius = int(truncate * sigma + 0.5) (scipy's convention; sigma 4 -> 33 taps)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def gaussian_blur(maps: torch.Tensor, sigma: float = DEFAULT_SIGMA, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps with reflect padding (scipy.ndimage 'reflect' = torch 'symmetric')."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma, truncate).to(maps.device, maps.dtype)
    r = (k.numel() - 1) // 2
    x = maps.unsqueeze(1)
    # 'reflect' in scipy repeats the edge sample (d c b a | a b c d); torch's 'reflect' does not, so pad by hand.
    x = _symmetric_pad(x, r)
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x.squeeze(1)


def _reflect_index(n: int, r: int, device) -> torch.Tensor:
    """Indices of a length-n axis padded by r on both sides, scipy 'reflect' style (period 2n, any r)."""
    i = torch.arange(-r, n + r, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def _symmetric_pad(x: torch.Tensor, r: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    x = x.index_select(-1, _reflect_index(w, r, x.device))
    return x.index_select(-2, _reflect_index(h, r, x.device))


def patch_scores_to_map(
    scores: torch.Tensor, size: tuple[int, int], sigma: float = DEFAULT_SIGMA
) -> torch.Tensor:
    """(B, h, w) patch scores -> (B, H, W) map: bilinear upsampling (align_corners=False), then Gaussian blur."""
    up = F.interpolate(scores.unsqueeze(1).float(), size=tuple(size), mode="bilinear", align_corners=False)
    return gaussian_blur(up.squeeze(1), sigma)
