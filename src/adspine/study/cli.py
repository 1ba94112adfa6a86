"""CLI commands: ``study`` (run or dry-run a spec), ``results export`` and ``demo`` (the README's main command)."""

from __future__ import annotations

import csv
import time
from enum import Enum
from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()
err_console = Console(stderr=True)

results_app = typer.Typer(help="The results store: export its rows.", no_args_is_help=True)


class ExecutorName(str, Enum):
    inprocess = "inprocess"
    ray = "ray"


class ExportFormat(str, Enum):
    csv = "csv"
    parquet = "parquet"


def _fail(msg: str, code: int = 2) -> None:
    err_console.print(f"[red]error:[/red] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _load(spec: str, data_root: Path | None):
    from adspine.study.spec import SpecError, load_spec

    try:
        return load_spec(spec, data_root=data_root)
    except SpecError as e:
        _fail(str(e))


def print_dry_run(spec, jobs) -> float:
    """Print the job list with per-job time estimates; return the total estimated seconds."""
    from adspine.study.runner import estimate_jobs, human_seconds

    est = estimate_jobs(spec, jobs)
    layers = {j.layers if isinstance(j.layers, str) else ",".join(j.layers) for j in jobs}
    table = Table(title=f"study '{spec.name}': {len(jobs)} job(s); {spec.protocol} protocol at {spec.image_size} px; "
                        f"layers {', '.join(sorted(layers))}", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("job id", no_wrap=True)
    table.add_column("category", overflow="fold")
    table.add_column("backbone", overflow="fold", min_width=12)
    table.add_column("init", overflow="fold")
    table.add_column("train/test", justify="right", no_wrap=True)
    table.add_column("GFLOPs", justify="right", no_wrap=True)
    table.add_column("est.", justify="right", no_wrap=True)
    total = 0.0
    for e in est:
        j = e["job"]
        total += e["seconds"]
        imgs = f"{e['n_train']}/{e['n_test']}" + ("" if e["data_found"] else "?")
        table.add_row(j.job_id, f"{j.dataset}/{j.category}", j.backbone, j.init, imgs,
                      "?" if e["flops"] is None else f"{e['flops'] / 1e9:.2f}", human_seconds(e["seconds"]))
    wide = console if console.is_terminal else Console(width=max(console.width, 130), file=console.file)
    wide.print(table)
    if any(not e["data_found"] for e in est):
        console.print("?: dataset folder not found; image counts assumed (MVTec AD means: 242 train, 115 test).",
                      soft_wrap=True)
    n_res = sum(len(spec.rd_seeds) if m.name == "padim" else 1 for m in spec.methods)
    console.print(
        f"{len(jobs)} jobs x about {n_res} result(s) each; estimated total [bold]{human_seconds(total)}[/bold] "
        f"on this machine with {spec.threads or 'default'} thread(s).\n"
        "Estimate = (truncated-backbone FLOPs x images + a FLOP model per method) / this CPU's measured 3x3-conv "
        "FLOP/s; an order of magnitude, not a promise.",
        soft_wrap=True,
    )
    return total


def study(
    spec: str = typer.Argument(..., help="Spec YAML file or preset name (thesis, demo)."),
    db: Path = typer.Option(Path("results.sqlite"), "--db", help="SQLite results store (created if missing)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the jobs and an estimated time; run nothing."),
    executor: ExecutorName = typer.Option(ExecutorName.inprocess, "--executor", help="inprocess or ray."),
    address: str = typer.Option(None, "--address", help="Ray cluster address (with --executor ray)."),
    data_root: Path = typer.Option(None, "--data-root", help="Replace the dataset root of the spec."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Run a study (resumable: finished jobs in --db are skipped; failed jobs are retried)."""
    from adspine.study.runner import plan_jobs, run_study
    from adspine.study.store import ResultStore

    s = _load(spec, data_root)
    try:
        jobs = plan_jobs(s)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    if dry_run:
        done = ResultStore(db).done_job_ids() if db.exists() else set()
        if done:
            console.print(f"{sum(j.job_id in done for j in jobs)} of these are already done in {db}.")
        todo = [j for j in jobs if j.job_id not in done]
        if todo:
            print_dry_run(s, todo)
        else:
            console.print("nothing to run.")
        return
    if address and executor != ExecutorName.ray:
        _fail("--address only applies to --executor ray")
    _run(s, db, executor.value, address, progress)


def _run(spec, db: Path, executor: str, address: str | None, progress: bool):
    from adspine.study.runner import run_study

    t0 = time.perf_counter()
    try:
        summary = run_study(spec, db, executor=executor, address=address, show_progress=progress, console=console)
    except KeyboardInterrupt:
        from adspine.study.store import ResultStore

        n = len(ResultStore(db).done_job_ids())
        err_console.print(
            f"[yellow]interrupted[/yellow]: {n} finished job(s) are committed in {db}; "
            "run the same command again to resume.",
            soft_wrap=True,
        )
        raise typer.Exit(130)
    console.print(
        f"study '{spec.name}': {summary.done} done, {summary.failed} failed, {summary.skipped} already done "
        f"(of {summary.planned}) in {time.perf_counter() - t0:.0f} s -> {db}",
        soft_wrap=True,
    )
    return summary


def export_rows(db: Path, fmt: str, out: Path) -> int:
    """Write the store's flat result rows (finished jobs) to CSV or Parquet; return the row count."""
    from adspine.study.store import JOB_COLUMNS, RESULT_COLUMNS, ResultStore

    with ResultStore(db) as store:
        rows = store.rows()
    cols = list(dict.fromkeys([*JOB_COLUMNS, *RESULT_COLUMNS]))
    rows = [{c: r.get(c) for c in cols} for r in rows]
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        with out.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        kinds = {"INTEGER": pa.int64(), "REAL": pa.float64()}
        schema = pa.schema([(c, kinds.get({**JOB_COLUMNS, **RESULT_COLUMNS}[c].split()[0], pa.string())) for c in cols])
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), out)
    return len(rows)


@results_app.command("export")
def results_export(
    db: Path = typer.Option(..., "--db", help="SQLite results store."),
    fmt: ExportFormat = typer.Option(ExportFormat.csv, "--format", help="csv or parquet."),
    out: Path = typer.Option(..., "--out", help="Output file."),
) -> None:
    """Export one row per (job, method, Rd seed) with every figure and its provenance."""
    if not db.is_file():
        _fail(f"{db}: no such results store")
    n = export_rows(db, fmt.value, out)
    console.print(f"wrote {n} row(s) to {out}", soft_wrap=True)


DEMO_SYNTH = {"seed": 0}  # the generator's small defaults (128 px, 24 train images per category), demo categories only


def demo(
    out: Path = typer.Option(Path("adspine-demo"), "--out", help="Folder for data, results store and report."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """The main job, offline: synthetic data -> demo study (pretrained vs random backbones) -> report."""
    from adspine.data import synth

    t0 = time.perf_counter()
    data = out / "data"
    spec = _load("demo", data)
    cats = spec.datasets[0].categories
    if not (data / "adspine_dataset.json").is_file():
        console.print(f"generating the synthetic dataset in {data} ...")
        try:
            synth.generate(data, **DEMO_SYNTH, categories=None if cats == "all" else list(cats))
        except ValueError as e:  # DatasetError: e.g. a half-written folder from an interrupted run
            _fail(f"{e} (delete {data} and run the demo again)")
    db = out / "results.sqlite"
    _run(spec, db, "inprocess", None, progress)
    try:
        from adspine.report import build_report
    except ImportError:
        console.print("report step skipped: adspine.report.build_report is not available yet.")
        return
    try:
        report = build_report(db, out / "report")
    except ValueError as e:  # ReportError: one line naming the problem
        _fail(f"report: {e}", 1)
    where = escape(str(Path(report).resolve()))
    console.print(f"demo finished in {time.perf_counter() - t0:.0f} s. Report: [bold]{where}[/bold]", soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``study``, ``results`` (export) and ``demo`` to the main app."""
    app.command("study")(study)
    app.add_typer(results_app, name="results")
    app.command("demo")(demo)


__all__ = ["register", "export_rows", "print_dry_run"]
