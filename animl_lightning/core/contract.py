"""The dataset contract between ``prepare.py`` and ``train.py``.

A prepared dataset is a folder holding:

``classification_ds.csv``
    One row per crop. Required columns (in this order, as the old CameraTraps pipeline wrote them):
    ``path`` (crop path relative to ``crops/``), ``dataset``, ``location``, ``dataset_class`` (the original CCT
    category), ``confidence`` (1.0 for ground-truth boxes, the detector's score otherwise) and ``label`` (the output
    label). Further columns follow: ``image_id``, ``annotation_id``, ``datetime``, ``seq_id``, ``source``, then
    ``sequence`` (the crop's burst: the CCT ``seq_id``, or found from the times, see
    :mod:`animl_lightning.core.sequences`) and, only for a dataset split by another unit than the location
    (``split.group_by``), ``split_group`` (the crop's group key).
``label_index.json``
    ``{"0": label, "1": label, ...}`` with labels sorted.
``splits.json``
    ``{"train": [[dataset, location], ...], "val": [...], "test": [...]}``; the three lists are pairwise disjoint.
    ``test`` may be empty (``split.test_frac=0``) but the key is always written. Split by another unit
    (``split.group_by=sequence`` or ``location_time``), the pairs are ``[dataset, group key]`` in the same shape,
    the group key being the crops' ``split_group`` value (a sequence key, or ``<location>@<time block>``).
``prepare_info.json``
    What prepare.py did: the crop rule (``crops.strategy``, ``crops.max_size``, ``crops.quality``), the settings,
    and a fingerprint per finished stage (the resume record). ``train.py`` reads the crop rule from it
    (:func:`read_crop_rule`) and records it in the checkpoint, so classify and deployment cut crops the same way.
``crops/``
    The crop JPEGs.

Locations are strings everywhere: a CCT file with integer locations and one with the same locations as strings
produce the same dataset.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from animl_lightning.core.crop_files import has_jpeg_markers
from animl_lightning.core.crop_rule import CropRule
from animl_lightning.core.errors import AnimlError, InputFileError
from animl_lightning.core.files import atomic_write, atomic_write_json, read_json_file, safe_relative
from animl_lightning.core.label_index import LabelIndex
from animl_lightning.core.taxonomy import TAXONOMY_FILENAME, Taxonomy, read_taxonomy

log = logging.getLogger(__name__)

CSV_FILENAME = "classification_ds.csv"
LABEL_INDEX_FILENAME = "label_index.json"
SPLITS_FILENAME = "splits.json"
SPLIT_REPORT_FILENAME = "split_report.csv"
INFO_FILENAME = "prepare_info.json"
CROPS_DIRNAME = "crops"
# Threads checking crop files before training: the check is a stat and two 2-byte reads per file, I/O bound.
_CHECK_THREADS = 8

REQUIRED_COLUMNS: tuple[str, ...] = ("path", "dataset", "location", "dataset_class", "confidence", "label")
STRING_COLUMNS: tuple[str, ...] = (
    "path",
    "dataset",
    "location",
    "dataset_class",
    "label",
    "image_id",
    "annotation_id",
    "datetime",
    "seq_id",
    "source",
    "sequence",
    "split_group",
)
# The column a split's groups are keyed on when the split was not made by location (split.group_by).
GROUP_COLUMN = "split_group"
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")

LocationKey = tuple[str, str]


class DatasetError(InputFileError):
    """A prepared dataset folder is inconsistent or malformed; the message names the file and the record."""


# --- writers ---------------------------------------------------------------------------------------------------


def write_classification_csv(frame: pd.DataFrame, path: str | Path) -> None:
    """Write ``classification_ds.csv`` atomically, required columns first."""
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DatasetError(f"cannot write {path}: missing columns {missing}")
    extra = [c for c in frame.columns if c not in REQUIRED_COLUMNS]
    ordered = frame[[*REQUIRED_COLUMNS, *extra]]
    with atomic_write(path, "w") as handle:
        ordered.to_csv(handle, index=False, lineterminator="\n")


def write_label_index(labels: Iterable[str], path: str | Path) -> list[str]:
    """Write ``label_index.json`` for the sorted unique ``labels``; return that order."""
    index = LabelIndex.sorted_from(labels)
    atomic_write_json(path, index.to_dict())
    return list(index)


def write_splits(splits: Mapping[str, Iterable[Sequence[str]]], path: str | Path) -> None:
    """Write ``splits.json`` with every split key present and each list sorted."""
    unknown = set(splits) - set(SPLIT_NAMES)
    if unknown:
        raise DatasetError(f"unknown split names {sorted(unknown)}; expected {list(SPLIT_NAMES)}")
    payload = {name: sorted([str(pair[0]), str(pair[1])] for pair in splits.get(name, [])) for name in SPLIT_NAMES}
    _check_disjoint({k: [tuple(p) for p in v] for k, v in payload.items()}, str(path))  # type: ignore[misc]
    atomic_write_json(path, payload)


def write_prepare_info(info: Mapping[str, Any], path: str | Path) -> None:
    """Write ``prepare_info.json`` (atomically); ``info["crops"]`` must hold the crop rule."""
    crops = info.get("crops")
    if not isinstance(crops, Mapping):
        raise DatasetError(f"cannot write {path}: field 'crops' (the crop rule) is missing")
    atomic_write_json(path, dict(info))


# --- readers ---------------------------------------------------------------------------------------------------


def read_prepare_info(path: str | Path) -> dict[str, Any]:
    """Read ``prepare_info.json`` as written by :func:`write_prepare_info`.

    Raises:
        DatasetError: missing, not JSON, or not an object.
    """
    raw = read_json_file(path, DatasetError)
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: expected a JSON object, got a {type(raw).__name__}")
    return raw


def read_crop_rule(data_dir: str | Path) -> CropRule:
    """The crop rule prepare.py cut a dataset's crops with (``prepare_info.json``, field ``crops``).

    Raises:
        DatasetError: the file is missing or its ``crops`` field is not a crop rule.
    """
    path = Path(data_dir) / INFO_FILENAME
    crops = read_prepare_info(path).get("crops")
    if not isinstance(crops, dict):
        raise DatasetError(f"{path}: field 'crops' must be an object {{'strategy', 'max_size'}}, got {crops!r}")
    try:
        return CropRule.from_dict(crops, f"{path}, field 'crops'")
    except AnimlError as err:
        raise DatasetError(str(err)) from err


def read_classification_csv(path: str | Path) -> pd.DataFrame:
    """Read ``classification_ds.csv`` with string locations and validated required columns."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    header = pd.read_csv(path, nrows=0)
    dtypes = {c: "string" for c in STRING_COLUMNS if c in header.columns}
    try:
        frame = pd.read_csv(path, dtype=dtypes, keep_default_na=False, na_values={"confidence": [""]})
    except (ValueError, pd.errors.ParserError) as err:
        raise DatasetError(f"{path}: cannot parse CSV: {err}") from err
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DatasetError(f"{path}: missing required columns {missing} (has {list(frame.columns)})")
    confidence = pd.to_numeric(frame["confidence"], errors="coerce")
    bad = confidence.isna() | ~np.isfinite(confidence.to_numpy(dtype=float, na_value=np.nan))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DatasetError(
            f"{path}: row {row + 2} ({frame['path'].iloc[row]}), field 'confidence': "
            f"{frame['confidence'].iloc[row]!r} is not a finite number"
        )
    frame["confidence"] = confidence.astype(float)
    for column in ("path", "dataset", "location", "label"):
        empty = frame[column].astype(str).str.len() == 0
        if empty.any():
            row = int(np.flatnonzero(empty.to_numpy())[0])
            raise DatasetError(f"{path}: row {row + 2}, field {column!r} is empty")
    return frame


