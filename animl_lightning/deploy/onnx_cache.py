"""A folder of exported ONNX models, so ``classify`` pays for the export once per checkpoint, not once per run.

An entry is two files named by its key, the SHA-256 of its *identity* (:func:`export_identity`: the checkpoint's
SHA-256, everything the exporter bakes into the graph, and the versions of this project, torch, ONNX, onnxscript and
ONNX Runtime):

- ``<key>.onnx``: the model;
- ``<key>.json``: the identity itself, the model's SHA-256 and size, and what the build reported (written last, so
  it always describes a complete model file).

An entry is used only when its sidecar holds the same identity and the model file's size and digest match it, and
ONNX Runtime can open it; anything else (a truncated or edited file, a sidecar of another build) is logged and built
again. Files are written atomically (temporary file + rename); a build holds an OS file lock on ``<key>.lock`` so
that runs started together on an empty cache export once and the others wait and read the result. A cache folder
that cannot be written is not an error: the run goes on with an uncached export, and says so in the log.

Nothing ever removes entries: the folder may be deleted at any time (the next run rebuilds what it needs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import filelock

from animl_lightning import __version__
from animl_lightning.core.errors import AnimlError
from animl_lightning.core.files import TMP_MARKER, atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
# ``classify.cache_dir`` value that means the user's cache folder (:func:`default_cache_dir`).
AUTO = "auto"
# How long a run waits for another one exporting the same model before it exports on its own (an int8 build of a
# large model on a busy 2-core machine takes minutes).
LOCK_WAIT_S = 1800.0
# The packages whose versions change what the exporter writes or how ONNX Runtime reads it.
VERSIONED_PACKAGES = ("torch", "onnx", "onnxscript", "onnxruntime", "timm")

T = TypeVar("T")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/animl-lightning/onnx``, else ``~/.cache/animl-lightning/onnx`` (the XDG default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(base) / "animl-lightning" / "onnx"


def resolve_cache_dir(setting: str | Path | None) -> Path | None:
    """``classify.cache_dir``: ``auto`` = :func:`default_cache_dir`, null or empty = no cache, else that folder."""
    if setting is None or str(setting) == "":
        return None
    if str(setting) == AUTO:
        return default_cache_dir()
    return Path(setting).expanduser()


def package_versions(names: tuple[str, ...] = VERSIONED_PACKAGES) -> dict[str, str]:
    """Installed versions (``absent`` for one that is not installed), and this project's."""
    versions = {"animl-lightning": __version__}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def source_digest(*modules: str) -> str:
    """SHA-256 of the source files of ``modules`` (paths relative to the package), in order.

    Part of a cache identity: an editable checkout changes the exporter without changing the project's version.
    """
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    for name in modules:
        digest.update(name.encode("utf-8") + b"\0" + (package / name).read_bytes() + b"\0")
    return digest.hexdigest()


def identity_key(identity: Mapping[str, Any]) -> str:
    """The entry name of an identity: SHA-256 of its canonical JSON."""
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


@dataclass(frozen=True)
class CachedModel:
    """A model from the cache or just built, what its build reported, and where it came from."""

    data: bytes
    record: dict[str, Any]
    from_cache: bool
    path: Path | None


class _UnusableEntryError(Exception):
    """An entry that is missing, damaged or of another build; the message says which (for the log)."""


