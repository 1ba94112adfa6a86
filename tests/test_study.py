"""Study: spec validation (every error), the plan checked before any work, dry run, execution with resume after
Ctrl-C, failed jobs and methods, killed jobs, two runners on one store, store and export errors."""

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
from adspine.study import job as jobmod
from adspine.study.plan import PlanError, expand, plan
from adspine.study.spec import SpecError, load_spec
from adspine.study.store import ResultStore
from study_fixtures import two_category_root

RD_SEEDS = [1, 2]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    return two_category_root(tmp_path_factory.mktemp("synth"))


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
        ({"image_size": 8}, "image_size", "image sides must be >= 32 px"),
        ({"timing": {"repeats": 3, "warm": 1}}, "timing.warm", "unknown field"),
        ({"methods": [{"name": "padim", "settings": {"d": "fifty"}}]}, "methods[0]", "settings.d: 'fifty'"),
        ({"methods": [{"name": "padim", "settings": {"d": 0}}]}, "methods[0]", "d must be a positive"),
        ({"rd": "numpy"}, "rd", "'numpy'"),
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


def test_spec_shows_every_error_one_per_line(tmp_path):
    path = write(tmp_path / "bad.yaml", {"name": "x", "colour": "red", "protocol": "crop", "image_size": 8})
    with pytest.raises(SpecError) as e:
        load_spec(path)
    lines = str(e.value).splitlines()
    fields = [ln.split(": ")[1] for ln in lines]
    assert all(ln.startswith(f"{path}: ") for ln in lines)
    assert {"datasets", "backbones", "methods", "colour", "protocol", "image_size"} <= set(fields)


def test_presets_validate_and_expand(tmp_path):
    from adspine.backbones.registry import list_specs

    thesis = load_spec("thesis")
    jobs = expand(thesis)
    assert len(jobs) == len(list_specs()) * 15  # every registry row x every MVTec AD category
    assert {m.name for m in thesis.methods} == {"padim", "spade", "patchcore"}
    assert thesis.protocol == "paper" and thesis.rd_seeds == [1024] and thesis.rd == "reference"
    assert len({j.job_id for j in jobs}) == len(jobs)
    moved = load_spec("thesis", data_root=tmp_path)
    assert moved.datasets[0].root == str(tmp_path)
    demo = load_spec("demo")
    combos = {(g, i) for grp in demo.backbones for g in grp.names for i in grp.inits}
    assert combos == {("tf_efficientnet_lite0", "imagenet"), ("tf_efficientnet_lite0", "random"),
                      ("mobilenetv2_deepsort", "imagenet"), ("mobilenetv2_deepsort", "random"),
                      ("resnet18", "random")}


def test_study_show_prints_a_preset_that_loads_back(tmp_path):
    res = CliRunner().invoke(app, ["study", "show", "demo"])
    assert res.exit_code == 0, res.output
    path = write(tmp_path / "mine.yaml", res.output)
    assert load_spec(path).name == "demo"
    assert "thesis" in CliRunner().invoke(app, ["study", "show"]).output


def test_job_ids_stable_and_sensitive(tmp_path):
    s1 = load_spec(write(tmp_path / "a.yaml", tiny_spec(tmp_path, datasets=[{"root": "x", "categories": ["c"]}])))
    s2 = load_spec(write(tmp_path / "b.yaml", tiny_spec(tmp_path, datasets=[{"root": "x", "categories": ["c"]}])))
    s3 = load_spec(write(tmp_path / "c.yaml", tiny_spec(tmp_path, datasets=[{"root": "x", "categories": ["c"]}],
                                                       rd_seeds=[5])))
    s4 = load_spec(write(tmp_path / "d.yaml", tiny_spec(tmp_path, datasets=[{"root": "x", "categories": ["c"]}],
                                                       rd="torch")))
    ids = [expand(s)[0].job_id for s in (s1, s2, s3, s4)]
    assert ids[0] == ids[1] != ids[2] and ids[3] not in ids[:3]