def read_label_index(path: str | Path) -> list[str]:
    """Read ``label_index.json``; return labels in index order (keys must be "0".."n-1", labels unique)."""
    path = Path(path)
    return list(LabelIndex.from_dict(read_json_file(path, DatasetError), str(path), DatasetError))


def read_splits(path: str | Path) -> dict[str, list[LocationKey]]:
    """Read ``splits.json`` into ``{split: [(dataset, location), ...]}``; a missing ``test`` key reads as empty."""
    path = Path(path)
    raw = read_json_file(path, DatasetError)
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: expected a JSON object with keys {list(SPLIT_NAMES)}")
    unknown = set(raw) - set(SPLIT_NAMES)
    if unknown:
        raise DatasetError(f"{path}: unknown split names {sorted(unknown)}; expected {list(SPLIT_NAMES)}")
    for required in ("train", "val"):
        if required not in raw:
            raise DatasetError(f"{path}: missing split {required!r}")
    splits: dict[str, list[LocationKey]] = {}
    for name in SPLIT_NAMES:
        entries = raw.get(name, [])
        if not isinstance(entries, list):
            raise DatasetError(f"{path}: split {name!r} must be a list of [dataset, location] pairs")
        pairs: list[LocationKey] = []
        for i, entry in enumerate(entries):
            if (
                not isinstance(entry, list | tuple)
                or len(entry) != 2
                or any(isinstance(x, bool) or not isinstance(x, str | int) for x in entry)
            ):
                raise DatasetError(f"{path}: split {name!r} entry {i}: expected [dataset, location], got {entry!r}")
            pairs.append((str(entry[0]), str(entry[1])))
        splits[name] = pairs
    _check_disjoint(splits, str(path))
    return splits


