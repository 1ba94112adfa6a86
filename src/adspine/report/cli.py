"""CLI command: ``adspine report --db results.sqlite --out DIR [--budget-ms MS] [--rank-by CRITERION]``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def report(
    db: Path = typer.Option(..., "--db", help="SQLite results store written by 'adspine study'."),
    out: Path = typer.Option(Path("report"), "--out", help="Folder for report.html, tables, plots and examples."),
    budget_ms: Optional[float] = typer.Option(
        None, "--budget-ms", help="Latency budget per image (backbone at batch 1 + method) for the recommendation."
    ),
    rank_by: Optional[str] = typer.Option(
        None, "--rank-by", help="Ranking and recommendation criterion: auto (localisation where masks exist), image "
        "or localisation (never recommend a model whose AUPRO or pixel AUROC is significantly more than 5 / 2 points "
        "below the best's). "
        "Default: the study spec's rank_by, else auto."
    ),
) -> None:
    """Write tables (Markdown, LaTeX, CSV), plots, example overlays, a recommendation and a self-contained HTML."""
    from adspine.clitools import fail
    from adspine.report.build import ReportError, build_report

    try:
        path = build_report(db, out, budget_ms=budget_ms, rank_by=rank_by)
    except ReportError as e:
        fail(str(e))
    typer.echo(str(path))
    for line in (path.parent / "recommendation.md").read_text().splitlines():
        if line.startswith("adspine fit "):
            typer.echo(f"build the recommendation: {line}")


def register(app: typer.Typer) -> None:
    """Add this concern's commands to the main app."""
    app.command("report")(report)
