"""The folders source: images sorted into one folder per label become a CCT file that the usual stages read.

Layouts, with ``folders.root=ROOT``::

    ROOT/<label>/<image>                  AddaxAI, MEWC            folders.location_level=null
    ROOT/<station>/<label>/<image>        camtrapR, Timelapse      folders.location_level=0
    ROOT/<site>/<camera>/<label>/<image>                           folders.location_level=1

An image's label is the name of the folder it is in. Its location is the path of its folders down to level
``location_level`` (``SiteA/Cam1`` for level 1, so that equally named camera folders of two sites stay two
locations); without a level every image is at ``unknown_location`` and :func:`split_without_locations` says how the
split changes. The datetime is EXIF ``DateTimeOriginal`` (``YYYY-MM-DD HH:MM:SS``), when the file has one.

The derived CCT (``folders_cct.json`` in the output folder) has ``file_name`` relative to the root, the displayed
width and height, one category per label folder name and one annotation per image: a box over the whole image (each
image becomes one whole-image crop), or no box when MegaDetector results give the boxes. From there every stage runs
as for an Animl export with ``images_dir=folders.root``.

What the scan reads from each image header is kept in ``folders_scan.json`` keyed by file name, size and
modification time, so a rerun on the same folder reads only new or changed files. Non-image files, unreadable
images, folders without images and images outside the expected layout are listed in the report (stage ``folders``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image

from animl_lightning.core.cct import UNKNOWN_LOCATION
from animl_lightning.core.errors import InputFileError
from animl_lightning.core.files import UnsafePathError, atomic_write_json, read_json_file, safe_relative
from animl_lightning.core.imaging import ImageLoadError, image_display_size
from animl_lightning.core.issues import PrepareReport
from animl_lightning.prepare.config import FolderSettings, SplitSettings
from animl_lightning.prepare.stage import SKIPPED, PrepareRun, Stage, StageOutcome

log = logging.getLogger(__name__)

STAGE = "folders"
FOLDERS_CCT_FILENAME = "folders_cct.json"
FOLDERS_SCAN_FILENAME = "folders_scan.json"
# Formats every stage decodes (PIL); compared case-insensitively.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
EXIF_IFD = 0x8769
DATETIME_ORIGINAL = 36867
_SCAN_VERSION = 1
_HEADER_THREADS = 8
_EXIF_DATETIME = re.compile(r"^(\d{4})[:-](\d{2})[:-](\d{2})[ T](\d{2}):(\d{2}):(\d{2})")


class FolderSourceError(InputFileError):
    """``folders.root`` gives no usable image; the message names the folder and what was found instead."""


@dataclass(frozen=True)
class FolderImage:
    """One image file found under the root, placed in the layout.

    Attributes:
        file_name: path relative to the root, ``/``-separated (the CCT ``file_name`` and image id).
        label: the name of the folder holding the image (NFC-normalised).
        location: the folders down to ``location_level``, or ``unknown_location`` without a level.
        size: file size in bytes; with ``mtime_ns`` it tells whether the cached header facts still hold.
        mtime_ns: modification time in nanoseconds.
    """

    file_name: str
    label: str
    location: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class ImageFacts:
    """What the CCT needs from an image header: displayed size and EXIF ``DateTimeOriginal`` (CCT format)."""

    width: int
    height: int
    datetime: str | None = None


@dataclass(frozen=True)
class FolderSource:
    """The outcome of :func:`build_folder_source`.

    Attributes:
        cct_file: the derived CCT file.
        images: the images it holds (readable, inside the layout), in walk order.
        headers_read: headers read in this run; 0 means everything came from the previous scan.
    """

    cct_file: Path
    images: tuple[FolderImage, ...]
    headers_read: int


def place_image(folders: Sequence[str], location_level: int | None) -> tuple[str, str] | str:
    """``(label, location)`` of an image in ``folders`` (its folders under the root), or why it has none.

    The location folder must lie above the label folder: with level K an image needs K + 2 folders.
    """
    if not folders:
        return "the image is directly in folders.root, not in a label folder"
    label = _nfc(folders[-1])
    if location_level is None:
        return label, UNKNOWN_LOCATION
    if len(folders) < location_level + 2:
        return (
            f"folders.location_level={location_level} needs a location folder above the label folder "
            f"({location_level + 2} folder levels), the image is {len(folders)} level(s) deep"
        )
    return label, "/".join(_nfc(part) for part in folders[: location_level + 1])


def _nfc(name: str) -> str:
    # macOS writes decomposed names (e + combining accent); a label typed in labels.map is composed.
    return unicodedata.normalize("NFC", name)


def parse_exif_datetime(value: object) -> str | None:
    """An EXIF ``YYYY:MM:DD HH:MM:SS`` value as CCT's ``YYYY-MM-DD HH:MM:SS``; None when blank or not a date."""
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    if not isinstance(value, str):
        return None
    match = _EXIF_DATETIME.match(value.strip("\x00 "))
    if match is None:
        return None
    try:
        # Camera wall-clock time without a zone, as the CCT datetime and the sequence grouping read it.
        year, month, day, hour, minute, second = (int(part) for part in match.groups())
        moment = datetime(year, month, day, hour, minute, second)
    except ValueError:  # cameras without a set clock write 0000:00:00 00:00:00
        return None
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def exif_datetime(path: Path) -> str | None:
    """EXIF ``DateTimeOriginal`` of an image in CCT format, or None (no EXIF, no such tag, or an unreadable one)."""
    try:
        with Image.open(path) as image:
            exif = image.getexif()
            value = exif.get_ifd(EXIF_IFD).get(DATETIME_ORIGINAL) or exif.get(DATETIME_ORIGINAL)
    except Exception:  # a broken EXIF block must not lose the image: PIL raises many types here
        return None
    return parse_exif_datetime(value)


