"""Running a plan: claim each job in the store before its work, commit each method's result as it ends, drive an
executor and a progress display, and sum it up.

Claims make a store safe to share: two runners (or two Ray drivers) on one store split the jobs, and a job whose
process died mid-way (killed, out of memory) is marked ``killed`` on the next run and skipped unless
``retry_killed``; an interrupted study loses nothing that had finished.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from adspine.study.plan import Job, Plan
from adspine.study.store import ResultStore


@dataclass
class StudySummary:
    planned: int
    skipped: int  # already done before this run
    done: int
    failed: int  # jobs that failed (data, backbone, or every method)
    methods_failed: int  # failed method runs inside finished jobs
    killed: int  # earlier attempts that died mid-job, skipped (rerun with --retry-killed)
    elsewhere: int  # held by another live runner
    db: str

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.methods_failed == 0 and self.killed == 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self, name: str) -> str:
        parts = [f"{self.done} done", f"{self.failed} failed"]
        if self.methods_failed:
            parts.append(f"{self.methods_failed} method run(s) failed")
        if self.killed:
            parts.append(f"{self.killed} killed earlier (skipped; --retry-killed reruns them)")
        if self.elsewhere:
            parts.append(f"{self.elsewhere} running in another process")
        parts.append(f"{self.skipped} already done")
        return f"study '{name}': {', '.join(parts)} (of {self.planned})"


class Claims:
    """The driver's side of the store: claim a job, record its results, finish it; counts for the summary."""

    def __init__(self, plan: Plan, store: ResultStore, summary: StudySummary, retry_killed: bool, console=None):
        self.plan, self.store, self.summary, self.retry_killed, self.console = plan, store, summary, retry_killed, \
            console

    def claim(self, job: Job) -> bool:
        from adspine.study.job import base_row

        why = self.store.claim_job(base_row(self.plan.spec, job), retry_killed=self.retry_killed)
        if why == "done":
            self.summary.skipped += 1
        elif why == "killed":
            self.summary.killed += 1
        elif why == "running":
            self.summary.elsewhere += 1
        return why is None

    def release(self, job: Job) -> None:
        self.store.release_job(job.job_id)

    def result(self, job: Job, result: dict[str, Any], examples: list[dict[str, Any]]) -> None:
        self.store.record_result(job.job_id, result, examples)
        if result.get("status") == "failed":
            self.summary.methods_failed += 1
            self._say(f"[red]method failed[/red] {job.label()} {result['method']}: {result.get('error')}")

    def finish(self, job: Job, row: dict[str, Any]) -> None:
        self.store.finish_job(row)
        if row.get("status") == "done":
            self.summary.done += 1
        else:
            self.summary.failed += 1
            self._say(f"[red]job failed[/red] {job.label()}: {row.get('error')}")

    def _say(self, text: str) -> None:
        if self.console is not None:
            from rich.markup import escape

            head, _, rest = text.partition("] ")
            self.console.print(f"{head}] {escape(rest)}", soft_wrap=True)


def run_plan(plan: Plan, db: str | Path, executor: str | Any = "inprocess", address: str | None = None,
             show_progress: bool = False, console=None, retry_killed: bool = False) -> StudySummary:
    """Run every unfinished job of ``plan``, committing as it goes. Raises KeyboardInterrupt after Ctrl-C; what had
    finished is committed and the interrupted job is released for the next run."""
    from adspine.study.executors import make_executor

    ex = make_executor(executor, address=address)
    store = ResultStore(db)
    try:
        store.record_spec(plan.spec.name, plan.spec_yaml())
        store.mark_dead_leases()
        summary = StudySummary(len(plan.jobs), 0, 0, 0, 0, 0, 0, str(db))
        done = store.done_job_ids()
        pending = [j for j in plan.jobs if j.job_id not in done]
        summary.skipped = len(plan.jobs) - len(pending)
        if pending:
            claims = Claims(plan, store, summary, retry_killed, console)
            with Progress(show_progress, console) as prog:
                ex.run(plan.spec, pending, claims, prog)
        return summary
    finally:
        store.close()


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