# --- checks ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedDataset:
    """A validated prepared dataset: rows carry ``split`` and ``label_idx`` columns."""

    root: Path
    frame: pd.DataFrame
    labels: list[str]
    splits: dict[str, list[LocationKey]]
    # The labels' taxonomy (``taxonomy.csv``, written by ``labels.taxonomy_file``), or None.
    taxonomy: Taxonomy | None = None

    @property
    def crops_dir(self) -> Path:
        """Folder that ``path`` values are relative to."""
        return self.root / CROPS_DIRNAME

    def split_frame(self, split: str) -> pd.DataFrame:
        """Rows of one split."""
        return self.frame[self.frame["split"] == split].reset_index(drop=True)


def crop_groups(frame: pd.DataFrame) -> pd.DataFrame:
    """``path, image, sequence, location, confidence`` per crop: the keys of the image, sequence and location tables.

    The image is ``<dataset>:<image_id>``; a dataset written before ``image_id`` or ``sequence`` were columns gets
    the crop path as its image and the image as its sequence (each crop then counts alone, stated in the log).
    """
    path = frame["path"].astype(str)
    if "image_id" in frame.columns:
        ids = frame["image_id"].astype("string").fillna("")
        image = (frame["dataset"].astype(str) + ":" + ids.astype(str)).where(ids != "", path)
    else:
        log.warning("classification_ds.csv has no image_id column: each crop counts as its own image")
        image = path
    if "sequence" in frame.columns:
        sequence = frame["sequence"].astype("string").fillna("").astype(str)
        sequence = sequence.where(sequence != "", image)
    else:
        log.warning("classification_ds.csv has no sequence column (prepared before sequences): each image is one")
        sequence = image
    return pd.DataFrame(
        {
            "path": path.to_numpy(dtype=object),
            "image": image.to_numpy(dtype=object),
            "sequence": sequence.to_numpy(dtype=object),
            "location": frame["location"].astype(str).to_numpy(dtype=object),
            "confidence": pd.to_numeric(frame["confidence"], errors="coerce").fillna(1.0).to_numpy(dtype=float),
        }
    )


