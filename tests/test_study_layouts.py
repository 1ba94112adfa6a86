"""Studies on every dataset layout, on image-level data and on wide images, end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from adspine.study.plan import plan
from adspine.study.spec import StudySpec
from adspine.study.store import ResultStore


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def study(root: Path, fmt: str, categories="all", methods=None, size=64, **over) -> StudySpec:
    return StudySpec.model_validate({
        "name": f"layout-{fmt}",
        "datasets": [{"root": str(root), "categories": categories, "format": fmt}],
        "backbones": [{"names": ["resnet18"], "inits": ["random"]}],
        "init_seed": 3,
        "methods": methods or [{"name": "padim", "settings": {"d": 40}}],
        "rd_seeds": [1], "protocol": "resize", "image_size": size, "threads": 1, "batch_size": 4,
        "timing": {"warmup": 0, "repeats": 1, "batch_n": 2}, "examples": {"count": 1, "size": 16},
        "uncertainty": {"n_boot": 0}, **over,
    })


def rows_of(spec: StudySpec, db: Path) -> list[dict]:
    summary = plan(spec).run(db)
    assert summary.ok and summary.done == 1, summary
    with ResultStore(db, readonly=True) as store:
        return store.rows()


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory) -> Path:
    from adspine.data.synth import generate

    root = tmp_path_factory.mktemp("layouts") / "mvtec"
    generate(root, seed=11, size=64, n_train=6, n_test_good=3, n_per_defect=2, categories=["fabric"])
    return root


def test_every_layout_gives_the_mvtec_numbers(tmp_path, mvtec_root):
    from adspine.data.convert import export_layout

    ref = rows_of(study(mvtec_root, "mvtec", ["fabric"]), tmp_path / "mvtec.sqlite")[0]
    assert ref["pixel_auroc"] is not None
    for fmt in ("visa", "folder", "manifest"):
        root = export_layout(mvtec_root, "fabric", tmp_path / fmt, fmt)
        (row,) = rows_of(study(root, fmt), tmp_path / f"{fmt}.sqlite")
        assert row["dataset_format"] == fmt and row["n_test"] == ref["n_test"]
        for k in ("image_auroc", "pixel_auroc", "aupro"):
            assert row[k] == pytest.approx(ref[k], abs=1e-9), (fmt, k)


def test_image_level_study_stores_pixel_metrics_as_absent(tmp_path):
    from adspine.data.synth import generate

    root = tmp_path / "nomasks"
    generate(root, seed=12, size=64, n_train=6, n_test_good=3, n_per_defect=2, categories=["wood"], masks=False)
    db = tmp_path / "r.sqlite"
    (row,) = rows_of(study(root, "auto", uncertainty={"n_boot": 20}), db)
    assert row["pixel_level"] == 0
    assert row["image_auroc"] is not None and 0 <= row["image_auroc"] <= 1
    for k in ("pixel_auroc", "aupro", "pixel_f1_max", "pixel_auroc_lo", "aupro_hi"):
        assert row[k] is None, k  # absent (NULL), not 0
    from adspine.report import build_report

    html = build_report(db, tmp_path / "report")
    text = Path(html).read_text()
    assert "image ROC-AUC" in text


def test_wide_images_run_every_method_and_maps_line_up_with_the_defect(tmp_path):
    """4:1 images at [64, 256]: a bright square at a known place in otherwise constant noise textures must be
    where each method's map peaks."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "wide" / "strip"
    h, w = 64, 256

    def texture() -> np.ndarray:
        return (120 + 20 * rng.standard_normal((h, w, 3))).clip(0, 255)

    for split, n in (("train/good", 8), ("test/good", 3)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(texture().astype(np.uint8)).save(root / split / f"{i:03d}.png")
    (root / "test/spot").mkdir(parents=True)
    (root / "ground_truth/spot").mkdir(parents=True)
    spots = [(20, 190), (30, 40), (12, 120)]  # (row, col) of the top-left corner, far apart along the strip
    for i, (r, c) in enumerate(spots):
        img, mask = texture(), np.zeros((h, w), np.uint8)
        img[r:r + 16, c:c + 16] = 255
        mask[r:r + 16, c:c + 16] = 255
        Image.fromarray(img.astype(np.uint8)).save(root / "test/spot" / f"{i:03d}.png")
        Image.fromarray(mask).save(root / "ground_truth/spot" / f"{i:03d}_mask.png")
    methods = [{"name": "padim", "settings": {"d": 40}}, {"name": "patchcore", "settings": {"coreset_ratio": 0.5}},
               {"name": "spade", "settings": {"k": 3}}]
    spec = study(root.parent, "mvtec", ["strip"], methods=methods, size=[h, w],
                 examples={"count": 6, "size": 32})
    db = tmp_path / "wide.sqlite"
    summary = plan(spec).run(db)
    assert summary.ok, summary
    with ResultStore(db, readonly=True) as store:
        rows = {r["method"]: r for r in store.rows()}
        assert set(rows) == {"padim", "patchcore", "spade"}
        for name, r in rows.items():
            assert (r["image_height"], r["image_width"]) == (h, w)
            assert r["image_auroc"] == 1.0, name
            for ex in store.examples(r["job_id"], name, r["rd_seed"]):
                if ex["label"] != 1:
                    continue
                amap, mask = ex["amap"].astype(np.float32), ex["mask"]
                assert amap.shape == mask.shape == (32, 128)  # the 4:1 aspect kept
                peak = np.unravel_index(np.argmax(amap), amap.shape)
                rows_, cols_ = np.nonzero(mask)
                # the map's maximum lies on (or within two cells of) the defect, in the right part of the strip
                assert rows_.min() - 2 <= peak[0] <= rows_.max() + 2, (name, peak)
                assert cols_.min() - 2 <= peak[1] <= cols_.max() + 2, (name, peak)
