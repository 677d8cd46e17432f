"""``classify.smoothing=image|sequence``: MegaDetector's classification smoothing applied to a classify output.

The rules are :func:`animl_lightning.core.smoothing.smooth_group`. ``image`` smooths within each image; ``sequence``
smooths within each image, then across each sequence (MegaDetector's image-level step followed by its
sequence-level step). A sequence is, per image:

- the ``seq_id`` of a COCO Camera Traps file (``cct_file`` or ``classify.sequence_file``; images matched on
  ``file_name``, as MegaDetector's ``cct_sequence_information``), in that file's image order; an image of it without
  a ``seq_id`` gets the rule below with the file's ``location`` and ``datetime``;
- otherwise the rule of :mod:`animl_lightning.core.sequences`: consecutive images of one folder (the camera) whose
  datetimes (the results' ``datetime`` field, else the image's EXIF ``DateTimeOriginal``) are at most
  ``classify.max_gap_s`` apart; an image without a datetime is a sequence of its own.

Nothing is lost: a detection whose class changes keeps its original list under ``classifications_before_smoothing``
and gets ``classifications`` with the new class first (the original top confidence) followed by its other
classifications. ``info.classifier_metadata.smoothing`` records the level, the options and the counts.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
from PIL import Image

from animl_lightning.core.errors import ConfigError, require
from animl_lightning.core.sequences import sequence_keys, wall_clock_seconds
from animl_lightning.core.smoothing import SMOOTHING_LEVELS, SmoothingOptions, smooth_group

log = logging.getLogger(__name__)

BEFORE_SMOOTHING = "classifications_before_smoothing"
_EXIF_IFD = 0x8769
_DATETIME_ORIGINAL = 36867
_DATETIME = 306


@dataclass
class SmoothingSummary:
    """What smoothing changed."""

    level: str
    detections_changed_image: int = 0
    detections_changed_sequence: int = 0
    sequences: int = 0


@dataclass(frozen=True)
class ImageSequence:
    """An image's sequence key and its rank in the sequence's image order."""

    key: str
    rank: float


def exif_datetime(path: Path) -> str | None:
    """The image's EXIF ``DateTimeOriginal`` (else ``DateTime``), or None when it has none or cannot be read."""
    try:
        with Image.open(path) as image:
            exif = image.getexif()
            value = exif.get_ifd(_EXIF_IFD).get(_DATETIME_ORIGINAL) or exif.get(_DATETIME)
    except (OSError, ValueError, SyntaxError):
        return None
    text = str(value).strip() if value else ""
    return text or None


def sequences_from_cct(cct: Mapping[str, Any], max_gap_s: float = 3.0) -> dict[str, ImageSequence]:
    """``file_name`` -> sequence from a CCT dict: its ``seq_id``, else its ``location`` and ``datetime``.

    Images keep the file's order within a sequence, as MegaDetector's sequence-level smoothing takes them.
    """
    rows = [
        {
            "dataset": "",
            "location": str(image.get("location", "")),
            "image_id": str(image["file_name"]),
            "datetime": image.get("datetime"),
            "seq_id": None if image.get("seq_id") in (None, "") else str(image["seq_id"]),
        }
        for image in cct.get("images") or []
        if isinstance(image, dict) and image.get("file_name")
    ]
    if not rows:
        return {}
    keys = sequence_keys(pd.DataFrame(rows), max_gap_s)
    return {
        str(row["image_id"]): ImageSequence(str(key), float(rank))
        for rank, (row, key) in enumerate(zip(rows, keys, strict=True))
    }


def sequences_from_times(results: Mapping[str, Any], images_dir: Path, max_gap_s: float) -> dict[str, ImageSequence]:
    """``file`` -> sequence by folder and datetime (module docstring); reads EXIF only where ``datetime`` is absent."""
    rows = []
    for image in results.get("images") or []:
        file = str(image["file"])
        when = image.get("datetime") or exif_datetime(images_dir / file)
        rows.append(
            {
                "dataset": "",
                "location": str(PurePosixPath(file).parent),
                "image_id": file,
                "datetime": when,
                "seq_id": None,
            }
        )
    if not rows:
        return {}
    frame = pd.DataFrame(rows)
    keys = sequence_keys(frame, max_gap_s)
    seconds = wall_clock_seconds(frame["datetime"])
    return {
        str(row["image_id"]): ImageSequence(str(key), float(when) if when == when else float(i))
        for i, (row, key, when) in enumerate(zip(rows, keys, seconds, strict=True))
    }


