"""COCO Camera Traps (CCT) ingest: read an Animl export into validated ``images`` and ``annotations`` tables.

The file is parsed once and every column is checked with numpy on whole arrays; only the (rare) records that fail
a check go through Python one by one to be reported. Problems come in two grades:

* The file as a whole is unusable (not JSON, truncated, wrong top-level types): :class:`CctError` names the file
  and, for JSON errors, the line, column and character position.
* One record is wrong: the record is skipped (or its box dropped, clamped or its size ignored) and the problem is
  added to the :class:`~animl_lightning.core.issues.PrepareReport` with the record id and the field.

What Animl writes, and therefore what is accepted (pipeline.md 2.1): string ids (integer ids of older datasets are
converted to strings), ``file_name`` relative to the images folder, ``location`` as a string (integers converted,
missing ones become ``"unknown_location"``), boxes as absolute-pixel ``[x, y, w, h]`` lists or, in exports before
2023-01, as ``{"left", "top", "width", "height"}`` objects, and ``bbox`` absent or ``null`` for an annotation
without a box. Boxes are in displayed image coordinates (after EXIF orientation).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from animl_lightning.core.errors import InputFileError
from animl_lightning.core.files import UnsafePathError, read_json_file, safe_relative
from animl_lightning.core.image_boxes import clip_with_positions
from animl_lightning.core.issues import PrepareReport

log = logging.getLogger(__name__)

STAGE = "ingest"
UNKNOWN_LOCATION = "unknown_location"
# The largest image side accepted from the file; beyond it a width or height is a corrupt field (and would overflow).
MAX_IMAGE_SIDE = 1_000_000

IMAGE_COLUMNS = ("image_id", "file_name", "location", "datetime", "seq_id", "width", "height", "s3_key")
ANNOTATION_COLUMNS = ("annotation_id", "image_id", "category_id", "category", "x", "y", "w", "h")

_NONE_TYPE = type(None)


class CctError(InputFileError):
    """The CCT file as a whole cannot be used; the message names the file (and the JSON position)."""


@dataclass(frozen=True)
class CctProject:
    """A validated CCT file.

    Attributes:
        images: one row per usable image; columns :data:`IMAGE_COLUMNS` (see the module docstring of
            :mod:`animl_lightning.prepare.pipeline` for the data model).
        annotations: one row per usable annotation; columns :data:`ANNOTATION_COLUMNS`; ``x, y, w, h`` are NaN for an
            annotation without a box.
        categories: category id -> name.
        source: the CCT file.
    """

    images: pd.DataFrame
    annotations: pd.DataFrame
    categories: dict[int, str]
    source: Path


# --- file level ------------------------------------------------------------------------------------------------


def _top_level_list(data: dict[str, Any], key: str, source: Path, required: bool) -> list[Any]:
    value = data.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list):
        what = "missing" if key not in data else f"a {type(value).__name__}"
        raise CctError(f"{source}: top-level {key!r} must be a list, got {what}")
    return value


# --- column helpers --------------------------------------------------------------------------------------------


def _objects(values: Sequence[Any]) -> np.ndarray:
    """A 1-d object array holding ``values`` as they are (lists stay elements, they do not become a 2-d array)."""
    return np.fromiter(values, dtype=object, count=len(values))


def _types(values: Sequence[Any] | np.ndarray) -> np.ndarray:
    return _objects(list(map(type, values)))


def _is(types: np.ndarray, kind: type) -> np.ndarray:
    """Elementwise exact type test (``bool`` is not ``int`` here, unlike ``isinstance``)."""
    return types == kind  # type: ignore[no-any-return]


def _column(records: Sequence[dict[str, Any]], key: str) -> list[Any]:
    return list(map(dict.get, records, repeat(key)))


def _ids(values: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Normalise id values: strings kept, integers (not bools) converted; returns (ids, valid)."""
    arr = _objects(values)
    types = _types(values)
    is_int = _is(types, int)
    if is_int.any():
        arr[is_int] = [str(v) for v in arr[is_int]]
    valid = _is(types, str) | is_int
    if valid.any():
        valid[valid] = arr[valid] != ""
    return arr, valid


