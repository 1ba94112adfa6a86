"""Executors: run study jobs in this process (default, no Ray needed) or as Ray tasks on a local or existing cluster.

Either way only the driver writes the store: an executor calls ``on_done(outcome)`` for every finished job, where
``outcome`` is what ``runner.execute_job`` returns (failures included).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adspine.study.runner import Job, execute_job
from adspine.study.spec import StudySpec

OnDone = Callable[[dict[str, Any]], None]


class InProcessExecutor:
    """Jobs one after another in this process, with a per-image progress bar."""

    name = "inprocess"

    def run(self, spec: StudySpec, jobs: list[Job], on_done: OnDone, progress=None) -> None:
        jobs_task = progress.add("jobs", len(jobs)) if progress else None
        img_task = progress.add("images", None) if progress else None
        for job in jobs:
            if progress:
                progress.update(jobs_task, description=f"jobs  {job.label()}")
                progress.update(img_task, completed=0, total=None)

            def cb(done: int, total: int) -> None:
                if progress:
                    progress.update(img_task, completed=done, total=total)

            on_done(execute_job(spec, job, cb))
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
    """Each job is a Ray task (``num_gpus=1`` on CUDA, else ``num_cpus`` = spec threads); results flow back to the
    driver, which writes the store. Connects to ``address`` (e.g. ``ray://head:10001`` or ``auto``) or, with none,
    uses an already initialised Ray or starts a local one. Workers need adspine installed in the same version."""

    name = "ray"

    def __init__(self, address: str | None = None, **init_kwargs: Any):
        self.address, self.init_kwargs = address, init_kwargs

    def run(self, spec: StudySpec, jobs: list[Job], on_done: OnDone, progress=None) -> None:
        import ray

        started = False
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False, **self.init_kwargs)
            started = True
        try:
            threads = spec.threads or 1
            opts: dict[str, Any] = {"num_cpus": threads, "max_retries": 0}
            if spec.device == "cuda":
                opts["num_gpus"] = 1
            remote = ray.remote(_ray_job).options(**opts)
            spec_dict = spec.model_dump(mode="json")
            refs = {remote.remote(spec_dict, job, threads): job for job in jobs}
            task = progress.add("jobs (ray)", len(jobs)) if progress else None
            try:
                while refs:
                    ready, _ = ray.wait(list(refs), num_returns=1)
                    for ref in ready:
                        job = refs.pop(ref)
                        try:
                            out = ray.get(ref)
                        except Exception as e:  # worker crash, Ray OOM kill, ...: recorded as a failed job
                            from adspine.study.runner import base_row, format_error

                            row = base_row(spec, job)
                            row.update(status="failed", error=f"ray: {format_error(e)}")
                            out = {"job": row, "results": [], "examples": []}
                        on_done(out)
                        if progress:
                            progress.update(task, advance=1)
            except KeyboardInterrupt:
                for ref in refs:
                    ray.cancel(ref, force=True)
                raise
        finally:
            if started:
                ray.shutdown()


def make_executor(executor: str | Any, address: str | None = None):
    """'inprocess' | 'ray' | an executor object."""
    if not isinstance(executor, str):
        return executor
    if executor == "inprocess":
        if address:
            raise ValueError("--address only applies to --executor ray")
        return InProcessExecutor()
    if executor == "ray":
        return RayExecutor(address)
    raise ValueError(f"unknown executor '{executor}'; valid: inprocess, ray")
