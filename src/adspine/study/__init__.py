"""The study: spec (YAML + presets), job runner, executors (in-process, Ray), timing helpers and the results store."""

from adspine.study.spec import SpecError, StudySpec, load_spec
from adspine.study.store import ResultStore

__all__ = ["ResultStore", "SpecError", "StudySpec", "load_spec", "plan_jobs", "run_study"]


def __getattr__(name: str):
    # runner pulls in torch; import it only when asked for
    if name in ("plan_jobs", "run_study"):
        from adspine.study import runner

        return getattr(runner, name)
    raise AttributeError(name)
