"""Synthetic MVTec-format dataset (numpy + Pillow, deterministic by seed): three textures, two objects, exact masks.

Textures: ``fabric`` (plain weave), ``wood`` (wavy grain), ``tiles`` (ceramic grid with grout); each good image shifts
and slightly rotates the pattern and adds noise. Objects on a plain background with pose jitter (rotation and
translation): ``nut`` (hexagonal nut with a bore) and ``chip`` (an IC package with pins and a pin-1 dot).
Defects: ``scratch``, ``hole``, ``contamination``, ``colour_spot`` and, for objects, ``missing_piece``. Every defect is
drawn on a fresh good image; its mask is exactly the set of pixels whose stored 8-bit value changed. Defects stay
away from the border of texture images so the ``paper`` centre crop keeps them.

Every image has its own generator ``numpy.random.default_rng([seed, crc32(category), split_code, index])``
(``split_code``: 0 train/good, 1 test/good, 2 + index in ``DEFECTS`` for a defect), so files do not depend on the
order of generation and the same seed gives byte-identical PNG files.

Variants for other layouts' tests: ``aspect=k`` writes wide images (``size`` high, ``k * size`` wide), each a row of
``k`` independently drawn squares (square ``j > 0`` of an image uses ``default_rng([..., index, j])``) with the defect,
if any, in square ``index % k``; ``masks=False`` writes no ``ground_truth`` (an image-level-only dataset).
"""

from __future__ import annotations

import colorsys
import json
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from adspine.data.category import DATASET_FILE, prepare_output
from adspine.data.images import DatasetError

DATASET_NAME = "synthetic"
CATEGORIES = {"fabric": "texture", "wood": "texture", "tiles": "texture", "nut": "object", "chip": "object"}
DEFECTS = ("scratch", "hole", "contamination", "colour_spot", "missing_piece")
TEXTURE_DEFECTS = ("scratch", "hole", "contamination", "colour_spot")
OBJECT_DEFECTS = DEFECTS
SUPERSAMPLE = 4  # object outlines are drawn at 4x and box-averaged (anti-aliased edges)
MIN_SIZE = 64


