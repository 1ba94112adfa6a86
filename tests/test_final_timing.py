"""Final round-robin timing: recorded once per backbone configuration at the end of a study, used by the report's
speed figures (total = final backbone minimum + the method's per-job minimum), with a note when the load exceeded
the cores; skipped after an interruption; reports of stores without it keep working."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch

from adspine.study.plan import plan
from adspine.study.store import ResultStore
from study_fixtures import two_category_root

BACKBONES = ["resnet18", "mobilenet_v3_small"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    return two_category_root(tmp_path_factory.mktemp("synth"))


def spec_file(folder: Path, root: Path, **timing) -> Path:
    import yaml

    spec = {"name": "tiny-final", "datasets": [{"root": str(root), "name": "synth"}],
            "backbones": [{"names": BACKBONES, "inits": ["random"]}], "methods": [{"name": "padim"}],
            "rd_seeds": [1], "protocol": "resize", "image_size": 64, "threads": 1, "batch_size": 4,
            "timing": {"warmup": 0, "repeats": 2, "batch_n": 2, "budget_s": 0.01, "final_budget_s": 0.01, **timing},
            "examples": {"count": 1, "size": 16}, "uncertainty": {"n_boot": 0}, "baselines": False}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def study_db(tmp_path_factory, synth_root) -> Path:
    """A finished tiny study: 2 categories x 2 backbones = 4 jobs, 2 backbone configurations."""
    folder = tmp_path_factory.mktemp("study")
    summary = plan(spec_file(folder, synth_root)).run(folder / "r.sqlite")
    assert summary.done == 4 and summary.ok
    return folder / "r.sqlite"


def copy_store(db: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy.sqlite"
    shutil.copy(db, out)
    return out


def method_minimum(db: Path, backbone: str) -> float:
    """The method's per-job minimum predict ms/img, read straight from the tables."""
    con = sqlite3.connect(db)
    (v,) = con.execute("SELECT MIN(r.predict_ms_min) FROM results r JOIN jobs j ON j.job_id = r.job_id "
                       "WHERE j.backbone = ? AND j.status = 'done'", (backbone,)).fetchone()
    con.close()
    return float(v)


def add_final_row(db: Path, backbone: str, b1_ms: float, load: float, cores: int, timed_at: str) -> None:
    """A final-timing row for ``backbone``'s configuration, its keys copied from the job rows."""
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    job = dict(con.execute("SELECT * FROM jobs WHERE backbone = ? AND status = 'done'", (backbone,)).fetchone())
    con.execute("INSERT INTO final_timing (study, timed_at, backbone, init, precision, layers, image_height, "
                "image_width, device, threads, backbone_ms_b1_min, backbone_ms_b1, load_before, load_after, cores, "
                "configurations, repeats) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 2, 5)",
                (job["study"], timed_at, backbone, job["init"], job["precision"], job["layers"], job["image_height"],
                 job["image_width"], job["device"], job["timing_threads"], b1_ms, b1_ms + 1.0, load, load, cores))
    con.commit()
    con.close()


def entries_of(db: Path) -> dict[str, dict]:
    from adspine.report.tables import ranking

    with ResultStore(db, readonly=True) as store:
        return {e["backbone"]: e for e in ranking(store.rows(), store.final_timings())}


def test_study_records_one_final_timing_row_per_backbone_configuration(study_db):
    with ResultStore(study_db, readonly=True) as store:
        final = store.final_timings()
        jobs = store.jobs("done")
    assert sorted(f["backbone"] for f in final) == sorted(BACKBONES)  # 4 jobs, timed once per configuration
    assert len({f["timed_at"] for f in final}) == 1 and {f["configurations"] for f in final} == {2}
    for f in final:
        mine = [j for j in jobs if j["backbone"] == f["backbone"]]
        assert {json.dumps(json.loads(j["layers"])) for j in mine} == {f["layers"]}
        assert (f["study"], f["init"], f["precision"], f["image_height"], f["image_width"], f["device"]) == \
            ("tiny-final", "random", "fp32", 64, 64, "cpu")
        assert {j["timing_threads"] for j in mine} == {f["threads"]} == {1}
        assert f["cores"] == len(os.sched_getaffinity(0))
        assert f["load_before"] is not None and f["load_after"] is not None
        assert f["batch_n"] == 2 and 1 <= f["repeats"] <= 2  # spec: repeats 2
        assert 0 < f["backbone_ms_b1_min"] <= f["backbone_ms_b1"] and 0 < f["backbone_ms_bn_min"]
    entries = entries_of(study_db)
    assert {e["latency_basis"] for e in entries.values()} == {"final round-robin"}


