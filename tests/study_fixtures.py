"""Shared helpers for tests that run a tiny study or fit a tiny detector (not a test module itself)."""

from __future__ import annotations

from pathlib import Path

import yaml


def tiny_study_spec(folder: Path, name: str, n_train: int = 4, n_test_good: int = 2) -> Path:
    """One synthetic 64 px category, random-init ResNet-18 + PaDiM (d=20), one Rd seed; the spec's YAML path."""
    from adspine.data.synth import generate

    generate(folder / "data", seed=4, size=64, n_train=n_train, n_test_good=n_test_good, n_per_defect=1,
             categories=["fabric"])
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "datasets": [{"root": str(folder / "data"), "categories": "all"}],
        "backbones": [{"names": ["resnet18"], "inits": ["random"]}],
        "methods": [{"name": "padim", "settings": {"d": 20}}],
        "rd_seeds": [1], "protocol": "resize", "image_size": 64, "threads": 1, "batch_size": 4,
        "timing": {"warmup": 0, "repeats": 1, "batch_n": 2}, "examples": {"count": 1, "size": 16},
        "uncertainty": {"n_boot": 0},
    }))
    return path


def tiny_fabric(folder: Path, size: int) -> Path:
    """A synthetic 'fabric' category (12 train, 3 good and 2 per defect type in test) at ``size`` px."""
    from adspine.data.synth import generate

    generate(folder, n_train=12, n_test_good=3, n_per_defect=2, size=size, categories=["fabric"])
    return folder / "fabric"


def holm_reference(p):
    """Holm-adjusted p-values, written out step by step (the reference the report's Holm correction is checked on)."""
    import numpy as np

    order = np.argsort(p)
    adj, run = np.empty(len(p)), 0.0
    for k, i in enumerate(order):
        run = max(run, min(1.0, (len(p) - k) * p[i]))
        adj[i] = run
    return adj


def two_category_root(folder: Path) -> Path:
    """Synthetic 'fabric' and 'nut' at 64 px (6 train, 3 good and 1 per defect type in test): a study's data root."""
    from adspine.data.synth import generate

    root = folder / "data"
    generate(root, seed=3, size=64, n_train=6, n_test_good=3, n_per_defect=1, categories=["fabric", "nut"])
    return root
