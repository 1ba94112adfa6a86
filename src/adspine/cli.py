"""The ``adspine`` command line: one sub-command group per concern, each defined next to its code.

Command modules import only typer at module level (heavy libraries inside the commands), so ``--help`` and the
quick commands start at once.
"""

from __future__ import annotations

import typer

from adspine.backbones.cli import app as backbones_app
from adspine.data.cli import app as data_app
from adspine.detector.cli import register as register_detector
from adspine.report.cli import register as register_report
from adspine.study.cli import register as register_study


def _version(value: bool) -> None:
    if value:
        from adspine import __version__

        typer.echo(f"adspine {__version__}")
        raise typer.Exit()


app = typer.Typer(
    help="adspine: which CNN backbone makes embedding-comparison anomaly detection work best, and at what speed.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """Exit codes: 0 ok; 1 a job, method or image failed or was flagged; 2 bad input (one line per problem);
    130 interrupted."""


app.add_typer(data_app, name="data", help="Datasets: synthetic generator, layouts (mvtec, visa, folder, manifest), LabelMe masks, summaries.")
app.add_typer(backbones_app, name="backbones", help="The backbone registry: list variants, show layer shapes.")
register_study(app)  # adds: study, results, demo
register_report(app)  # adds: report
register_detector(app)  # adds: fit, predict, evaluate, export (the engineer's path)

if __name__ == "__main__":
    app()