def test_rerun_with_nothing_to_do_does_not_time_again(study_db, tmp_path, synth_root):
    db = copy_store(study_db, tmp_path)
    summary = plan(spec_file(tmp_path, synth_root)).run(db)
    assert summary.skipped == 4 and summary.done == 0
    with ResultStore(db, readonly=True) as store:
        assert len(store.final_timings()) == 2


def test_ranking_total_is_the_latest_final_minimum_plus_the_method_minimum(study_db, tmp_path):
    db = copy_store(study_db, tmp_path)
    add_final_row(db, "resnet18", 1000.0, 0.5, 8, "2999-01-01T00:00:00+00:00")
    add_final_row(db, "resnet18", 7.25, 0.5, 8, "2999-01-02T00:00:00+00:00")  # the latest run wins
    e = entries_of(db)["resnet18"]
    assert e["total_ms_b1"] == pytest.approx(7.25 + method_minimum(db, "resnet18"))
    assert e["final_ms_b1"] == 7.25 and e["latency_basis"] == "final round-robin"
    assert e["total_ms_b1_median"] == pytest.approx(8.25 + e["predict_ms"])
    from adspine.report.tables import ranking_cells

    assert "7.2" in ranking_cells(e)  # the backbone column shows the figure the total rests on


def test_final_row_of_another_configuration_is_not_used(study_db, tmp_path):
    db = copy_store(study_db, tmp_path)
    con = sqlite3.connect(db)
    con.execute("DELETE FROM final_timing")
    con.commit()
    con.close()
    add_final_row(db, "resnet18", 7.25, 0.5, 8, "2999-01-01T00:00:00+00:00")
    con = sqlite3.connect(db)
    con.execute("UPDATE final_timing SET image_height = 128, image_width = 128")  # a different input size
    con.commit()
    con.close()
    e = entries_of(db)["resnet18"]
    assert e["latency_basis"] == "minimum" and e.get("final_ms_b1") is None
    con = sqlite3.connect(db)
    (b1,) = con.execute("SELECT MIN(backbone_ms_b1_min) FROM jobs WHERE backbone = 'resnet18'").fetchone()
    con.close()
    assert e["total_ms_b1"] == pytest.approx(b1 + method_minimum(db, "resnet18"))


@pytest.mark.parametrize("load, cores, noted", [(50.0, 2, True), (0.5, 2, False)])
def test_load_above_the_cores_is_said_beside_the_figures(study_db, tmp_path, load, cores, noted):
    from adspine.report import build_report
    from adspine.report.recommend import recommend
    from adspine.report.tables import ranking_note

    db = copy_store(study_db, tmp_path)
    for bb in BACKBONES:
        add_final_row(db, bb, 5.0, load, cores, "2999-01-01T00:00:00+00:00")
    entries = list(entries_of(db).values())
    assert {e["final_load"] for e in entries} == {load}
    note = "exceeded the 2 usable core(s)"
    assert (note in ranking_note(entries)) is noted
    assert (note in recommend(entries, None).text) is noted
    html = build_report(db, tmp_path / "report").read_text()
    assert (note in html) is noted
    assert (note in (tmp_path / "report" / "recommendation.md").read_text()) is noted
    assert "final round-robin" in html


def test_report_works_for_a_store_without_final_timing(study_db, tmp_path):
    from adspine.report import build_report

    db = copy_store(study_db, tmp_path)
    con = sqlite3.connect(db)
    con.execute("DROP TABLE final_timing")
    con.commit()
    con.close()
    assert {e["latency_basis"] for e in entries_of(db).values()} == {"minimum"}
    assert build_report(db, tmp_path / "report").is_file()
    with ResultStore(db, readonly=True) as store:
        assert store.final_timings() == []


def test_interrupted_study_is_not_timed_and_final_false_is_not_timed(tmp_path, synth_root):
    from adspine.study.executors import InProcessExecutor

    class StopAfterOneJob(InProcessExecutor):
        def run(self, spec, jobs, claims, progress=None):
            super().run(spec, jobs[:1], claims, progress)
            raise KeyboardInterrupt

    db = tmp_path / "r.sqlite"
    with pytest.raises(KeyboardInterrupt):
        plan(spec_file(tmp_path, synth_root)).run(db, executor=StopAfterOneJob())
    with ResultStore(db, readonly=True) as store:
        assert len(store.done_job_ids()) == 1 and store.final_timings() == []
    summary = plan(spec_file(tmp_path, synth_root, final=False)).run(db)
    assert summary.done == 3
    with ResultStore(db, readonly=True) as store:
        assert store.final_timings() == []