def test_method_runs_and_example_picks():
    spec = load_spec_dict(tiny_spec(Path("x")))
    runs = list(jobmod.method_runs(spec, 448, 100))
    assert [(n, s) for n, _, s in runs] == [("padim", 1), ("padim", 2), ("patchcore", None)]
    assert runs[0][1]["d"] == 100 and runs[0][1]["rd_scheme"] == "reference"
    assert runs[2][1]["coreset_seed"] == spec.seed
    # no Rd (no default d, or d >= the channels there are): one run, rd_seed NULL, d = all channels
    assert [(n, s) for n, _, s in jobmod.method_runs(spec, 448, None)] == [("padim", None), ("patchcore", None)]
    big = load_spec_dict(tiny_spec(Path("x"), methods=[{"name": "padim", "settings": {"d": 5000}}]))
    (name, settings, seed), = jobmod.method_runs(big, 448, 100)
    assert settings["d"] is None and seed is None
    labels, scores = np.array([0, 1, 0, 1, 1]), np.array([0.1, 0.9, 0.5, 0.2, 0.6])
    assert jobmod.pick_examples(labels, scores, 4) == [1, 3, 2, 0]


def load_spec_dict(d: dict):
    from adspine.study.spec import StudySpec

    return StudySpec.model_validate(d)


