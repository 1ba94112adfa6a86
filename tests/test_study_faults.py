"""Study under faults: a process killed mid-job, two runners on one store, store and output paths that fail."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from adspine.cli import app
from adspine.study.store import SCHEMA_VERSION, ResultStore, StoreError

CATS = ["fabric", "nut"]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    from adspine.data.synth import generate

    root = tmp_path_factory.mktemp("synth") / "data"
    generate(root, seed=4, size=64, n_train=6, n_test_good=3, n_per_defect=1, categories=CATS)
    return root


def spec_file(tmp: Path, root: Path, inits=("random",)) -> Path:
    spec = {
        "name": "faults",
        "datasets": [{"root": str(root), "categories": "all"}],
        "backbones": [{"names": ["resnet18"], "inits": list(inits)}],
        "methods": [{"name": "padim", "settings": {"d": 20}}],
        "rd_seeds": [1], "protocol": "resize", "image_size": 64, "threads": 1, "batch_size": 4,
        "timing": {"warmup": 0, "repeats": 1, "batch_n": 2}, "examples": {"count": 1, "size": 16},
        "uncertainty": {"n_boot": 0},
    }
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_child(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


KILLER = """
    import os, signal, sys
    from adspine.study import job
    from adspine.study.plan import plan

    def die(*a, **k):  # the kernel's OOM killer does the same: SIGKILL, no cleanup, no exception
        os.kill(os.getpid(), signal.SIGKILL)

    job._run_method = die
    plan(sys.argv[1]).run(sys.argv[2])
"""


def _job(db: Path) -> dict:
    with ResultStore(db) as store:
        (row,) = store.jobs()
    return row


def test_killed_job_is_retried_once_then_skipped_until_asked(tmp_path, synth_root):
    spec = spec_file(tmp_path, synth_root)
    spec = spec.rename(tmp_path / "one.yaml")
    one = yaml.safe_load(spec.read_text())
    one["datasets"][0]["categories"] = ["fabric"]
    spec.write_text(yaml.safe_dump(one))
    db = tmp_path / "r.sqlite"
    child = run_child(KILLER, str(spec), str(db))
    child.communicate(timeout=300)
    assert child.returncode == -9  # really killed mid-job
    started = _job(db)
    assert started["status"] == "started" and started["attempts"] == 1  # recorded before its work
    cli = CliRunner()

    # killed once: a dry run marks it for a retry and a plain run retries it by itself
    once = tmp_path / "once.sqlite"
    once.write_bytes(db.read_bytes())
    res = cli.invoke(app, ["study", str(spec), "--db", str(once), "--dry-run"])
    assert res.exit_code == 0 and "retry: killed once" in res.output, res.output
    res = cli.invoke(app, ["study", str(spec), "--db", str(once), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "1 retried after their process died (data/fabric resnet18 [random])" in res.output.replace("\n", " ")
    row = _job(once)
    assert (row["status"], row["attempts"], row["kills"]) == ("done", 2, 1)

    # the automatic retry dies as well (the out-of-memory loop): marked killed and skipped until --retry-killed
    child = run_child(KILLER, str(spec), str(db))
    child.communicate(timeout=300)
    assert child.returncode == -9
    row = _job(db)
    assert (row["status"], row["attempts"], row["kills"]) == ("started", 2, 1)
    res = cli.invoke(app, ["study", str(spec), "--db", str(db), "--dry-run"])
    assert res.exit_code == 0 and "skipped: killed twice" in res.output.replace("\n", " "), res.output
    res = cli.invoke(app, ["study", str(spec), "--db", str(db), "--no-progress"])
    assert res.exit_code == 1, res.output  # the killed job is skipped, so the study is not complete
    assert "1 killed twice (skipped; --retry-killed reruns them)" in res.output.replace("\n", " ")
    row = _job(db)
    assert (row["status"], row["kills"]) == ("killed", 2) and "died mid-job" in row["error"]

    res = cli.invoke(app, ["study", str(spec), "--db", str(db), "--no-progress", "--retry-killed"])
    assert res.exit_code == 0, res.output
    row = _job(db)
    assert (row["job_id"], row["status"], row["attempts"]) == (started["job_id"], "done", 3)


WORKER = """
    import sys
    from adspine.study import job
    from adspine.study.plan import plan

    real = job.run_job

    def logged(spec, j, *a, **k):
        with open(sys.argv[3], "a") as f:
            f.write(j.job_id + "\\n")
        return real(spec, j, *a, **k)

    job.run_job = logged
    print(plan(sys.argv[1]).run(sys.argv[2]).as_dict())
