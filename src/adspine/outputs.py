"""Writing output files safely: to a temporary name beside the target, renamed into place only when complete, with
one-line errors naming the path and what to do (full disk, read-only folder, a folder or a file in the way)."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


class OutputError(ValueError):
    """An output path cannot be written; one line naming it and what to do."""


def explain(path: Path, e: OSError) -> str:
    """One line for an OSError met while writing ``path``."""
    code = getattr(e, "errno", None)
    if code == errno.ENOSPC:
        return f"{path}: disk full; free space or write elsewhere"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{path}: not writable (permission denied or read-only file system); choose another output path"
    if code == errno.EISDIR:
        return f"{path}: is a folder; give a file path"
    if code == errno.ENOTDIR:
        return f"{path}: a parent of this path is a file, not a folder; choose another output path"
    return f"{path}: cannot write ({e.strerror or e})"


def check_parent(path: Path) -> None:
    """Create ``path``'s folder, or fail in one line when a file is in the way or it cannot be made."""
    for p in [path.parent, *path.parent.parents]:
        if p.exists():
            if not p.is_dir():
                raise OutputError(f"{path}: {p} is a file, not a folder; choose another output path")
            break
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(explain(path, e)) from None


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``. On any failure nothing
    (not even a partial or empty file) is left at ``path``, and an OSError becomes a one-line ``OutputError``."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file path")
    check_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise OutputError(explain(path, e)) from None
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise OutputError(explain(path, e)) from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path
