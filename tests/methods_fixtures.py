"""Shared helpers for the method tests (imported by tests/test_methods_*.py; not a test module itself).

``synthetic_features()`` gives random-init ResNet-18 features of one small synthetic category, computed once per
process; ``check_separation``/``check_roundtrip``/``check_corruption`` are the checks every method shares.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

IMAGE_SIZE = 128
CATEGORY = "wood"
BATCH = 8


def set_threads() -> None:
    import faiss

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)


def random_maps(batch: int, channels=(6, 8, 10), grids=((8, 8), (4, 4), (2, 2)), seed: int = 0) -> list[torch.Tensor]:
    """A batch of small random per-layer maps (shallow to deep)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, h, w, generator=gen) for c, (h, w) in zip(channels, grids)]


@functools.lru_cache(maxsize=1)
def synthetic_features() -> tuple[list[list[torch.Tensor]], list[torch.Tensor], np.ndarray, np.ndarray]:
    """(train batches, test features as one batch, test labels, test masks) of the synthetic ``wood`` category
    (``adspine.data.synth``, seed 0, 24 train / 8 good + 16 defective test images, ``paper`` protocol at 128) through
    a random-init ResNet-18 (torchvision init, seed 0, layers 1-3)."""
    from adspine.backbones.extractor import build_extractor
    from adspine.data.mvtec import ImageDataset, scan_category
    from adspine.data.synth import generate

    set_threads()
    with tempfile.TemporaryDirectory() as tmp:
        root = generate(Path(tmp) / "synth", seed=0, size=IMAGE_SIZE, categories=[CATEGORY])
        data = scan_category(root, CATEGORY)
        train = [item["image"] for item in ImageDataset(data.train, protocol="paper", size=IMAGE_SIZE)]
        test = list(ImageDataset(data.test, protocol="paper", size=IMAGE_SIZE))
    extract = build_extractor("resnet18", init="random", init_seed=0)
    train_batches = [extract(torch.stack(train[i : i + BATCH])) for i in range(0, len(train), BATCH)]
    test_feats = extract(torch.stack([item["image"] for item in test]))
    labels = np.array([item["label"] for item in test])
    masks = torch.stack([item["mask"] for item in test]).numpy()
    return train_batches, test_feats, labels, masks


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(roc_auc_score(labels, scores))


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    return float(roc_auc_score(masks.reshape(-1), maps.reshape(-1)))


def check_separation(method, min_image_auroc: float, min_pixel_auroc: float = 0.9) -> tuple[float, float]:
    """Fit ``method`` on the synthetic train features (as a generator) and check it separates defects."""
    train_batches, test, labels, masks = synthetic_features()
    method.fit(b for b in train_batches)
    pred = method.predict(test, (IMAGE_SIZE, IMAGE_SIZE))
    assert pred.maps.shape == (len(labels), IMAGE_SIZE, IMAGE_SIZE) and pred.maps.dtype == np.float32
    assert pred.scores.shape == (len(labels),) and np.isfinite(pred.scores).all()
    img, pix = image_auroc(labels, pred.scores), pixel_auroc(masks, pred.maps)
    assert img > min_image_auroc, f"image AUROC {img:.3f}"
    assert pix > min_pixel_auroc, f"pixel AUROC {pix:.3f}"
    return img, pix


def check_roundtrip(method, features: list[torch.Tensor], size: tuple[int, int], folder) -> None:
    """save -> load -> predict gives identical outputs, settings and extra state."""
    from adspine.methods import AnomalyMethod

    before = method.predict(features, size)
    method.save(folder, {"backbone": "test"})
    loaded = AnomalyMethod.load(folder)
    assert type(loaded) is type(method)
    assert loaded.settings() == method.settings()
    assert loaded.extra_state() == method.extra_state()
    assert loaded.provenance["backbone"] == "test"
    after = loaded.predict(features, size)
    np.testing.assert_array_equal(before.maps, after.maps)
    np.testing.assert_array_equal(before.scores, after.scores)


def check_corruption(method, folder, name: str) -> None:
    """A saved folder with tensor ``name`` missing or with one of its values altered, or whose ``model.json`` had a
    setting edited, fails to load (the safetensors header, which holds model.json's checksum, is kept as it was)."""
    import json

    import pytest
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from adspine.methods import AnomalyMethod, ModelFileError
    from adspine.methods.base import META_FILE, TENSORS_FILE

    path = method.save(folder) / TENSORS_FILE
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    altered = {**tensors, name: tensors[name].clone()}
    altered[name].view(-1)[0] += 1
    save_file(altered, str(path), metadata=header)
    with pytest.raises(ModelFileError, match="altered"):
        AnomalyMethod.load(folder)
    save_file({k: v for k, v in tensors.items() if k != name}, str(path), metadata=header)
    with pytest.raises(ModelFileError, match="missing"):
        AnomalyMethod.load(folder)
    save_file(tensors, str(path), metadata=header)
    meta_path = folder / META_FILE
    meta = json.loads(meta_path.read_text())
    key = sorted(meta["settings"])[0]
    value = meta["settings"][key]
    meta["settings"][key] = (value + 1) if isinstance(value, (int, float)) and not isinstance(value, bool) else "x"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match=r"model.json: altered"):
        AnomalyMethod.load(folder)
    meta_path.write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        AnomalyMethod.load(folder)
    meta_path.write_text(json.dumps({"method": 3}))
    with pytest.raises(ModelFileError, match="model.json: field"):
        AnomalyMethod.load(folder)
