"""Ray executor: a tiny study on a local Ray instance (2 CPUs) writes the same results as the in-process run."""

from __future__ import annotations

import os

import pytest
import torch

from adspine.study.plan import plan
from adspine.study.spec import StudySpec
from adspine.study.store import ResultStore

ray = pytest.importorskip("ray")

METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "image_auroc_lo", "aupro_lo")


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> StudySpec:
    from adspine.data.synth import generate

    root = tmp_path_factory.mktemp("ray") / "data"
    generate(root, seed=5, size=64, n_train=6, n_test_good=3, n_per_defect=1, categories=["wood", "chip"])
    return StudySpec.model_validate({
        "name": "tiny-ray",
        "datasets": [{"root": str(root), "categories": "all"}],
        "backbones": [{"names": ["resnet18"], "inits": ["random"]}],
        "methods": ["padim", {"name": "patchcore", "settings": {"coreset_ratio": 0.5}}],
        "rd_seeds": [1, 2],
        "protocol": "resize", "image_size": 64, "threads": 1, "batch_size": 4,
        "timing": {"warmup": 0, "repeats": 1, "batch_n": 2}, "uncertainty": {"n_boot": 20},
        "examples": {"count": 2, "size": 16},
    })


def _by_key(db) -> dict:
    with ResultStore(db) as store:
        return {(r["job_id"], r["method"], r["rd_seed"]): r for r in store.rows()}


def test_ray_executor_matches_inprocess(spec, tmp_path):
    torch.set_num_threads(1)
    local = plan(spec).run(tmp_path / "local.sqlite")
    assert (local.done, local.failed) == (2, 0)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = plan(spec).run(tmp_path / "ray.sqlite", executor="ray")
    finally:
        ray.shutdown()
    assert (remote.done, remote.failed) == (2, 0)

    a, b = _by_key(tmp_path / "local.sqlite"), _by_key(tmp_path / "ray.sqlite")
    assert a.keys() == b.keys() and len(a) == 2 * 3
    for k in a:
        for m in METRICS:
            assert b[k][m] == pytest.approx(a[k][m], rel=1e-9, abs=1e-12), (k, m)
        for c in ("d", "settings", "dim_a", "params", "flops", "n_train", "n_test", "layers", "init_seed"):
            assert b[k][c] == a[k][c], (k, c)
        assert b[k]["fit_s"] > 0 and b[k]["backbone_ms_b1"] > 0  # timings measured in the workers
    with ResultStore(tmp_path / "ray.sqlite") as store:
        job = store.jobs("done")[0]
        assert len(store.examples(job["job_id"], "padim", 1)) == 2
