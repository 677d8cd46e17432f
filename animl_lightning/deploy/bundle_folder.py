"""The bundle's folder: ``export format=animl`` replaces only an empty folder or a bundle it wrote itself.

Every bundle lists its files in ``bundle_files.json`` (written last); a folder holding anything else, or the current
folder and those above it, is refused before any work, so an export never deletes a user's file.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

from animl_lightning import __version__
from animl_lightning.core.errors import ConfigError
from animl_lightning.core.files import read_json_file

MANIFEST_FILENAME = "bundle_files.json"


def bundle_manifest(folder: Path) -> dict[str, Any]:
    """``bundle_files.json``: who wrote the folder and every file in it (POSIX paths relative to it), sorted."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink())
    return {"written_by": f"animl-lightning {__version__} export format=animl", "files": files}


def _listed_files(folder: Path) -> set[str] | None:
    """The files an earlier export listed in ``folder``'s manifest; None when it has no readable one."""
    manifest = folder / MANIFEST_FILENAME
    if not manifest.is_file():
        return None
    try:
        record = read_json_file(manifest, ConfigError)
    except ConfigError:
        return None
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        return None
    return {*files, MANIFEST_FILENAME}


def _first_unlisted(folder: Path, listed: set[str]) -> str | None:
    """The first entry below ``folder`` that is none of ``listed`` nor a folder holding one; None if there is none.

    Python's bytecode caches are not the user's: running the bundle's ``serving/`` sources writes them.
    """
    folders = {str(parent) for name in listed for parent in PurePosixPath(name).parents}
    for root, subfolders, files in os.walk(folder):
        here = PurePosixPath(Path(root).relative_to(folder).as_posix())
        subfolders.sort()
        for name in sorted(files):
            if (here / name).as_posix() not in listed and not (here.name == "__pycache__" and name.endswith(".pyc")):
                return (here / name).as_posix()
        for name in subfolders:
            entry = here / name
            # os.walk lists a symlink to a folder among the folders without entering it; the export writes none.
            if Path(root, name).is_symlink() and entry.as_posix() not in listed:
                return entry.as_posix()
            if entry.as_posix() not in folders and name != "__pycache__":
                return entry.as_posix()
    return None


def refuse_unless_replaceable(folder: Path, shown: Path | None = None) -> None:
    """Refuse a ``folder`` that exists and is neither empty nor an earlier bundle with nothing added to it.

    ``shown`` is the path named in the error (the folder's own name while it sits under a temporary one).

    Raises:
        ConfigError: naming the folder and what in it the export did not write.
    """
    if not folder.exists():
        return
    name = shown or folder
    if not folder.is_dir():
        raise ConfigError(f"output: {name} is a file; format=animl writes a folder")
    if not any(folder.iterdir()):
        return
    listed = _listed_files(folder)
    if listed is None:
        raise ConfigError(
            f"output: {name} is not empty and holds no bundle of format=animl (no readable {MANIFEST_FILENAME}); "
            "it replaces only an empty folder or its own earlier bundle: choose a new folder"
        )
    unlisted = _first_unlisted(folder, listed)
    if unlisted is not None:
        raise ConfigError(
            f"output: {name} holds {unlisted}, which format=animl did not write there; the export replaces the whole "
            "folder: move that away or choose a new folder"
        )


def output_folder(output: str | Path) -> Path:
    """``output`` as the absolute bundle folder, once it is sure that writing there loses nothing of the user's.

    Refused: the current folder and those above it (``output=.``), a file, and a folder holding anything that is
    not an earlier bundle (:func:`refuse_unless_replaceable`).

    Raises:
        ConfigError: naming ``output`` and why.
    """
    # Resolved, so that `.`, `..`, a trailing slash and a symlink name the folder that would really be replaced.
    target = Path(output).resolve()
    here = Path.cwd().resolve()
    if target == here or target in here.parents:
        raise ConfigError(
            f"output: {output} is the current folder or one above it ({target}); format=animl replaces its output "
            "folder: give a new folder, e.g. output=animl_model"
        )
    refuse_unless_replaceable(target)
    return target