def load_prepared_dataset(root: str | Path, check_files: bool = True) -> PreparedDataset:
    """Read and cross-check the three dataset files in ``root``.

    Raises :class:`DatasetError` listing (up to 10 of) every label missing from ``label_index.json``, location in
    no split, unsafe crop path and (with ``check_files``) missing or damaged crop file, before any training starts.
    The crop check is cheap (JPEG start and end markers, :func:`~animl_lightning.core.crop_rule.has_jpeg_markers`):
    an emptied or truncated crop is caught here, not as a traceback in the middle of an epoch. Every damaged crop is
    named in the log.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data_dir {root} does not exist or is not a folder")
    csv_path = root / CSV_FILENAME
    frame = read_classification_csv(csv_path)
    labels = read_label_index(root / LABEL_INDEX_FILENAME)
    splits = read_splits(root / SPLITS_FILENAME)

    problems: list[str] = []
    label_to_idx = {label: i for i, label in enumerate(labels)}
    unknown_labels = sorted(set(frame["label"].astype(str)) - set(label_to_idx))
    if unknown_labels:
        problems.append(f"{csv_path}: labels {unknown_labels[:10]} are not in {root / LABEL_INDEX_FILENAME} ({labels})")

    location_to_split: dict[LocationKey, str] = {}
    for name, pairs in splits.items():
        for pair in pairs:
            location_to_split[pair] = name
    group = GROUP_COLUMN if GROUP_COLUMN in frame.columns else "location"
    keys = list(zip(frame["dataset"].astype(str), frame[group].astype(str), strict=True))
    split_col = [location_to_split.get(k) for k in keys]
    orphans = sorted({k for k, s in zip(keys, split_col, strict=True) if s is None})
    if orphans:
        problems.append(
            f"{csv_path}: {len(orphans)} (dataset, {group}) pairs are in no split of "
            f"{root / SPLITS_FILENAME}, e.g. {[list(o) for o in orphans[:10]]}"
        )

    bad_paths: list[str] = []
    safe_paths: list[str] = []
    crops_dir = root / CROPS_DIRNAME
    for rel in frame["path"].astype(str):
        try:
            safe_relative(rel)
        except ValueError:
            bad_paths.append(rel)
            continue
        safe_paths.append(rel)
    if bad_paths:
        problems.append(f"{csv_path}: field 'path' escapes {crops_dir}: {bad_paths[:10]}")
    if check_files:
        missing, damaged = check_crop_files(crops_dir, safe_paths)
        if missing:
            problems.append(f"{csv_path}: {len(missing)} crop files are missing under {crops_dir}: {missing[:10]}")
        if damaged:
            problems.append(
                f"{csv_path}: {len(damaged)} crop files under {crops_dir} are not complete JPEGs (emptied or "
                f"truncated since prepare.py made them): {damaged[:10]}; run prepare.py again to redo them"
            )
    if problems:
        raise DatasetError(f"dataset in {root} is inconsistent: " + "; ".join(problems))

    frame = frame.assign(
        split=pd.Series(split_col, index=frame.index, dtype="string"),
        label_idx=frame["label"].astype(str).map(label_to_idx).astype(np.int64),
    )
    taxonomy_path = root / TAXONOMY_FILENAME
    taxonomy = read_taxonomy(taxonomy_path, labels) if taxonomy_path.is_file() else None
    return PreparedDataset(root=root, frame=frame, labels=labels, splits=splits, taxonomy=taxonomy)


def _check_disjoint(splits: Mapping[str, Sequence[LocationKey]], source: str) -> None:
    seen: dict[LocationKey, str] = {}
    for name, pairs in splits.items():
        for pair in pairs:
            key = (str(pair[0]), str(pair[1]))
            if key in seen and seen[key] != name:
                raise DatasetError(
                    f"{source}: location {list(key)} is in both {seen[key]!r} and {name!r}; splits must be disjoint"
                )
            seen[key] = name


def check_crop_files(crops_dir: Path, paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(missing, damaged)`` crop paths under ``crops_dir``; every one is also logged by name.

    Damaged means not a complete JPEG (:func:`~animl_lightning.core.crop_rule.has_jpeg_markers`).
    """

    def state(rel: str) -> str:
        path = crops_dir / rel
        if not path.is_file():
            return "missing"
        return "ok" if has_jpeg_markers(path) else "damaged"

    with ThreadPoolExecutor(max_workers=_CHECK_THREADS) as pool:
        states = list(pool.map(state, paths, chunksize=256))
    missing = [rel for rel, st in zip(paths, states, strict=True) if st == "missing"]
    damaged = [rel for rel, st in zip(paths, states, strict=True) if st == "damaged"]
    for rel in damaged:
        log.error("unreadable crop %s: not a complete JPEG", crops_dir / rel)
    return missing, damaged