def read_image_facts(path: Path) -> ImageFacts:
    """Displayed size (after EXIF orientation, as Animl's boxes are) and datetime, from the header only.

    Raises:
        ImageLoadError: missing, not an image, or over the decompression-bomb limit.
    """
    width, height = image_display_size(path)
    return ImageFacts(width=width, height=height, datetime=exif_datetime(path))


def whole_image_annotation_id(file_name: str) -> str:
    """A stable, unique, short annotation id for an image's whole-image box (it becomes part of the crop name)."""
    return "whole-" + hashlib.sha256(file_name.encode("utf-8")).hexdigest()[:16]


def folders_cct(
    images: Sequence[FolderImage],
    facts: Mapping[str, ImageFacts],
    description: str,
    *,
    whole_image_boxes: bool = True,
) -> dict[str, Any]:
    """The CCT document of ``images`` (each needs its ``facts``), in the shape Animl exports.

    Args:
        images: the images, in the order they are written.
        facts: header facts by ``file_name``.
        description: the CCT ``info.description``.
        whole_image_boxes: one box over each whole image; False leaves the boxes to MegaDetector results.
    """
    names = sorted({image.label for image in images})
    category_ids = {name: i for i, name in enumerate(names, start=1)}
    records: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image in images:
        fact = facts[image.file_name]
        record: dict[str, Any] = {
            "id": image.file_name,
            "file_name": image.file_name,
            "location": image.location,
            "width": fact.width,
            "height": fact.height,
        }
        if fact.datetime is not None:
            record["datetime"] = fact.datetime
        records.append(record)
        annotation: dict[str, Any] = {
            "id": whole_image_annotation_id(image.file_name),
            "image_id": image.file_name,
            "category_id": category_ids[image.label],
        }
        if whole_image_boxes:
            annotation["bbox"] = [0, 0, fact.width, fact.height]
        annotations.append(annotation)
    return {
        "info": {"version": "1.0", "description": description},
        "images": records,
        "annotations": annotations,
        "categories": [{"id": category_ids[name], "name": name} for name in names],
    }