def _record_names(ids: np.ndarray, valid_ids: np.ndarray, section: str) -> np.ndarray:
    names = ids.copy()
    bad = np.flatnonzero(~valid_ids)
    names[bad] = [f"{section}[{i}]" for i in bad]
    return names


def _suspect(name: str) -> bool:
    # Over-flags on purpose ("a/.b", ".hidden"): flagged names are confirmed by safe_relative.
    return (
        not name
        or name.startswith(("/", "."))
        or name.endswith("/")
        or "/." in name
        or "//" in name
        or "\\" in name
        or "\x00" in name
        or name[1:2] == ":"
    )


def suspect_paths(names: np.ndarray) -> np.ndarray:
    """Fast pre-check for :func:`safe_relative`: True for every name it might refuse (and a few more)."""
    return np.fromiter(map(_suspect, names), dtype=bool, count=len(names))


class _Issues:
    """Collects per-record issues of one section, then reports them in record order."""

    def __init__(self, report: PrepareReport, source: Path) -> None:
        self.report = report
        self.file = str(source)

    def add(self, kind: str, message: str, record: str, field: str | None, action: str = "skipped") -> None:
        self.report.add(STAGE, kind, message, file=self.file, record=record, field=field, action=action)


# --- categories ------------------------------------------------------------------------------------------------


def _parse_categories(raw: list[Any], issues: _Issues) -> dict[int, str]:
    categories: dict[int, str] = {}
    names: dict[str, int] = {}
    for i, rec in enumerate(raw):
        where = f"categories[{i}]"
        if not isinstance(rec, dict):
            issues.add("invalid_record", f"{where} is a {type(rec).__name__}, not an object", where, None)
            continue
        cid, name = rec.get("id"), rec.get("name")
        if type(cid) is not int:
            issues.add("invalid_field", f"{where}: category id must be an integer, got {cid!r}", where, "id")
            continue
        if not isinstance(name, str) or not name:
            issues.add(
                "invalid_field", f"category {cid}: name must be a non-empty string, got {name!r}", str(cid), "name"
            )
            continue
        if cid in categories:
            issues.add(
                "duplicate_id",
                f"category id {cid} ({name!r}) repeats id of {categories[cid]!r}; the first is kept",
                str(cid),
                "id",
            )
            continue
        if name in names:
            # Two ids with one name are one class for training: crops are labelled by name.
            issues.add(
                "duplicate_category_name",
                f"category {cid} has the same name {name!r} as category {names[name]}; both map to that name",
                str(cid),
                "name",
                action="merged",
            )
        categories[cid] = name
        names.setdefault(name, cid)
    return categories


# --- images ----------------------------------------------------------------------------------------------------


def _dict_records(raw: list[Any], section: str, issues: _Issues) -> tuple[list[dict[str, Any]], np.ndarray]:
    """The dict records of a section and their positions in the file; other values are reported."""
    is_dict = _is(_types(raw), dict)
    positions = np.flatnonzero(is_dict)
    for i in np.flatnonzero(~is_dict):
        where = f"{section}[{i}]"
        issues.add("invalid_record", f"{where} is a {type(raw[i]).__name__}, not an object", where, None)
    if len(positions) == len(raw):
        return raw, positions
    return [raw[i] for i in positions], positions


