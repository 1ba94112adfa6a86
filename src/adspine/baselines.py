"""Trivial baselines (the shortcut check): image anomaly scores with no CNN, on the study's split and preprocessing.

If one of these separates good from defective test images about as well as the best backbone, the image-level
figures measure global appearance (brightness, colour, framing), not the defects: judge by localisation instead.

Each baseline turns an image (H, W, 3) float in [0, 1] (as ``adspine.data.transforms.preprocess`` returns it) into a
small feature vector, then scores a test image against the train (good) images:

- ``pixel NN grey 32 px`` / ``pixel NN colour 32 px``: the image area-averaged to 32 x 32 (grey = ITU-R BT.601 luma
  0.299 R + 0.587 G + 0.114 B), score = Euclidean distance to the nearest train image.
- ``intensity mean/std``: (mean, std) of the grey image; score = Mahalanobis distance to the train images' (mean,
  std), covariance ``np.cov`` (ddof 1) plus 1e-6 times the identity (never singular).
- ``colour histogram``: per channel a 16-bin histogram of [0, 1] (each summing to 1), concatenated; score = L1
  distance to the nearest train histogram.

Numpy only; :func:`category_baselines` reads a category's images through the study's preprocessing (torch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

LOW_RES = 32
HIST_BINS = 16
RIDGE = 1e-6
LUMA = np.array([0.299, 0.587, 0.114])


def area_resize(image: np.ndarray, size: int = LOW_RES) -> np.ndarray:
    """(H, W, C) -> (size, size, C) by averaging the pixels of each of size x size near-equal blocks (rows
    ``[i H // size, (i + 1) H // size)``, columns likewise); H and W must be at least ``size``."""
    h, w = image.shape[:2]
    if h < size or w < size:
        raise ValueError(f"image: {w}x{h} is smaller than {size}x{size}")
    out = image.astype(np.float64)
    for axis, n in ((0, h), (1, w)):
        edges = np.arange(size) * n // size
        counts = np.diff(np.append(edges, n)).reshape([-1 if a == axis else 1 for a in range(out.ndim)])
        out = np.add.reduceat(out, edges, axis=axis) / counts
    return out


def grey(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float64) @ LUMA


def _pixels_grey(image: np.ndarray) -> np.ndarray:
    return grey(area_resize(image)).ravel()


def _pixels_colour(image: np.ndarray) -> np.ndarray:
    return area_resize(image).ravel()


def _intensity(image: np.ndarray) -> np.ndarray:
    g = grey(image)
    return np.array([g.mean(), g.std()])


def _histogram(image: np.ndarray) -> np.ndarray:
    return np.concatenate([np.histogram(image[..., c], bins=HIST_BINS, range=(0.0, 1.0))[0] / image[..., c].size
                           for c in range(image.shape[-1])])


def nearest_distance(train: np.ndarray, test: np.ndarray, ord: int = 2) -> np.ndarray:
    """Per test row, the smallest L``ord`` distance (2: Euclidean, 1: L1) to any train row."""
    out = np.empty(len(test))
    for i, t in enumerate(test):
        out[i] = np.linalg.norm(train - t, ord=ord, axis=1).min()
    return out


def mahalanobis(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Mahalanobis distance of each test row to the train rows' mean, covariance ``np.cov`` + ``RIDGE`` I."""
    mu = train.mean(axis=0)
    cov = np.atleast_2d(np.cov(train, rowvar=False)) if len(train) > 1 else np.zeros((train.shape[1],) * 2)
    inv = np.linalg.inv(cov + RIDGE * np.eye(train.shape[1]))
    d = test - mu
    return np.sqrt(np.einsum("ij,jk,ik->i", d, inv, d))


# name -> (image -> feature vector, (train features, test features) -> test scores)
BASELINES: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray, np.ndarray], np.ndarray]]] = {
    f"pixel NN grey {LOW_RES} px": (_pixels_grey, nearest_distance),
    f"pixel NN colour {LOW_RES} px": (_pixels_colour, nearest_distance),
    "intensity mean/std": (_intensity, mahalanobis),
    "colour histogram": (_histogram, lambda tr, te: nearest_distance(tr, te, ord=1)),
}


def features(images: Iterable[np.ndarray]) -> dict[str, np.ndarray]:
    """Every baseline's feature matrix (N, D) of the images (streamed: only the small features are kept)."""
    feats: dict[str, list[np.ndarray]] = {name: [] for name in BASELINES}
    for image in images:
        for name, (feature, _) in BASELINES.items():
            feats[name].append(feature(image))
    return {name: np.stack(v) for name, v in feats.items()}


def score(train: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Test image scores (higher = more anomalous) of every baseline, from :func:`features` of both splits."""
    return {name: BASELINES[name][1](train[name], test[name]) for name in BASELINES}


def evaluate(labels, scores: dict[str, np.ndarray], level: float = 0.95) -> list[dict]:
    """One row per baseline: ``baseline, image_auroc, image_auroc_lo, image_auroc_hi`` (DeLong; interval None with
    fewer than 2 good or 2 defective images), ``test_labels``, ``test_scores``."""
    from adspine.metrics import auroc_ci, image_auroc

    y = np.asarray(labels).astype(np.int8)
    rows = []
    for name, s in scores.items():
        auc, lo, hi = image_auroc(y, s), None, None
        if min((y == 0).sum(), (y == 1).sum()) >= 2:
            _, lo, hi = auroc_ci(y, s, level=level)
        rows.append({"baseline": name, "image_auroc": float(auc), "image_auroc_lo": lo, "image_auroc_hi": hi,
                     "test_labels": y, "test_scores": np.asarray(s, dtype=np.float64)})
    return rows


def _images(samples, protocol: str, size) -> Iterable[np.ndarray]:
    from adspine.data.transforms import load_sample, preprocess

    for s in samples:
        img, _ = preprocess(*load_sample(s), protocol, size)
        yield img.permute(1, 2, 0).numpy()


def category_baselines(data, protocol: str = "paper", size: int | tuple[int, int] = 224) -> list[dict]:
    """Every baseline of one ``CategoryData`` (its train / test split) under the study's preprocessing; rows as
    :func:`evaluate` plus ``category, protocol, image_height, image_width, n_train, n_test``."""
    from adspine.data.errors import DatasetError
    from adspine.data.geometry import check_protocol

    h, w = check_protocol(protocol, size)
    if len({s.label for s in data.test}) < 2:
        raise DatasetError(f"{data.root}: category {data.name}: the test split needs good and defective images for "
                           "the trivial baselines")
    train = features(_images(data.train, protocol, (h, w)))
    test = features(_images(data.test, protocol, (h, w)))
    rows = evaluate([s.label for s in data.test], score(train, test))
    extra = {"category": data.name, "protocol": protocol, "image_height": h, "image_width": w,
             "n_train": len(data.train), "n_test": len(data.test)}
    return [{**extra, **r} for r in rows]