"""


def test_two_runners_on_one_store_compute_every_job_once(tmp_path, synth_root):
    spec = spec_file(tmp_path, synth_root, inits=("random", "kaiming_normal", "orthogonal"))
    db = tmp_path / "shared.sqlite"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    children = [run_child(WORKER, str(spec), str(db), str(log)) for log in logs]
    for c in children:
        out, err = c.communicate(timeout=600)
        assert c.returncode == 0, err[-2000:]
    ran = [log.read_text().split() if log.exists() else [] for log in logs]
    from adspine.study.plan import plan

    all_ids = {j.job_id for j in plan(spec).jobs}
    assert len(all_ids) == 6
    assert sorted(ran[0] + ran[1]) == sorted(all_ids)  # every job computed exactly once across both runners
    with ResultStore(db) as store:
        assert len(store.rows()) == 6 and all(j["status"] == "done" for j in store.jobs())
        assert all(j["attempts"] == 1 for j in store.jobs())


# -- store and output paths ---------------------------------------------------------------------------------------
def test_store_path_errors_are_one_line(tmp_path):
    not_db = tmp_path / "notes.sqlite"
    not_db.write_text("these are not the results you are looking for\n" * 100)
    with pytest.raises(StoreError, match=r"notes.sqlite: not an SQLite results store"):
        ResultStore(not_db)
    with pytest.raises(StoreError, match="is a folder"):
        ResultStore(tmp_path)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(StoreError, match="is a file, not a folder"):
        ResultStore(a_file / "r.sqlite")
    with pytest.raises(StoreError, match="no such results store"):
        ResultStore(tmp_path / "none.sqlite", readonly=True)


def test_full_disk_while_storing_is_one_line_and_keeps_finished_rows(tmp_path):
    db = tmp_path / "r.sqlite"
    store = ResultStore(db)
    store.record_job({"job_id": "a", "status": "done"}, [{"method": "padim", "image_auroc": 0.9}])

    class FullDisk:  # sqlite raises this when a page cannot be written
        def __init__(self, con):
            self.con = con

        def execute(self, *a, **k):
            raise sqlite3.OperationalError("database or disk is full")

        def __getattr__(self, name):
            return getattr(self.con, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    store._con = FullDisk(store._con)
    with pytest.raises(StoreError) as e:
        store.record_result("a", {"method": "spade", "image_auroc": 0.5})
    assert str(e.value).startswith(f"{db}: disk full") and "\n" not in str(e.value)
    store._con.con.close()
    with ResultStore(db, readonly=True) as again:
        assert [r["method"] for r in again.rows()] == ["padim"]


def test_old_store_is_upgraded_in_place(tmp_path):
    db = tmp_path / "old.sqlite"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE jobs (job_id TEXT PRIMARY KEY, status TEXT, backbone TEXT, started_at TEXT)")
    con.execute("CREATE TABLE results (job_id TEXT, method TEXT, rd_seed INTEGER, image_auroc REAL)")
    con.execute("INSERT INTO jobs VALUES ('j', 'done', 'resnet18', '2026')")
    con.execute("INSERT INTO results VALUES ('j', 'padim', 1, 0.75)")
    con.commit()
    con.close()
    with ResultStore(db) as store:
        (row,) = store.rows()
        assert row["image_auroc"] == 0.75 and row["method_peak_mb"] is None and row["backbone"] == "resnet18"
    con = sqlite3.connect(db)
    assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    con.close()


@pytest.mark.parametrize("case", ["folder", "under-a-file", "full-disk", "read-only"])
def test_export_failures_are_one_line_and_leave_no_partial_file(tmp_path, monkeypatch, case):
    db = tmp_path / "r.sqlite"
    with ResultStore(db) as store:
        store.record_job({"job_id": "a", "status": "done", "backbone": "resnet18"},
                         [{"method": "padim", "image_auroc": 0.9}])
    out = tmp_path / "out" / "rows.csv"
    out.parent.mkdir()
    if case == "folder":
        out.mkdir()
        words = "is a folder"
    elif case == "under-a-file":
        (tmp_path / "out" / "f").write_text("x")
        out = tmp_path / "out" / "f" / "rows.csv"
        words = "is a file, not a folder"
    elif case == "full-disk":
        import csv

        class FullWriter:
            def __init__(self, *a, **k):
                pass

            def writeheader(self):
                raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(csv, "DictWriter", FullWriter)
        words = "disk full"
    else:
        if os.geteuid() == 0:
            os.chmod(out.parent, 0o555)
            monkeypatch.setattr("tempfile.mkstemp", lambda *a, **k: (_ for _ in ()).throw(
                PermissionError(errno.EACCES, "Permission denied")))
        else:
            os.chmod(out.parent, 0o555)
        words = "not writable"
    res = CliRunner().invoke(app, ["results", "export", "--db", str(db), "--out", str(out)])
    os.chmod(tmp_path / "out", 0o755)
    assert res.exit_code == 2, res.output
    text = res.output.replace("\n", " ")
    assert words in text and "Traceback" not in res.output
    leftovers = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and p.name != "f"]
    assert leftovers == []


def test_report_never_writes_into_its_database(tmp_path):
    db = tmp_path / "r.sqlite"
    with ResultStore(db) as store:
        store.record_job({"job_id": "a", "status": "done"}, [{"method": "padim", "image_auroc": 0.9}])
    before = db.read_bytes()
    with ResultStore(db, readonly=True) as store:
        assert len(store.rows()) == 1
        with pytest.raises(StoreError, match="read-only"):
            store.record_result("a", {"method": "x"})
    assert db.read_bytes() == before


@pytest.mark.parametrize("where", ["store", "method"])
def test_full_disk_stops_the_study_at_once_and_keeps_finished_jobs(tmp_path, synth_root, monkeypatch, where):
    from adspine.study import job as job_mod

    spec = spec_file(tmp_path, synth_root, inits=("random", "kaiming_normal"))  # 4 jobs
    db = tmp_path / "r.sqlite"
    ran = []
    real_run_job = job_mod.run_job
    monkeypatch.setattr(job_mod, "run_job", lambda s, j, *a, **k: ran.append(j.job_id) or real_run_job(s, j, *a, **k))
    if where == "store":  # sqlite's own message when a page cannot be written, from the second result on
        real_insert = ResultStore._insert

        def insert(self, table, row, replace=False):
            if table == "results" and len(ran) > 1:
                raise sqlite3.OperationalError("database or disk is full")
            return real_insert(self, table, row, replace)

        monkeypatch.setattr(ResultStore, "_insert", insert)
    else:  # a method's temporary files
        real_method = job_mod._run_method

        def method(*a, **k):
            if len(ran) > 1:
                raise OSError(errno.ENOSPC, "No space left on device", "/tmp/adspine-model-x")
            return real_method(*a, **k)

        monkeypatch.setattr(job_mod, "_run_method", method)
    res = CliRunner().invoke(app, ["study", str(spec), "--db", str(db), "--no-progress"])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "disk full" in errors[0] and "Traceback" not in res.output, res.output
    assert len(ran) == 2  # the job that met the full disk was the last one started
    with ResultStore(db, readonly=True) as store:
        status = {j["job_id"]: j["status"] for j in store.jobs()}
    assert status == {ran[0]: "done", ran[1]: "interrupted"}  # finished job kept, the stopped one released


def test_empty_store_file_is_one_line_for_readers(tmp_path, synth_root):
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    cli = CliRunner()
    for args in (["report", "--db", str(empty), "--out", str(tmp_path / "report")],
                 ["results", "export", "--db", str(empty), "--out", str(tmp_path / "rows.csv")]):
        res = cli.invoke(app, args)
        assert res.exit_code == 2, res.output
        assert res.output.replace("\n", " ").count("empty.sqlite: an empty file (0 bytes), not a results store") == 1
        assert "Traceback" not in res.output and "no such table" not in res.output
    res = cli.invoke(app, ["study", str(spec_file(tmp_path, synth_root)), "--db", str(empty), "--dry-run"])
    assert res.exit_code == 0 and "2 job(s)" in res.output, res.output  # a plain run fills an empty file
