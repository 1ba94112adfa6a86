"""CLI commands: ``study`` (run, dry-run or show a spec), ``results export`` and ``demo`` (the README's main command).

Exit codes (``adspine.clitools``): 0 every job done; 1 a job or method failed, or killed jobs were skipped (rerun
with --retry-killed); 2 bad input found before any work (spec, plan, store or output path), or a full disk, one line
per problem; 130 interrupted (Ctrl-C), 143 terminated (SIGTERM): finished jobs are committed; rerun to continue.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
import warnings
from collections.abc import Iterator
from enum import Enum
from pathlib import Path

import typer
from typer.core import TyperGroup

from adspine.clitools import EXIT_FAILED, EXIT_INTERRUPTED, fail

EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, as a shell reports a process ended by SIGTERM


def _consoles():
    from rich.console import Console

    return Console(), Console(stderr=True)


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Each ``LargeImageWarning`` (naming its file) as one yellow line on stderr, once, as it happens."""
    from rich.markup import escape

    from adspine.data.images import LargeImageWarning

    _, err = _consoles()
    seen: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("always", LargeImageWarning)
        default = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            if not issubclass(category, LargeImageWarning):
                return default(message, category, filename, lineno, file, line)
            if str(message) not in seen:
                seen.add(str(message))
                err.print(f"[yellow]warning:[/yellow] {escape(str(message))}", soft_wrap=True, highlight=False)

        warnings.showwarning = show
        yield


class _RunByDefault(TyperGroup):
    """``adspine study SPEC ...`` means ``adspine study run SPEC ...``; ``show`` is a subcommand."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


study_app = typer.Typer(cls=_RunByDefault, no_args_is_help=True,
                        help="Run (SPEC), dry-run or show a study spec. SPEC: a YAML file or a preset name.")
results_app = typer.Typer(help="The results store: export its rows.", no_args_is_help=True)


class ExecutorName(str, Enum):
    inprocess = "inprocess"
    ray = "ray"


class ExportFormat(str, Enum):
    csv = "csv"
    parquet = "parquet"


def load_plan(spec: str, data_root: Path | None):
    """The checked plan of a spec, or every problem on its own line and exit 2."""
    from adspine.study.plan import PlanError, plan
    from adspine.study.spec import SpecError

    try:
        return plan(spec, data_root=data_root)
    except (SpecError, PlanError) as e:
        fail(str(e).splitlines())


def print_dry_run(p, notes: dict[str, str] | None = None) -> float:
    """Print the job list with per-job time estimates and ``notes`` (job id -> what a run will do with it: a note
    starting 'skipped' leaves it out of the total); return the total estimated seconds."""
    from rich import box
    from rich.table import Table

    from adspine.study.estimate import human_seconds

    console, _ = _consoles()
    spec, jobs = p.spec, p.jobs
    est = p.estimate()
    layers = {j.layers if isinstance(j.layers, str) else ",".join(j.layers) for j in jobs}
    h, w = spec.size_hw
    table = Table(title=f"study '{spec.name}': {len(jobs)} job(s); {spec.protocol} protocol at {h}x{w} px; "
                        f"layers {', '.join(sorted(layers))}", box=box.SIMPLE_HEAD, pad_edge=False)
    for col, kw in (("job id", {"no_wrap": True}), ("category", {"overflow": "fold"}),
                    ("backbone", {"overflow": "fold", "min_width": 12}), ("init", {"overflow": "fold"}),
                    ("train/test", {"justify": "right", "no_wrap": True}),
                    ("GFLOPs", {"justify": "right", "no_wrap": True}), ("est.", {"justify": "right", "no_wrap": True})):
        table.add_column(col, **kw)
    precisions = {j.precision for j in jobs}
    if precisions != {"fp32"}:  # a precision axis: say which job is which
        table.add_column("precision", no_wrap=True)
    notes = notes or {}
    if notes:
        table.add_column("note", overflow="fold")
    total = 0.0
    for e in est:
        j = e["job"]
        note = notes.get(j.job_id, "")
        total += 0.0 if note.startswith("skipped") else e["seconds"]
        imgs = f"{e['n_train']}/{e['n_test']}" + ("" if e["data_found"] else "?")
        table.add_row(j.job_id, f"{j.dataset}/{j.category}", j.backbone, j.init, imgs,
                      "?" if e["flops"] is None else f"{e['flops'] / 1e9:.2f}", human_seconds(e["seconds"]),
                      *([j.precision] if precisions != {"fp32"} else []), *([note] if notes else []))
    from rich.console import Console

    wide = console if console.is_terminal else Console(width=max(console.width, 130), file=console.file)
    wide.print(table)
    if any(not e["data_found"] for e in est):
        console.print("?: dataset not readable yet; image counts assumed (MVTec AD means: 242 train, 115 test).",
                      soft_wrap=True)
    console.print(
        f"{len(jobs)} job(s); estimated total [bold]{human_seconds(total)}[/bold] on this machine with "
        f"{spec.threads or 'default'} thread(s). Estimate = (truncated-backbone FLOPs x images + each method's FLOP "
        "model) / this CPU's measured 3x3-conv FLOP/s, calibrated on the demo; a guide, not a promise.",
        soft_wrap=True,
    )
    return total


@study_app.command("run")
def study_run(
    spec: str = typer.Argument(..., help="Spec YAML file or preset name (see 'adspine study show')."),
    db: Path = typer.Option(Path("results.sqlite"), "--db", help="SQLite results store (created if missing)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check everything, list the jobs with an estimate; run "
                                                          "nothing."),
    executor: ExecutorName = typer.Option(ExecutorName.inprocess, "--executor", help="inprocess or ray."),
    address: str = typer.Option(None, "--address", help="Ray cluster address (with --executor ray)."),
    data_root: Path = typer.Option(None, "--data-root", help="Replace the dataset root of the spec."),
    retry_killed: bool = typer.Option(False, "--retry-killed", help="Rerun jobs whose earlier process died "
                                                                    "mid-job (e.g. out of memory)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Run a study: every problem is reported before any work; finished jobs in --db are skipped, failed jobs are
    retried, a job whose process died is retried once, each method's result is committed as it ends. Exit 1 when a
    job or method failed."""
    if address and executor != ExecutorName.ray:
        fail("--address only applies to --executor ray")
    with one_line_warnings():
        p = load_plan(spec, data_root)
        from rich.markup import escape

        _, err = _consoles()
        for where, n in p.skipped_links.items():  # as `adspine data summary` counts them
            err.print(f"[yellow]warning:[/yellow] {escape(where)}: skipped {n} broken or looping link(s)",
                      soft_wrap=True, highlight=False)
        for note in p.notes:  # e.g. bf16 emulated on this CPU
            err.print(f"note: {escape(note)}", soft_wrap=True, highlight=False)
        if dry_run:
            dry_run_jobs(p, db, retry_killed)
            return
        summary = run_plan(p, db, executor.value, address, progress, retry_killed)
    if not summary.ok:
        raise typer.Exit(EXIT_FAILED)


