"""What every ``adspine`` command shares: exit codes, the one-line error helper and table output (``print_table``:
a rich table on a terminal, plain lines when piped, or csv / json); imports typer and rich only.

Exit codes: 0 ok; 1 a job, method or image failed (or, for ``predict``, was flagged); 2 bad input or an output path
that cannot be written, found before any work, one line per problem; 130 interrupted (finished work is kept).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from enum import Enum
from typing import Any

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


# ------------------------------------------------------------------------------------------------- table output


class TableFormat(str, Enum):
    """How a command prints its table: ``table`` (boxed, for people), ``plain`` (tab-separated lines), ``csv`` or
    ``json`` (a list of objects keyed by column)."""

    table = "table"
    plain = "plain"
    csv = "csv"
    json = "json"


TABLE_FORMAT_HELP = ("table, plain (tab-separated lines), csv or json (default: table on a terminal, plain when "
                     "piped; never cut to a width).")


def table_format(fmt: TableFormat | str | None, console) -> TableFormat:
    """The format asked for, else ``table`` on a terminal and ``plain`` when piped."""
    return TableFormat(fmt or ("table" if console.is_terminal else "plain"))


def _cell_text(value: Any) -> str:
    """A cell's text: None empty, lists joined with ', '."""
    if value is None:
        return ""
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _flat(value: Any, sep: str) -> str:
    """A cell's text on one line: line breaks replaced by ``sep``, tabs by spaces."""
    return sep.join(_cell_text(value).splitlines()).replace("\t", " ")


def print_table(columns: Sequence[str | tuple[str, dict]], rows: Sequence[Sequence[Any]], *,
                fmt: TableFormat | str | None = None, title: str | None = None, console=None,
                **table_options: Any) -> None:
    """Print ``rows`` under ``columns`` (a name, or ``(name, rich add_column options)``) as ``fmt``; None: a rich
    table on a terminal, plain lines otherwise. Only ``table`` shows ``title``; ``json`` keeps the values' types."""
    from rich.console import Console

    console = console or Console()
    fmt = table_format(fmt, console)
    names = [c if isinstance(c, str) else c[0] for c in columns]
    if fmt is TableFormat.table:
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=None if title is None else escape(title), **table_options)
        for c in columns:
            name, options = (c, {}) if isinstance(c, str) else c
            table.add_column(escape(name), **options)
        for row in rows:
            table.add_row(*(escape(_cell_text(v)) for v in row))
        # piped: as wide as the table needs, never cut to the 80 columns rich assumes
        (console if console.is_terminal else Console(file=console.file, width=100_000)).print(table)
        return
    keys = [_flat(n, " ") for n in names]
    out = console.file
    if fmt is TableFormat.json:
        out.write(json.dumps([dict(zip(keys, row)) for row in rows], indent=2, default=str) + "\n")
    elif fmt is TableFormat.csv:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerows([keys, *([_flat(v, "; ") for v in row] for row in rows)])
    else:
        for line in [keys, *([_flat(v, "; ") for v in row] for row in rows)]:
            out.write("\t".join(line) + "\n")
    out.flush()