def split_without_locations(split: SplitSettings) -> tuple[SplitSettings, list[str]]:
    """The split settings that work when no image has a location, and a warning for each change.

    ``group_by=location`` would put every crop in one group, so it becomes ``sequence``; ``split.min_locs`` would
    drop every label (each is seen at one location), so it is ignored. ``sequence`` and ``location_time`` (time
    blocks) work without locations and are kept.
    """
    warnings: list[str] = []
    changes: dict[str, Any] = {}
    if split.group_by == "location":
        changes["group_by"] = "sequence"
        warnings.append(
            "folders.location_level is null, so the images have no camera locations and split.group_by=location "
            "would put every crop in one group: splitting by sequence instead (bursts from EXIF DateTimeOriginal "
            "within sequences.max_gap_s), which lets a camera's backgrounds reach train and val/test; set "
            "folders.location_level to the folder level that names the camera to split by location"
        )
    if split.min_locs is not None:
        changes["min_locs"] = None
        warnings.append(
            f"folders.location_level is null, so every label is seen at one location: split.min_locs="
            f"{split.min_locs} is ignored (it would drop every label)"
        )
    return (replace(split, **changes) if changes else split), warnings


class _Walk:
    """The sorted walk under the root: candidate images, and every file or folder that gives none, reported."""

    def __init__(self, root: Path, location_level: int | None, report: PrepareReport, skip: Path | None) -> None:
        self.root = root
        self.location_level = location_level
        self.report = report
        self.skip = skip.resolve() if skip is not None else None
        self.images: list[FolderImage] = []

    def issue(self, kind: str, message: str, path: Path, record: str, field: str) -> None:
        self.report.add(STAGE, kind, message, file=path, record=record, field=field)
        self.report.count(STAGE, kind)

    def run(self) -> None:
        self.walk(self.root, (), frozenset({os.path.realpath(self.root)}))

    def walk(self, folder: Path, parts: tuple[str, ...], ancestors: frozenset[str]) -> int | None:
        """Collect the images under ``folder``; returns how many image files it holds (readable or not).

        None: the folder cannot be listed (reported here, so not again as an empty folder).
        """
        relative = "/".join(parts)
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as err:
            self.issue(
                "unreadable_folder", f"cannot list the folder: {err.strerror or err}", folder, relative, "folder"
            )
            return None
        found = 0
        empty: list[tuple[Path, str]] = []
        for entry in entries:
            path = Path(entry.path)
            record = "/".join((*parts, entry.name))
            try:
                entry.name.encode("utf-8")
            except UnicodeEncodeError:
                # The report is UTF-8 JSON: name the entry by its escaped form, in its (decodable) folder.
                message = f"the name {entry.name!a} is not valid UTF-8; rename it"
                self.issue("undecodable_name", message, folder, ascii(record), "file_name")
                continue
            if entry.name.startswith("."):
                # .DS_Store, macOS ._* companions, .thumbnails/: never photos of the project.
                self.report.count(STAGE, "hidden_skipped")
                continue
            try:
                is_dir, is_file = entry.is_dir(), entry.is_file()
            except OSError as err:
                self.issue("unreadable_file", f"cannot stat: {err.strerror or err}", path, record, "file_name")
                continue
            if is_dir:
                real = os.path.realpath(path)
                if self.skip is not None and Path(real) == self.skip:
                    log.info("folders: skipping %s, the output folder", path)
                    continue
                if real in ancestors:
                    self.issue("symlink_loop", f"links back to {real}, a folder above it", path, record, "folder")
                    continue
                below = self.walk(path, (*parts, entry.name), ancestors | {real})
                if below == 0:
                    empty.append((path, record))
                found += below or 0
            elif is_file:
                found += self.file(entry, path, record, parts)
            else:
                what = "a link to nothing" if entry.is_symlink() else "not a regular file"
                self.issue("not_a_file", what, path, record, "file_name")
        if found or not parts:
            # Only the topmost folder without images is listed; the folders inside it are covered by it.
            for path, record in empty:
                self.issue("empty_folder", "the folder holds no image file", path, record, "folder")
        return found

    def file(self, entry: os.DirEntry[str], path: Path, record: str, parts: tuple[str, ...]) -> int:
        extension = Path(entry.name).suffix.lower()
        if extension not in IMAGE_EXTENSIONS:
            self.issue(
                "non_image_file",
                f"not an image file (extension {extension or 'none'!r}; read are {', '.join(IMAGE_EXTENSIONS)})",
                path,
                record,
                "file_name",
            )
            return 0
        try:
            safe_relative(record)
        except UnsafePathError as err:
            self.issue("unsafe_file_name", f"refused: {err}", path, record, "file_name")
            return 1
        placed = place_image(parts, self.location_level)
        if isinstance(placed, str):
            kind = "no_label_folder" if not parts else "no_location_folder"
            field = "file_name" if not parts else "folders.location_level"
            self.issue(kind, placed, path, record, field)
            return 1
        try:
            stat = entry.stat()
        except OSError as err:
            self.issue("unreadable_file", f"cannot stat: {err.strerror or err}", path, record, "file_name")
            return 1
        label, location = placed
        self.images.append(FolderImage(record, label, location, stat.st_size, stat.st_mtime_ns))
        return 1


