"""``build_report``: tables, plots, example overlays, recommendation and one self-contained HTML from a store.

Layout of ``out``::

    report.html                      everything below, images inlined
    recommendation.md
    tables/ranking_<dataset>.{md,tex,csv}
    tables/<dataset>_<family>.{md,tex,csv}
    tables/failed_jobs.csv
    plots/<dataset>_*.png
    examples/<dataset>_<category>.png
"""

from __future__ import annotations

import csv
import datetime as _dt
from pathlib import Path

from adspine.report import html as html_mod
from adspine.report import plots as plots_mod
from adspine.report import recommend as rec_mod
from adspine.report.examples import CategoryExamples, category_extremes, render_category
from adspine.report.tables import datasets, family_tables, ranking, ranking_csv, ranking_latex, ranking_markdown, slug
from adspine.study.store import ResultStore


class ReportError(ValueError):
    """One-line error about the report's input (message starts with the offending path or value)."""


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _meta(db: Path, rows: list[dict], jobs_done: int, failed: list[dict]) -> dict:
    hosts = sorted({f"{r.get('host_cpu') or '?'} / {r.get('device') or '?'} / {r.get('threads') or '?'} threads"
                    + (f" / {r['host_gpu']}" if r.get("host_gpu") else "") for r in rows})
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return {
        "summary": f"{db.name}: {jobs_done} finished jobs, {len(failed)} failed, {len(rows)} result rows; "
                   f"generated {now}",
        "hosts": "Measured on: " + ("; ".join(hosts) if hosts else "-"),
    }


def build_report(db: str | Path, out: str | Path, budget_ms: float | None = None) -> Path:
    """Write every report file into ``out`` and return the path of ``report.html``."""
    db, out = Path(db), Path(out)
    if not db.is_file():
        raise ReportError(f"{db}: results store not found")
    if budget_ms is not None and not budget_ms > 0:
        raise ReportError(f"--budget-ms {budget_ms}: must be a positive number of milliseconds")
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    with ResultStore(db) as store:
        rows = store.rows()
        failed = store.jobs("failed")
        jobs_done = len(store.done_job_ids())

        ranks = ranking(rows)
        by_ds = {ds: [e for e in ranks if e["dataset"] == ds] for ds in datasets(rows)}
        for ds, entries in by_ds.items():
            stem = out / "tables" / f"ranking_{slug(ds)}"
            files += [_write(stem.with_suffix(".md"), ranking_markdown(entries, ds)),
                      _write(stem.with_suffix(".tex"), ranking_latex(entries, ds)),
                      _write(stem.with_suffix(".csv"), ranking_csv(entries))]

        fams = family_tables(rows)
        for t in fams:
            stem = out / "tables" / t.name
            files += [_write(stem.with_suffix(".md"), t.to_markdown()), _write(stem.with_suffix(".tex"), t.to_latex()),
                      _write(stem.with_suffix(".csv"), t.to_csv())]

        plots = {}
        for ds, entries in by_ds.items():
            plots[ds] = plots_mod.dataset_plots(entries, ds, out / "plots", slug(ds))
            files += [v["path"] for v in plots[ds].values()]

        recs = [rec_mod.recommend(entries, budget_ms) for entries in by_ds.values()]
        files.append(_write(out / "recommendation.md", rec_mod.to_markdown(recs)))

        examples = []
        top_method = {ds: (entries[0]["method"] if entries else None) for ds, entries in by_ds.items()}
        rows_by_ds = {ds: [r for r in rows if str(r.get("dataset") or "dataset") == ds] for ds in by_ds}
        for ds, ds_rows in rows_by_ds.items():
            for _ds, cat, method, best, worst in category_extremes(ds_rows, top_method[ds]):
                item = CategoryExamples(ds, cat, method, best, worst)
                p = render_category(store, item, out / "examples" / f"{slug(ds)}_{slug(cat)}.png")
                if p:
                    files.append(p)
                examples.append(item)

    failed_csv = out / "tables" / "failed_jobs.csv"
    failed_csv.parent.mkdir(parents=True, exist_ok=True)
    with failed_csv.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        cols = ["job_id", "dataset", "category", "backbone", "init", "started_at", "error"]
        w.writerow(cols)
        for j in failed:
            w.writerow([j.get(c) if j.get(c) is not None else "" for c in cols])
    files.append(failed_csv)

    ctx = {
        "meta": _meta(db, rows, jobs_done, failed),
        "datasets": list(by_ds),
        "ranking": by_ds,
        "plots": plots,
        "family_tables": fams,
        "recommendations": recs,
        "examples": examples,
        "failed": failed,
        "files": [str(p.relative_to(out)) for p in files],
    }
    return _write(out / "report.html", html_mod.render(ctx))
