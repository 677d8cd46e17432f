"""Crash-safe file output, path containment, JSON input with one message format, and one run per folder.

Every file this project writes goes through :func:`atomic_write` (or one of its wrappers): the bytes land in a
temporary file in the destination folder, are flushed to disk, and only then renamed over the final name. A process
killed at any instant therefore leaves either the old file, the complete new file, or a stray ``*.tmp-*`` file that
no reader ever opens as a result.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any, NoReturn

import filelock

from animl_lightning.core.errors import AnimlError, DataError, InputFileError, RunLockedError

TMP_MARKER = ".tmp-"
LOCK_FILENAME = ".animl-lightning.lock"


class UnsafePathError(InputFileError):
    """A path taken from input data would leave the folder it must stay in."""


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (datasets, checkpoints and model files run to gigabytes)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_json_file(path: str | Path, error: type[AnimlError] = InputFileError) -> Any:
    """Parse a JSON file; every problem raises ``error`` with one message format naming the file.

    Missing or unreadable files, bytes that are not UTF-8 and malformed JSON (with line, column and character
    position) each get one sentence. Large files (CCT exports reach hundreds of MB) are parsed with orjson when it
    is installed, with the cyclic garbage collector paused; the standard library re-parses a file orjson refuses,
    which both gives the position and accepts the NaN that Python writers emit.
    """
    source = Path(path)
    try:
        raw = source.read_bytes()
    except FileNotFoundError as err:
        raise error(f"{source} does not exist") from err
    except IsADirectoryError as err:
        raise error(f"{source} is a folder, not a JSON file") from err
    except OSError as err:
        raise error(f"{source}: cannot read: {err}") from err
    was_enabled = gc.isenabled()
    # Parsing creates millions of small dicts; the cyclic collector would rescan them over and over (3x slower).
    gc.disable()
    try:
        try:
            import orjson

            try:
                return orjson.loads(raw)
            except orjson.JSONDecodeError:
                pass
        except ImportError:
            pass
        try:
            return json.loads(raw)
        except json.JSONDecodeError as err:
            raise error(
                f"{source}: not valid JSON (truncated or malformed) at line {err.lineno}, column {err.colno} "
                f"(character {err.pos}): {err.msg}"
            ) from err
        except UnicodeDecodeError as err:
            raise error(f"{source}: not UTF-8 text at byte {err.start}: {err.reason}") from err
    finally:
        if was_enabled:
            gc.enable()


@contextlib.contextmanager
def run_lock(folder: str | Path, command: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` for this process while a command writes there.

    A second process that asks for the same folder is refused at once with :class:`RunLockedError` (naming the
    folder and the lock file), instead of both writing the same files. The lock is an OS file lock
    (``filelock``), so a killed process releases it; the lock file itself stays and is harmless.
    """
    root = Path(folder)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError as err:
        raise InputFileError(f"{root} is a file, not a folder") from err
    except OSError as err:
        raise InputFileError(f"{root}: cannot create the folder: {err}") from err
    if not root.is_dir():
        raise InputFileError(f"{root} is a file, not a folder")
    lock = filelock.FileLock(root / LOCK_FILENAME, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout as err:
        raise RunLockedError(
            f"{root} is in use by another {command} (lock file {root / LOCK_FILENAME}); wait for it to finish or "
            "use another folder"
        ) from err
    try:
        yield root
    finally:
        lock.release()


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing and rename it into place on success.

    On any exception the temporary file is removed and ``path`` is left untouched. An OSError that does not say
    which file it is about (a write or flush on a full disk) is raised again naming ``path``.
    """
    if mode not in {"w", "wb"}:
        raise DataError(f"atomic_write supports modes 'w' and 'wb', got {mode!r}")
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}{TMP_MARKER}")
    except OSError as err:
        _raise_naming(err, target)
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
    except OSError as err:
        tmp.unlink(missing_ok=True)
        _raise_naming(err, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _raise_naming(err: OSError, target: Path) -> NoReturn:
    """Raise ``err``, naming ``target`` when it names no file (so the one-line message says where the disk is full)."""
    if err.filename is not None or err.errno is None:
        raise err
    raise OSError(err.errno, err.strerror, str(target)) from err


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


def check_writable(path: str | Path, key: str) -> Path:
    """Check, before any work, that a file can be written at ``path`` (``key`` names the setting in the error).

    Refuses a folder, a parent that is a file or cannot be created, and a folder this process cannot write to, by
    creating and removing a temporary file there.

    Raises:
        InputFileError: naming the key, the path and the reason.
    """
    target = Path(path)
    if target.is_dir():
        raise InputFileError(f"{key}: {target} is a folder; give a file name")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}{TMP_MARKER}")
    except OSError as err:
        raise InputFileError(f"{key}: cannot write {target}: {err.strerror or err}") from err
    os.close(fd)
    Path(probe).unlink(missing_ok=True)
    return target


def same_file(first: str | Path, second: str | Path) -> bool:
    """Whether two paths name one file: the same file on disk (a symlink or a hard link to it), else the same path.

    A path that does not exist yet is compared by its absolute, symlink-free form, so ``out/../md.json`` is
    ``md.json``.
    """
    a, b = Path(first), Path(second)
    try:
        return a.samefile(b)
    except OSError:  # one of them does not exist (yet) or cannot be looked at: compare where they point
        return a.resolve() == b.resolve()


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


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C back until the block ends, so a set of files is written whole; then the interrupt is raised."""
    pending: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    except ValueError:  # not the main thread: signals are delivered to the main thread anyway
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            raise KeyboardInterrupt
