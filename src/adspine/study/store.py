"""SQLite results store: one row per job (backbone figures, status) and one per (job, method, Rd seed).

Every job is written in one transaction when it ends, so an interrupted study loses nothing that had finished, and a
rerun skips jobs whose status is ``done``. ``rows()`` returns the flat view the reports and exports read.
"""

from __future__ import annotations

import io
import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

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
    "backbone_ms_b1": "REAL",  # median forward ms per image at batch 1
    "backbone_ms_bn": "REAL",  # median forward ms per image at batch N
    "batch_n": "INTEGER",
    "peak_cuda_mb": "REAL",
    "params": "INTEGER",  # of the truncated backbone
    "flops": "REAL",  # of the truncated backbone, per image at image_size
    "status": "TEXT",  # 'done' or 'failed'
    "error": "TEXT",
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
    "d": "INTEGER",  # embedding channels the method used after Rd (NULL = all)
    "settings": "TEXT",  # JSON of the method's constructor settings
    "image_auroc": "REAL",
    "pixel_auroc": "REAL",
    "aupro": "REAL",
    "image_f1_max": "REAL",  # optimistic: threshold chosen on the test set
    "pixel_f1_max": "REAL",  # optimistic: threshold chosen on the test set
    "fit_s": "REAL",
    "predict_ms": "REAL",  # method part only, per image
    "peak_rss_mb": "REAL",
    "model_bytes": "INTEGER",
    "provenance": "TEXT",  # JSON: Rd indices seed, coreset seed, scoring options, ...
}

EXAMPLE_COLUMNS: dict[str, str] = {
    "job_id": "TEXT",
    "method": "TEXT",
    "rd_seed": "INTEGER",
    "idx": "INTEGER",
    "image_path": "TEXT",
    "label": "INTEGER",
    "defect": "TEXT",
    "score": "REAL",
    "amap": "BLOB",  # .npy bytes, float16 (H, W), as returned by the method
    "mask": "BLOB",  # .npy bytes, bool (H, W)
}


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _from_npy(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


class ResultStore:
    """Thin wrapper over one SQLite file; safe to reopen, creates its tables on first use."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._con = sqlite3.connect(str(self.path), timeout=60)
        self._con.row_factory = sqlite3.Row
        with self._con:
            self._con.execute(f"CREATE TABLE IF NOT EXISTS jobs ({', '.join(f'{k} {v}' for k, v in JOB_COLUMNS.items())})")
            self._con.execute(
                f"CREATE TABLE IF NOT EXISTS results ({', '.join(f'{k} {v}' for k, v in RESULT_COLUMNS.items())}, "
                "UNIQUE(job_id, method, rd_seed))"
            )
            self._con.execute(
                f"CREATE TABLE IF NOT EXISTS examples ({', '.join(f'{k} {v}' for k, v in EXAMPLE_COLUMNS.items())})"
            )

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writing -------------------------------------------------------------------------------------------------
    def record_job(
        self, job: dict[str, Any], results: Iterable[dict[str, Any]] = (), examples: Iterable[dict[str, Any]] = ()
    ) -> None:
        """Write (or replace) one job with its results and example maps in a single transaction."""
        job = _clean(job, JOB_COLUMNS)
        with self._con:
            jid = job["job_id"]
            self._con.execute("DELETE FROM results WHERE job_id = ?", (jid,))
            self._con.execute("DELETE FROM examples WHERE job_id = ?", (jid,))
            self._insert("jobs", job, replace=True)
            for r in results:
                self._insert("results", _clean({**r, "job_id": jid}, RESULT_COLUMNS))
            for e in examples:
                e = dict(e, job_id=jid)
                for k in ("amap", "mask"):
                    if isinstance(e.get(k), np.ndarray):
                        e[k] = _npy(e[k])
                self._insert("examples", _clean(e, EXAMPLE_COLUMNS))

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
        """Flat view: every result row joined with its job's columns (finished jobs only)."""
        q = "SELECT j.*, r.* FROM results r JOIN jobs j ON j.job_id = r.job_id WHERE j.status = 'done' ORDER BY j.rowid, r.rowid"
        return [dict(r) for r in self._con.execute(q)]

    def examples(self, job_id: str, method: str, rd_seed: int | None = None) -> list[dict[str, Any]]:
        q = "SELECT * FROM examples WHERE job_id = ? AND method = ? AND rd_seed IS ? ORDER BY idx"
        out = []
        for r in self._con.execute(q, (job_id, method, rd_seed)):
            d = dict(r)
            d["amap"] = _from_npy(d["amap"]) if d["amap"] is not None else None
            d["mask"] = _from_npy(d["mask"]) if d["mask"] is not None else None
            out.append(d)
        return out


def _clean(row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    unknown = set(row) - set(columns)
    if unknown:
        raise KeyError(f"unknown result store column(s): {', '.join(sorted(unknown))}")
    out = {}
    for k, v in row.items():
        if isinstance(v, (dict, list, tuple)):
            v = json.dumps(v)
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out
