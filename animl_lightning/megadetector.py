"""Read and validate MegaDetector batch results files (format v1.x, pipeline.md 2.2).

Boxes are normalized ``[x_min, y_min, width, height]`` with the origin at the top left; category ids are string
integers mapped to names by ``detection_categories``. A malformed file as a whole raises :class:`DetectionsError`;
a malformed image entry or detection is reported (stage ``boxes``, with the image file, the record and the field)
and skipped. Detections keep their position in the image's original list (``index``): crop names use it, so a
detection skipped for a low confidence or a bad field still uses up its number, as in the old pipeline.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from animl_lightning.report import PrepareReport

log = logging.getLogger(__name__)

STAGE = "boxes"
STANDARD_CATEGORIES = {"1": "animal", "2": "person", "3": "vehicle"}


class DetectionsError(ValueError):
    """The detections file as a whole cannot be used; the message names the file (and the JSON position)."""


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


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


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
    # The old cct_to_md wrote 1.2 as a number (pipeline.md 4.1): accept numbers and strings alike.
    if type(version) in (int, float) or isinstance(version, str):
        text = str(version)
        try:
            major = int(float(text))
        except ValueError:
            major = -1
        if major == 1:
            return text
    raise DetectionsError(f"{source}: info.format_version {version!r} is not a supported 1.x MegaDetector format")


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
    if not isinstance(raw, dict):
        raise DetectionsError(f"{source}: detection_categories must be an object, got a {type(raw).__name__}")
    categories: dict[str, str] = {}
    for key, name in raw.items():
        if not key.isdigit() or not isinstance(name, str):
            report.add(
                STAGE,
                "invalid_field",
                f"detection category {key!r}: {name!r} must map a string integer id to a name",
                file=source,
                record=str(key),
                field="detection_categories",
            )
            continue
        categories[key] = name
    return categories


def _detection(raw: Any, index: int, file: str, source: Path, report: PrepareReport) -> Detection | None:
    record = f"{file}#{index}"

    def bad(field_name: str, message: str) -> None:
        report.add(STAGE, "invalid_detection", message, file=source, record=record, field=field_name)

    if not isinstance(raw, dict):
        bad("detections", f"detection {index} of {file!r} is a {type(raw).__name__}, not an object")
        return None
    category: Any = raw.get("category")
    conf: Any = raw.get("conf")
    bbox: Any = raw.get("bbox")
    if not isinstance(category, str):
        bad("category", f"category must be a string id, got {category!r}")
        return None
    if not _is_number(conf) or not 0.0 <= conf <= 1.0:
        bad("conf", f"conf must be a number in [0, 1], got {conf!r}")
        return None
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        bad("bbox", f"bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
        return None
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        bad("bbox", f"bbox {bbox} has a width or height <= 0")
        return None
    return Detection(category=category, conf=float(conf), bbox=(x, y, w, h), index=index)


def load_detections(path: str | Path, report: PrepareReport) -> DetectionResults:
    """Read a MegaDetector results file.

    Args:
        path: the results JSON.
        report: receives one issue per skipped image entry or detection (stage ``boxes``) and the counts.

    Raises:
        DetectionsError: unreadable, not JSON, wrong top-level types, or a format version other than 1.x.
    """
    source = Path(path)
    try:
        data = json.loads(source.read_bytes())
    except OSError as err:
        raise DetectionsError(f"{source}: cannot read the detections file: {err}") from err
    except json.JSONDecodeError as err:
        raise DetectionsError(
            f"{source}: not valid JSON (truncated or malformed) at line {err.lineno}, column {err.colno} "
            f"(character {err.pos}): {err.msg}"
        ) from err
    except UnicodeDecodeError as err:
        raise DetectionsError(f"{source}: not UTF-8 text at byte {err.start}: {err.reason}") from err
    if not isinstance(data, dict):
        raise DetectionsError(f"{source}: the top level must be a JSON object, got a {type(data).__name__}")
    info = data.get("info", {})
    if not isinstance(info, dict):
        raise DetectionsError(f"{source}: info must be an object, got a {type(info).__name__}")
    raw_images = data.get("images")
    if not isinstance(raw_images, list):
        raise DetectionsError(f"{source}: top-level 'images' must be a list, got {type(raw_images).__name__}")
    version = _format_version(info, source, report)
    categories = _categories(data, source, report)
    detector = info.get("detector")
    if not isinstance(detector, str) or not detector:
        detector = "unknown"

    images: dict[str, list[Detection]] = {}
    failures: dict[str, str] = {}
    n_detections = 0
    for position, entry in enumerate(raw_images):
        where = f"images[{position}]"
        if not isinstance(entry, dict):
            report.add(
                STAGE,
                "invalid_record",
                f"{where} is a {type(entry).__name__}, not an object",
                file=source,
                record=where,
            )
            continue
        file = entry.get("file")
        if not isinstance(file, str) or not file:
            report.add(
                STAGE,
                "invalid_field",
                f"{where}: file must be a non-empty string, got {file!r}",
                file=source,
                record=where,
                field="file",
            )
            continue
        if file in images or file in failures:
            report.add(
                STAGE,
                "duplicate_file",
                f"{file!r} appears more than once; the first entry is kept",
                file=source,
                record=file,
                field="file",
            )
            continue
        failure = entry.get("failure")
        detections = entry.get("detections")
        if failure is not None:
            failures[file] = str(failure)
            continue
        if detections is None:
            report.add(
                STAGE,
                "missing_detections",
                f"{file!r} has neither detections nor a failure",
                file=source,
                record=file,
                field="detections",
            )
            continue
        if not isinstance(detections, list):
            report.add(
                STAGE,
                "invalid_field",
                f"detections must be a list, got {type(detections).__name__}",
                file=source,
                record=file,
                field="detections",
            )
            continue
        kept = [d for i, raw in enumerate(detections) if (d := _detection(raw, i, file, source, report)) is not None]
        n_detections += len(kept)
        images[file] = kept

    report.set_count(STAGE, "detector_images", len(images))
    report.set_count(STAGE, "detector_failures", len(failures))
    report.set_count(STAGE, "detections", n_detections)
    log.info("%s: %d images, %d detections, %d failures", source, len(images), n_detections, len(failures))
    return DetectionResults(
        detector=detector,
        detection_categories=categories,
        images=images,
        failures=failures,
        format_version=version,
        source=source,
    )
