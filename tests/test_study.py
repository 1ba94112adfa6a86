"""Study: spec validation, dry run, execution with resume after Ctrl-C, failed jobs, results export."""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from adspine.cli import app
from adspine.study import runner
from adspine.study.spec import SpecError, load_spec
from adspine.study.store import ResultStore

CATS = ["fabric", "nut"]
RD_SEEDS = [1, 2]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    from adspine.data.synth import generate

    root = tmp_path_factory.mktemp("synth") / "data"
    generate(root, seed=3, size=64, n_train=6, n_test_good=3, n_per_defect=1, categories=CATS)
    return root


def tiny_spec(root: Path, group_inits=("random",), **over) -> dict:
    spec = {
        "name": "tiny",
        "datasets": [{"root": str(root), "name": "synth", "categories": "all"}],
        "backbones": [{"names": ["resnet18"], "layers": "thesis", "inits": list(group_inits)}],
        "init_seed": 7,
        "methods": [{"name": "padim"}, {"name": "patchcore", "settings": {"coreset_ratio": 0.5}}],
        "rd_seeds": RD_SEEDS,
        "protocol": "resize",
        "image_size": 64,
        "threads": 1,
        "batch_size": 4,
        "timing": {"warmup": 0, "repeats": 1, "batch_n": 2},
        "examples": {"count": 2, "size": 16},
    }
    spec.update(over)
    return spec


def write(path: Path, data) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


