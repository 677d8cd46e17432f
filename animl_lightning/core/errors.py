"""The project's error family.

Every error this project raises for a bad input, a bad setting or an unusable file derives from :class:`AnimlError`,
so each entry point catches that one type and prints its message as one line (exit status 2). Anything else that
escapes is a bug and keeps its traceback. Each error belongs to one of three groups, by what the user must do:
:class:`ConfigError` (fix a setting), :class:`InputFileError` (fix an input file or record) and
:class:`ResourceError` (free or reach a resource: a folder another run holds, a full disk, a process that could not
run). The first two also derive from ``ValueError``, so callers that caught that keep working.
"""

from __future__ import annotations

from collections.abc import Iterable


class AnimlError(Exception):
    """Base of every error raised for bad input; the message names the file, record and field (or the setting)."""


class InterruptedWork(KeyboardInterrupt):
    """Ctrl-C, honoured where the work could stop cleanly; the message says what was done and how to resume."""


class ConfigError(AnimlError, ValueError):
    """A setting is missing or out of range; the message names the key as it is written on the command line."""


def require(condition: bool, key: str, message: str) -> None:
    """The settings check of every typed constructor: ``ConfigError("<key>: <message>")`` unless ``condition``."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


def require_known_keys(values: Iterable[str], known: Iterable[str], key: str, what: str = "key") -> None:
    """A settings block read from a mapping names only ``known`` keys: ``<key>: unknown key(s) [...]; known: [...]``."""
    known = sorted(known)
    unknown = sorted(set(values) - set(known))
    require(not unknown, key, f"unknown {what}(s) {unknown}; known: {known}")


class InputFileError(AnimlError, ValueError):
    """An input or output file cannot be used; the message names the file, the record and the field."""


class ResourceError(AnimlError):
    """A resource the command needs is not available (held by another run, full, unreachable, or a child process that
    could not run); the message names it."""


class RunLockedError(ResourceError):
    """Another process is already working on the same output folder."""


class DataError(InputFileError):
    """Data handed to a computation cannot be used (empty, out of range, inconsistent); the message says which."""