DRY_RUN_NOTES = {"killed": "skipped: killed twice (--retry-killed reruns it)", "retry": "retry: killed once",
                 "running": "skipped: running in another process"}


def dry_run_jobs(p, db: Path, retry_killed: bool) -> None:
    """``--dry-run``: the jobs a run would start, those it will skip (killed twice, running elsewhere) marked."""
    from adspine.study.store import ResultStore, StoreError, plain_run_outcome

    console, _ = _consoles()
    try:
        readable = db.is_file() and db.stat().st_size > 0  # an empty file is filled by the run
        with ResultStore(db, readonly=True) if readable else contextlib.nullcontext() as store:
            stored = {j["job_id"]: j for j in store.jobs()} if store else {}
    except StoreError as e:
        fail(str(e))
    outcomes = {jid: plain_run_outcome(row) for jid, row in stored.items()}
    done = {jid for jid, o in outcomes.items() if o == "done"}
    if done:
        console.print(f"{sum(j.job_id in done for j in p.jobs)} of these are already done in {db}.")
    p.jobs = [j for j in p.jobs if j.job_id not in done]
    notes = {jid: DRY_RUN_NOTES[o] for jid, o in outcomes.items() if o in DRY_RUN_NOTES}
    if retry_killed:
        notes.update({jid: "retry: killed twice (--retry-killed)" for jid, o in outcomes.items() if o == "killed"})
    if p.jobs:
        print_dry_run(p, {j.job_id: notes[j.job_id] for j in p.jobs if j.job_id in notes})
    else:
        console.print("nothing to run.")


@study_app.command("show")
def study_show(spec: str = typer.Argument(None, help="Preset name or spec file; none: list the presets.")) -> None:
    """Print a preset's (or spec file's) YAML, e.g. to start your own spec from it."""
    from adspine.study.spec import SpecError, preset_names, resolve_spec_path

    if spec is None:
        typer.echo("presets: " + ", ".join(preset_names()) + "  (adspine study show NAME > my.yaml)")
        return
    try:
        _, text = resolve_spec_path(spec)
    except SpecError as e:
        fail(str(e))
    typer.echo(text.rstrip("\n"))