def scan_folders(
    root: Path, location_level: int | None, report: PrepareReport, skip: Path | None = None
) -> list[FolderImage]:
    """Walk ``root`` in sorted order (symbolic links followed) and place each image file in the layout.

    Args:
        root: ``folders.root``.
        location_level: ``folders.location_level``.
        report: receives one issue per file or folder that gives no image (stage ``folders``) and the counts.
        skip: a folder not to walk (the output folder, when it lies under the root).

    Returns:
        The image files inside the layout, in walk order; their headers are not read yet.
    """
    walk = _Walk(root, location_level, report, skip)
    walk.run()
    return walk.images


def _load_scan(path: Path, root: Path) -> dict[str, dict[str, Any]]:
    """The previous run's header facts by file name; empty when absent, unreadable or of another root."""
    if not path.is_file():
        return {}
    try:
        data = read_json_file(path)
    except InputFileError as err:
        log.warning("ignoring %s (%s); every image header is read again", path, err)
        return {}
    if not isinstance(data, dict) or data.get("version") != _SCAN_VERSION or data.get("root") != str(root.resolve()):
        return {}
    files = data.get("files")
    return files if isinstance(files, dict) else {}


def _cached(entry: object, image: FolderImage) -> ImageFacts | ImageLoadError | None:
    if not isinstance(entry, dict) or entry.get("size") != image.size or entry.get("mtime_ns") != image.mtime_ns:
        return None
    if "error" in entry:
        return ImageLoadError(str(entry.get("kind", "unreadable_image")), str(entry["error"]))
    width, height, when = entry.get("width"), entry.get("height"), entry.get("datetime")
    if type(width) is not int or type(height) is not int or not (when is None or isinstance(when, str)):
        return None
    return ImageFacts(width=width, height=height, datetime=when)


def _scan_entry(image: FolderImage, outcome: ImageFacts | ImageLoadError) -> dict[str, Any]:
    entry: dict[str, Any] = {"size": image.size, "mtime_ns": image.mtime_ns}
    if isinstance(outcome, ImageLoadError):
        return entry | {"kind": outcome.kind, "error": str(outcome)}
    return entry | {"width": outcome.width, "height": outcome.height, "datetime": outcome.datetime}


