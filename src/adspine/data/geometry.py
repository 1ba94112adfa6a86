"""Preprocessing protocols as plain geometry (no torch): image sizes, the resize and the centre crop of each protocol.

``size`` is an int (square) or ``(H, W)`` everywhere. Protocols (``image`` h x w -> output H x W):

- ``paper``: resize each side to ``round(side * 256 / 224)`` of the output (256 x 256 for 224), ignoring the image's
  aspect ratio, then centre-crop (H, W): the published PaDiM / PatchCore protocol;
- ``resize``: plain resize to (H, W) (the image's aspect ratio is lost unless it matches);
- ``aspect-crop``: keep the aspect ratio: scale by ``max(H / h, W / w)`` so the image covers (H, W), then
  centre-crop (H, W).

Masks go through the same geometry (nearest). The crop offset is ``round((side - out) / 2)`` on each axis.
"""

from __future__ import annotations

from adspine.data.images import DatasetError

PROTOCOLS = ("paper", "resize", "aspect-crop")
MIN_SIDE = 8
DESCRIPTIONS = {
    "paper": "resize each side x256/224 (aspect ratio not kept), centre-crop",
    "resize": "plain resize (aspect ratio not kept)",
    "aspect-crop": "scale to cover keeping the aspect ratio, centre-crop",
}


def normalise_size(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """An image size as ``(H, W)``: an int S means (S, S); sides must be integers >= 8."""
    if isinstance(size, int) and not isinstance(size, bool):
        sides: tuple = (size, size)
    else:
        sides = tuple(size) if isinstance(size, (list, tuple)) else ()
    valid = len(sides) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= MIN_SIDE for v in sides)
    if not valid:
        raise DatasetError(f"size={size!r}: image size must be an integer >= {MIN_SIDE} or [H, W] with both >= "
                           f"{MIN_SIDE}")
    return int(sides[0]), int(sides[1])


def check_protocol(protocol: str, size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """Validate a protocol name and size; returns the size as (H, W)."""
    if protocol not in PROTOCOLS:
        raise DatasetError(f"{protocol!r}: unknown protocol (valid: {', '.join(PROTOCOLS)})")
    return normalise_size(size)


def paper_resize_size(size: int) -> int:
    """Side of the resize before the centre crop in the ``paper`` protocol (256 for 224)."""
    return round(size * 256 / 224)


def resize_shape(protocol: str, size: int | tuple[int, int], image_hw: tuple[int, int]) -> tuple[int, int]:
    """(height, width) an image of ``image_hw`` is resized to before the centre crop to ``size``."""
    out_h, out_w = check_protocol(protocol, size)
    if protocol == "paper":
        return paper_resize_size(out_h), paper_resize_size(out_w)
    if protocol == "resize":
        return out_h, out_w
    h, w = image_hw
    scale = max(out_h / h, out_w / w)
    return max(out_h, round(h * scale)), max(out_w, round(w * scale))


def protocol_record(protocol: str, size: int | tuple[int, int] | list[int]) -> dict:
    """What to store with results: ``{"protocol", "image_size": [H, W], "description"}``."""
    out_h, out_w = check_protocol(protocol, size)
    return {"protocol": protocol, "image_size": [out_h, out_w], "description": DESCRIPTIONS[protocol]}
