"""SQLite results store: one row per job (backbone figures, status, lease) and one per (job, method, Rd seed).

Life of a job: a runner *claims* it (status ``started``, attempt count, a lease naming its process) before any work,
so two runners on one store split the work and a process killed mid-job (e.g. out of memory) is found on the next
run: its job becomes ``killed`` and is retried automatically once; killed again, it is skipped unless asked to retry
(a job that runs out of memory must not loop). Each method's result is committed as it ends
(``failed`` with its error when it raised), then the job row is finished as ``done`` or ``failed``. An interrupted
study loses nothing that had finished. ``rows()`` returns the flat view the reports and exports read. The backbones
re-timed round-robin at the end of a study run sit apart from the per-job figures (``final_timing``).

The schema carries a version (``meta`` table); opening an older store adds the missing columns in place.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import os
import socket
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 2
DEFAULT_LEASE_TTL_S = 6 * 3600  # a lease of another host counts as expired after this long without a heartbeat
AUTO_RETRIES_AFTER_KILL = 1  # a job whose process died is rerun automatically this often; then skipped (OOM loops)


class StoreError(ValueError):
    """The results store cannot be opened or written; one line naming the path and what to do."""


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` says the disk (or quota) is full: then no later job can be kept and the study stops."""
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(e, (sqlite3.DatabaseError, StoreError)) and ("disk is full" in str(e) or "disk full" in str(e))


JOB_COLUMNS: dict[str, str] = {
    "job_id": "TEXT PRIMARY KEY",  # stable hash of the job key (dataset, category, backbone, init, layers, protocol...)
    "study": "TEXT",
    "dataset": "TEXT",  # dataset name (folder name of the root unless the spec names it)
    "dataset_root": "TEXT",
    "category": "TEXT",
    "category_kind": "TEXT",  # 'texture', 'object' or NULL
    "backbone": "TEXT",
    "family": "TEXT",
    "init": "TEXT",  # e.g. 'imagenet', 'imagenet:IMAGENET1K_V2', 'random', 'kaiming_normal', 'file:/x.safetensors'
    "weights_tag": "TEXT",  # resolved pretrained tag, or the random scheme
    "init_seed": "INTEGER",
    "precision": "TEXT",  # backbone precision: 'fp32', 'bf16', 'int8' (NULL in stores written before: fp32)
    "layer_preset": "TEXT",
    "layers": "TEXT",  # JSON list of module names
    "dim_a": "INTEGER",  # total channels of the fused embedding
    "imagenet_top1": "REAL",
    "protocol": "TEXT",
    "image_size": "INTEGER",
    "device": "TEXT",
    "threads": "INTEGER",
    "n_train": "INTEGER",
    "n_test": "INTEGER",
    "image_height": "INTEGER",
    "image_width": "INTEGER",
    "dataset_format": "TEXT",  # mvtec, visa, folder, manifest
    "pixel_level": "INTEGER",  # 1 when every defective test image has a mask (pixel metrics exist)
    "backbone_ms_b1": "REAL",  # median forward ms per image at batch 1
    "backbone_ms_bn": "REAL",  # median forward ms per image at batch N
    "backbone_ms_b1_min": "REAL",  # minimum over the repeats (least disturbed by other processes; ranked by this)
    "backbone_ms_bn_min": "REAL",
    "timing_repeats": "INTEGER",
    "timing_threads": "INTEGER",  # torch threads while timing latency (fit runs with ``threads``)
    "load_avg": "REAL",  # 1-minute load average of the machine while timing
    "batch_n": "INTEGER",
    "peak_cuda_mb": "REAL",
    "params": "INTEGER",  # of the truncated backbone
    "flops": "REAL",  # of the truncated backbone, per image at image_size
    "status": "TEXT",  # 'started', 'done', 'failed', 'killed' (the process died mid-job), 'interrupted'
    "error": "TEXT",
    "attempts": "INTEGER",
    "kills": "INTEGER",  # times a process running it died mid-job (the first is retried automatically, once)
    "lease_host": "TEXT",  # runner that holds the job while it is 'started'
    "lease_pid": "INTEGER",
    "lease_proc_start": "REAL",  # that process's start time (guards against a reused pid)
    "lease_at": "TEXT",  # last heartbeat (claim or method end), UTC
    "host_cpu": "TEXT",
    "host_gpu": "TEXT",
    "versions": "TEXT",  # JSON
    "started_at": "TEXT",
    "finished_at": "TEXT",
}

