"""Read and validate MegaDetector batch results files (format v1.x, pipeline.md 2.2): the one owner of the format.

Boxes are normalized ``[x_min, y_min, width, height]`` with the origin at the top left; category ids are string
integers mapped to names by ``detection_categories``.

:func:`read_results_file` reads the JSON and checks what every reader needs (the file, the top-level types, a 1.x
format version); a file that fails raises :class:`DetectionsError`. Each record is then checked by
:func:`category_problem`, :func:`image_problem` and :func:`detection_problem`, which return the
:class:`RecordProblem` (record, field, message) or None. Two policies use them:

* :func:`load_detections` (prepare) is lenient: a bad record is reported (stage ``boxes``) and skipped. Detections
  keep their position in the image's original list (``index``): crop names use it, so a detection skipped for a low
  confidence or a bad field still uses up its number, as in the old pipeline.
* :func:`read_results_strict` (classify) keeps the raw dict, so that every field can be written back, and raises at
  the first bad record.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from animl_lightning.core.errors import InputFileError
from animl_lightning.core.files import read_json_file
from animl_lightning.core.issues import PrepareReport

log = logging.getLogger(__name__)

STAGE = "boxes"
STANDARD_CATEGORIES = {"1": "animal", "2": "person", "3": "vehicle"}
DEGENERATE_BOX = "degenerate_box"  # the record problem kind of a box with no area


class DetectionsError(InputFileError):
    """The detections file cannot be used; the message names the file (and the JSON position, or record and field)."""


@dataclass(frozen=True)
class Detection:
    """One detector box.

    Attributes:
        category: detection category id (a string integer, key of ``detection_categories``).
        conf: confidence in [0, 1].
        bbox: normalized ``(x, y, w, h)``.
        index: position of the detection in the image's original ``detections`` list.
    """

    category: str
    conf: float
    bbox: tuple[float, float, float, float]
    index: int


@dataclass(frozen=True)
class DetectionResults:
    """A validated MegaDetector results file.

    Attributes:
        detector: ``info.detector``, or ``"unknown"``.
        detection_categories: category id -> name.
        images: image ``file`` -> its valid detections (an empty list for an image with none).
        failures: image ``file`` -> the detector's failure message.
        format_version: ``info.format_version`` as a string ("" when absent).
        source: the file read.
    """

    detector: str
    detection_categories: dict[str, str]
    images: dict[str, list[Detection]]
    failures: dict[str, str] = field(default_factory=dict)
    format_version: str = ""
    source: Path | None = None


@dataclass(frozen=True)
class RecordProblem:
    """What is wrong with one record of a results file.

    Attributes:
        kind: report kind (``invalid_field``, ``invalid_record``, ``duplicate_file``, ``invalid_detection``,
            ``degenerate_box``).
        record: the record's id: ``images[i]`` while the entry has no usable ``file``, then the file, and
            ``<file>#<index>`` for a detection.
        field: the field that is wrong, or None when the record as a whole is.
        message: a sentence naming the record's position in the file, the field and the bad value.
    """

    kind: str
    record: str
    field: str | None
    message: str


def is_json_number(value: Any) -> bool:
    """A finite JSON number (``true``/``false`` are not numbers here, although Python's bool is an int)."""
    return type(value) in (int, float) and math.isfinite(value)


def _is_format_1x(version: Any) -> bool:
    # The old cct_to_md wrote 1.2 as a number (pipeline.md 4.1): accept numbers and strings alike.
    if type(version) not in (int, float, str):
        return False
    try:
        return int(float(version)) == 1
    except ValueError:
        return False


def read_results_file(path: str | Path) -> dict[str, Any]:
    """Read a MegaDetector results file and check its top level; the records are left to the callers.

    Returns:
        The parsed JSON object, untouched.

    Raises:
        DetectionsError: missing or unreadable, not UTF-8, not JSON, wrong top-level types (the file is not an
            object, ``info`` or ``detection_categories`` not an object, ``images`` not a list), or an
            ``info.format_version`` other than 1.x. A missing ``info``, ``format_version`` or
            ``detection_categories`` is left for the caller to decide.
    """
    source = Path(path)
    data = read_json_file(source, DetectionsError)
    if not isinstance(data, dict):
        raise DetectionsError(f"{source}: the top level must be a JSON object, got a {type(data).__name__}")
    info = data.get("info", {})
    if not isinstance(info, dict):
        raise DetectionsError(f"{source}: info must be an object, got a {type(info).__name__}")
    images = data.get("images")
    if not isinstance(images, list):
        what = "missing" if "images" not in data else f"a {type(images).__name__}"
        raise DetectionsError(f"{source}: top-level 'images' must be a list, got {what}")
    version = info.get("format_version")
    if version is not None and not _is_format_1x(version):
        raise DetectionsError(f"{source}: info.format_version {version!r} is not a supported 1.x MegaDetector format")
    categories = data.get("detection_categories")
    if categories is not None and not isinstance(categories, dict):
        raise DetectionsError(f"{source}: detection_categories must be an object, got a {type(categories).__name__}")
    return data


def category_problem(key: str, name: Any) -> RecordProblem | None:
    """The problem with one ``detection_categories`` entry, or None."""
    if key.isdigit() and isinstance(name, str):
        return None
    return RecordProblem(
        "invalid_field",
        key,
        "detection_categories",
        f"field 'detection_categories': {key!r}: {name!r} must map a string integer id to a name",
    )


def image_problem(entry: Any, position: int, seen: Container[str]) -> RecordProblem | None:
    """The problem with the image entry ``images[position]`` itself (not its detections), or None.

    Args:
        entry: the raw entry.
        position: its index in ``images``.
        seen: the files of the entries already accepted; a file listed again is a problem.
    """
    where = f"images[{position}]"
    if not isinstance(entry, dict):
        return RecordProblem("invalid_record", where, None, f"{where} is a {type(entry).__name__}, not an object")
    file = entry.get("file")
    if not isinstance(file, str) or not file:
        return RecordProblem(
            "invalid_field", where, "file", f"{where}: field 'file' must be a non-empty string, got {file!r}"
        )
    if file in seen:
        return RecordProblem("duplicate_file", file, "file", f"{where} ({file}): field 'file' is listed twice")
    detections = entry.get("detections")
    if detections is not None and not isinstance(detections, list):
        return RecordProblem(
            "invalid_field",
            file,
            "detections",
            f"{where} ({file}): field 'detections' must be a list or null, got a {type(detections).__name__}",
        )
    return None


def detection_problem(
    raw: Any, position: int, file: str, index: int, categories: Mapping[str, str]
) -> RecordProblem | None:
    """The problem with detection ``index`` of the image entry ``images[position]`` (file ``file``), or None."""
    where = f"images[{position}] ({file}) detections[{index}]"

    def bad(field_name: str, message: str) -> RecordProblem:
        return RecordProblem("invalid_detection", f"{file}#{index}", field_name, f"{where}: {message}")

    if not isinstance(raw, dict):
        return bad("detections", f"is a {type(raw).__name__}, not an object")
    category: Any = raw.get("category")
    conf: Any = raw.get("conf")
    bbox: Any = raw.get("bbox")
    if not isinstance(category, str) or category not in categories:
        return bad("category", f"field 'category' {category!r} is not in detection_categories")
    if not is_json_number(conf) or not 0.0 <= conf <= 1.0:
        return bad("conf", f"field 'conf' must be a number in [0, 1], got {conf!r}")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(is_json_number(v) for v in bbox):
        return bad("bbox", f"field 'bbox' must be 4 finite numbers [x, y, width, height], got {bbox!r}")
    if bbox[2] <= 0 or bbox[3] <= 0:
        return RecordProblem(
            DEGENERATE_BOX, f"{file}#{index}", "bbox", f"{where}: field 'bbox' {bbox} has a width or height <= 0"
        )
    return None


def read_results_strict(path: str | Path) -> dict[str, Any]:
    """Read a MegaDetector results file whose every record must be valid (classify).

    Returns:
        The parsed JSON object, untouched, so that every field can be written back.

    Raises:
        DetectionsError: what :func:`read_results_file` raises, a missing ``detection_categories`` (a detection's
            category has no name without it), or the first record problem, naming its record and field.
    """
    source = Path(path)
    results = read_results_file(source)

    def refuse(problem: RecordProblem | None) -> None:
        # A box rounded to zero width is one bad detection, not a bad file: the caller fails just that crop.
        if problem is not None and problem.kind != DEGENERATE_BOX:
            raise DetectionsError(f"{source}: {problem.message}")

    categories = results.get("detection_categories")
    if categories is None:
        raise DetectionsError(f"{source}: field 'detection_categories' is missing")
    for key, name in categories.items():
        refuse(category_problem(key, name))
    seen: set[str] = set()
    for position, entry in enumerate(results["images"]):
        refuse(image_problem(entry, position, seen))
        seen.add(entry["file"])
        for index, raw in enumerate(entry.get("detections") or []):
            refuse(detection_problem(raw, position, entry["file"], index, categories))
    return results


def _report(report: PrepareReport, source: Path, problem: RecordProblem) -> None:
    report.add(STAGE, problem.kind, problem.message, file=source, record=problem.record, field=problem.field)


def _format_version(info: dict[str, Any], source: Path, report: PrepareReport) -> str:
    version = info.get("format_version")
    if version is None:
        report.add(
            STAGE,
            "missing_format_version",
            "info.format_version is missing; reading the file as format 1.x",
            file=source,
            field="info.format_version",
            action="ignored",
        )
        return ""
    return str(version)


def _categories(data: dict[str, Any], source: Path, report: PrepareReport) -> dict[str, str]:
    raw = data.get("detection_categories")
    if raw is None:
        report.add(
            STAGE,
            "missing_detection_categories",
            f"detection_categories is missing; using the standard MegaDetector ones {STANDARD_CATEGORIES}",
            file=source,
            field="detection_categories",
            action="filled",
        )
        return dict(STANDARD_CATEGORIES)
    categories: dict[str, str] = {}
    for key, name in raw.items():
        if (problem := category_problem(key, name)) is not None:
            _report(report, source, problem)
            continue
        categories[key] = name
    return categories


def load_detections(path: str | Path, report: PrepareReport) -> DetectionResults:
    """Read a MegaDetector results file, skipping (and reporting) every bad record (prepare).

    Args:
        path: the results JSON.
        report: receives one issue per skipped image entry or detection (stage ``boxes``) and the counts.

    Raises:
        DetectionsError: what :func:`read_results_file` raises.
    """
    source = Path(path)
    data = read_results_file(source)
    info = data.get("info", {})
    version = _format_version(info, source, report)
    categories = _categories(data, source, report)
    detector = info.get("detector")
    if not isinstance(detector, str) or not detector:
        detector = "unknown"

    images: dict[str, list[Detection]] = {}
    failures: dict[str, str] = {}
    seen: set[str] = set()
    n_detections = 0
    for position, entry in enumerate(data["images"]):
        if (problem := image_problem(entry, position, seen)) is not None:
            _report(report, source, problem)
            continue
        file: str = entry["file"]
        seen.add(file)
        failure = entry.get("failure")
        detections = entry.get("detections")
        if failure is not None:
            failures[file] = str(failure)
            continue
        if detections is None:
            # Valid for classify (nothing to classify), but prepare cannot tell an empty image from an unknown one.
            report.add(
                STAGE,
                "missing_detections",
                f"images[{position}] ({file}) has neither detections nor a failure",
                file=source,
                record=file,
                field="detections",
            )
            continue
        kept: list[Detection] = []
        for index, raw in enumerate(detections):
            if (problem := detection_problem(raw, position, file, index, categories)) is not None:
                _report(report, source, problem)
                continue
            x, y, w, h = (float(v) for v in raw["bbox"])
            kept.append(Detection(category=raw["category"], conf=float(raw["conf"]), bbox=(x, y, w, h), index=index))
        n_detections += len(kept)
        images[file] = kept

    # Added, not set: prepare may read two results files (detections_file and the detect stage's own).
    report.count(STAGE, "detector_images", len(images))
    report.count(STAGE, "detector_failures", len(failures))
    report.count(STAGE, "detections", n_detections)
    log.info("%s: %d images, %d detections, %d failures", source, len(images), n_detections, len(failures))
    return DetectionResults(
        detector=detector,
        detection_categories=categories,
        images=images,
        failures=failures,
        format_version=version,
        source=source,
    )