def run_plan(p, db: Path, executor: str, address: str | None, progress: bool, retry_killed: bool = False):
    from adspine.study.store import ResultStore, StoreError

    from adspine.study.run import Terminated

    console, err = _consoles()
    t0 = time.perf_counter()
    job_log = logging.getLogger("adspine.study.job")  # its method failures are printed here once, by run.Claims
    quiet = logging.NullHandler()
    job_log.addHandler(quiet)
    try:
        summary = p.run(db, executor=executor, address=address, show_progress=progress, console=console,
                        retry_killed=retry_killed)
    except ValueError as e:  # StoreError (e.g. a full disk), a missing optional library: one line, nothing lost
        fail(str(e))
    except KeyboardInterrupt as e:
        try:
            with ResultStore(db, readonly=True) as store:
                n = len(store.done_job_ids())
        except StoreError:
            n = 0
        what, code = ("terminated (SIGTERM)", EXIT_TERMINATED) if isinstance(e, Terminated) else \
            ("interrupted", EXIT_INTERRUPTED)
        err.print(f"[yellow]{what}[/yellow]: {n} finished job(s) are committed in {db}; run the same "
                  "command again to resume.", soft_wrap=True)
        raise typer.Exit(code)
    finally:
        job_log.removeHandler(quiet)
    console.print(f"{summary.line(p.spec.name)} in {time.perf_counter() - t0:.0f} s -> {db}", soft_wrap=True,
                  highlight=False, markup=False)
    return summary


def export_rows(db: Path, fmt: str, out: Path) -> int:
    """Write the store's flat result rows (finished jobs) to CSV or Parquet; return the row count."""
    import csv

    from adspine.outputs import write_atomically
    from adspine.study.store import JOB_COLUMNS, RESULT_COLUMNS, ResultStore

    with ResultStore(db, readonly=True) as store:
        rows = store.rows()
    blobs = {c for c, t in RESULT_COLUMNS.items() if t == "BLOB"}
    cols = [c for c in dict.fromkeys([*JOB_COLUMNS, *RESULT_COLUMNS]) if c not in blobs]
    rows = [{c: r.get(c) for c in cols} for r in rows]

    def write(tmp: Path) -> None:
        if fmt == "csv":
            with tmp.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=cols)
                w.writeheader()
                w.writerows(rows)
        else:
            try:
                import pyarrow as pa
                import pyarrow.parquet as pq
            except ImportError:
                raise ValueError("parquet export needs pyarrow: pip install 'adspine[parquet]'") from None
            kinds = {"INTEGER": pa.int64(), "REAL": pa.float64()}
            types = {**JOB_COLUMNS, **RESULT_COLUMNS}
            schema = pa.schema([(c, kinds.get(types[c].split()[0], pa.string())) for c in cols])
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)

    write_atomically(out, write)
    return len(rows)


@results_app.command("export")
def results_export(
    db: Path = typer.Option(..., "--db", help="SQLite results store."),
    fmt: ExportFormat = typer.Option(ExportFormat.csv, "--format", help="csv or parquet."),
    out: Path = typer.Option(..., "--out", help="Output file (written whole or not at all)."),
) -> None:
    """Export one row per (job, method, Rd seed) with every figure and its provenance."""
    from adspine.outputs import OutputError
    from adspine.study.store import StoreError

    try:
        n = export_rows(db, fmt.value, out)
    except (StoreError, OutputError, ValueError) as e:
        fail(str(e))
    typer.echo(f"wrote {n} row(s) to {out}")


DEMO_SYNTH = {"seed": 0}  # the generator's small defaults (128 px, 24 train images per category), demo categories only


def demo(
    out: Path = typer.Option(Path("adspine-demo"), "--out", help="Folder for data, results store and report."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """The main job, offline: synthetic data -> demo study (pretrained vs random backbones) -> report."""
    from rich.markup import escape

    from adspine.data import synth
    from adspine.study.spec import SpecError, load_spec

    console, _ = _consoles()
    t0 = time.perf_counter()
    data = out / "data"
    try:
        spec = load_spec("demo", data)
    except SpecError as e:
        fail(str(e).splitlines())
    cats = spec.datasets[0].categories
    if not (data / "adspine_dataset.json").is_file():
        console.print(f"generating the synthetic dataset in {data} ...")
        try:
            synth.generate(data, **DEMO_SYNTH, categories=None if cats == "all" else list(cats))
        except ValueError as e:  # DatasetError: e.g. a half-written folder from an interrupted run
            fail(f"{e} (delete {data} and run the demo again)")
    p = load_plan(spec, None)
    db = out / "results.sqlite"
    summary = run_plan(p, db, "inprocess", None, progress)
    from adspine.report import build_report

    try:
        report = build_report(db, out / "report")
    except ValueError as e:  # ReportError / OutputError: one line naming the problem
        fail(f"report: {e}")
    where = escape(str(Path(report).resolve()))
    console.print(f"demo finished in {time.perf_counter() - t0:.0f} s. Report: [bold]{where}[/bold]", soft_wrap=True)
    if not summary.ok:
        raise typer.Exit(EXIT_FAILED)


def register(app: typer.Typer) -> None:
    """Add ``study``, ``results`` (export) and ``demo`` to the main app."""
    app.add_typer(study_app, name="study")
    app.add_typer(results_app, name="results")
    app.command("demo")(demo)


__all__ = ["register", "export_rows", "print_dry_run"]