RESULT_COLUMNS: dict[str, str] = {
    "job_id": "TEXT",
    "method": "TEXT",
    "rd_seed": "INTEGER",  # NULL where the method draws no Rd indices
    "status": "TEXT",  # 'done' or 'failed' (then ``error`` says why and the metrics are NULL)
    "error": "TEXT",
    "d": "INTEGER",  # embedding channels the method used after Rd (NULL = all)
    "rd_scheme": "TEXT",  # 'reference' (Python random.sample, as the PaDiM reference code) or 'torch'
    "settings": "TEXT",  # JSON of the method's constructor settings
    "image_auroc": "REAL",
    "image_auroc_lo": "REAL",  # 95 % interval (DeLong)
    "image_auroc_hi": "REAL",
    "pixel_auroc": "REAL",  # NULL where the category has no pixel masks
    "pixel_auroc_lo": "REAL",  # 95 % interval (bootstrap over test images)
    "pixel_auroc_hi": "REAL",
    "aupro": "REAL",
    "aupro_lo": "REAL",
    "aupro_hi": "REAL",
    "max_in_mask": "REAL",  # share of defective test images whose map maximum is in (or 4 px near) the ground truth
    "pixel_boot": "BLOB",  # .npy float32 (n_boot, 2): bootstrap replicates of [pixel AUROC, AUPRO] (paired tests)
    "pixel_boot_seed": "INTEGER",  # the bootstrap's seed (replicates pair only between equal seeds and test sets)
    "image_f1_max": "REAL",  # optimistic: threshold chosen on the test set
    "pixel_f1_max": "REAL",  # optimistic: threshold chosen on the test set
    "fit_s": "REAL",
    "predict_ms": "REAL",  # method part only, per image, median over repeats
    "predict_ms_min": "REAL",  # minimum over repeats
    "peak_rss_mb": "REAL",  # process peak during the method's fit + predict
    "method_peak_mb": "REAL",  # that peak minus the resident size just before the method
    "memory_source": "TEXT",  # 'VmHWM' (kernel high-water mark) or 'sampler'
    "test_labels": "BLOB",  # .npy int8 (T,), test image labels in the category's order
    "test_scores": "BLOB",  # .npy float64 (T,), this result's image scores (for paired tests)
    "model_bytes": "INTEGER",
    "provenance": "TEXT",  # JSON: Rd indices seed, coreset seed, scoring options, ...
    "finished_at": "TEXT",
}

EXAMPLE_COLUMNS: dict[str, str] = {
    "job_id": "TEXT",
    "method": "TEXT",
    "rd_seed": "INTEGER",
    "idx": "INTEGER",
    "image_path": "TEXT",
    "mask_path": "TEXT",  # ground-truth mask file (NULL: good image or no mask)
    "label": "INTEGER",
    "defect": "TEXT",
    "score": "REAL",
    "amap": "BLOB",  # .npy bytes, float16 (H, W), as returned by the method
    "mask": "BLOB",  # .npy bytes, bool (H, W)
}


