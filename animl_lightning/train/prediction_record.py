"""``metrics/predictions.json``: which dataset, labels and calibration a run's ``predictions_<split>.csv`` belong to.

The predictions tables name crops by path only. Whoever reads them later (the label review,
:mod:`animl_lightning.train.label_review`) joins them to the prepared dataset by that path, and the dataset may have
been prepared again since (labels corrected in Animl, a new export): the record holds a fingerprint of the dataset
files the run evaluated, so a stale join is refused instead of mixing one dataset's probabilities with another's
labels. A run trained before this record existed has predictions without it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from animl_lightning.core.contract import CSV_FILENAME, LABEL_INDEX_FILENAME, SPLITS_FILENAME
from animl_lightning.core.errors import InputFileError
from animl_lightning.core.files import atomic_write_json, file_sha256, read_json_file

PREDICTIONS_RECORD_FILENAME = "predictions.json"
RECORD_FORMAT = 1
# The dataset files whose contents decide what a crop path means: its label, its split, the label order.
FINGERPRINTED: tuple[str, ...] = (CSV_FILENAME, LABEL_INDEX_FILENAME, SPLITS_FILENAME)


def dataset_fingerprint(data_dir: str | Path) -> dict[str, str]:
    """``{file name: sha256}`` of the dataset files in :data:`FINGERPRINTED` (a missing file maps to ``""``)."""
    root = Path(data_dir)
    return {name: file_sha256(root / name) if (root / name).is_file() else "" for name in FINGERPRINTED}


@dataclass(frozen=True)
class PredictionsRecord:
    """What ``metrics/predictions.json`` holds.

    Attributes:
        data_dir: the prepared dataset the predictions were made on (absolute).
        fingerprint: :func:`dataset_fingerprint` of that dataset at the time.
        labels: label names in index order (the probability columns).
        temperature: the calibration temperature of the evaluated weights; 1.0 = the model's own softmax.
        rows: crops per evaluated split.
    """

    data_dir: str
    fingerprint: dict[str, str]
    labels: list[str]
    temperature: float
    rows: dict[str, int]

    @property
    def calibrated(self) -> bool:
        """Whether the probabilities were calibrated (``calibrate=true``)."""
        return self.temperature != 1.0


def write_predictions_record(
    metrics_dir: str | Path, data_dir: str | Path, labels: Sequence[str], temperature: float, rows: Mapping[str, int]
) -> Path:
    """Write ``<metrics_dir>/predictions.json`` (atomically) and return its path."""
    path = Path(metrics_dir) / PREDICTIONS_RECORD_FILENAME
    atomic_write_json(
        path,
        {
            "format": RECORD_FORMAT,
            "data_dir": str(Path(data_dir).resolve()),
            "fingerprint": dataset_fingerprint(data_dir),
            "labels": list(labels),
            "temperature": float(temperature),
            "rows": {str(k): int(v) for k, v in rows.items()},
        },
    )
    return path


def read_predictions_record(path: str | Path) -> PredictionsRecord:
    """Read ``predictions.json``; a damaged or foreign file raises :class:`InputFileError` naming the field."""
    raw: Any = read_json_file(path, InputFileError)
    if not isinstance(raw, dict) or raw.get("format") != RECORD_FORMAT:
        raise InputFileError(f"{path}: not a predictions record of format {RECORD_FORMAT}")
    try:
        return PredictionsRecord(
            data_dir=str(raw["data_dir"]),
            fingerprint={str(k): str(v) for k, v in dict(raw["fingerprint"]).items()},
            labels=[str(label) for label in raw["labels"]],
            temperature=float(raw["temperature"]),
            rows={str(k): int(v) for k, v in dict(raw["rows"]).items()},
        )
    except (KeyError, TypeError, ValueError) as err:
        raise InputFileError(f"{path}: field {err} is missing or malformed") from err