@dataclass
class Scene:
    """A good image as layers: ``background`` then ``(colour, alpha)`` layers composited bottom to top.

    ``support``: where surface defects may go; ``removable``: names of layers (or "bite:<layer>") a missing piece
    may take away (objects only); ``attached``: layers on top of the bitten layer that lose the same piece."""

    background: np.ndarray
    layers: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    support: np.ndarray | None = None
    removable: list[str] = field(default_factory=list)
    attached: list[str] = field(default_factory=list)

    def compose(self, alphas: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Composite the layers (optionally with replaced alpha maps) -> float (H, W, 3)."""
        image = self.background.copy()
        for name, (colour, alpha) in self.layers.items():
            a = (alphas or {}).get(name, alpha)[:, :, None]
            image = image * (1.0 - a) + colour * a
        return image


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    return yy + 0.5, xx + 0.5


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float | tuple[float, float]) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation (periodic borders)."""
    noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return noise / (noise.std() + 1e-12)


def _interior(size: int) -> np.ndarray:
    """Pixels at least 14/128 of the side from the border (the paper crop removes 1/16 per side)."""
    margin = int(math.ceil(14 * size / 128))
    inside = np.zeros((size, size), dtype=bool)
    inside[margin:size - margin, margin:size - margin] = True
    return inside


def _coverage(size: int, draw: Callable[[ImageDraw.ImageDraw, float], None]) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of shapes drawn by ``draw(canvas, scale)`` at SUPERSAMPLE x resolution."""
    canvas = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    draw(ImageDraw.Draw(canvas), SUPERSAMPLE)
    return np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float64) / 255.0


def _rotated(points: np.ndarray, angle: float, centre: np.ndarray) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return (points @ np.array([[c, s], [-s, c]])) + centre


# ----------------------------------------------------------------------------------------------------- textures
def _fabric(rng: np.random.Generator, size: int) -> Scene:
    s = size / 128
    yy, xx = _grid(size)
    period = 8.0 * s
    angle = math.radians(rng.uniform(-3, 3))
    u = xx * math.cos(angle) - yy * math.sin(angle) + rng.uniform(0, 2 * period)
    v = xx * math.sin(angle) + yy * math.cos(angle) + rng.uniform(0, 2 * period)
    over = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    shade = np.where(over, np.sin(np.pi * (u / period % 1.0)), np.sin(np.pi * (v / period % 1.0))) ** 0.6
    base = np.array([0.30, 0.42, 0.70]) + rng.uniform(-0.02, 0.02, 3)
    light = (0.55 + 0.45 * shade) * (1 + 0.05 * _smooth_noise(rng, size, 6 * s))
    image = base * light[:, :, None] + 0.025 * rng.standard_normal((size, size, 3))
    return Scene(background=image, support=_interior(size))


def _wood(rng: np.random.Generator, size: int) -> Scene:
    s = size / 128
    yy, xx = _grid(size)
    angle = math.radians(rng.uniform(-4, 4))
    v = xx * math.sin(angle) + yy * math.cos(angle) + rng.uniform(0, size)
    phase = v / (rng.uniform(6, 9) * s) + 1.2 * _smooth_noise(rng, size, (3 * s, 20 * s))
    lines = (0.5 + 0.5 * np.sin(2 * np.pi * phase)) ** 3
    light = np.array([0.74, 0.54, 0.33]) + rng.uniform(-0.02, 0.02, 3)
    dark = np.array([0.48, 0.30, 0.16]) + rng.uniform(-0.02, 0.02, 3)
    streaks = 1 + 0.05 * _smooth_noise(rng, size, (0.5 * s, 6 * s))
    image = (light + (dark - light) * (0.75 * lines)[:, :, None]) * streaks[:, :, None]
    image += 0.015 * rng.standard_normal((size, size, 3))
    return Scene(background=image, support=_interior(size))


def _tiles(rng: np.random.Generator, size: int) -> Scene:
    s = size / 128
    yy, xx = _grid(size)
    period, grout = 32.0 * s, 3.0 * s
    u, v = xx + rng.uniform(0, period), yy + rng.uniform(0, period)
    cells = int(size / period) + 3
    brightness = 0.03 * rng.standard_normal((cells, cells))
    tile_shift = brightness[np.floor(v / period).astype(int), np.floor(u / period).astype(int)]
    is_grout = ((u % period) < grout) | ((v % period) < grout)
    tile = np.array([0.86, 0.84, 0.79]) + (tile_shift + 0.02 * _smooth_noise(rng, size, 1.0 * s))[:, :, None]
    mortar = np.array([0.52, 0.50, 0.47]) + (0.03 * _smooth_noise(rng, size, 0.7 * s))[:, :, None]
    image = np.where(is_grout[:, :, None], mortar, tile) + 0.01 * rng.standard_normal((size, size, 3))
    return Scene(background=image, support=_interior(size))


# ------------------------------------------------------------------------------------------------------ objects
def _plain_background(rng: np.random.Generator, size: int, colour: tuple[float, float, float]) -> np.ndarray:
    s = size / 128
    base = np.array(colour) + rng.uniform(-0.015, 0.015, 3)
    shading = 0.02 * _smooth_noise(rng, size, 24 * s)
    return base + shading[:, :, None] + 0.01 * rng.standard_normal((size, size, 3))


def _support(alpha: np.ndarray, size: int) -> np.ndarray:
    """Fully covered object pixels, eroded so that surface defects stay on the object."""
    return ndimage.binary_erosion(alpha > 0.999, iterations=max(1, round(2 * size / 128)))


def _nut(rng: np.random.Generator, size: int) -> Scene:
    s = size / 128
    yy, xx = _grid(size)
    centre = np.array([size / 2, size / 2]) + rng.uniform(-10, 10, 2) * s  # (x, y)
    angle = rng.uniform(0, math.pi / 3)
    radius, bore = 34 * s * rng.uniform(0.98, 1.02), 13 * s
    hexagon = np.array([[math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)] for k in range(6)]) * radius

    def body(draw: ImageDraw.ImageDraw, k: float) -> None:
        draw.polygon([tuple(p) for p in _rotated(hexagon, angle, centre) * k], fill=255)
        cx, cy = centre * k
        draw.ellipse([cx - bore * k, cy - bore * k, cx + bore * k, cy + bore * k], fill=0)

    def face(draw: ImageDraw.ImageDraw, k: float) -> None:
        cx, cy = centre * k
        r_out, r_in = 0.86 * radius * k, (bore + 3 * s) * k
        draw.ellipse([cx - r_out, cy - r_out, cx + r_out, cy + r_out], fill=255)
        draw.ellipse([cx - r_in, cy - r_in, cx + r_in, cy + r_in], fill=0)

    alpha = _coverage(size, body)
    light = ((xx - centre[0]) * -0.6 + (yy - centre[1]) * -0.8) / radius  # lit from the top left
    metal = 0.60 + 0.10 * light + 0.02 * _smooth_noise(rng, size, (0.6 * s, 5 * s))
    colour = np.stack([metal, metal * 1.0, metal * 1.03], axis=2)
    face_alpha = _coverage(size, face) * alpha
    face_colour = colour + 0.06
    scene = Scene(background=_plain_background(rng, size, (0.16, 0.17, 0.19)), support=_support(alpha, size))
    scene.layers = {"body": (colour, alpha), "face": (face_colour, face_alpha)}
    scene.removable, scene.attached = ["bite:body"], ["face"]
    return scene


def _chip(rng: np.random.Generator, size: int) -> Scene:
    s = size / 128
    centre = np.array([size / 2, size / 2]) + rng.uniform(-10, 10, 2) * s
    angle = math.radians(rng.uniform(-12, 12))
    half_w, half_h = 28 * s, 18 * s
    pin_w, pin_l, n_pins = 5 * s, 7 * s, 5
    body = np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h]])
    pins = []
    for side in (-1, 1):
        for i in range(n_pins):
            x0 = -half_w + (i + 0.5) * (2 * half_w / n_pins) - pin_w / 2
            y0, y1 = side * (half_h - 2 * s), side * (half_h + pin_l)
            pins.append(np.array([[x0, y0], [x0 + pin_w, y0], [x0 + pin_w, y1], [x0, y1]]))
    dot = np.array([-half_w + 7 * s, -half_h + 7 * s])

    def polygon(points: np.ndarray) -> Callable[[ImageDraw.ImageDraw, float], None]:
        return lambda draw, k: draw.polygon([tuple(p) for p in _rotated(points, angle, centre) * k], fill=255)

    def dot_draw(draw: ImageDraw.ImageDraw, k: float) -> None:
        cx, cy = _rotated(dot[None], angle, centre)[0] * k
        r = 3 * s * k
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)

    def flat(value: tuple[float, float, float], noise: float) -> np.ndarray:
        return np.array(value) + noise * _smooth_noise(rng, size, 1.5 * s)[:, :, None]

    scene = Scene(background=_plain_background(rng, size, (0.22, 0.40, 0.27)))
    pin_colour = flat((0.82, 0.82, 0.85), 0.02)
    for i, pin in enumerate(pins):
        scene.layers[f"pin{i}"] = (pin_colour, _coverage(size, polygon(pin)))
    body_alpha = _coverage(size, polygon(body))
    scene.layers["body"] = (flat((0.17, 0.17, 0.19), 0.012), body_alpha)
    scene.layers["dot"] = (flat((0.33, 0.33, 0.35), 0.01), _coverage(size, dot_draw))
    scene.support = _support(body_alpha, size)
    scene.removable, scene.attached = [f"pin{i}" for i in range(len(pins))] + ["bite:body"], ["dot"]
    return scene


RENDERERS: dict[str, Callable[[np.random.Generator, int], Scene]] = {
    "fabric": _fabric, "wood": _wood, "tiles": _tiles, "nut": _nut, "chip": _chip,
}


# ------------------------------------------------------------------------------------------------------ defects
def _blob(rng: np.random.Generator, size: int, centre: np.ndarray, radius: float, roughness: float) -> np.ndarray:
    """Irregular blob: radius modulated by low harmonics of the polar angle."""
    yy, xx = _grid(size)
    dy, dx = yy - centre[0], xx - centre[1]
    theta = np.arctan2(dy, dx)
    r = np.ones_like(theta)
    for k in (2, 3, 4):
        r += roughness / k * rng.uniform(0.5, 1.0) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(dy, dx) < radius * r


def _pick_point(rng: np.random.Generator, support: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(support)
    i = rng.integers(len(ys))
    return np.array([ys[i] + 0.5, xs[i] + 0.5])


def _scratch_region(rng: np.random.Generator, size: int, support: np.ndarray) -> np.ndarray:
    s = size / 128
    start = _pick_point(rng, support)[::-1]  # (x, y)
    direction = rng.uniform(0, 2 * np.pi)
    length = rng.uniform(22, 45) * s
    end = start + length * np.array([math.cos(direction), math.sin(direction)])
    bend = (start + end) / 2 + rng.uniform(-0.25, 0.25) * length * np.array([-math.sin(direction), math.cos(direction)])
    t = np.linspace(0, 1, 64)[:, None]
    curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t**2 * end
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).line([tuple(p) for p in curve], fill=255, width=int(rng.integers(1, 3) * max(1, round(s))))
    return (np.asarray(canvas) > 0) & support


def _contrast_hue(colour: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    hue, _, value = colorsys.rgb_to_hsv(*np.clip(colour, 0, 1))
    new_hue = (hue + rng.uniform(0.3, 0.7)) % 1.0
    return np.array(colorsys.hsv_to_rgb(new_hue, 0.85, float(np.clip(value, 0.5, 0.9))))


CONTAMINANTS = ((0.36, 0.25, 0.10), (0.30, 0.40, 0.15), (0.92, 0.91, 0.86), (0.10, 0.10, 0.10))


def _surface_defect(defect: str, scene: Scene, good: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = good.shape[0]
    s = size / 128
    support = scene.support
    if defect == "scratch":
        region = _scratch_region(rng, size, support)
        a = rng.uniform(0.55, 0.75)
        lighten = good[region].mean() < 0.55 if region.any() else True
        changed = good + a * (1 - good) if lighten else good * (1 - a)
    elif defect == "hole":
        region = _blob(rng, size, _pick_point(rng, support), rng.uniform(3, 6) * s, 0.3) & support
        pit = ndimage.binary_erosion(region)  # dark pit with a lit rim: visible on light and dark surfaces
        changed = np.where(pit[:, :, None], good * rng.uniform(0.10, 0.2) + 0.01, good + 0.6 * (1 - good))
    elif defect == "contamination":
        region = _blob(rng, size, _pick_point(rng, support), rng.uniform(4, 8) * s, 0.45) & support
        local = good[region].mean() if region.any() else good.mean()
        visible = [c for c in CONTAMINANTS if abs(np.mean(c) - local) >= 0.2] or list(CONTAMINANTS)
        colour = np.array(visible[rng.integers(len(visible))])
        stuff = colour + 0.04 * _smooth_noise(rng, size, 1.0)[:, :, None]
        a = rng.uniform(0.65, 0.85)
        changed = good * (1 - a) + stuff * a
    elif defect == "colour_spot":
        region = _blob(rng, size, _pick_point(rng, support), rng.uniform(3, 6) * s, 0.15) & support
        colour = _contrast_hue(good[region].mean(axis=0) if region.any() else good.mean(axis=(0, 1)), rng)
        a = rng.uniform(0.55, 0.75)
        changed = good * (1 - a) + colour * a
    else:
        raise ValueError(f"{defect!r}: not a surface defect")
    return np.where(region[:, :, None], changed, good)


def _missing_piece(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    size = scene.background.shape[0]
    s = size / 128
    choice = scene.removable[rng.integers(len(scene.removable))]
    if not choice.startswith("bite:"):
        return scene.compose({choice: np.zeros((size, size))})
    layer = choice.split(":", 1)[1]
    alpha = scene.layers[layer][1]
    edge = (alpha > 0.5) & ~ndimage.binary_erosion(alpha > 0.5)
    edge &= _interior(size)
    bite = _blob(rng, size, _pick_point(rng, edge), rng.uniform(6, 10) * s, 0.3).astype(np.float64)
    cut = [layer] + scene.attached  # the layer and what is printed on it lose the same piece
    return scene.compose({name: scene.layers[name][1] * (1 - bite) for name in cut})


def defects_for(category: str) -> tuple[str, ...]:
    """Defect types drawn for a category."""
    return OBJECT_DEFECTS if CATEGORIES[category] == "object" else TEXTURE_DEFECTS


def render_good(category: str, rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """One defect-free image, uint8 (size, size, 3)."""
    return _to_uint8(RENDERERS[category](rng, size).compose())


def render_defective(
    category: str, defect: str, rng: np.random.Generator, size: int = 128
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(good uint8 image, defective uint8 image, mask) where mask = pixels whose stored value changed (>= 6 px)."""
    if defect not in defects_for(category):
        raise DatasetError(f"{defect!r}: not a defect of {category!r} (valid: {', '.join(defects_for(category))})")
    scene = RENDERERS[category](rng, size)
    good = _to_uint8(scene.compose())
    min_pixels = max(6, round(6 * (size / 128) ** 2))
    for _ in range(100):
        if defect == "missing_piece":
            bad = _to_uint8(_missing_piece(scene, rng))
        else:
            bad = _to_uint8(_surface_defect(defect, scene, scene.compose(), rng))
        mask = (bad != good).any(axis=2)
        if mask.sum() >= min_pixels:
            return good, bad, mask
    raise RuntimeError(f"could not place a {defect} on {category} after 100 tries")  # pragma: no cover


def _image_rng(seed: int, category: str, split_code: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(category.encode()), split_code, index])


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG", compress_level=6)