STUDY_COLUMNS: dict[str, str] = {"study": "TEXT PRIMARY KEY", "spec_yaml": "TEXT", "recorded_at": "TEXT"}
BASELINE_COLUMNS: dict[str, str] = {  # trivial shortcut baselines (adspine.baselines), once per category and input
    "dataset": "TEXT",
    "dataset_root": "TEXT",
    "category": "TEXT",
    "protocol": "TEXT",
    "image_height": "INTEGER",
    "image_width": "INTEGER",
    "baseline": "TEXT",  # adspine.baselines.BASELINES name
    "image_auroc": "REAL",
    "image_auroc_lo": "REAL",  # 95 % interval (DeLong)
    "image_auroc_hi": "REAL",
    "n_train": "INTEGER",
    "n_test": "INTEGER",
    "test_labels": "BLOB",
    "test_scores": "BLOB",
    "computed_at": "TEXT",
}
FINAL_TIMING_COLUMNS: dict[str, str] = {  # backbones re-timed round-robin at the end of a study (timing.final_timing)
    "study": "TEXT",
    "timed_at": "TEXT",  # UTC; the same for every configuration timed together (one study run)
    "backbone": "TEXT",
    "init": "TEXT",
    "init_seed": "INTEGER",
    "precision": "TEXT",
    "layers": "TEXT",  # JSON list of module names, as in jobs.layers
    "image_height": "INTEGER",
    "image_width": "INTEGER",
    "device": "TEXT",
    "threads": "INTEGER",  # torch threads while timing (compared with jobs.timing_threads)
    "batch_n": "INTEGER",
    "backbone_ms_b1_min": "REAL",  # minimum over the interleaved rounds, ms per image (the report uses this)
    "backbone_ms_b1": "REAL",  # median
    "backbone_ms_bn_min": "REAL",
    "backbone_ms_bn": "REAL",
    "repeats": "INTEGER",  # interleaved rounds
    "configurations": "INTEGER",  # configurations timed together in those rounds
    "wall_s": "REAL",
    "load_before": "REAL",  # 1-minute load average before and after the rounds
    "load_after": "REAL",
    "cores": "INTEGER",  # CPU cores usable by the timing process (its affinity)
    "host_cpu": "TEXT",
    "host_gpu": "TEXT",
}
_TABLES = {"jobs": (JOB_COLUMNS, ""), "results": (RESULT_COLUMNS, ", UNIQUE(job_id, method, rd_seed)"),
           "examples": (EXAMPLE_COLUMNS, ""), "studies": (STUDY_COLUMNS, ""),
           "baselines": (BASELINE_COLUMNS, ", UNIQUE(dataset, category, protocol, image_height, image_width, "
                                           "baseline)"),
           "final_timing": (FINAL_TIMING_COLUMNS, "")}
_BLOBS = ("amap", "mask", "test_labels", "test_scores", "pixel_boot")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _from_npy(b: bytes | None) -> np.ndarray | None:
    return None if b is None else np.load(io.BytesIO(b), allow_pickle=False)


def _process_start(pid: int) -> float | None:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:  # noqa: BLE001 - no such process (or no permission): treated as gone
        return None


def lease_alive(job: dict[str, Any], ttl_s: float = DEFAULT_LEASE_TTL_S) -> bool:
    """Whether the runner holding a ``started`` job still exists (same host: its process with the same start
    time; another host: a heartbeat younger than ``ttl_s``)."""
    if job.get("lease_host") == socket.gethostname() and job.get("lease_pid"):
        start = _process_start(int(job["lease_pid"]))
        return start is not None and abs(start - float(job.get("lease_proc_start") or 0.0)) < 1.0
    try:
        age = (_dt.datetime.now(_dt.timezone.utc) - _dt.datetime.fromisoformat(job["lease_at"])).total_seconds()
    except (TypeError, ValueError):
        return False
    return age < ttl_s


def _killed_message(job: dict[str, Any]) -> str:
    return f"killed: the process running attempt {job.get('attempts') or 1} died mid-job (e.g. out of memory)"


