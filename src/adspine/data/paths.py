"""Names and paths that come from data (CSV rows, category and defect names, JSON fields) made safe to write to.

``plain_name`` accepts one file or folder name; ``safe_join`` joins relative names under a root and refuses any
result that resolves outside it (``..``, absolute paths, a symbolic link leading out). Both raise a one-line
``DatasetError`` starting with ``where`` (the row or file the value came from). No numpy, no Pillow.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from adspine.data.errors import DatasetError


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be one file or folder name, or None when it can."""
    if not name:
        return "is empty"
    if "\0" in name:
        return "holds a NUL character"
    if "/" in name or "\\" in name:
        return "holds a path separator"
    if name in (".", ".."):
        return f"is {name!r}"
    if PureWindowsPath(name).anchor:
        return "is an absolute path"
    return None


def plain_name(name: str, what: str, where: str) -> str:
    """``name`` when it is one plain file or folder name; else a DatasetError ``<where>: <what> <name> ...``."""
    problem = name_problem(name)
    if problem:
        raise DatasetError(f"{where}: {what} {name!r} {problem} (it must be a plain file or folder name)")
    return name


def safe_join(root: Path | str, *parts: str | os.PathLike, where: str | None = None) -> Path:
    """``root`` joined with ``parts`` (relative paths; ``/`` separates names), refused unless every name is plain
    and the resolved result lies inside the resolved ``root``."""
    root = Path(root)
    names: list[str] = []
    for part in parts:
        text = os.fspath(part)
        prefix = f"{where or root}: path {text!r}"
        if not PurePosixPath(text).parts:
            raise DatasetError(f"{prefix} names no file or folder")
        if PurePosixPath(text).is_absolute() or PureWindowsPath(text).anchor:
            raise DatasetError(f"{prefix} is absolute (expected a path inside {root})")
        for name in PurePosixPath(text).parts:
            problem = name_problem(name)
            if problem:
                raise DatasetError(f"{prefix}: name {name!r} {problem} (expected a path inside {root})")
        names.extend(PurePosixPath(text).parts)
    joined = root.joinpath(*names)
    try:
        inside = joined.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a symbolic link loop
        inside = False
    if not inside:
        raise DatasetError(f"{where or joined}: {joined} resolves outside {root} (through a symbolic link)")
    return joined