def _sizes(values: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Positive integral width/height values; returns (values as float with NaN, invalid-but-present mask)."""
    types = _types(values)
    numeric = _is(types, int) | _is(types, float)
    out = np.full(len(values), np.nan)
    if numeric.any():
        out[numeric] = np.asarray(_objects(values)[numeric], dtype=float)
    good = numeric & np.isfinite(out) & (out > 0) & (out == np.floor(out)) & (out <= MAX_IMAGE_SIDE)
    out[~good] = np.nan
    present = ~_is(types, _NONE_TYPE)
    return out, present & ~good


def _parse_images(raw: list[Any], key_field: str, issues: _Issues) -> tuple[pd.DataFrame, set[str]]:
    """Validate the images section; returns the kept images and every id that appeared (for annotation messages)."""
    recs, _ = _dict_records(raw, "images", issues)
    n = len(recs)
    ids, id_ok = _ids(_column(recs, "id"))
    records = _record_names(ids, id_ok, "images")
    skip = ~id_ok
    # Each problem: (mask, kind, field, message builder). Messages are built only for flagged rows.
    problems: list[tuple[np.ndarray, str, str | None, Any]] = [
        (~id_ok, "invalid_id", "id", lambda i: f"image id must be a non-empty string, got {recs[i].get('id')!r}"),
    ]

    file_names = _objects(_column(recs, "file_name"))
    fn_is_str = _is(_types(file_names), str)
    problems.append(
        (~fn_is_str, "invalid_field", "file_name", lambda i: f"file_name must be a string, got {file_names[i]!r}")
    )
    unsafe = np.zeros(n, dtype=bool)
    flagged = np.flatnonzero(fn_is_str & suspect_paths(np.where(fn_is_str, file_names, "")))
    unsafe_reason: dict[int, str] = {}
    for i in flagged:
        try:
            safe_relative(file_names[i])
        except UnsafePathError as err:
            unsafe[i] = True
            unsafe_reason[int(i)] = str(err)
    problems.append((unsafe, "unsafe_file_name", "file_name", lambda i: unsafe_reason[int(i)]))

    locations = _objects(_column(recs, "location"))
    loc_types = _types(locations)
    loc_int = _is(loc_types, int)
    if loc_int.any():
        locations[loc_int] = [str(v) for v in locations[loc_int]]
    loc_none = _is(loc_types, _NONE_TYPE)
    loc_ok = _is(loc_types, str) | loc_int | loc_none
    loc_blank = loc_none | (loc_ok & (locations == ""))
    locations[loc_blank] = UNKNOWN_LOCATION
    # Every image without a location lands in one group: the split treats them as one camera, which they may not be.
    for i in np.flatnonzero(loc_blank):
        issues.add(
            "location_missing",
            f"location is {recs[i].get('location')!r}; the image joins the {UNKNOWN_LOCATION!r} group",
            records[i],
            "location",
            action="filled",
        )
    problems.append(
        (~loc_ok, "invalid_field", "location", lambda i: f"location must be a string, got {recs[i].get('location')!r}")
    )

    datetimes = _objects(_column(recs, "datetime"))
    dt_types = _types(datetimes)
    dt_ok = _is(dt_types, str) | _is(dt_types, _NONE_TYPE)
    datetimes[_is(dt_types, _NONE_TYPE)] = ""
    problems.append(
        (~dt_ok, "invalid_field", "datetime", lambda i: f"datetime must be a string, got {recs[i].get('datetime')!r}")
    )

    seq_ids = _objects(_column(recs, "seq_id"))
    seq_types = _types(seq_ids)
    seq_int = _is(seq_types, int)
    if seq_int.any():
        seq_ids[seq_int] = [str(v) for v in seq_ids[seq_int]]
    seq_ok = _is(seq_types, str) | seq_int | _is(seq_types, _NONE_TYPE)
    seq_ids[_is(seq_types, _NONE_TYPE)] = ""
    problems.append(
        (~seq_ok, "invalid_field", "seq_id", lambda i: f"seq_id must be a string, got {recs[i].get('seq_id')!r}")
    )

    corrupt = _objects(_column(recs, "corrupt")) == True  # noqa: E712  (elementwise on an object array)
    problems.append((corrupt, "corrupt_image", "corrupt", lambda i: "image is marked corrupt in the CCT file"))

    for mask, kind, field, message in problems:
        for i in np.flatnonzero(mask):
            issues.add(kind, message(i), records[i], field)
        skip |= mask

    widths, bad_w = _sizes(_column(recs, "width"))
    heights, bad_h = _sizes(_column(recs, "height"))
    for field, bad, values in (("width", bad_w, "width"), ("height", bad_h, "height")):
        for i in np.flatnonzero(bad & ~skip):
            issues.add(
                "invalid_size",
                f"{field} must be a positive integer up to {MAX_IMAGE_SIDE:,}, got {recs[i].get(values)!r}; it is "
                "read from the image file",
                records[i],
                field,
                action="ignored",
            )

    keys = _objects(_column(recs, key_field))
    key_types = _types(keys)
    key_ok = _is(key_types, str) & (keys != "")
    bad_key = ~key_ok & (~_is(key_types, _NONE_TYPE)) & ~skip
    for i in np.flatnonzero(bad_key):
        issues.add(
            "invalid_field",
            f"{key_field} must be a non-empty string, got {keys[i]!r}; file_name is used as the S3 key",
            records[i],
            key_field,
            action="ignored",
        )
    keys[~key_ok] = file_names[~key_ok]

    every_id = set(ids[id_ok].tolist())
    keep = ~skip
    frame = pd.DataFrame(
        {
            "image_id": ids[keep],
            "file_name": file_names[keep],
            "location": locations[keep],
            "datetime": datetimes[keep],
            "seq_id": seq_ids[keep],
            "width": pd.array(widths[keep], dtype="Int64"),
            "height": pd.array(heights[keep], dtype="Int64"),
            "s3_key": keys[keep],
        }
    )
    for column in ("image_id", "file_name", "location", "datetime", "seq_id", "s3_key"):
        frame[column] = frame[column].astype("str")

    for column, kind in (("image_id", "duplicate_id"), ("file_name", "duplicate_file_name")):
        dup = frame[column].duplicated(keep="first").to_numpy()
        if dup.any():
            column_values = frame[column].to_numpy(dtype=object)
            kept_ids = frame["image_id"].to_numpy(dtype=object)
            first = dict(zip(column_values[~dup].tolist(), kept_ids[~dup].tolist(), strict=True))
            for row in np.flatnonzero(dup).tolist():
                issues.add(
                    kind,
                    f"{column} {column_values[row]!r} repeats that of image {first[column_values[row]]!r}; "
                    "the first is kept",
                    str(kept_ids[row]),
                    "id" if column == "image_id" else column,
                )
            frame = frame.loc[~dup].reset_index(drop=True)
    return frame, every_id


# --- annotations -----------------------------------------------------------------------------------------------


def _boxes(values: list[Any]) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Parse bbox values; returns (n x 4 float array, NaN where absent or bad), has_box, {row: why it is bad}."""
    n = len(values)
    out = np.full((n, 4), np.nan)
    bad: dict[int, str] = {}
    types = _types(values)
    is_list = _is(types, list)
    list_rows = np.flatnonzero(is_list)
    if len(list_rows):
        items = [values[i] for i in list_rows]
        lengths = np.fromiter(map(len, items), dtype=np.int64, count=len(items))
        four = lengths == 4
        rows4 = list_rows[four]
        if len(rows4):
            flat = list(chain.from_iterable(values[i] for i in rows4))
            if set(map(type, flat)) <= {int, float}:
                numeric = np.ones(len(rows4), dtype=bool)  # the usual case: no per-value type array needed
            else:
                ftypes = _types(flat).reshape(-1, 4)
                numeric = (_is(ftypes, int) | _is(ftypes, float)).all(axis=1)
            good_rows = rows4[numeric]
            if len(good_rows):
                out[good_rows] = np.array([values[i] for i in good_rows], dtype=float)
            for i in rows4[~numeric]:
                bad[int(i)] = f"bbox values must be numbers, got {values[i]!r}"
        for i in list_rows[~four]:
            bad[int(i)] = f"bbox must have 4 values [x, y, w, h], got {len(values[i])}"
    for i in np.flatnonzero(_is(types, dict)):
        # Animl exports before 2023-01-23 wrote {left, top, width, height} (absolute pixels, like the list form).
        box = values[i]
        parts = [box.get(k) for k in ("left", "top", "width", "height")]
        if all(type(p) in (int, float) for p in parts):
            out[i] = np.array(parts, dtype=float)
        else:
            bad[int(i)] = f"bbox object must have numeric left, top, width, height, got {box!r}"
    for i in np.flatnonzero(~is_list & ~_is(types, dict) & ~_is(types, _NONE_TYPE)):
        bad[int(i)] = f"bbox must be a list [x, y, w, h] or null, got {values[i]!r}"
    parsed = np.isfinite(out).all(axis=1)
    for i in np.flatnonzero(~parsed & (is_list | _is(types, dict))):
        bad.setdefault(int(i), f"bbox has NaN, infinite or null values: {values[i]!r}")
    has_box = parsed.copy()
    has_box[list(bad)] = False
    out[~has_box] = np.nan
    return out, has_box, bad


def _parse_annotations(
    raw: list[Any],
    images: pd.DataFrame,
    every_image_id: set[str],
    categories: dict[int, str],
    issues: _Issues,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Validate the annotations; returns them and, per row, the position of its image in ``images``."""
    recs, _ = _dict_records(raw, "annotations", issues)
    ids, id_ok = _ids(_column(recs, "id"))
    records = _record_names(ids, id_ok, "annotations")
    skip = ~id_ok
    for i in np.flatnonzero(~id_ok):
        issues.add(
            "invalid_id", f"annotation id must be a non-empty string, got {recs[i].get('id')!r}", records[i], "id"
        )

    image_ids, image_ok = _ids(_column(recs, "image_id"))
    for i in np.flatnonzero(~image_ok & ~skip):
        issues.add(
            "invalid_field",
            f"image_id must be a non-empty string, got {recs[i].get('image_id')!r}",
            records[i],
            "image_id",
        )
    skip |= ~image_ok
    known = pd.Index(images["image_id"].to_numpy(dtype=object))
    position = known.get_indexer(np.where(skip, "", image_ids))
    dangling = ~skip & (position < 0)
    for i in np.flatnonzero(dangling):
        if image_ids[i] in every_image_id:
            issues.add(
                "image_skipped",
                f"image {image_ids[i]!r} was skipped (see its own issue), so is this annotation",
                records[i],
                "image_id",
            )
        else:
            issues.add(
                "dangling_image_id", f"image_id {image_ids[i]!r} is not in the images list", records[i], "image_id"
            )
    skip |= dangling

    category_ids = _objects(_column(recs, "category_id"))
    cat_int = _is(_types(category_ids), int)
    cat_known = cat_int.copy()
    if cat_int.any():
        cat_known[cat_int] = pd.Index(list(categories)).get_indexer(category_ids[cat_int].astype(np.int64)) >= 0
    for i in np.flatnonzero(~cat_int & ~skip):
        issues.add(
            "invalid_field",
            f"category_id must be an integer, got {category_ids[i]!r}",
            records[i],
            "category_id",
        )
    for i in np.flatnonzero(cat_int & ~cat_known & ~skip):
        issues.add(
            "dangling_category_id",
            f"category_id {category_ids[i]} is not in the categories list",
            records[i],
            "category_id",
        )
    skip |= ~cat_known

    boxes, has_box, bad_box = _boxes(_column(recs, "bbox"))
    for row, why in bad_box.items():
        if not skip[row]:  # a record already skipped for another field is reported once
            issues.add("invalid_bbox", why, records[row], "bbox", action="dropped")
            skip[row] = True
    nonpositive = has_box & ~skip & ((boxes[:, 2] <= 0) | (boxes[:, 3] <= 0))
    for i in np.flatnonzero(nonpositive):
        issues.add(
            "bbox_negative_size",
            f"bbox {boxes[i].tolist()} has a width or height <= 0",
            records[i],
            "bbox",
            action="dropped",
        )
    skip |= nonpositive

    keep = ~skip
    cat_values = np.zeros(len(recs), dtype=np.int64)
    cat_values[cat_known] = category_ids[cat_known].astype(np.int64)
    frame = pd.DataFrame(
        {
            "annotation_id": pd.array(ids[keep], dtype="str"),
            "image_id": pd.array(image_ids[keep], dtype="str"),
            "category_id": cat_values[keep],
            "x": boxes[keep, 0],
            "y": boxes[keep, 1],
            "w": boxes[keep, 2],
            "h": boxes[keep, 3],
        }
    )
    names = pd.Series(categories, dtype="str")
    frame.insert(3, "category", frame["category_id"].map(names).astype("str"))

    dup = frame["annotation_id"].duplicated(keep="first").to_numpy()
    annotation_ids = frame["annotation_id"].to_numpy(dtype=object)
    for row in np.flatnonzero(dup).tolist():
        issues.add(
            "duplicate_id",
            f"annotation id {annotation_ids[row]!r} repeats an earlier one; the first is kept",
            str(annotation_ids[row]),
            "id",
        )
    positions = position[keep]
    if dup.any():
        frame = frame.loc[~dup].reset_index(drop=True)
        positions = positions[~dup]
    return frame, positions


# --- public API ------------------------------------------------------------------------------------------------


def load_cct(path: str | Path, report: PrepareReport, key_field: str = "serving_bucket_key") -> CctProject:
    """Read and validate a CCT file as Animl writes it.

    Args:
        path: the CCT JSON file.
        report: receives one issue per skipped, dropped, clamped or ignored record, and the ingest counts.
        key_field: image field that holds the S3 key (``s3_key`` column); ``file_name`` when absent.

    Returns:
        The validated project. Boxes are clamped to their image where its size is known; boxes of images without a
        size are checked again by :func:`clip_boxes` once :func:`fill_image_sizes` has read the size from the file.

    Raises:
        CctError: the file is unreadable, not JSON, truncated, or its top level is not the CCT shape.
    """
    source = Path(path)
    data = read_json_file(source, CctError)
    if not isinstance(data, dict):
        raise CctError(f"{source}: the top level must be a JSON object, got a {type(data).__name__}")
    images_raw = _top_level_list(data, "images", source, required=True)
    categories_raw = _top_level_list(data, "categories", source, required=True)
    annotations_raw = _top_level_list(data, "annotations", source, required=False)
    issues = _Issues(report, source)

    categories = _parse_categories(categories_raw, issues)
    images, every_image_id = _parse_images(images_raw, key_field, issues)
    annotations, positions = _parse_annotations(annotations_raw, images, every_image_id, categories, issues)
    annotations = clip_with_positions(annotations, images, positions, report, STAGE, source)

    report.set_count(STAGE, "images_in", len(images_raw))
    report.set_count(STAGE, "images", len(images))
    report.set_count(STAGE, "annotations_in", len(annotations_raw))
    report.set_count(STAGE, "annotations", len(annotations))
    report.set_count(STAGE, "annotations_with_box", int(annotations["w"].notna().sum()))
    report.set_count(STAGE, "categories", len(categories))
    log.info(
        "%s: %d/%d images, %d/%d annotations, %d categories",
        source,
        len(images),
        len(images_raw),
        len(annotations),
        len(annotations_raw),
        len(categories),
    )
    return CctProject(images=images, annotations=annotations, categories=categories, source=source)
