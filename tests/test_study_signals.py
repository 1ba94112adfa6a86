"""Study under signals: SIGTERM (schedulers, `docker stop`) mid-job is handled like Ctrl-C, not as a crash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adspine.cli import app
from adspine.study.store import ResultStore
from study_fixtures import tiny_study_spec


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> Path:
    return tiny_study_spec(tmp_path_factory.mktemp("signals"), "signals", n_train=6, n_test_good=3)


STUCK_IN_A_JOB = """
    import sys, time
    from pathlib import Path
    from adspine.cli import app
    from adspine.study import job

    def busy(*a, **k):  # a long fit: tell the test it started, then work until a signal arrives
        Path(sys.argv[3]).write_text("started")
        while True:
            time.sleep(0.05)

    job._run_method = busy
    app(["study", sys.argv[1], "--db", sys.argv[2], "--no-progress"])
"""


def wait_for(path: Path, child: subprocess.Popen, limit_s: float = 300) -> None:
    """Until ``path`` exists (the child reached its job); fails if the child ends first."""
    deadline = time.monotonic() + limit_s
    while not path.exists():
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "the child never reached its job"
        time.sleep(0.05)


def test_sigterm_mid_job_exits_143_with_one_line_and_a_plain_rerun_runs_the_job(spec, tmp_path):
    db, started = tmp_path / "r.sqlite", tmp_path / "started"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(STUCK_IN_A_JOB), str(spec), str(db), str(started)],
                             env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    wait_for(started, child)
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=300)
    assert child.returncode == 143, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("terminated (SIGTERM): 0 finished job(s) are committed"), err
    with ResultStore(db, readonly=True) as store:
        (row,) = store.jobs()
    assert row["status"] == "interrupted" and row["lease_pid"] is None  # released, not left to look killed

    res = CliRunner().invoke(app, ["study", str(spec), "--db", str(db), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "killed" not in res.output and "retried" not in res.output
    with ResultStore(db, readonly=True) as store:
        (row,) = store.jobs()
    assert (row["status"], row["attempts"], row["kills"]) == ("done", 2, None)
