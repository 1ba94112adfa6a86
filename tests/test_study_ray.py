"""Ray executor: a tiny study on a local Ray instance (2 CPUs) writes the same results as the in-process run."""

from __future__ import annotations


import pytest
import torch

from adspine.study.plan import plan
from adspine.study.spec import StudySpec
from adspine.study.store import ResultStore

ray = pytest.importorskip("ray")


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Keep every Ray node, cluster and connection of these tests on 127.0.0.1: Ray otherwise picks this machine's
    network address, and a plain ``ray.init()`` joins whatever cluster another test started (its address file)."""
    import ray._private.services as services

    monkeypatch.setattr(services, "get_node_ip_address", lambda address=None: "127.0.0.1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")

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

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
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


def _stand_in_job(node_to_lose: str, marks: str):
    """A Ray task body that, on the node to lose, says so and waits there for the node's end; elsewhere the real
    job (a closure: Ray ships it to the workers by value)."""

    def job_fn(spec_dict, job, threads):
        import time
        from pathlib import Path

        import ray as ray_

        from adspine.study.executors import _ray_job

        if ray_.get_runtime_context().get_node_id() == node_to_lose:
            Path(marks, job.job_id).write_text("on the node to lose")
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:  # until the node is removed under it
                time.sleep(0.1)
            raise RuntimeError("the node was never removed")
        return _ray_job(spec_dict, job, threads)

    return job_fn


@pytest.mark.slow
def test_lost_worker_node_is_retried_and_every_job_ends_done(spec, tmp_path, monkeypatch):
    """A two-node cluster on loopback; the worker node dies while running a job: the job runs again elsewhere."""
    import threading
    import time

    from ray.cluster_utils import Cluster

    from adspine.study.executors import RayExecutor

    one = spec.model_copy(update={"methods": spec.methods[:1], "rd_seeds": [1], "uncertainty": spec.uncertainty})
    marks = tmp_path / "marks"
    marks.mkdir()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        assert cluster.address.startswith("127.0.0.1:"), cluster.address
        ray.init(address=cluster.address, log_to_driver=False, _node_ip_address="127.0.0.1")
        removed = threading.Event()

        def lose_the_node() -> None:
            deadline = time.monotonic() + 300
            while not any(marks.iterdir()) and time.monotonic() < deadline:
                time.sleep(0.1)
            if any(marks.iterdir()):
                cluster.remove_node(worker, allow_graceful=False)
                removed.set()

        killer = threading.Thread(target=lose_the_node, daemon=True)
        killer.start()
        ex = RayExecutor(max_in_flight=2, job_fn=_stand_in_job(worker.node_id, str(marks)))
        summary = plan(one).run(tmp_path / "r.sqlite", executor=ex)
        killer.join(timeout=60)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert removed.is_set()
    (lost,) = [p.name for p in marks.iterdir()]
    assert (summary.done, summary.failed, summary.killed, len(summary.retried)) == (2, 0, 0, 1)
    with ResultStore(tmp_path / "r.sqlite") as store:
        jobs = {j["job_id"]: j for j in store.jobs()}
    assert all(j["status"] == "done" for j in jobs.values())
    assert (jobs[lost]["attempts"], jobs[lost]["kills"]) == (2, 1)
