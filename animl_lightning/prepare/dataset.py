"""The dataset stage: labelled, cropped boxes become the ``classification_ds.csv`` table.

:func:`build_dataset_frame` keeps the boxes whose crop exists, applies ``split.min_locs`` and returns the table in
the column order of :mod:`animl_lightning.core.contract`; :func:`write_dataset_files` writes it together with
``label_index.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from animl_lightning.core.contract import (
    CSV_FILENAME,
    LABEL_INDEX_FILENAME,
    REQUIRED_COLUMNS,
    write_classification_csv,
    write_label_index,
)
from animl_lightning.core.errors import DataError, InputFileError
from animl_lightning.core.files import atomic_write_text, file_sha256
from animl_lightning.core.issues import PrepareReport
from animl_lightning.core.sequences import sequence_keys, time_block_keys
from animl_lightning.core.taxonomy import TAXONOMY_FILENAME, read_taxonomy
from animl_lightning.prepare.config import SplitSettings
from animl_lightning.prepare.stage import PrepareRun, Stage, StageOutcome, need

log = logging.getLogger(__name__)

STAGE = "dataset"
EXTRA_COLUMNS: tuple[str, ...] = ("image_id", "annotation_id", "datetime", "seq_id", "source")
DATASET_COLUMNS: tuple[str, ...] = (*REQUIRED_COLUMNS, *EXTRA_COLUMNS, "sequence")
_NEEDED = ("crop_path", "location", "dataset_class", "confidence", "label", "crop_ok")


class EmptyDatasetError(InputFileError):
    """No crop is left to build a dataset from; the message says which step removed the last ones."""


def build_dataset_frame(
    boxes: pd.DataFrame,
    dataset: str,
    min_locs: int | None,
    report: PrepareReport,
    max_gap_s: float = 3.0,
    split_unit: SplitSettings | None = None,
) -> pd.DataFrame:
    """Build the ``classification_ds.csv`` frame from labelled boxes.

    Args:
        boxes: the labelled boxes frame (``crop_path``, ``location``, ``dataset_class``, ``confidence``, ``label``,
            ``crop_ok``; ``image_id``, ``annotation_id``, ``datetime``, ``seq_id``, ``source`` are carried when
            present, filled with ``""`` otherwise).
        dataset: the dataset name written to the ``dataset`` column.
        min_locs: drop labels seen at fewer distinct ``(dataset, location)`` pairs; ``None`` keeps every label.
        report: receives the counts and one issue per label dropped by ``min_locs``.
        max_gap_s: ``sequences.max_gap_s``, for the ``sequence`` column (:mod:`animl_lightning.core.sequences`).
        split_unit: ``split.*``; with ``group_by`` other than ``location`` a ``split_group`` column holds each crop's
            group key (its sequence, or ``<location>@<time block>``).

    Returns:
        The table, columns :data:`DATASET_COLUMNS` (and ``split_group``), sorted by ``path`` (ties by ``label``),
        one row per crop path.

    Raises:
        ValueError: a needed column is missing.
        EmptyDatasetError: no row is left.
    """
    missing = [c for c in _NEEDED if c not in boxes.columns]
    if missing:
        raise DataError(f"build_dataset_frame: boxes frame lacks columns {missing}")
    report.set_count(STAGE, "boxes_in", len(boxes))
    ok = boxes["crop_ok"].fillna(False).astype(bool).to_numpy()
    if (~ok).any():
        report.set_count(STAGE, "crop_failed_dropped", int((~ok).sum()))
    kept = boxes.loc[ok]
    if kept.empty:
        causes = [
            f"{stage}: {n} {kind}"
            for stage, kinds in report.issue_summary().items()
            if stage in ("images", "crops")
            for kind, n in sorted(kinds.items(), key=lambda item: -item[1])
        ]
        raise EmptyDatasetError(
            f"dataset {dataset!r}: none of the {len(boxes)} labelled boxes has a crop, because of "
            f"{'; '.join(causes[:4]) or 'the crops stage'} (every record is in prepare_report.json)"
        )

    frame = pd.DataFrame(
        {
            "path": kept["crop_path"].astype(str).to_numpy(),
            "dataset": dataset,
            "location": kept["location"].astype(str).to_numpy(),
            "dataset_class": kept["dataset_class"].astype(str).to_numpy(),
            "confidence": pd.to_numeric(kept["confidence"], errors="coerce").astype(float).to_numpy(),
            "label": kept["label"].astype(str).to_numpy(),
        }
    )
    for column in EXTRA_COLUMNS:
        if column in kept.columns:
            frame[column] = kept[column].astype("string").fillna("").astype(str).to_numpy()
        else:
            frame[column] = ""

    has_duplicates = bool(frame["path"].duplicated().any())
    # Paths are unique unless an upstream stage misbehaved; the multi-key sort (3x slower) is only needed then.
    keys = ["path", "label", "source"] if has_duplicates else ["path"]
    frame = frame.sort_values(keys, kind="stable").reset_index(drop=True)
    if has_duplicates:
        duplicated = frame["path"].duplicated(keep="first").to_numpy()
        for path in sorted(set(frame.loc[duplicated, "path"])):
            report.add(
                STAGE,
                "duplicate_crop_path",
                f"crop path {path!r} belongs to more than one box; the first (by label, source) is kept",
                record=path,
                field="path",
                action="dropped",
            )
        frame = frame.loc[~duplicated].reset_index(drop=True)

    if min_locs is not None:
        frame = _apply_min_locs(frame, dataset, min_locs, report)
    frame["sequence"] = sequence_keys(frame, max_gap_s).to_numpy(dtype=object)
    if split_unit is not None and split_unit.group_by == "sequence":
        frame["split_group"] = frame["sequence"]
    elif split_unit is not None and split_unit.group_by == "location_time":
        seconds = split_unit.time_block_seconds
        assert seconds is not None  # SplitSettings requires time_block with location_time
        frame["split_group"] = time_block_keys(frame, seconds).to_numpy(dtype=object)
    report.set_count(STAGE, "sequences", int(frame["sequence"].nunique()))

    report.set_count(STAGE, "rows", len(frame))
    report.set_count(STAGE, "labels", frame["label"].nunique())
    report.set_count(STAGE, "locations", len(np.unique(_location_codes(frame))))
    return frame


def label_location_counts(frame: pd.DataFrame) -> pd.Series:
    """Number of distinct ``(dataset, location)`` pairs per label, indexed by label (sorted)."""
    label_codes, label_values = pd.factorize(frame["label"].astype(str))
    location_codes = _location_codes(frame)
    pairs = np.unique(label_codes.astype(np.int64) * (int(location_codes.max(initial=0)) + 1) + location_codes)
    per_label = np.bincount(pairs // (int(location_codes.max(initial=0)) + 1), minlength=len(label_values))
    counts = pd.Series(per_label, index=[str(v) for v in label_values], dtype=np.int64)
    return counts.sort_index()


def _location_codes(frame: pd.DataFrame) -> np.ndarray:
    """One integer per distinct ``(dataset, location)`` pair."""
    dataset_codes, _ = pd.factorize(frame["dataset"].astype(str))
    location_codes, location_values = pd.factorize(frame["location"].astype(str))
    return np.asarray(dataset_codes, dtype=np.int64) * max(len(location_values), 1) + location_codes


def write_dataset_files(frame: pd.DataFrame, output_dir: str | Path) -> list[str]:
    """Write ``classification_ds.csv`` and ``label_index.json`` into ``output_dir``; return the label order."""
    output_dir = Path(output_dir)
    write_classification_csv(frame, output_dir / CSV_FILENAME)
    return write_label_index(frame["label"].astype(str), output_dir / LABEL_INDEX_FILENAME)


def _apply_min_locs(frame: pd.DataFrame, dataset: str, min_locs: int, report: PrepareReport) -> pd.DataFrame:
    per_label = {str(k): int(v) for k, v in label_location_counts(frame).items()}
    too_few = {label: n for label, n in per_label.items() if n < min_locs}
    if not too_few:
        return frame
    crops = {str(k): int(v) for k, v in frame["label"].value_counts().items()}
    for label, n_locs in too_few.items():
        report.add(
            STAGE,
            "label_below_min_locs",
            f"label {label!r} is seen at {n_locs} location(s), fewer than split.min_locs={min_locs}: "
            f"{crops[label]} crops dropped",
            record=label,
            field="split.min_locs",
            action="dropped",
        )
        report.count(STAGE, f"min_locs_dropped:{label}", crops[label])
    log.warning(
        "dropping %d label(s) seen at fewer than %d locations: %s",
        len(too_few),
        min_locs,
        ", ".join(f"{label} ({n})" for label, n in too_few.items()),
    )
    keep = ~frame["label"].isin(list(too_few)).to_numpy()
    if not keep.any():
        raise EmptyDatasetError(
            f"dataset {dataset!r}: every label is seen at fewer than split.min_locs={min_locs} locations "
            f"({per_label}); lower split.min_locs or add data"
        )
    return frame.loc[keep].reset_index(drop=True)


class DatasetStage(Stage):
    """Always runs: write ``classification_ds.csv``, ``label_index.json`` and the taxonomy of ``labels.*``."""

    name = STAGE

    def fingerprint(self, run: PrepareRun) -> str | None:
        """The digest of ``classification_ds.csv`` (what the splits stage depends on)."""
        return file_sha256(run.output_dir / CSV_FILENAME)

    def run(self, run: PrepareRun) -> StageOutcome:
        """Leave the table on ``run.frame`` and its labels on ``run.labels``."""
        settings, split = run.settings, run.split
        labelled = need(run.labelled, "the labelled boxes")
        frame = build_dataset_frame(
            labelled, run.dataset, split.min_locs, run.report, settings.sequences.max_gap_s, split
        )
        labels = write_dataset_files(frame, run.output_dir)
        run.frame, run.labels = frame, labels
        detail = f"{len(frame)} crops, {len(labels)} labels"
        taxonomy_path = run.output_dir / TAXONOMY_FILENAME
        if settings.labels.taxonomy_file:
            taxonomy = read_taxonomy(settings.labels.taxonomy_file, labels)
            atomic_write_text(taxonomy_path, taxonomy.to_csv())
            detail += ", taxonomy"
        else:
            taxonomy_path.unlink(missing_ok=True)  # a taxonomy of an earlier run does not describe these labels
        return StageOutcome(detail=detail, counts={"crops": len(frame), "labels": len(labels)})
