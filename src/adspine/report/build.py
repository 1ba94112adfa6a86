"""``build_report``: tables, plots, example overlays, recommendation and one self-contained HTML from a store.

Layout of ``out``::

    report.html                      everything below, images inlined
    recommendation.md
    tables/ranking_<dataset>.{md,tex,csv}
    tables/significance_<dataset>.csv
    tables/baselines_<dataset>.csv   trivial baselines per category (where the store has them)
    tables/<dataset>_<family>.{md,tex,csv}
    tables/failed_jobs.csv, tables/failed_methods.csv
    plots/<dataset>_*.png
    examples/<dataset>_<category>.png

The store is opened read-only. Everything is written into a temporary folder beside ``out`` and moved into place at
the end (``report.html`` last), so a failure leaves no partial report: it raises ``ReportError`` with one line
naming the path and what to do.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import shutil
import tempfile
from pathlib import Path


class ReportError(ValueError):
    """One-line error about the report's input or output (message starts with the offending path or value)."""


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _csv(rows: list[list], head: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(head)
    w.writerows([["" if v is None else v for v in r] for r in rows])
    return buf.getvalue()


def _versions(jobs: list[dict]) -> list[str]:
    out = []
    for v in dict.fromkeys(j.get("versions") for j in jobs if j.get("versions")):
        try:
            d = json.loads(v)
            out.append(", ".join(f"{k} {d[k]}" for k in sorted(d)) if isinstance(d, dict) else str(d))
        except (TypeError, ValueError):
            out.append(str(v))
    return out


def _meta(db: Path, rows: list[dict], jobs: list[dict], specs: dict[str, str], final: list[dict] = ()) -> dict:
    """Provenance shown at the top: spec YAML, versions, machines, threads, load while timing (per job and during
    the final round-robin re-timing of each study's latest run)."""
    from adspine.report.tables import fmt

    by_status: dict[str, int] = {}
    for j in jobs:
        by_status[str(j.get("status") or "?")] = by_status.get(str(j.get("status") or "?"), 0) + 1
    hosts = sorted({f"{j.get('host_cpu') or '?'} / {j.get('device') or '?'} / {j.get('threads') or '?'} threads"
                    + (f" / {j['host_gpu']}" if j.get("host_gpu") else "") for j in jobs if j.get("status") == "done"})
    loads = sorted(float(j["load_avg"]) for j in jobs if j.get("load_avg") is not None)
    load = (f"1-minute load average while timing: min {fmt(loads[0], 2)}, median {fmt(loads[len(loads) // 2], 2)}, "
            f"max {fmt(loads[-1], 2)} over {len(loads)} jobs" if loads else
            "load average while timing: not recorded in this store")
    latest = {(f.get("study"), f.get("timed_at")): f for f in final}  # one row per study run
    latest = {study: f for (study, _), f in latest.items()}
    for study, f in latest.items():
        around = "?" if f.get("load_before") is None else f"{fmt(f['load_before'], 2)} -> {fmt(f.get('load_after'), 2)}"
        load += (f"; final round-robin re-timing of '{study}' ({f.get('timed_at')}): {f.get('configurations')} "
                 f"backbone configuration(s), {f.get('repeats')} rounds, 1-minute load {around} on {f.get('cores')} "
                 "usable core(s)")
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    counts = ", ".join(f"{n} {s}" for s, n in sorted(by_status.items()))
    return {
        "summary": f"{db.name}: {len(jobs)} jobs ({counts or 'none'}), {len(rows)} result rows; generated {now}",
        "hosts": "Measured on: " + ("; ".join(hosts) if hosts else "–"),
        "load": load,
        "versions": _versions(jobs),
        "specs": specs,
    }


def _fit_command(entry: dict | None, rows: list[dict]) -> str | None:
    """``adspine fit ...`` that builds the recommended configuration, where the detector module provides it."""
    if entry is None:
        return None
    from adspine.detector import fit_command

    row = next((r for r in rows if (r["backbone"], r["init"], r.get("precision") or "fp32", r["method"],
                                    str(r.get("dataset") or "dataset"))
                == (entry["backbone"], entry["init"], entry.get("precision") or "fp32", entry["method"],
                    entry["dataset"])), None)
    if row is None:
        return None
    try:
        return str(fit_command(row))
    except (KeyError, TypeError, ValueError):
        return None


def _prepare_out(out: Path) -> Path:
    """A fresh temporary folder beside ``out`` (same file system: the final moves are renames)."""
    for p in [out, *out.parents]:
        if p.exists() and not p.is_dir():
            raise ReportError(f"{out}: {p} is a file, not a folder; pass another --out folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".adspine-report-", dir=out.parent))
    except OSError as e:
        raise ReportError(f"{out}: cannot write the report here ({e.strerror or e}); check the folder's permissions "
                          "or pass another --out folder") from None


def _publish(tmp: Path, out: Path) -> None:
    """Move every file from ``tmp`` into ``out`` (renames), ``report.html`` last."""
    files = sorted((p for p in tmp.rglob("*") if p.is_file()), key=lambda p: p.name == "report.html")
    for p in files:
        dest = out / p.relative_to(tmp)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(p, dest)


def _spec_rank_by(specs: dict[str, str]) -> str | None:
    """The studies' ``rank_by`` where they agree on one (None: the default)."""
    import yaml

    found = set()
    for text in specs.values():
        try:
            d = yaml.safe_load(text or "")
        except yaml.YAMLError:
            continue
        if isinstance(d, dict) and d.get("rank_by"):
            found.add(str(d["rank_by"]))
    return found.pop() if len(found) == 1 else None


def build_report(db: str | Path, out: str | Path, budget_ms: float | None = None, rank_by: str | None = None) -> Path:
    """Write every report file into ``out`` and return the path of ``report.html``. ``rank_by``: the ranking and
    recommendation criterion (``recommend.RANK_BY``; None = the study spec's ``rank_by``, else ``auto``)."""
    from adspine.report.recommend import RANK_BY

    from adspine.study.store import ResultStore, StoreError

    db, out = Path(db), Path(out)
    if not db.is_file():
        raise ReportError(f"{db}: results store not found; pass the --db file written by `adspine study`")
    if budget_ms is not None and not budget_ms > 0:
        raise ReportError(f"--budget-ms {budget_ms}: must be a positive number of milliseconds")
    if rank_by is not None and rank_by not in RANK_BY:
        raise ReportError(f"--rank-by {rank_by}: must be one of {', '.join(RANK_BY)}")
    if out.resolve() == db.resolve() or db.resolve() in out.resolve().parents:
        raise ReportError(f"{out}: is the results store itself; pass another --out folder")
    try:
        store = ResultStore(db, readonly=True)
    except StoreError as e:
        raise ReportError(str(e)) from None
    tmp = _prepare_out(out)
    try:
        with store:
            _build(store, db, tmp, budget_ms, rank_by)
        _publish(tmp, out)
    except OSError as e:
        where = e.filename or out
        raise ReportError(f"{where}: cannot write the report ({e.strerror or e}); free disk space or pass another "
                          "--out folder (nothing was written)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "report.html"


def _build(store, db: Path, out: Path, budget_ms: float | None, rank_by: str | None = None) -> None:
    from adspine.report import html as html_mod
    from adspine.report import plots as plots_mod
    from adspine.report import recommend as rec_mod
    from adspine.report import significance as sig_mod
    from adspine.report.examples import CategoryExamples, category_extremes, render_category
    from adspine.report.tables import add_baselines, baseline_csv, baseline_entries, baseline_rows_for, datasets, \
        family_tables, ranking, ranking_csv, ranking_latex, ranking_markdown, slug

    files: list[Path] = []
    rows = store.rows()
    jobs = store.jobs()
    failed_jobs = [j for j in jobs if j.get("status") in ("failed", "killed")]
    failed_methods = store.failed_results()
    specs = store.study_specs()
    rank_by = rank_by or _spec_rank_by(specs) or "auto"

    final = store.final_timings()
    ranks = ranking(rows, final)
    by_ds = {ds: [e for e in ranks if e["dataset"] == ds] for ds in datasets(rows)}
    sig, modes, refs, shortcut = {}, {}, {}, {}
    precision_views: dict[str, list[dict]] = {}  # per dataset: bf16 / int8 configurations against fp32
    for ds, entries in by_ds.items():
        ds_rows = [r for r in rows if str(r.get("dataset") or "dataset") == ds]
        sig[ds] = sig_mod.compare_to_best(ds_rows, entries)
        sig_mod.compare_localisation(ds_rows, entries)
        modes[ds] = rec_mod.resolve_rank_by(rank_by, entries)
        by_ds[ds] = entries = rec_mod.order(entries, modes[ds])
        base_rows = baseline_rows_for(store.baselines(ds), ds_rows)
        refs[ds] = baseline_entries(base_rows, ds)
        shortcut[ds] = rec_mod.shortcut_warning(entries, refs[ds])
        stem = out / "tables" / f"ranking_{slug(ds)}"
        files += [_write(stem.with_suffix(".md"), ranking_markdown(entries, ds, modes[ds], refs[ds], shortcut[ds])),
                  _write(stem.with_suffix(".tex"), ranking_latex(entries, ds, modes[ds], refs[ds])),
                  _write(stem.with_suffix(".csv"), ranking_csv(entries))]
        if base_rows:
            files.append(_write(out / "tables" / f"baselines_{slug(ds)}.csv", baseline_csv(base_rows)))
        from adspine.report.precision import precision_comparison, precision_markdown, use_final_timings

        precision_views[ds] = precision_comparison(ds_rows)
        use_final_timings(precision_views[ds], entries)
        precision_md = precision_markdown(precision_views[ds])
        if precision_md:  # some configuration ran in bf16 / int8 beside fp32
            files.append(_write(out / "tables" / f"precision_{slug(ds)}.md", precision_md))
        if sig[ds].per_category:
            files.append(_write(out / "tables" / f"significance_{slug(ds)}.csv", _csv(
                sig_mod.category_csv_rows(entries, sig[ds]),
                ["dataset", "category", "backbone", "init", "method", "is_best", "p_holm", "indistinguishable",
                 "precision"])))

    fams = family_tables(rows)
    add_baselines(fams, refs)
    for t in fams:
        stem = out / "tables" / t.name
        files += [_write(stem.with_suffix(".md"), t.to_markdown()), _write(stem.with_suffix(".tex"), t.to_latex()),
                  _write(stem.with_suffix(".csv"), t.to_csv())]

    plots = {}
    for ds, entries in by_ds.items():
        plots[ds] = plots_mod.dataset_plots(entries, ds, out / "plots", slug(ds))
        files += [v["path"] for v in plots[ds].values()]

    recs = []
    for ds, entries in by_ds.items():
        rec = rec_mod.recommend(entries, budget_ms, rank_by=rank_by, baselines=refs[ds])
        rec.fit_command = _fit_command(rec.best, rows)
        recs.append(rec)
    files.append(_write(out / "recommendation.md", rec_mod.to_markdown(recs)))

    examples = []
    top_method = {ds: (entries[0]["method"] if entries else None) for ds, entries in by_ds.items()}
    for ds in by_ds:
        ds_rows = [r for r in rows if str(r.get("dataset") or "dataset") == ds]
        for _ds, cat, method, best, worst in category_extremes(ds_rows, top_method[ds]):
            item = CategoryExamples(ds, cat, method, best, worst)
            p = render_category(store, item, out / "examples" / f"{slug(ds)}_{slug(cat)}.png")
            if p:
                files.append(p)
            examples.append(item)

    job_cols = ["job_id", "status", "attempts", "dataset", "category", "backbone", "init", "started_at", "error"]
    files.append(_write(out / "tables" / "failed_jobs.csv",
                        _csv([[j.get(c) for c in job_cols] for j in failed_jobs], job_cols)))
    res_cols = ["job_id", "dataset", "category", "backbone", "init", "method", "rd_seed", "error"]
    files.append(_write(out / "tables" / "failed_methods.csv",
                        _csv([[r.get(c) for c in res_cols] for r in failed_methods], res_cols)))

    ctx = {
        "meta": _meta(db, rows, jobs, specs, final),
        "datasets": list(by_ds),
        "ranking": by_ds,
        "significance": sig,
        "rank_mode": modes,
        "baselines": refs,
        "shortcut": shortcut,
        "precision": precision_views,
        "plots": plots,
        "family_tables": fams,
        "recommendations": recs,
        "examples": examples,
        "failed": failed_jobs,
        "failed_methods": failed_methods,
        "files": [str(p.relative_to(out)) for p in files],
    }
    _write(out / "report.html", html_mod.render(ctx))