@dataclass(frozen=True)
class OnnxCache:
    """The cache folder; see the module docstring."""

    folder: Path

    def paths(self, key: str) -> tuple[Path, Path, Path]:
        """The model, sidecar and lock file of entry ``key``."""
        return self.folder / f"{key}.onnx", self.folder / f"{key}.json", self.folder / f"{key}.lock"

    def get_or_build(
        self,
        identity: Mapping[str, Any],
        build: Callable[[], tuple[bytes, dict[str, Any]]],
        open_model: Callable[[bytes], T],
        what: str = "ONNX model",
    ) -> tuple[T, CachedModel]:
        """The opened model of ``identity``: from the cache when a usable entry is there, else built and stored.

        Args:
            identity: everything the model depends on (JSON-ready); its key names the entry.
            build: makes the model: ``(bytes, record)``, the record kept in the sidecar (e.g. a quality report).
            open_model: opens model bytes (an ONNX Runtime session); an entry it refuses is built again.
            what: the model in log lines.

        Raises:
            AnimlError: whatever ``build`` raises (the cache never hides a failed build).
        """
        key = identity_key(identity)
        model_path, _, lock_path = self.paths(key)
        found = self._usable(key, identity, open_model)
        if isinstance(found, tuple):
            log.info("loaded the %s from the cache (%s)", what, model_path)
            return found
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            lock = filelock.FileLock(lock_path, timeout=0)
            try:
                lock.acquire()
            except filelock.Timeout:
                log.info("waiting for another process that is building this %s (lock %s)", what, lock_path)
                lock.acquire(timeout=LOCK_WAIT_S)
        except (OSError, filelock.Timeout) as error:
            log.warning("cannot use the cache folder %s (%s); building the %s without it", self.folder, error, what)
            return self._build(key, identity, build, open_model, what, store=False)
        try:
            # Another process may have built it while this one waited for the lock.
            found = self._usable(key, identity, open_model)
            if isinstance(found, tuple):
                log.info("loaded the %s from the cache (%s), built by another process", what, model_path)
                return found
            if found is not None:
                log.warning("the cached %s %s is unusable (%s); building it again", what, model_path, found)
            return self._build(key, identity, build, open_model, what, store=True)
        finally:
            lock.release()

    def _usable(
        self, key: str, identity: Mapping[str, Any], open_model: Callable[[bytes], T]
    ) -> tuple[T, CachedModel] | str | None:
        """The opened entry; or why it cannot be used (a string); or None when there is no entry."""
        model_path, sidecar_path, _ = self.paths(key)
        if not model_path.exists() and not sidecar_path.exists():
            return None
        try:
            data, record = self._read(model_path, sidecar_path, identity)
        except _UnusableEntryError as error:
            return str(error)
        try:
            opened = open_model(data)
        except Exception as error:  # ONNX Runtime raises its own types for a model it cannot load
            return f"ONNX Runtime cannot load it: {type(error).__name__}: {error}"
        return opened, CachedModel(data=data, record=record, from_cache=True, path=model_path)

    @staticmethod
    def _read(model_path: Path, sidecar_path: Path, identity: Mapping[str, Any]) -> tuple[bytes, dict[str, Any]]:
        try:
            sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
        except FileNotFoundError as error:
            raise _UnusableEntryError(f"{sidecar_path.name} is missing (a build was interrupted)") from error
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise _UnusableEntryError(f"{sidecar_path.name} cannot be read: {error}") from error
        if not isinstance(sidecar, dict) or sidecar.get("identity") != json.loads(json.dumps(identity)):
            raise _UnusableEntryError(f"{sidecar_path.name} describes another build")
        try:
            data = model_path.read_bytes()
        except OSError as error:
            raise _UnusableEntryError(f"cannot read {model_path.name}: {error}") from error
        if len(data) != sidecar.get("model_bytes") or hashlib.sha256(data).hexdigest() != sidecar.get("model_sha256"):
            raise _UnusableEntryError(f"{model_path.name} is not the file its sidecar describes (damaged or replaced)")
        record = sidecar.get("record")
        return data, record if isinstance(record, dict) else {}

    def _build(
        self,
        key: str,
        identity: Mapping[str, Any],
        build: Callable[[], tuple[bytes, dict[str, Any]]],
        open_model: Callable[[bytes], T],
        what: str,
        store: bool,
    ) -> tuple[T, CachedModel]:
        started = time.perf_counter()
        data, record = build()
        opened = open_model(data)
        log.info("built the %s in %.1f s", what, time.perf_counter() - started)
        model_path, sidecar_path, _ = self.paths(key)
        if not store:
            return opened, CachedModel(data=data, record=record, from_cache=False, path=None)
        try:
            # Under the lock only this process writes this entry: a temporary left by a killed writer is stale.
            for stale in self.folder.glob(f".{key}.*{TMP_MARKER}*"):
                stale.unlink(missing_ok=True)
            sidecar_path.unlink(missing_ok=True)  # an old sidecar must never vouch for the new model file
            atomic_write_bytes(model_path, data)
            atomic_write_json(
                sidecar_path,
                {
                    "cache_format": CACHE_FORMAT,
                    "identity": identity,
                    "model_sha256": hashlib.sha256(data).hexdigest(),
                    "model_bytes": len(data),
                    "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "record": record,
                },
            )
        except (OSError, AnimlError) as error:
            log.warning("cannot store the %s in the cache %s (%s); going on without it", what, self.folder, error)
            return opened, CachedModel(data=data, record=record, from_cache=False, path=None)
        log.info("stored the %s in the cache (%s)", what, model_path)
        return opened, CachedModel(data=data, record=record, from_cache=False, path=model_path)

    def has(self, identity: Mapping[str, Any]) -> bool:
        """Whether an entry for ``identity`` looks complete (sidecar of this identity, model of its size).

        A cheap check for choosing a backend; the digest is verified when the entry is used.
        """
        model_path, sidecar_path, _ = self.paths(identity_key(identity))
        try:
            sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
            size = model_path.stat().st_size
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return False
        return (
            isinstance(sidecar, dict)
            and sidecar.get("identity") == json.loads(json.dumps(identity))
            and sidecar.get("model_bytes") == size
        )
