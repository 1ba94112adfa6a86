"""Executors: run study jobs in this process (default, no Ray needed) or as Ray tasks on a local or existing cluster.

Either way only the driver writes the store: it claims a job before handing it out (so two drivers on one store
split the work) and records what comes back through ``claims`` (see ``run.Claims``). On Ray a job whose worker
process or node died is resubmitted once (``Claims.died``); an exception raised by the job itself is a failed job.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

from adspine.study.job import execute_job
from adspine.study.plan import Job
from adspine.study.spec import StudySpec


class InProcessExecutor:
    """Jobs one after another in this process, with a per-image progress bar; each method's result is committed
    as it ends."""

    name = "inprocess"

    def run(self, spec: StudySpec, jobs: list[Job], claims, progress=None) -> None:
        jobs_task = progress.add("jobs", len(jobs)) if progress else None
        img_task = progress.add("images", None) if progress else None
        for job in jobs:
            if progress:
                progress.update(jobs_task, description=f"jobs  {job.label()}")
                progress.update(img_task, completed=0, total=None)

            def cb(done: int, total: int) -> None:
                if progress:
                    progress.update(img_task, completed=done, total=total)

            if claims.claim(job):  # Ctrl-C, SIGTERM, a full disk: ``run_plan`` releases the job
                out = execute_job(spec, job, cb, on_result=lambda r, e, job=job: claims.result(job, r, e))
                claims.finish(job, out["job"])
            if progress:
                progress.update(jobs_task, advance=1)


def _ray_job(spec_dict: dict[str, Any], job: Job, threads: int) -> dict[str, Any]:
    """Ray task body: rebuild the spec, pin torch threads to the task's CPUs, run one job."""
    import torch

    spec = StudySpec.model_validate(spec_dict)
    if spec.threads is None:
        torch.set_num_threads(max(1, threads))
    return execute_job(spec, job)


class RayExecutor:
    """Each job is a Ray task (``num_gpus=1`` on CUDA, else ``num_cpus`` = spec threads); the driver claims jobs as
    it submits them (at most ``max_in_flight`` at once: the cluster's CPUs / threads) and writes what comes back.
    Connects to ``address`` (e.g. ``ray://head:10001`` or ``auto``) or, with none, uses an already initialised Ray
    or starts a local one. Workers need adspine installed in the same version. ``job_fn`` replaces the task body
    (same arguments as ``_ray_job``; tests use it to stand in for a job)."""

    name = "ray"

    def __init__(self, address: str | None = None, max_in_flight: int | None = None,
                 job_fn: Callable[..., dict[str, Any]] | None = None, **init_kwargs: Any):
        self.address, self.max_in_flight, self.init_kwargs = address, max_in_flight, init_kwargs
        self.job_fn = job_fn or _ray_job

    def run(self, spec: StudySpec, jobs: list[Job], claims, progress=None) -> None:
        from adspine.study.job import base_row, format_error
        from adspine.study.store import is_disk_full

        ray = require_ray()
        died = _process_deaths(ray)

        started = False
        if not ray.is_initialized():
            sigterm = signal.getsignal(signal.SIGTERM)
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False, **self.init_kwargs)
            started = True
            if sigterm is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, sigterm)  # ray.init sets its own (exit at once): keep the study's
        try:
            threads = spec.threads or 1
            opts: dict[str, Any] = {"num_cpus": threads, "max_retries": 0}
            if spec.device == "cuda":
                opts["num_gpus"] = 1
            remote = ray.remote(self.job_fn).options(**opts)  # no Ray retries: deaths are counted in the store
            spec_dict = spec.model_dump(mode="json")
            limit = self.max_in_flight or max(1, int(ray.cluster_resources().get("CPU", 1) // threads))
            queue, refs = list(jobs), {}
            task = progress.add("jobs (ray)", len(jobs)) if progress else None
            try:
                while queue or refs:
                    while queue and len(refs) < limit:
                        job = queue.pop(0)
                        if claims.claim(job):
                            refs[remote.remote(spec_dict, job, threads)] = job
                        elif progress:
                            progress.update(task, advance=1)
                    if not refs:
                        continue
                    ready, _ = ray.wait(list(refs), num_returns=1)
                    for ref in ready:
                        job = refs.pop(ref)
                        try:
                            out = ray.get(ref)
                        except died as e:  # the worker process or its node: resubmitted once
                            if claims.died(job, f"ray: {format_error(e)}"):
                                refs[remote.remote(spec_dict, job, threads)] = job
                            elif progress:
                                progress.update(task, advance=1)
                            continue
                        except Exception as e:  # raised by the job itself: recorded as a failed job
                            cause = getattr(e, "cause", None)
                            if cause is not None and is_disk_full(cause):
                                raise cause from None  # a worker's disk is full: stop the study
                            row = base_row(spec, job)
                            row.update(status="failed", error=f"ray: {format_error(e)}")
                            out = {"job": row, "results": []}
                        for result, examples in out["results"]:
                            claims.result(job, result, examples)
                        claims.finish(job, out["job"])
                        if progress:
                            progress.update(task, advance=1)
            except BaseException:  # Ctrl-C, SIGTERM, a full disk: ``run_plan`` releases the jobs
                for ref in refs:
                    ray.cancel(ref, force=True)
                raise
        finally:
            if started:
                ray.shutdown()


def _process_deaths(ray) -> tuple[type[BaseException], ...]:
    """Ray's errors for a task whose process died (worker crash, lost node, Ray's out-of-memory kill), as opposed
    to ``RayTaskError`` (the task raised)."""
    x = ray.exceptions
    return (x.WorkerCrashedError, x.NodeDiedError, x.ObjectLostError, x.OutOfMemoryError)


def require_ray():
    try:
        import ray
    except ImportError:
        raise ValueError("--executor ray needs Ray: pip install 'adspine[ray]'") from None
    return ray


def make_executor(executor: str | Any, address: str | None = None):
    """'inprocess' | 'ray' | an executor object."""
    if not isinstance(executor, str):
        return executor
    if executor == "inprocess":
        if address:
            raise ValueError("--address only applies to --executor ray")
        return InProcessExecutor()
    if executor == "ray":
        require_ray()
        return RayExecutor(address)
    raise ValueError(f"unknown executor '{executor}'; valid: inprocess, ray")
