"""What every ``adspine`` command shares: exit codes and the one-line error helper (imports typer and rich only).

Exit codes: 0 ok; 1 a job, method or image failed (or, for ``predict``, was flagged); 2 bad input or an output path
that cannot be written, found before any work, one line per problem; 130 interrupted (finished work is kept).
"""

from __future__ import annotations

import typer

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def fail(lines: str | BaseException | list[str], code: int = EXIT_BAD_INPUT) -> None:
    """Print each problem as one ``error:`` line on stderr (no traceback) and exit with ``code``."""
    from rich.console import Console
    from rich.markup import escape

    if isinstance(lines, KeyError) and lines.args:
        lines = str(lines.args[0])
    err = Console(stderr=True, soft_wrap=True)
    for line in [str(lines)] if not isinstance(lines, list) else lines:
        for part in str(line).splitlines() or [""]:
            err.print(f"[red]error:[/red] {escape(part)}", highlight=False)
    raise typer.Exit(code)