def plain_run_outcome(job: dict[str, Any], ttl_s: float = DEFAULT_LEASE_TTL_S) -> str | None:
    """What a run without ``retry_killed`` does with a stored job row: 'done' (skipped), 'running' (held by a live
    runner), 'killed' (its process died again after the automatic retry: skipped), 'retry' (died once: rerun);
    None: an ordinary (re)run."""
    status, kills = job.get("status"), int(job.get("kills") or 0)
    if status == "started":
        if lease_alive(job, ttl_s):
            return "running"
        status, kills = "killed", kills + 1
    if status == "done":
        return "done"
    if status == "killed":
        return "retry" if max(kills, 1) <= AUTO_RETRIES_AFTER_KILL else "killed"
    return None


class ResultStore:
    """Thin wrapper over one SQLite file; creates or upgrades its tables on first use (``readonly``: never writes)."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        what = "read" if readonly else "open"
        if self.path.is_dir():
            raise StoreError(f"{self.path}: is a folder, not a results store; pass a file path (e.g. results.sqlite)")
        if readonly and not self.path.is_file():
            raise StoreError(f"{self.path}: no such results store")
        if not readonly:
            parent = self.path.parent
            if parent.exists() and not parent.is_dir():
                raise StoreError(f"{self.path}: {parent} is a file, not a folder; choose another --db path")
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"{self.path}: cannot create its folder ({e.strerror}); choose another --db path") \
                    from None
        try:
            if readonly:
                self._con = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=60)
            else:
                self._con = sqlite3.connect(str(self.path), timeout=60)
            self._con.row_factory = sqlite3.Row
            self._con.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
            if not readonly:
                self._create_or_upgrade()
            else:
                self._columns = {t: self._table_columns(t) for t in _TABLES}
        except sqlite3.DatabaseError as e:
            raise StoreError(self._message(e, what)) from None
        if readonly and not (self._columns["jobs"] and self._columns["results"]):
            self._con.close()
            what = "an empty file (0 bytes)" if self.path.stat().st_size == 0 else "an SQLite file without results"
            raise StoreError(f"{self.path}: {what}, not a results store; pass the --db file written by "
                             "`adspine study`")

    def _message(self, e: BaseException, what: str = "write") -> str:
        msg = str(e)
        if "not a database" in msg:
            return f"{self.path}: not an SQLite results store; pass another --db path"
        if "full" in msg or getattr(e, "errno", None) == 28:
            return f"{self.path}: disk full while writing the results store; free space and run again " \
                   f"(finished jobs are kept)"
        if "readonly" in msg or "read-only" in msg or "unable to open" in msg:
            return f"{self.path}: cannot {what} the results store ({msg}); check the folder's permissions or " \
                   f"choose another --db path"
        return f"{self.path}: cannot {what} the results store ({msg})"

    def _table_columns(self, table: str) -> set[str]:
        return {r[1] for r in self._con.execute(f"PRAGMA table_info({table})")}

    def _create_or_upgrade(self) -> None:
        with self._con:
            self._con.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            row = self._con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row else None
            if version is not None and version > SCHEMA_VERSION:
                raise StoreError(f"{self.path}: results store schema {version} is newer than this adspine "
                                 f"({SCHEMA_VERSION}); upgrade adspine")
            for table, (cols, extra) in _TABLES.items():
                self._con.execute(f"CREATE TABLE IF NOT EXISTS {table} "
                                  f"({', '.join(f'{k} {v}' for k, v in cols.items())}{extra})")
                have = self._table_columns(table)
                for k, v in cols.items():  # upgrade path: older stores gain the new columns (NULL)
                    if k not in have:
                        self._con.execute(f"ALTER TABLE {table} ADD COLUMN {k} {v.replace('PRIMARY KEY', '')}")
            self._con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        self._columns = {t: self._table_columns(t) for t in _TABLES}

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writing -------------------------------------------------------------------------------------------------
    def _write(self, fn, *args):
        if self.readonly:
            raise StoreError(f"{self.path}: opened read-only")
        try:
            with self._con:
                return fn(*args)
        except sqlite3.DatabaseError as e:
            raise StoreError(self._message(e)) from None
        except OSError as e:
            raise StoreError(self._message(e)) from None

    def record_spec(self, study: str, spec_yaml: str) -> None:
        """Keep the spec that produced a study's rows (the report shows it)."""
        self._write(lambda: self._insert("studies", {"study": study, "spec_yaml": spec_yaml, "recorded_at": now()},
                                         replace=True))

    def claim_job(self, row: dict[str, Any], retry_killed: bool = False, ttl_s: float = DEFAULT_LEASE_TTL_S) -> str:
        """Take a job for this process before any work. Returns 'claimed', 'retried' (claimed again after its process
        died: automatically the first time, every time with ``retry_killed``) or why not: 'done', 'running' (another
        live runner holds it), 'killed' (its process died again after the automatic retry; see ``retry_killed``)."""

        def claim() -> str:
            self._con.execute("BEGIN IMMEDIATE")  # one claimer at a time across processes
            old = self._con.execute("SELECT * FROM jobs WHERE job_id = ?", (row["job_id"],)).fetchone()
            old = dict(old) if old else {}
            outcome = plain_run_outcome(old, ttl_s) if old else None
            if outcome in ("done", "running"):
                return outcome
            if old.get("status") == "started":  # its runner is gone
                old["kills"] = self._mark_killed(old)
            if outcome == "killed" and not retry_killed:
                return "killed"
            self._con.execute("DELETE FROM results WHERE job_id = ?", (row["job_id"],))
            self._con.execute("DELETE FROM examples WHERE job_id = ?", (row["job_id"],))
            claimed = {**_clean(row, JOB_COLUMNS), "status": "started", "error": None,
                       "attempts": int(old.get("attempts") or 0) + 1,
                       "kills": max(int(old.get("kills") or 0), 1) if outcome else old.get("kills"),
                       "lease_host": socket.gethostname(), "lease_pid": os.getpid(),
                       "lease_proc_start": _process_start(os.getpid()), "lease_at": now()}
            self._insert("jobs", claimed, replace=True)
            return "claimed" if outcome is None else "retried"

        return self._write(claim)

    def _mark_killed(self, job: dict[str, Any], error: str | None = None) -> int:
        """Set a job whose process died to 'killed' (inside a write); returns its new kill count."""
        kills = int(job.get("kills") or 0) + 1
        self._con.execute("UPDATE jobs SET status = 'killed', error = ?, kills = ?, lease_host = NULL, "
                          "lease_pid = NULL, lease_proc_start = NULL WHERE job_id = ?",
                          (error or _killed_message(job), kills, job["job_id"]))
        return kills

    def mark_dead_leases(self, ttl_s: float = DEFAULT_LEASE_TTL_S) -> list[str]:
        """Mark every ``started`` job whose runner is gone as ``killed``; returns their ids."""

        def mark() -> list[str]:
            dead = [dict(r) for r in self._con.execute("SELECT * FROM jobs WHERE status = 'started'")]
            dead = [j for j in dead if not lease_alive(j, ttl_s)]
            for j in dead:
                self._mark_killed(j)
            return [j["job_id"] for j in dead]

        return self._write(mark)

    def job_died(self, job_id: str, error: str) -> bool:
        """A process running a job this runner holds died (e.g. a Ray worker or its node). Returns True when the job
        is to be retried now (its first death; the attempt is counted), else marks it 'killed' (plain runs skip it)."""

        def put() -> bool:
            job = dict(self._con.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone())
            if int(job.get("kills") or 0) < AUTO_RETRIES_AFTER_KILL:
                self._con.execute("UPDATE jobs SET kills = ?, attempts = ?, error = ?, lease_at = ? WHERE job_id = ?",
                                  (int(job.get("kills") or 0) + 1, int(job.get("attempts") or 0) + 1,
                                   f"retried: {error}", now(), job_id))
                return True
            self._mark_killed(job, f"killed: {error}")
            return False

        return self._write(put)

    def release_job(self, job_id: str | None = None) -> None:
        """Give a job this process holds back after an interruption (Ctrl-C, SIGTERM): the next run takes it up again.
        None: every job it holds."""
        which = "" if job_id is None else "job_id = ? AND "
        self._write(lambda: self._con.execute(
            "UPDATE jobs SET status = 'interrupted', lease_host = NULL, lease_pid = NULL, lease_proc_start = NULL "
            f"WHERE {which}status = 'started' AND lease_host = ? AND lease_pid = ?",
            ([] if job_id is None else [job_id]) + [socket.gethostname(), os.getpid()]))

    def record_result(self, job_id: str, result: dict[str, Any], examples: Iterable[dict[str, Any]] = ()) -> None:
        """Commit one method's result (and its example maps) as soon as it ends; renews the job's lease."""

        def put() -> None:
            r = _clean({**result, "job_id": job_id}, RESULT_COLUMNS)
            self._con.execute("DELETE FROM examples WHERE job_id = ? AND method = ? AND rd_seed IS ?",
                              (job_id, r.get("method"), r.get("rd_seed")))
            self._insert("results", r, replace=True)
            for e in examples:
                self._insert("examples", _clean(dict(e, job_id=job_id), EXAMPLE_COLUMNS))
            self._con.execute("UPDATE jobs SET lease_at = ? WHERE job_id = ?", (now(), job_id))

        self._write(put)

    def finish_job(self, row: dict[str, Any]) -> None:
        """Write the job's final row (status 'done' or 'failed') and release its lease."""

        def put() -> None:
            job = _clean({**row, "lease_host": None, "lease_pid": None, "lease_proc_start": None}, JOB_COLUMNS)
            cols = [c for c in job if c != "job_id"]
            cur = self._con.execute(f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in cols)} WHERE job_id = ?",
                                    [job[c] for c in cols] + [job["job_id"]])
            if cur.rowcount == 0:
                self._insert("jobs", job)

        self._write(put)

    def record_job(
        self, job: dict[str, Any], results: Iterable[dict[str, Any]] = (), examples: Iterable[dict[str, Any]] = ()
    ) -> None:
        """Write (or replace) one whole job with its results and example maps in a single transaction."""
        job = _clean(job, JOB_COLUMNS)

        def put() -> None:
            jid = job["job_id"]
            self._con.execute("DELETE FROM results WHERE job_id = ?", (jid,))
            self._con.execute("DELETE FROM examples WHERE job_id = ?", (jid,))
            self._insert("jobs", job, replace=True)
            for r in results:
                self._insert("results", _clean({**r, "job_id": jid}, RESULT_COLUMNS))
            for e in examples:
                self._insert("examples", _clean(dict(e, job_id=jid), EXAMPLE_COLUMNS))

        self._write(put)

    def _insert(self, table: str, row: dict[str, Any], replace: bool = False) -> None:
        cols = list(row)
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        self._con.execute(
            f"{verb} INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
            [row[c] for c in cols],
        )

    # -- reading -------------------------------------------------------------------------------------------------
    def job_status(self) -> dict[str, str]:
        return {r["job_id"]: r["status"] for r in self._con.execute("SELECT job_id, status FROM jobs")}

    def done_job_ids(self) -> set[str]:
        return {k for k, v in self.job_status().items() if v == "done"}

    def jobs(self, status: str | None = None) -> list[dict[str, Any]]:
        q, args = "SELECT * FROM jobs", ()
        if status:
            q, args = q + " WHERE status = ?", (status,)
        return [dict(r) for r in self._con.execute(q + " ORDER BY started_at", args)]

    def rows(self) -> list[dict[str, Any]]:
        """Flat view: every successful result row joined with its job's columns (finished jobs only)."""
        ok = "AND (r.status IS NULL OR r.status = 'done')" if "status" in self._columns["results"] else ""
        q = (f"SELECT j.*, r.* FROM results r JOIN jobs j ON j.job_id = r.job_id WHERE j.status = 'done' {ok} "
             "ORDER BY j.rowid, r.rowid")
        return [_row(r) for r in self._con.execute(q)]

    def failed_results(self) -> list[dict[str, Any]]:
        """Methods that raised inside otherwise finished jobs, with their errors."""
        if "status" not in self._columns["results"]:
            return []
        q = ("SELECT j.*, r.* FROM results r JOIN jobs j ON j.job_id = r.job_id WHERE r.status = 'failed' "
             "ORDER BY j.rowid, r.rowid")
        return [_row(r) for r in self._con.execute(q)]

    def study_specs(self) -> dict[str, str]:
        if "study" not in self._columns.get("studies", set()):
            return {}
        return {r["study"]: r["spec_yaml"] for r in self._con.execute("SELECT * FROM studies ORDER BY recorded_at")}

    def record_baselines(self, rows: Iterable[dict[str, Any]]) -> None:
        """Keep one category's trivial baselines (replacing earlier ones of the same category and input)."""
        rows = [_clean({**r, "computed_at": now()}, BASELINE_COLUMNS) for r in rows]
        self._write(lambda: [self._insert("baselines", r, replace=True) for r in rows])

    def baselines(self, dataset: str | None = None) -> list[dict[str, Any]]:
        """Stored trivial baselines (none in stores written before they existed)."""
        return [_decode(r) for r in self._table_rows("baselines", "baseline", "dataset", dataset)]

    def record_final_timing(self, rows: Iterable[dict[str, Any]]) -> None:
        """Keep one study run's final round-robin backbone timings (one row per configuration)."""
        rows = [_clean(r, FINAL_TIMING_COLUMNS) for r in rows]
        self._write(lambda: [self._insert("final_timing", r) for r in rows])

    def final_timings(self, study: str | None = None) -> list[dict[str, Any]]:
        """Stored final timings, oldest first (none in stores written before they existed)."""
        return self._table_rows("final_timing", "timed_at", "study", study)

    def _table_rows(self, table: str, marker: str, key: str, value: str | None) -> list[dict[str, Any]]:
        """Rows of a table added in a later version (none where the store predates it: ``marker`` column absent),
        oldest first, optionally only those whose ``key`` equals ``value``."""
        if marker not in self._columns.get(table, set()):
            return []
        q, args = f"SELECT * FROM {table}", ()
        if value is not None:
            q, args = q + f" WHERE {key} = ?", (value,)
        return [dict(r) for r in self._con.execute(q + " ORDER BY rowid", args)]

    def examples(self, job_id: str, method: str, rd_seed: int | None = None) -> list[dict[str, Any]]:
        q = "SELECT * FROM examples WHERE job_id = ? AND method = ? AND rd_seed IS ? ORDER BY idx"
        return [_decode(dict(r)) for r in self._con.execute(q, (job_id, method, rd_seed))]


def _row(r: sqlite3.Row) -> dict[str, Any]:
    """A joined row as a dict where the later table's columns win (``SELECT j.*, r.*``: the result's status,
    error and finish time, not the job's)."""
    return _decode(dict(zip(r.keys(), tuple(r))))


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    for k in _BLOBS:
        if isinstance(row.get(k), bytes):
            row[k] = _from_npy(row[k])
    return row


def _clean(row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    unknown = set(row) - set(columns)
    if unknown:
        raise KeyError(f"unknown result store column(s): {', '.join(sorted(unknown))}")
    out = {}
    for k, v in row.items():
        if isinstance(v, np.ndarray):
            v = _npy(v)
        elif isinstance(v, (dict, list, tuple)):
            v = json.dumps(v)
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out