def _tile_rng(seed: int, category: str, split_code: int, index: int, tile: int) -> np.random.Generator:
    if tile == 0:
        return _image_rng(seed, category, split_code, index)
    return np.random.default_rng([seed, zlib.crc32(category.encode()), split_code, index, tile])


def render_row(
    category: str, seed: int, split_code: int, index: int, size: int, aspect: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 image (size, aspect * size, 3), bool mask): ``aspect`` squares side by side; for a defect split code
    square ``index % aspect`` holds the defect (the mask is empty for good images)."""
    tiles, masks = [], []
    defect = DEFECTS[split_code - 2] if split_code >= 2 else None
    for tile in range(aspect):
        rng = _tile_rng(seed, category, split_code, index, tile)
        if defect is not None and tile == index % aspect:
            _, image, mask = render_defective(category, defect, rng, size)
        else:
            image, mask = render_good(category, rng, size), np.zeros((size, size), dtype=bool)
        tiles.append(image)
        masks.append(mask)
    return np.concatenate(tiles, axis=1), np.concatenate(masks, axis=1)


def generate(
    out: Path | str,
    seed: int = 0,
    size: int = 128,
    n_train: int = 24,
    n_test_good: int = 8,
    n_per_defect: int = 4,
    categories: list[str] | None = None,
    overwrite: bool = False,
    aspect: int = 1,
    masks: bool = True,
    shortcut: float = 0.0,
) -> Path:
    """Write the synthetic MVTec-format dataset and ``adspine_dataset.json`` into ``out``; returns ``out``.

    ``aspect``: images ``aspect`` times as wide as high; ``masks=False``: no ``ground_truth`` (image level only).
    ``shortcut`` in [0, 1): defective test images are also darker overall by this fraction (pixel values times
    ``1 - shortcut``), a global cue that trivial baselines pick up: a test of whether a ranking sees the defect.
    ``out`` must be absent or empty, or hold an earlier synthetic dataset and ``overwrite`` be set."""
    out = Path(out)
    for name, value, low in (("size", size, MIN_SIZE), ("n_train", n_train, 1), ("n_test_good", n_test_good, 1),
                             ("n_per_defect", n_per_defect, 1), ("seed", seed, 0), ("aspect", aspect, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise DatasetError(f"{name}={value!r}: must be an integer >= {low}")
    if not 0.0 <= shortcut < 1.0:
        raise DatasetError(f"shortcut={shortcut!r}: must be in [0, 1)")
    chosen = list(CATEGORIES) if categories is None else list(categories)
    for name in chosen:
        if name not in CATEGORIES:
            raise DatasetError(f"{name!r}: unknown synthetic category (valid: {', '.join(CATEGORIES)})")
    prepare_output(out, DATASET_NAME, list(CATEGORIES) + [DATASET_FILE], overwrite)
    for category in chosen:
        cat = out / category
        good_splits = ((0, cat / "train" / "good", n_train), (1, cat / "test" / "good", n_test_good))
        for split_code, folder, count in good_splits:
            folder.mkdir(parents=True)
            for i in range(count):
                _save_png(render_row(category, seed, split_code, i, size, aspect)[0], folder / f"{i:03d}.png")
        for defect in defects_for(category):
            folder, gt = cat / "test" / defect, cat / "ground_truth" / defect
            folder.mkdir(parents=True)
            if masks:
                gt.mkdir(parents=True)
            for i in range(n_per_defect):
                bad, mask = render_row(category, seed, 2 + DEFECTS.index(defect), i, size, aspect)
                _save_png(np.round(bad * (1.0 - shortcut)).astype(np.uint8) if shortcut else bad,
                          folder / f"{i:03d}.png")
                if masks:
                    _save_png(mask.astype(np.uint8) * 255, gt / f"{i:03d}_mask.png")
    meta = {
        "name": DATASET_NAME,
        "generator": {
            "module": "adspine.data.synth",
            "seed": seed,
            "size": size,
            "aspect": aspect,
            "masks": masks,
            "shortcut": shortcut,
            "n_train": n_train,
            "n_test_good": n_test_good,
            "n_per_defect": n_per_defect,
            "rng": "numpy.random.default_rng([seed, zlib.crc32(category), split_code, index]); split_code 0 = "
            "train/good, 1 = test/good, 2 + DEFECTS.index(defect); square j > 0 of a wide image appends j",
            "defects": list(DEFECTS),
        },
        "categories": {c: {"kind": CATEGORIES[c], "defects": list(defects_for(c))} for c in chosen},
    }
    (out / DATASET_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out
