"""Reports from the results store: family tables, ranking, plots, example overlays, recommendation, HTML."""

from adspine.report.build import ReportError, build_report

__all__ = ["ReportError", "build_report"]
