"""The study: spec (YAML + presets) -> plan (jobs, checked before any work) -> run (executors, results store) ->
estimate. Modules: ``spec``, ``plan``, ``job`` (one job), ``run`` (claims, progress), ``executors`` (in-process,
Ray), ``estimate`` (dry run), ``timing``, ``store``, ``cli``. Names below are imported on first use."""

import importlib

_EXPORTS = {
    "Job": "plan", "Plan": "plan", "PlanError": "plan", "plan": "plan",
    "SpecError": "spec", "StudySpec": "spec", "load_spec": "spec",
    "ResultStore": "store", "StoreError": "store",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"adspine.study.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'adspine.study' has no attribute {name!r}")