def build_folder_source(
    settings: FolderSettings,
    output_dir: Path,
    report: PrepareReport,
    *,
    whole_image_boxes: bool = True,
    reuse_scan: bool = True,
) -> FolderSource:
    """Scan ``folders.root``, read the headers that changed, and write the derived CCT into ``output_dir``.

    Args:
        settings: ``folders.*`` (``root`` set).
        output_dir: receives ``folders_cct.json`` and ``folders_scan.json``.
        report: receives the issues and counts of stage ``folders``.
        whole_image_boxes: see :func:`folders_cct`.
        reuse_scan: take the header facts of unchanged files from the previous scan (``force=true`` turns it off).

    Raises:
        FolderSourceError: no image under the root is usable.
    """
    assert settings.root is not None  # the caller runs this only with folders.root
    root = Path(settings.root)
    earlier_issues = len(report.issues_of(STAGE))
    images = scan_folders(root, settings.location_level, report, skip=output_dir)
    scan_path = output_dir / FOLDERS_SCAN_FILENAME
    previous = _load_scan(scan_path, root) if reuse_scan else {}

    outcomes: dict[str, ImageFacts | ImageLoadError] = {}
    to_read: list[FolderImage] = []
    for image in images:
        cached = _cached(previous.get(image.file_name), image)
        if cached is None:
            to_read.append(image)
        else:
            outcomes[image.file_name] = cached

    def read(image: FolderImage) -> tuple[str, ImageFacts | ImageLoadError]:
        try:
            return image.file_name, read_image_facts(root / image.file_name)
        except ImageLoadError as err:
            return image.file_name, err

    with ThreadPoolExecutor(max_workers=_HEADER_THREADS) as pool:
        outcomes.update(pool.map(read, to_read))
    atomic_write_json(
        scan_path,
        {
            "version": _SCAN_VERSION,
            "root": str(root.resolve()),
            "files": {image.file_name: _scan_entry(image, outcomes[image.file_name]) for image in images},
        },
        indent=None,
    )

    usable: list[FolderImage] = []
    facts: dict[str, ImageFacts] = {}
    for image in images:
        outcome = outcomes[image.file_name]
        if isinstance(outcome, ImageLoadError):
            report.add(
                STAGE,
                outcome.kind,
                str(outcome),
                file=root / image.file_name,
                record=image.file_name,
                field="file_name",
            )
            report.count(STAGE, "unreadable_images")
            continue
        usable.append(image)
        facts[image.file_name] = outcome
    if not usable:
        kinds = Counter(issue.kind for issue in report.issues_of(STAGE)[earlier_issues:])
        found = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) or "nothing"
        raise FolderSourceError(
            f"folders.root: no usable image under {root} (found: {found}); images must sit in one folder per label"
            + ("" if settings.location_level is None else f" below folder level {settings.location_level}")
        )

    cct_file = output_dir / FOLDERS_CCT_FILENAME
    atomic_write_json(
        cct_file,
        folders_cct(
            usable,
            facts,
            f"derived by prepare.py from the label folders under {root} "
            f"(folders.location_level={settings.location_level})",
            whole_image_boxes=whole_image_boxes,
        ),
    )
    with_datetime = sum(fact.datetime is not None for fact in facts.values())
    report.set_count(STAGE, "images", len(usable))
    report.set_count(STAGE, "labels", len({image.label for image in usable}))
    report.set_count(STAGE, "locations", len({image.location for image in usable}))
    report.set_count(STAGE, "with_datetime", with_datetime)
    report.set_count(STAGE, "headers_read", len(to_read))
    report.set_count(STAGE, "headers_reused", len(images) - len(to_read))
    return FolderSource(cct_file=cct_file, images=tuple(usable), headers_read=len(to_read))


def folder_dataset_name(root: str | Path) -> str:
    """The default dataset name of a folder source: the root folder's own name."""
    return Path(root).resolve().name or "folders"


class FoldersStage(Stage):
    """With ``folders.root``: write the CCT file that ingest reads; current when no header had to be read again."""

    name = STAGE

    def wanted(self, run: PrepareRun) -> bool:
        """Only with ``folders.root``."""
        return run.settings.folders.root is not None

    def fingerprint(self, run: PrepareRun) -> str | None:
        """The digest of the CCT file written."""
        return run.coco_digest()

    def run(self, run: PrepareRun) -> StageOutcome:
        """Scan the tree (reusing the scan of the last run unless ``force``) and write ``run.coco_file``."""
        settings = run.settings
        source = build_folder_source(
            settings.folders,
            run.output_dir,
            run.report,
            # With MegaDetector results (given, or run by the detect stage) the boxes come from them, as for a CCT
            # export without boxes.
            whole_image_boxes=settings.detections_file is None and settings.detector.model_file is None,
            reuse_scan=not settings.force,
        )
        counts = {"images": len(source.images), "headers_read": source.headers_read}
        outcome = StageOutcome(
            detail=f"{counts['images']} images, {counts['headers_read']} headers read", counts=counts
        )
        if source.headers_read == 0 and run.is_current(self.name, self.fingerprint(run)):
            outcome.status = SKIPPED
        return outcome
