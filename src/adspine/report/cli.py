"""CLI command: report (filled in by its owner)."""

import typer


def register(app: typer.Typer) -> None:
    """Add this concern's commands to the main app."""