def _ids(names: Mapping[str, Any], wanted: tuple[str, ...]) -> set[str]:
    return {str(k) for k, v in names.items() if str(v) in wanted}


def smooth_results(
    output: dict[str, Any],
    level: str,
    options: SmoothingOptions,
    sequences: Mapping[str, ImageSequence] | None = None,
) -> SmoothingSummary:
    """Smooth a MegaDetector results dict with classifications in place; see the module docstring.

    Raises:
        ConfigError: ``level`` unknown, or ``sequence`` without sequences.
    """
    require(level in SMOOTHING_LEVELS, "classify.smoothing", f"must be one of {list(SMOOTHING_LEVELS)}, got {level!r}")
    summary = SmoothingSummary(level=level)
    if level == "none":
        return summary
    if level == "sequence" and sequences is None:
        raise ConfigError(
            "classify.smoothing: sequence needs sequence information (a seq_id, or images with a date and time)"
        )
    other = frozenset(_ids(output.get("classification_categories") or {}, options.other_category_names))
    to_smooth = _ids(output.get("detection_categories") or {}, options.detection_category_names_to_smooth)

    # (image index, detection index) of every relevant detection, per image, in detection order.
    relevant: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for i, image in enumerate(output.get("images") or []):
        for j, detection in enumerate(image.get("detections") or []):
            if (
                detection.get("classifications")
                and float(detection.get("conf", 0.0)) >= options.detection_confidence_threshold
                and str(detection.get("category")) in to_smooth
            ):
                relevant[i].append((i, j))

    summary.detections_changed_image = sum(
        _smooth(output, members, other, options) for members in relevant.values() if members
    )
    if level == "sequence":
        assert sequences is not None
        groups: dict[str, list[tuple[float, int]]] = defaultdict(list)
        for i, image in enumerate(output.get("images") or []):
            found = sequences.get(str(image.get("file")))
            key, rank = (found.key, found.rank) if found is not None else (f"img:{image.get('file')}", 0.0)
            groups[key].append((rank, i))
        summary.sequences = len(groups)
        for members in groups.values():
            ordered = [pair for _, i in sorted(members) for pair in relevant.get(i, [])]
            if ordered:
                summary.detections_changed_sequence += _smooth(output, ordered, other, options)
    info = output.setdefault("info", {})
    metadata = info.setdefault("classifier_metadata", {})
    metadata["smoothing"] = {
        "level": level,
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(options).items()},
        "detections_changed_image": summary.detections_changed_image,
        "detections_changed_sequence": summary.detections_changed_sequence,
    }
    return summary


def _smooth(
    output: dict[str, Any], members: list[tuple[int, int]], other: frozenset[str], options: SmoothingOptions
) -> int:
    detections = [output["images"][i]["detections"][j] for i, j in members]
    classes = [str(d["classifications"][0][0]) for d in detections]
    confidences = [float(d["classifications"][0][1]) for d in detections]
    smoothed = smooth_group(classes, confidences, other, options)
    changed = 0
    for detection, before, after in zip(detections, classes, smoothed, strict=True):
        if after == before:
            continue
        original = detection["classifications"]
        detection.setdefault(BEFORE_SMOOTHING, [list(c) for c in original])
        top_confidence = original[0][1]
        detection["classifications"] = [[after, top_confidence]] + [list(c) for c in original[1:] if c[0] != after]
        changed += 1
    return changed


def options_from_config(level: str, values: Mapping[str, Any] | None) -> SmoothingOptions:
    """Validated options for ``classify.smoothing=level`` from the ``smoothing`` config mapping."""
    require(level in SMOOTHING_LEVELS, "classify.smoothing", f"must be one of {list(SMOOTHING_LEVELS)}, got {level!r}")
    return SmoothingOptions.from_mapping(dict(values or {}))