# -- spec ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, field, words",
    [
        ({"colour": "red"}, "colour", "unknown field"),
        ({"backbones": [{"names": ["resnet19x"]}]}, "backbones[0].names", "unknown backbone 'resnet19x'"),
        ({"backbones": [{"names": ["family:Nope"]}]}, "backbones[0].names", "unknown backbone family 'Nope'"),
        ({"methods": [{"name": "padimm"}]}, "methods[0]", "unknown method 'padimm'"),
        ({"methods": [{"name": "padim", "settings": {"dd": 3}}]}, "methods[0]", "unknown setting(s) dd"),
        ({"protocol": "crop"}, "protocol", "'crop'"),
        ({"inits": ["imagenet", "pretrained"]}, "inits[1]", "unknown init 'pretrained'"),
        ({"backbones": [{"names": ["resnet18"], "inits": ["he"]}]}, "backbones[0].inits[0]", "unknown init 'he'"),
        ({"backbones": [{"names": ["resnet18"], "layers": "deep"}]}, "backbones[0].layers", "'thesis' or 'stride'"),
        ({"image_size": 8}, "image_size", "greater than or equal"),
        ({"timing": {"repeats": 3, "warm": 1}}, "timing.warm", "unknown field"),
    ],
)
def test_spec_errors_name_file_and_field(tmp_path, change, field, words):
    path = write(tmp_path / "bad.yaml", tiny_spec(tmp_path, **change))
    with pytest.raises(SpecError) as e:
        load_spec(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: {field}: "), msg
    assert words in msg


def test_spec_yaml_and_missing_file_errors(tmp_path):
    path = write(tmp_path / "broken.yaml", "name: x\ndatasets: [\n")
    with pytest.raises(SpecError, match=rf"^{path}: line \d+: not valid YAML"):
        load_spec(path)
    with pytest.raises(SpecError, match="nope.yaml: no such spec file or preset"):
        load_spec(tmp_path / "nope.yaml")


def test_presets_validate_and_expand(tmp_path):
    from adspine.backbones.registry import list_specs

    thesis = load_spec("thesis")
    jobs = runner.plan_jobs(thesis)
    assert len(jobs) == len(list_specs()) * 15  # every registry row x every MVTec AD category
    assert {m.name for m in thesis.methods} == {"padim", "spade", "patchcore"}
    assert thesis.protocol == "paper" and thesis.rd_seeds == [1024]
    assert len({j.job_id for j in jobs}) == len(jobs)
    moved = load_spec("thesis", data_root=tmp_path)
    assert moved.datasets[0].root == str(tmp_path)
    demo = load_spec("demo")
    combos = {(g, i) for grp in demo.backbones for g in grp.names for i in grp.inits}
    assert combos == {("tf_efficientnet_lite0", "imagenet"), ("tf_efficientnet_lite0", "random"),
                      ("mobilenetv2_deepsort", "imagenet"), ("mobilenetv2_deepsort", "random"),
                      ("resnet18", "random")}


def test_job_ids_stable_and_sensitive(tmp_path):
    s1 = load_spec(write(tmp_path / "a.yaml", tiny_spec(tmp_path, datasets=[{"root": "x", "categories": ["c"]}])))
    s2 = load_spec(write(tmp_path / "b.yaml", tiny_spec(tmp_path, datasets=[{"root": "x", "categories": ["c"]}])))
    s3 = load_spec(write(tmp_path / "c.yaml", tiny_spec(tmp_path, datasets=[{"root": "x", "categories": ["c"]}],
                                                       rd_seeds=[5])))
    ids = [runner.plan_jobs(s)[0].job_id for s in (s1, s2, s3)]
    assert ids[0] == ids[1] != ids[2]


def test_method_runs_and_example_picks():
    class Ext:
        channels, default_d = [64, 128, 256], 100

    spec = load_spec_dict(tiny_spec(Path("x")))
    runs = list(runner.method_runs(spec, Ext()))
    assert [(n, s) for n, _, s in runs] == [("padim", 1), ("padim", 2), ("patchcore", None)]
    assert runs[0][1]["d"] == 100 and runs[2][1]["coreset_seed"] == spec.seed
    Ext.default_d = None  # no Rd: one run, rd_seed NULL
    assert [(n, s) for n, _, s in runner.method_runs(spec, Ext())] == [("padim", None), ("patchcore", None)]
    labels, scores = np.array([0, 1, 0, 1, 1]), np.array([0.1, 0.9, 0.5, 0.2, 0.6])
    assert runner.pick_examples(labels, scores, 4) == [1, 3, 2, 0]


def load_spec_dict(d: dict):
    from adspine.study.spec import StudySpec

    return StudySpec.model_validate(d)


# -- dry run -------------------------------------------------------------------------------------------------------
def test_dry_run_lists_jobs_and_estimate(tmp_path, synth_root):
    path = write(tmp_path / "s.yaml", tiny_spec(synth_root))
    res = CliRunner().invoke(app, ["study", str(path), "--db", str(tmp_path / "r.sqlite"), "--dry-run"],
                             env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    jobs = runner.plan_jobs(load_spec(path))
    assert len(jobs) == 2
    for j in jobs:
        assert j.job_id in res.output
    assert "estimated total" in res.output and "FLOP" in res.output
    assert not (tmp_path / "r.sqlite").exists()
    est = runner.estimate_jobs(load_spec(path), jobs)
    assert all(e["seconds"] > 0 and e["data_found"] and e["n_train"] == 6 for e in est)
    assert est[0]["flops"] and est[0]["flops"] > 1e7


def test_bad_spec_on_cli_is_one_line(tmp_path):
    path = write(tmp_path / "s.yaml", tiny_spec(tmp_path, methods=["nope"]))
    res = CliRunner().invoke(app, ["study", str(path), "--dry-run"])
    assert res.exit_code == 2
    assert f"{path}: methods[0]: unknown method 'nope'" in res.output.replace("\n", "")


# -- execution: interrupt, resume, failures, export ----------------------------------------------------------------
def _result_keys(db: Path) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT job_id, method, rd_seed FROM results ORDER BY job_id, method, rd_seed").fetchall()
    finally:
        con.close()


@pytest.fixture(scope="module")
def study_db(tmp_path_factory, synth_root):
    """Run a study (2 categories x init random + a missing weights file) interrupted by Ctrl-C on its 2nd job, then
    resumed from the CLI; yields (db, spec path, calls of the first and the second run, CLI outputs)."""
    tmp = tmp_path_factory.mktemp("study")
    missing = tmp / "missing.safetensors"
    spec_path = write(tmp / "tiny.yaml", tiny_spec(synth_root, group_inits=("random", f"file:{missing}")))
    db = tmp / "results.sqlite"
    real = runner.run_job
    calls: list[list[str]] = [[], []]
    mp = pytest.MonkeyPatch()

    def interrupted(spec, job, progress=None, row=None):
        calls[0].append(job.job_id)
        if len(calls[0]) == 2:
            raise KeyboardInterrupt
        return real(spec, job, progress, row)

    mp.setattr(runner, "run_job", interrupted)
    cli = CliRunner()
    first = cli.invoke(app, ["study", str(spec_path), "--db", str(db), "--no-progress"])
    mp.setattr(runner, "run_job", lambda spec, job, progress=None, row=None: calls[1].append(job.job_id)
               or real(spec, job, progress, row))
    second = cli.invoke(app, ["study", str(spec_path), "--db", str(db), "--no-progress"])
    mp.undo()
    yield db, spec_path, calls, first, second


def test_interrupt_then_resume_loses_and_duplicates_nothing(study_db):
    db, spec_path, calls, first, second = study_db
    assert first.exit_code == 130
    assert "interrupted" in first.output and "1 finished job(s) are committed" in first.output
    jobs = runner.plan_jobs(load_spec(spec_path))
    assert len(jobs) == 4
    assert calls[0] == [jobs[0].job_id, jobs[1].job_id]
    assert calls[1] == [j.job_id for j in jobs[1:]]  # the finished job is skipped, the interrupted one reruns
    assert second.exit_code == 0, second.output
    assert "1 done, 2 failed, 1 already done (of 4)" in second.output
    keys = _result_keys(db)
    assert len(keys) == len(set(keys)) == 2 * (len(RD_SEEDS) + 1)  # 2 done jobs x (padim per seed + patchcore)
    third = CliRunner().invoke(app, ["study", str(spec_path), "--db", str(db), "--no-progress"])
    assert "0 done, 2 failed, 2 already done" in third.output  # failed jobs are retried, done ones are not
    assert _result_keys(db) == keys


def test_failed_job_recorded_and_study_goes_on(study_db):
    db, spec_path, *_ = study_db
    with ResultStore(db) as store:
        failed, done = store.jobs("failed"), store.jobs("done")
    assert [j["category"] for j in done] == CATS and [j["category"] for j in failed] == CATS
    for j in failed:
        assert j["init"].startswith("file:") and "missing.safetensors" in j["error"]
        assert j["backbone"] == "resnet18" and j["finished_at"]
    # the second run went 'fabric/file' (failed) -> 'nut/random' (done) -> 'nut/file' (failed)
    assert len(study_db[2][1]) == 3 and done[1]["job_id"] == study_db[2][1][1]


def test_results_have_all_figures_and_provenance(study_db):
    db, *_ = study_db
    with ResultStore(db) as store:
        rows = store.rows()
        job = store.jobs("done")[0]
        ex = store.examples(job["job_id"], "padim", RD_SEEDS[0])
    assert len(rows) == 6
    for r in rows:
        for k in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max"):
            assert 0.0 <= r[k] <= 1.0, (k, r[k])
        assert r["fit_s"] > 0 and r["predict_ms"] > 0 and r["peak_rss_mb"] > 50 and r["model_bytes"] > 1000
        assert r["backbone_ms_b1"] > 0 and r["backbone_ms_bn"] > 0 and r["batch_n"] == 2 and r["threads"] == 1
        assert r["params"] > 1e5 and r["flops"] > 1e7 and r["dim_a"] == 448
        assert json.loads(r["layers"]) == ["layer1", "layer2", "layer3"]
        assert r["init_seed"] == 7 and r["protocol"] == "resize" and r["image_size"] == 64
        assert "torch" in json.loads(r["versions"]) and r["host_cpu"]
        prov = json.loads(r["provenance"])
        assert prov["rd_seed"] == r["rd_seed"] and prov["init_seed"] == 7
    padim = [r for r in rows if r["method"] == "padim"]
    assert {r["rd_seed"] for r in padim} == set(RD_SEEDS) and all(r["d"] == 100 for r in padim)
    pc = [r for r in rows if r["method"] == "patchcore"]
    assert all(r["rd_seed"] is None for r in pc)
    assert json.loads(pc[0]["provenance"])["seeds"] == {"coreset_seed": 1024}
    assert len(ex) == 2 and ex[0]["amap"].dtype == np.float16 and ex[0]["amap"].shape == (16, 16)
    assert ex[0]["mask"].dtype == bool and ex[0]["label"] == 1  # most confident defective first


def test_export_csv_and_parquet_roundtrip(study_db, tmp_path):
    import pyarrow.parquet as pq

    db, *_ = study_db
    with ResultStore(db) as store:
        rows = store.rows()
    cli = CliRunner()
    for fmt in ("csv", "parquet"):
        out = tmp_path / f"r.{fmt}"
        res = cli.invoke(app, ["results", "export", "--db", str(db), "--format", fmt, "--out", str(out)])
        assert res.exit_code == 0, res.output
        if fmt == "csv":
            with out.open() as f:
                got = list(csv.DictReader(f))
        else:
            got = pq.read_table(out).to_pylist()
        assert len(got) == len(rows)
        for a, b in zip(rows, got):
            assert (a["job_id"], a["method"], a["backbone"]) == (b["job_id"], b["method"], b["backbone"])
            assert float(b["image_auroc"]) == pytest.approx(a["image_auroc"], rel=1e-12)
            assert float(b["fit_s"]) == pytest.approx(a["fit_s"], rel=1e-12)
    table = pq.read_table(tmp_path / "r.parquet")
    assert str(table.schema.field("image_auroc").type) == "double"
    assert str(table.schema.field("rd_seed").type) == "int64"
    res = cli.invoke(app, ["results", "export", "--db", str(tmp_path / "none.sqlite"), "--out", "x.csv"])
    assert res.exit_code == 2 and "none.sqlite: no such results store" in res.output


def test_cflow_runs_in_a_study_with_training_time_as_fit_time(tmp_path, synth_root):
    """CFLOW goes through the same runner as the other methods: fit_s is its training time, metrics are stored."""
    spec = tiny_spec(
        synth_root,
        datasets=[{"root": str(synth_root), "name": "synth", "categories": ["fabric"]}],
        methods=[{"name": "cflow", "settings": {"epochs": 2, "coupling_blocks": 2, "pos_dim": 16, "fibre_batch": 128}}],
        rd_seeds=[1],
    )
    db = tmp_path / "cflow.sqlite"
    runner.run_study(load_spec(write(tmp_path / "c.yaml", spec)), db, show_progress=False)
    rows = ResultStore(db).rows()
    assert [r["method"] for r in rows] == ["cflow"] and rows[0]["rd_seed"] is None
    row = rows[0]
    assert row["fit_s"] > 0 and row["predict_ms"] > 0 and row["model_bytes"] > 0
    assert 0.0 <= row["image_auroc"] <= 1.0 and 0.0 <= row["pixel_auroc"] <= 1.0
    assert len(json.loads(row["provenance"])["extra_state"]["epoch_losses"]) == 2
