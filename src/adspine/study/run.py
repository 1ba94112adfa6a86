"""Running a plan: claim each job in the store before its work, commit each method's result as it ends, drive an
executor and a progress display, and sum it up.

Claims make a store safe to share: two runners (or two Ray drivers) on one store split the jobs, and a job whose
process died mid-way (killed, out of memory, a lost Ray node) is retried automatically once; dead again, it is marked
``killed`` and skipped unless ``retry_killed``. An interrupted (Ctrl-C) or terminated (SIGTERM) study loses nothing
that had finished and releases the job it was running; a full disk stops it at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adspine.study.plan import Job, Plan
from adspine.study.store import ResultStore, StoreError, is_disk_full


class Terminated(KeyboardInterrupt):
    """SIGTERM (schedulers, ``docker stop``, cluster managers) arrived: handled like Ctrl-C."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within: the first SIGTERM raises ``Terminated`` in the main thread; later ones are ignored while the running
    job is released. Elsewhere than the main thread nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    received = threading.Event()

    def handler(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        received.set()
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except KeyboardInterrupt as e:
        if received.is_set() and not isinstance(e, Terminated):  # Ray re-raises it as a plain KeyboardInterrupt
            raise Terminated() from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class StudySummary:
    planned: int
    skipped: int  # already done before this run
    done: int
    failed: int  # jobs that failed (data, backbone, or every method)
    methods_failed: int  # failed method runs inside finished jobs
    killed: int  # jobs whose process died again after the automatic retry, skipped (rerun with --retry-killed)
    elsewhere: int  # held by another live runner
    db: str
    retried: list[str] = field(default_factory=list)  # jobs rerun because their process died (labels)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.methods_failed == 0 and self.killed == 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self, name: str) -> str:
        parts = [f"{self.done} done", f"{self.failed} failed"]
        if self.methods_failed:
            parts.append(f"{self.methods_failed} method run(s) failed")
        if self.retried:
            shown = ", ".join(self.retried[:3]) + (", ..." if len(self.retried) > 3 else "")
            parts.append(f"{len(self.retried)} retried after their process died ({shown})")
        if self.killed:
            parts.append(f"{self.killed} killed twice (skipped; --retry-killed reruns them)")
        if self.elsewhere:
            parts.append(f"{self.elsewhere} running in another process")
        parts.append(f"{self.skipped} already done")
        return f"study '{name}': {', '.join(parts)} (of {self.planned})"


class Claims:
    """The driver's side of the store: claim a job, record its results, finish it; counts for the summary."""

    def __init__(self, plan: Plan, store: ResultStore, summary: StudySummary, retry_killed: bool, console=None):
        self.plan, self.store, self.summary, self.retry_killed, self.console = plan, store, summary, retry_killed, \
            console
        self._methods_failed: dict[str, int] = {}  # per job: method failures already reported

    def claim(self, job: Job) -> bool:
        from adspine.study.job import base_row

        outcome = self.store.claim_job(base_row(self.plan.spec, job), retry_killed=self.retry_killed)
        if outcome == "done":
            self.summary.skipped += 1
        elif outcome == "killed":
            self.summary.killed += 1
        elif outcome == "running":
            self.summary.elsewhere += 1
        elif outcome == "retried":
            self.summary.retried.append(job.label())
        return outcome in ("claimed", "retried")

    def release_all(self) -> None:
        """Give back every job this process holds (after Ctrl-C, SIGTERM, a full disk); where even that cannot be
        written, the next run finds their dead leases and retries them."""
        with contextlib.suppress(StoreError):
            self.store.release_job()

    def died(self, job: Job, error: str) -> bool:
        """The process running ``job`` died (a Ray worker or node): True to retry it now (first death), else it is
        marked killed and reported."""
        if self.store.job_died(job.job_id, error):
            self.summary.retried.append(job.label())
            return True
        self.summary.killed += 1
        self._say(f"[red]job killed[/red] {job.label()}: {error} (died twice; --retry-killed reruns it)")
        return False

    def result(self, job: Job, result: dict[str, Any], examples: list[dict[str, Any]]) -> None:
        self.store.record_result(job.job_id, result, examples)
        if result.get("status") == "failed":
            self.summary.methods_failed += 1
            self._methods_failed[job.job_id] = self._methods_failed.get(job.job_id, 0) + 1
            self._say(f"[red]method failed[/red] {job.label()} {result['method']}: {result.get('error')}")

    def finish(self, job: Job, row: dict[str, Any]) -> None:
        self.store.finish_job(row)
        if row.get("status") == "done":
            self.summary.done += 1
        else:
            self.summary.failed += 1
            said = self._methods_failed.get(job.job_id) and str(row.get("error")).endswith("method run(s) failed")
            if not said:  # every method failed and each was reported: the summary counts the job
                self._say(f"[red]job failed[/red] {job.label()}: {row.get('error')}")

    def _say(self, text: str) -> None:
        if self.console is not None:
            from rich.markup import escape

            head, _, rest = text.partition("] ")
            self.console.print(f"{head}] {escape(rest)}", soft_wrap=True)


def run_plan(plan: Plan, db: str | Path, executor: str | Any = "inprocess", address: str | None = None,
             show_progress: bool = False, console=None, retry_killed: bool = False) -> StudySummary:
    """Run every unfinished job of ``plan``, committing as it goes. Raises KeyboardInterrupt after Ctrl-C
    (``Terminated`` after SIGTERM); what had finished is committed and the interrupted job is released for the next
    run. A full disk raises ``StoreError`` at once (one line)."""
    from adspine.study.executors import make_executor

    ex = make_executor(executor, address=address)
    store = ResultStore(db)
    try:
        with sigterm_as_interrupt():
            return _run(plan, store, ex, db, show_progress, console, retry_killed)
    except OSError as e:  # e.g. a method's temporary files on a full disk
        if not is_disk_full(e):
            raise
        raise StoreError(f"{e.filename or 'disk'}: disk full ({e.strerror}); free space and run again (finished "
                         f"jobs are kept in {db})") from None
    finally:
        store.close()


def _run(plan: Plan, store: ResultStore, ex, db: str | Path, show_progress: bool, console,
         retry_killed: bool) -> StudySummary:
    """``run_plan`` on an open store."""
    store.record_spec(plan.spec.name, plan.spec_yaml())
    store.mark_dead_leases()
    if plan.spec.baselines:
        record_baselines(plan, store, console)
    summary = StudySummary(len(plan.jobs), 0, 0, 0, 0, 0, 0, str(db))
    done = store.done_job_ids()
    pending = [j for j in plan.jobs if j.job_id not in done]
    summary.skipped = len(plan.jobs) - len(pending)
    if pending:
        claims = Claims(plan, store, summary, retry_killed, console)
        try:
            with Progress(show_progress, console) as prog:
                ex.run(plan.spec, pending, claims, prog)
        except BaseException:  # the job(s) it was running: released, even when claimed an instant ago
            claims.release_all()
            raise
    if plan.spec.timing.final:  # not reached after Ctrl-C, SIGTERM or a full disk (they raise above)
        record_final_timing(plan, store, console, ran=summary.done > 0)
    return summary


def record_final_timing(plan: Plan, store: ResultStore, console=None, ran: bool = True) -> None:
    """Re-time the backbones of the study's finished jobs round-robin in this (the driver's) process and store them
    apart from the per-job figures (``timing.final_timing``); the report's speed statements use them. Done when
    this run finished a job or the study has no final timing yet; a failure is reported and the study goes on."""
    import logging

    from adspine.study.timing import final_timing

    log = logging.getLogger(__name__)
    done = store.done_job_ids()
    jobs = [j for j in plan.jobs if j.job_id in done]
    if not jobs or (not ran and store.final_timings(plan.spec.name)):
        return
    try:
        rows, problems = final_timing(plan.spec, jobs)
    except Exception as e:  # noqa: BLE001 - the per-job figures remain; never stops the study
        if is_disk_full(e):
            raise
        rows, problems = [], [f"final timing failed: {type(e).__name__}: {e}".splitlines()[0]]
    for line in problems:
        log.warning("%s", line)
    if rows:
        store.record_final_timing(rows)
    if console is not None and rows:
        r = rows[0]
        load = " -> ".join("?" if v is None else f"{v:.1f}" for v in (r["load_before"], r["load_after"]))
        busy = max((v for v in (r["load_before"], r["load_after"]) if v is not None), default=0.0) > r["cores"]
        console.print(f"final timing: {len(rows)} backbone configuration(s) re-timed round-robin in "
                      f"{r['wall_s']:.1f} s ({r['repeats']} rounds; 1-minute load {load} on {r['cores']} usable "
                      f"core(s){'; busier than the cores: the report says so' if busy else ''})",
                      soft_wrap=True, markup=False, highlight=False)


def record_baselines(plan: Plan, store: ResultStore, console=None) -> None:
    """The trivial baselines (``adspine.baselines``) of every category of the plan not yet in the store, once per
    category and input size; a failure is reported and the study goes on."""
    import logging

    from adspine.baselines import category_baselines
    from adspine.study.plan import scan

    seen = set()
    for job in plan.jobs:
        key = (job.dataset, job.category, job.protocol, *job.image_size)
        if key in seen:
            continue
        seen.add(key)
        if any((r["category"], r["protocol"], r["image_height"], r["image_width"]) == key[1:]
               for r in store.baselines(job.dataset)):
            continue
        try:
            rows = category_baselines(scan(job, verify=False), job.protocol, job.image_size)
        except Exception as e:  # noqa: BLE001 - a reference figure; never stops the study
            logging.getLogger(__name__).warning("%s/%s: trivial baselines failed: %s", job.dataset, job.category, e)
            continue
        store.record_baselines([{**r, "dataset": job.dataset, "dataset_root": job.root} for r in rows])
        if console is not None:
            best = max(rows, key=lambda r: r["image_auroc"])
            console.print(f"{job.dataset}/{job.category}: best trivial baseline {best['baseline']} image AUROC "
                          f"{100 * best['image_auroc']:.1f} %", soft_wrap=True, markup=False)


class Progress:
    """Rich progress bars for jobs and images (ETA from rich's TimeRemainingColumn); no-op when disabled."""

    def __init__(self, enabled: bool, console=None):
        self.enabled, self.console, self._p = enabled, console, None

    def __enter__(self) -> "Progress":
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._p = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                   console=self.console)
            self._p.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._p is not None:
            self._p.__exit__(*exc)

    def add(self, description: str, total: int | None) -> int | None:
        return self._p.add_task(description, total=total) if self._p else None

    def update(self, task: int | None, **kw) -> None:
        if self._p is not None and task is not None:
            self._p.update(task, **kw)
