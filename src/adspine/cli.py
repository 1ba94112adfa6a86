"""The ``adspine`` command line: one sub-command group per concern, each defined next to its code."""

from __future__ import annotations

import typer

from adspine.backbones.cli import app as backbones_app
from adspine.data.cli import app as data_app
from adspine.report.cli import register as register_report
from adspine.study.cli import register as register_study

app = typer.Typer(
    help="adspine: which CNN backbone makes embedding-comparison anomaly detection work best, and at what speed.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(data_app, name="data", help="Datasets: synthetic generator, magnetic tile adapter, summaries.")
app.add_typer(backbones_app, name="backbones", help="The backbone registry: list variants, show layer shapes.")
register_study(app)  # adds: study, results, demo
register_report(app)  # adds: report

if __name__ == "__main__":
    app()
