"""Crash-safe file output and path containment.

Every file this project writes goes through :func:`atomic_write` (or one of its wrappers): the bytes land in a
temporary file in the destination folder, are flushed to disk, and only then renamed over the final name. A process
killed at any instant therefore leaves either the old file, the complete new file, or a stray ``*.tmp-*`` file that
no reader ever opens as a result.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any

TMP_MARKER = ".tmp-"


class UnsafePathError(ValueError):
    """A path taken from input data would leave the folder it must stay in."""


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing and rename it into place on success.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    if mode not in {"w", "wb"}:
        raise ValueError(f"atomic_write supports modes 'w' and 'wb', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}{TMP_MARKER}")
    tmp = Path(tmp_name)
    try:
        encoding = None if "b" in mode else "utf-8"
        newline = None if "b" in mode else "\n"
        with os.fdopen(fd, mode, encoding=encoding, newline=newline) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600 files; crops and tables are meant to be shared like any other output.
        tmp.chmod(0o644)
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path, "w") as handle:
        handle.write(text)


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 1) -> None:
    """Serialise ``obj`` as JSON (stable key order as given, UTF-8, trailing newline) and write it atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False) + "\n")


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete temporary files left by a killed writer below ``folder``; return how many were removed."""
    root = Path(folder)
    if not root.exists():
        return 0
    removed = 0
    for stale in root.rglob(f"*{TMP_MARKER}*"):
        if stale.is_file() and stale.name.startswith("."):
            stale.unlink(missing_ok=True)
            removed += 1
    return removed


def safe_relative(name: str) -> PurePosixPath:
    """Validate a relative path taken from input data (a CCT ``file_name``, an S3 key, a crop path).

    Refuses absolute paths, drive letters, backslashes, empty components, ``.`` and ``..``, and NUL bytes,
    so that joining the result to a root folder can never leave that folder.

    Raises:
        UnsafePathError: naming the offending value and why.
    """
    if not isinstance(name, str) or not name:
        raise UnsafePathError(f"path must be a non-empty string, got {name!r}")
    if "\x00" in name:
        raise UnsafePathError(f"path {name!r} contains a NUL byte")
    if "\\" in name:
        raise UnsafePathError(f"path {name!r} contains a backslash; use '/' separators")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafePathError(f"path {name!r} is absolute; expected a path relative to its root folder")
    parts = name.split("/")
    for part in parts:
        if part in {"", ".", ".."}:
            raise UnsafePathError(f"path {name!r} has a {part or 'empty'!r} component that could escape its root")
    return PurePosixPath(*parts)


def safe_join(root: str | Path, name: str) -> Path:
    """Join a validated relative ``name`` to ``root``; see :func:`safe_relative` for what is refused."""
    return Path(root) / safe_relative(name)
