"""adspine: which CNN backbone makes embedding-comparison anomaly detection work best, and at what speed.

Public entry points (imported lazily, so ``import adspine`` stays light): ``adspine.plan(spec).run(db)`` runs a
study (spec: a YAML file, a preset name or a ``StudySpec``); ``adspine.Detector`` fits, thresholds, saves and exports
one chosen configuration.
"""

__version__ = "0.2.0"

__all__ = ["Detector", "plan", "__version__"]


def __getattr__(name: str):
    if name == "plan":
        from adspine.study.plan import plan

        return plan
    if name == "Detector":
        from adspine.detector import Detector

        return Detector
    raise AttributeError(f"module 'adspine' has no attribute {name!r}")