# -- the plan: every problem before any work --------------------------------------------------------------------
def test_dry_run_lists_jobs_and_estimate(tmp_path, synth_root):
    path = write(tmp_path / "s.yaml", tiny_spec(synth_root))
    res = CliRunner().invoke(app, ["study", str(path), "--db", str(tmp_path / "r.sqlite"), "--dry-run"],
                             env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    p = plan(path)
    assert len(p.jobs) == 2
    for j in p.jobs:
        assert j.job_id in res.output
    assert "estimated total" in res.output and "FLOP" in res.output
    assert not (tmp_path / "r.sqlite").exists()
    est = p.estimate()
    assert all(e["seconds"] > 0 and e["data_found"] and e["n_train"] == 6 for e in est)
    assert est[0]["flops"] and est[0]["flops"] > 1e7


def test_bad_spec_on_cli_is_one_line(tmp_path):
    path = write(tmp_path / "s.yaml", tiny_spec(tmp_path, methods=["nope"]))
    res = CliRunner().invoke(app, ["study", str(path), "--dry-run"])
    assert res.exit_code == 2
    assert f"{path}: methods[0]: unknown method 'nope'" in res.output.replace("\n", "")


@pytest.mark.parametrize("case", ["offline-weights", "cuda", "missing-root", "missing-file"])
def test_plan_stops_before_any_work(tmp_path, synth_root, monkeypatch, case):
    over: dict = {}
    if case == "offline-weights":  # torchvision ImageNet weights, not cached, machine offline
        monkeypatch.setenv("ADSPINE_OFFLINE", "1")
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
        over = {"backbones": [{"names": ["resnet18"], "inits": ["imagenet"]}]}
        words = "resnet18"
    elif case == "cuda":
        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA device")
        over, words = {"device": "cuda"}, "no CUDA device"
    elif case == "missing-root":
        over = {"datasets": [{"root": str(tmp_path / "nowhere"), "categories": ["fabric"]}]}
        words = "nowhere: dataset folder not found"
    else:
        over = {"backbones": [{"names": ["resnet18"], "inits": [f"file:{tmp_path / 'w.safetensors'}"]}]}
        words = "w.safetensors: weights file not found"
    path = write(tmp_path / "s.yaml", tiny_spec(synth_root, **over))
    with pytest.raises(PlanError) as e:
        plan(path)
    assert words in str(e.value)
    assert all(line.strip() for line in e.value.problems)
    db = tmp_path / "r.sqlite"
    res = CliRunner().invoke(app, ["study", str(path), "--db", str(db), "--no-progress"])
    assert res.exit_code == 2 and words in res.output.replace("\n", "")
    assert not db.exists()  # stopped before any work


def test_plan_lists_every_problem_at_once(tmp_path):
    spec = tiny_spec(tmp_path, datasets=[{"root": str(tmp_path / "nowhere"), "categories": ["a"]}],
                     backbones=[{"names": ["resnet18"], "inits": [f"file:{tmp_path / 'w.pth'}"]}])
    with pytest.raises(PlanError) as e:
        plan(write(tmp_path / "s.yaml", spec))
    assert len(e.value.problems) == 2
    assert "nowhere" in e.value.problems[0] and "w.pth" in e.value.problems[1]


def test_help_imports_no_torch_or_matplotlib():
    import subprocess
    import sys

    code = ("import sys\nfrom typer.testing import CliRunner\nfrom adspine.cli import app\n"
            "r = CliRunner().invoke(app, ['--help'])\nassert r.exit_code == 0, r.output\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'matplotlib', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    ver = subprocess.run([sys.executable, "-m", "adspine.cli", "--version"], capture_output=True, text=True)
    assert ver.returncode == 0 and ver.stdout.startswith("adspine ")


# -- execution: interrupt, resume, failures, export ----------------------------------------------------------------
def _result_keys(db: Path) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT job_id, method, rd_seed FROM results ORDER BY job_id, method, rd_seed").fetchall()
    finally:
        con.close()


@pytest.fixture(scope="module")
def study_db(tmp_path_factory, synth_root):
    """Run a study (2 categories x init random, kaiming_normal) interrupted by Ctrl-C on its 2nd job, then resumed
    from the CLI with the 'nut' jobs failing inside; yields (db, spec path, calls of both runs, CLI outputs)."""
    tmp = tmp_path_factory.mktemp("study")
    spec_path = write(tmp / "tiny.yaml", tiny_spec(synth_root, group_inits=("random", "kaiming_normal")))
    db = tmp / "results.sqlite"
    real = jobmod.run_job
    calls: list[list[str]] = [[], []]
    mp = pytest.MonkeyPatch()

    def interrupted(spec, job, progress=None, row=None, on_result=None):
        calls[0].append(job.job_id)
        if len(calls[0]) == 2:
            raise KeyboardInterrupt
        return real(spec, job, progress, row, on_result)

    def nut_fails(spec, job, progress=None, row=None, on_result=None):
        calls[1].append(job.job_id)
        if job.category == "nut" and job.init == "kaiming_normal":
            raise RuntimeError("simulated failure inside the job")
        return real(spec, job, progress, row, on_result)

    mp.setattr(jobmod, "run_job", interrupted)
    cli = CliRunner()
    first = cli.invoke(app, ["study", str(spec_path), "--db", str(db), "--no-progress"])
    mp.setattr(jobmod, "run_job", nut_fails)
    second = cli.invoke(app, ["study", str(spec_path), "--db", str(db), "--no-progress"])
    keys_after_second = _result_keys(db)
    mp.undo()
    third = cli.invoke(app, ["study", str(spec_path), "--db", str(db), "--no-progress"])  # retries the failed job
    yield db, spec_path, calls, first, second, third, keys_after_second


def test_interrupt_then_resume_loses_and_duplicates_nothing(study_db):
    db, spec_path, calls, first, second, third, keys = study_db
    assert first.exit_code == 130
    assert "interrupted" in first.output and "1 finished job(s) are committed" in first.output
    jobs = plan(spec_path).jobs
    assert len(jobs) == 4
    assert calls[0] == [jobs[0].job_id, jobs[1].job_id]
    assert calls[1] == [j.job_id for j in jobs[1:]]  # the finished job is skipped, the interrupted one reruns
    assert second.exit_code == 1, second.output  # a failed job makes the run exit non-zero
    assert "2 done, 1 failed, 1 already done (of 4)" in second.output
    assert len(keys) == len(set(keys)) == 3 * (len(RD_SEEDS) + 1)  # 3 done jobs x (padim per seed + patchcore)
    assert third.exit_code == 0 and "1 done, 0 failed, 3 already done" in third.output  # failed job retried
    assert len(_result_keys(db)) == 4 * (len(RD_SEEDS) + 1)


def test_failed_job_recorded_with_its_layers(study_db):
    db, spec_path, calls, first, second, *_ = study_db
    out = second.output.replace("\n", " ")
    assert "job failed" in out and "simulated failure inside the job" in out and "[layers thesis]" in out
    with ResultStore(db, readonly=True) as store:
        jobs = {j["job_id"]: j for j in store.jobs()}
    failed_id = calls[1][2]
    # the third run retried it: now done, attempt 2
    assert jobs[failed_id]["status"] == "done" and jobs[failed_id]["attempts"] == 2


def test_results_have_all_figures_and_provenance(study_db):
    db, *_ = study_db
    with ResultStore(db) as store:
        rows = store.rows()
        job = store.jobs("done")[0]
        ex = store.examples(job["job_id"], "padim", RD_SEEDS[0])
    assert len(rows) == 12
    for r in rows:
        for k in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max"):
            assert 0.0 <= r[k] <= 1.0, (k, r[k])
        assert r["image_auroc_lo"] <= r["image_auroc"] <= r["image_auroc_hi"]
        assert r["pixel_auroc_lo"] <= r["pixel_auroc_hi"] and r["aupro_lo"] <= r["aupro_hi"]
        assert r["fit_s"] > 0 and 0 < r["predict_ms_min"] <= r["predict_ms"] and r["model_bytes"] > 1000
        assert r["peak_rss_mb"] > 50 and r["method_peak_mb"] >= 0 and r["memory_source"] in ("VmHWM", "sampler")
        assert 0 < r["backbone_ms_b1_min"] <= r["backbone_ms_b1"] and 0 < r["backbone_ms_bn_min"] <= r["backbone_ms_bn"]
        assert r["batch_n"] == 2 and r["threads"] == 1 and r["timing_repeats"] >= 1
        assert r["params"] > 1e5 and r["flops"] > 1e7 and r["dim_a"] == 448
        assert json.loads(r["layers"]) == ["layer1", "layer2", "layer3"]
        assert r["init_seed"] == 7 and r["protocol"] == "resize" and r["image_size"] == 64
        assert (r["image_height"], r["image_width"]) == (64, 64) and r["pixel_level"] == 1
        assert "torch" in json.loads(r["versions"]) and r["host_cpu"]
        assert len(r["test_scores"]) == len(r["test_labels"]) == r["n_test"]
        prov = json.loads(r["provenance"])
        assert prov["rd_seed"] == r["rd_seed"] and prov["init_seed"] == 7
    padim = [r for r in rows if r["method"] == "padim"]
    assert {r["rd_seed"] for r in padim} == set(RD_SEEDS) and all(r["d"] == 100 for r in padim)
    assert all(r["rd_scheme"] == "reference" for r in padim)
    pc = [r for r in rows if r["method"] == "patchcore"]
    assert all(r["rd_seed"] is None for r in pc)
    assert json.loads(pc[0]["provenance"])["seeds"] == {"coreset_seed": 1024}
    assert len(ex) == 2 and ex[0]["amap"].dtype == np.float16 and ex[0]["amap"].shape == (16, 16)
    assert ex[0]["mask"].dtype == bool and ex[0]["label"] == 1  # most confident defective first
    with ResultStore(db) as store:
        assert "tiny" in store.study_specs() and "padim" in store.study_specs()["tiny"]


def test_one_bad_method_keeps_the_others(tmp_path, synth_root):
    # PaDiM without regulariser on 6 images of 100 channels: the covariance is singular, its fit really fails
    spec = tiny_spec(synth_root, datasets=[{"root": str(synth_root), "categories": ["fabric"]}],
                     methods=[{"name": "patchcore", "settings": {"coreset_ratio": 0.5}},
                              {"name": "padim", "settings": {"eps": 0.0}}], rd_seeds=[1])
    db = tmp_path / "r.sqlite"
    res = CliRunner().invoke(app, ["study", str(write(tmp_path / "s.yaml", spec)), "--db", str(db), "--no-progress"])
    assert res.exit_code == 1, res.output
    assert "1 method run(s) failed" in res.output.replace("\n", " ")
    with ResultStore(db) as store:
        ok, bad = store.rows(), store.failed_results()
    assert [r["method"] for r in ok] == ["patchcore"]
    assert [r["method"] for r in bad] == ["padim"] and "positive definite" in bad[0]["error"]
    assert bad[0]["image_auroc"] is None


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
    summary = plan(write(tmp_path / "c.yaml", spec)).run(db)
    assert summary.ok and summary.done == 1
    rows = ResultStore(db).rows()
    assert [r["method"] for r in rows] == ["cflow"] and rows[0]["rd_seed"] is None
    row = rows[0]
    assert row["fit_s"] > 0 and row["predict_ms"] > 0 and row["model_bytes"] > 0
    assert 0.0 <= row["image_auroc"] <= 1.0 and 0.0 <= row["pixel_auroc"] <= 1.0
    assert len(json.loads(row["provenance"])["extra_state"]["history_"]["epoch_losses"]) == 2
