"""Likely label errors and uncertain crops, from out-of-sample probabilities, for the people who label.

``python -m animl_lightning.review run_dir=RUN`` reads the probabilities a finished ``train.py`` run gave its val
and test crops (``metrics/predictions_{val,test}.csv``: crops the model never trained on; calibrated when the run
was), and with ``review.folds=K`` those of its train crops from K fits over folds of whole locations
(:mod:`animl_lightning.train.review_folds`). It joins them by crop path to the prepared dataset
(``classification_ds.csv``: Animl's image and annotation ids, location, sequence) and writes ``RUN/review/``:

``label_issues.csv``
    The crops cleanlab's confident learning flags (``cleanlab.filter.find_label_issues``), most suspicious first by
    cleanlab's label-quality score (``cleanlab.rank.get_label_quality_scores``, ``review.method``), with the given
    label, the suggested one (the most probable other label) and both probabilities.
``uncertain.csv``
    Crops the model cannot decide: top probability below ``review.uncertain_top_probability`` or a margin between the
    two most probable labels below ``review.uncertain_margin``, smallest margin first.
``review.html``
    One self-contained page (crop thumbnails embedded, no script): counts, then the suspicious crops grouped by
    given label with given and suggested label.
``animl_ids/<label>.txt``
    Per given label with suspicious crops, one ``image_id<TAB>annotation_id`` line per crop in rank order, to open
    each in Animl and correct it at the source.

The command then rebuilds the run's ``report.html``, whose label review section counts these crops per split and
shows how the val/test per-label table would change with their suggested labels
(:func:`animl_lightning.train.report.label_review_section`).

Everything is computed in memory first and written as a set (each file atomically, Ctrl-C held back), so a bad input
(a run without predictions, a run from before ``metrics/predictions.json``, a dataset changed since the run, a
deleted crop) ends with one line and leaves the previous review as it was.
"""

from __future__ import annotations

import base64
import io
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
from PIL import Image

from animl_lightning.core.contract import SPLIT_NAMES, PreparedDataset, check_crop_files, load_prepared_dataset
from animl_lightning.core.errors import InputFileError, require
from animl_lightning.core.files import atomic_write, atomic_write_text, interrupts_deferred, safe_join
from animl_lightning.train.galleries import gallery_filename
from animl_lightning.train.prediction_record import (
    PREDICTIONS_RECORD_FILENAME,
    PredictionsRecord,
    dataset_fingerprint,
    read_predictions_record,
)

log = logging.getLogger(__name__)

REVIEW_DIRNAME = "review"
ISSUES_FILENAME = "label_issues.csv"
UNCERTAIN_FILENAME = "uncertain.csv"
PAGE_FILENAME = "review.html"
IDS_DIRNAME = "animl_ids"
TEMPLATE = "review.html.j2"
# The crops a run's own model never trained on; the train crops need review.folds.
OUT_OF_SAMPLE_SPLITS: tuple[str, ...] = ("val", "test")
METHODS: tuple[str, ...] = ("self_confidence", "normalized_margin", "confidence_weighted_entropy")
FILTERS: tuple[str, ...] = (
    "prune_by_noise_rate",
    "prune_by_class",
    "both",
    "confident_learning",
    "predicted_neq_given",
    "low_normalized_margin",
    "low_self_confidence",
)
PREDICTION_COLUMNS: tuple[str, ...] = ("path", "label", "prediction")
# Joined from classification_ds.csv; a dataset prepared before a column existed gets it empty.
DATASET_COLUMNS: tuple[str, ...] = ("annotation_id", "image_id", "location", "sequence")
CROP_COLUMNS: tuple[str, ...] = ("annotation_id", "image_id", "file", "location", "sequence", "split", "given_label")
ISSUE_COLUMNS: tuple[str, ...] = (
    "rank",
    *CROP_COLUMNS,
    "suggested_label",
    "p_given",
    "p_suggested",
    "label_quality",
)
UNCERTAIN_COLUMNS: tuple[str, ...] = (
    "rank",
    *CROP_COLUMNS,
    "top_label",
    "p_top",
    "second_label",
    "p_second",
    "margin",
)


class ReviewError(InputFileError):
    """A run folder cannot be reviewed; the message names the folder or file and says what to do."""


@dataclass(frozen=True)
class ReviewSettings:
    """The ``review.*`` keys of the review command and their defaults (the schema of ``configs/review.yaml``).

    Attributes:
        method: cleanlab's label-quality score that orders ``label_issues.csv`` (see the README for the choice).
        filter_by: cleanlab's rule that decides which crops are label issues (``find_label_issues(filter_by=...)``).
        uncertain_top_probability: a crop whose most probable label is below this is uncertain.
        uncertain_margin: a crop whose two most probable labels are closer than this is uncertain.
        page_crops: suspicious crops shown as thumbnails on ``review.html`` (the CSV has them all).
        page_uncertain: uncertain crops shown as thumbnails.
        thumbnail_size: longest side of a thumbnail in pixels.
        folds: also review the train crops with this many fits over folds of whole locations; None = val and
            test only.
        fold_seed: seed of the assignment of locations to folds.
    """

    method: str = "normalized_margin"
    filter_by: str = "prune_by_noise_rate"
    uncertain_top_probability: float = 0.5
    uncertain_margin: float = 0.1
    page_crops: int = 300
    page_uncertain: int = 60
    thumbnail_size: int = 128
    folds: int | None = None
    fold_seed: int = 0

    def __post_init__(self) -> None:
        require(self.method in METHODS, "review.method", f"must be one of {list(METHODS)}, got {self.method!r}")
        require(
            self.filter_by in FILTERS, "review.filter_by", f"must be one of {list(FILTERS)}, got {self.filter_by!r}"
        )
        require(
            0.0 <= self.uncertain_top_probability <= 1.0,
            "review.uncertain_top_probability",
            f"must be in [0, 1], got {self.uncertain_top_probability}",
        )
        require(
            0.0 <= self.uncertain_margin <= 1.0,
            "review.uncertain_margin",
            f"must be in [0, 1], got {self.uncertain_margin}",
        )
        require(self.page_crops >= 0, "review.page_crops", f"must be >= 0, got {self.page_crops}")
        require(self.page_uncertain >= 0, "review.page_uncertain", f"must be >= 0, got {self.page_uncertain}")
        require(self.thumbnail_size >= 16, "review.thumbnail_size", f"must be >= 16, got {self.thumbnail_size}")
        require(
            self.folds is None or self.folds >= 2,
            "review.folds",
            f"must be null (val and test only) or >= 2, got {self.folds}",
        )


@dataclass(frozen=True)
class RunPredictions:
    """The out-of-sample predictions of a run and the dataset they belong to.

    Attributes:
        run_dir: the run folder.
        record: its ``metrics/predictions.json``.
        prepared: the prepared dataset (crop files not checked).
        frames: ``predictions_<split>.csv`` of the val and test splits the run evaluated.
    """

    run_dir: Path
    record: PredictionsRecord
    prepared: PreparedDataset
    frames: dict[str, pd.DataFrame] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        """Label names in index order (the probability columns)."""
        return list(self.record.labels)


def load_run_predictions(run_dir: str | Path) -> RunPredictions:
    """Read a run's val/test predictions and check that they belong to its dataset as it is now.

    Raises:
        ReviewError: not a folder, no predictions, a run from before ``metrics/predictions.json``, the dataset gone
            or prepared again since the run, predictions whose columns are not the record's labels.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise ReviewError(f"run_dir: {run} is not a folder; give the folder of a finished train.py run")
    metrics = run / "metrics"
    files = {split: metrics / f"predictions_{split}.csv" for split in OUT_OF_SAMPLE_SPLITS}
    present = {split: path for split, path in files.items() if path.is_file()}
    if not present:
        raise ReviewError(
            f"run_dir: {run} has no metrics/predictions_val.csv or predictions_test.csv; give the folder of a "
            "finished train.py run that wrote its predictions (callbacks.metric_tables.predictions=true)"
        )
    record_file = metrics / PREDICTIONS_RECORD_FILENAME
    if not record_file.is_file():
        raise ReviewError(
            f"run_dir: {run} was trained before the label review existed (no metrics/{PREDICTIONS_RECORD_FILENAME} "
            "ties its predictions to a dataset); evaluate its checkpoint again with python train.py train=false "
            f"ckpt_path={run / 'checkpoints' / 'best.ckpt'} and review that run's folder"
        )
    record = read_predictions_record(record_file)
    data_dir = Path(record.data_dir)
    if not data_dir.is_dir():
        raise ReviewError(f"the dataset {data_dir} that {run}'s predictions were made on is gone")
    changed = [name for name, digest in dataset_fingerprint(data_dir).items() if record.fingerprint.get(name) != digest]
    if changed:
        raise ReviewError(
            f"the dataset {data_dir} changed since {run}'s predictions were made ({', '.join(changed)} differ); "
            "train again on it, or evaluate the checkpoint on it again (train=false ckpt_path=...), and review that run"
        )
    prepared = load_prepared_dataset(data_dir, check_files=False)
    frames: dict[str, pd.DataFrame] = {}
    for split, path in present.items():
        frame = read_predictions(path, record.labels)
        if len(frame):
            frames[split] = frame
    if not frames:
        raise ReviewError(f"run_dir: {run}'s val and test predictions have no rows; there is nothing to review")
    return RunPredictions(run, record, prepared, frames)


def read_predictions(path: Path, labels: Sequence[str]) -> pd.DataFrame:
    """A ``predictions_<split>.csv``: ``path, label, prediction`` then one probability column per label."""
    try:
        frame = pd.read_csv(path, dtype={"path": "string", "label": "string", "prediction": "string"})
    except (ValueError, pd.errors.ParserError) as err:
        raise ReviewError(f"{path}: cannot parse CSV: {err}") from err
    missing = [column for column in (*PREDICTION_COLUMNS, *labels) if column not in frame.columns]
    if missing:
        raise ReviewError(f"{path}: columns {missing} are missing (it has {list(frame.columns)})")
    unknown = sorted(set(frame["label"].astype(str)) - set(labels))
    if unknown:
        raise ReviewError(f"{path}: labels {unknown[:10]} are not among the run's labels {list(labels)}")
    probs = frame[list(labels)].to_numpy(dtype=np.float64)
    if len(probs) and (not np.isfinite(probs).all() or (probs < 0).any()):
        raise ReviewError(f"{path}: probabilities must be finite and >= 0")
    return frame


def crop_table(
    frames: Mapping[str, pd.DataFrame], dataset: pd.DataFrame, labels: Sequence[str]
) -> tuple[pd.DataFrame, np.ndarray]:
    """One row per reviewed crop (:data:`CROP_COLUMNS`) and its probabilities, rows in the same order.

    Args:
        frames: predictions by split (``path, label`` and one probability column per label).
        dataset: ``classification_ds.csv`` (``path`` and the :data:`DATASET_COLUMNS` it has).
        labels: label names in index order.

    Raises:
        ReviewError: a crop reviewed twice, or a crop the dataset does not list.
    """
    parts = [frame.assign(split=split) for split, frame in frames.items() if len(frame)]
    if not parts:
        return pd.DataFrame(columns=list(CROP_COLUMNS)), np.zeros((0, len(labels)))
    predictions = pd.concat(parts, ignore_index=True)
    twice = predictions["path"][predictions["path"].duplicated()]
    if len(twice):
        raise ReviewError(f"crops are scored twice: {twice.astype(str).tolist()[:5]}")
    columns = dataset.reindex(columns=["path", *DATASET_COLUMNS]).astype("string").fillna("")
    joined = predictions.merge(columns, on="path", how="left", indicator=True, validate="one_to_one")
    unlisted = joined.loc[joined["_merge"] != "both", "path"]
    if len(unlisted):
        raise ReviewError(
            f"{len(unlisted)} scored crops are not in the dataset's classification_ds.csv, e.g. "
            f"{unlisted.astype(str).tolist()[:5]}"
        )
    table = pd.DataFrame(
        {
            "annotation_id": joined["annotation_id"].astype(str),
            "image_id": joined["image_id"].astype(str),
            "file": joined["path"].astype(str),
            "location": joined["location"].astype(str),
            "sequence": joined["sequence"].astype(str),
            "split": joined["split"].astype(str),
            "given_label": joined["label"].astype(str),
        }
    )
    return table, joined[list(labels)].to_numpy(dtype=np.float64)


def _normalised(probs: np.ndarray) -> np.ndarray:
    # The CSVs hold 6 significant digits: rows then sum to 1 only within ~1e-5, and cleanlab checks the sums.
    totals = probs.sum(axis=1, keepdims=True)
    normalised: np.ndarray = np.divide(
        probs, totals, out=np.full_like(probs, 1.0 / max(probs.shape[1], 1)), where=totals > 0
    )
    return normalised


def label_quality(given: np.ndarray, probs: np.ndarray, method: str) -> np.ndarray:
    """cleanlab's label-quality score of every crop (0 = the given label is surely wrong, 1 = surely right)."""
    from cleanlab.rank import get_label_quality_scores

    if not len(given):
        return np.zeros(0)
    scores: np.ndarray = get_label_quality_scores(given, _normalised(probs), method=method)
    return scores


def label_issue_mask(given: np.ndarray, probs: np.ndarray, filter_by: str) -> np.ndarray:
    """cleanlab's confident-learning verdict per crop: True where the given label is likely wrong."""
    from cleanlab.filter import find_label_issues

    if not len(given):
        return np.zeros(0, dtype=bool)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # n_jobs=1: the work is a few array passes; worker processes would cost more than they save.
        mask: np.ndarray = find_label_issues(given, _normalised(probs), filter_by=filter_by, n_jobs=1)
    for warning in caught:
        log.info("cleanlab: %s", warning.message)
    return mask.astype(bool)


def rank_label_issues(
    crops: pd.DataFrame, probs: np.ndarray, labels: Sequence[str], method: str, filter_by: str
) -> pd.DataFrame:
    """The crops whose given label is likely wrong, most suspicious first (:data:`ISSUE_COLUMNS`).

    The suggested label is the most probable label other than the given one.
    """
    index = {name: i for i, name in enumerate(labels)}
    given = crops["given_label"].map(index).to_numpy(dtype=np.int64)
    quality = label_quality(given, probs, method)
    flagged = np.flatnonzero(label_issue_mask(given, probs, filter_by))
    # Ties keep the table's order (split, then path), so the ranking is reproducible.
    order = flagged[np.argsort(quality[flagged], kind="stable")]
    others = probs[order].copy()
    others[np.arange(len(order)), given[order]] = -np.inf
    suggested = others.argmax(axis=1) if len(order) else np.zeros(0, dtype=np.int64)
    names = np.asarray(labels, dtype=object)
    issues = crops.iloc[order].reset_index(drop=True)
    issues.insert(0, "rank", np.arange(1, len(order) + 1))
    issues["suggested_label"] = names[suggested]
    issues["p_given"] = probs[order, given[order]]
    issues["p_suggested"] = probs[order, suggested]
    issues["label_quality"] = quality[order]
    return issues[list(ISSUE_COLUMNS)]


def uncertain_crops(
    crops: pd.DataFrame, probs: np.ndarray, labels: Sequence[str], top_probability: float, margin: float
) -> pd.DataFrame:
    """Crops with a top probability below ``top_probability`` or a top-two margin below ``margin``, smallest margin
    first (:data:`UNCERTAIN_COLUMNS`)."""
    if probs.shape[1] < 2 or not len(probs):
        return pd.DataFrame(columns=list(UNCERTAIN_COLUMNS))
    ordered = np.argsort(-probs, axis=1, kind="stable")
    rows = np.arange(len(probs))
    first, second = ordered[:, 0], ordered[:, 1]
    p_top, p_second = probs[rows, first], probs[rows, second]
    gap = p_top - p_second
    picked = np.flatnonzero((p_top < top_probability) | (gap < margin))
    picked = picked[np.argsort(gap[picked], kind="stable")]
    names = np.asarray(labels, dtype=object)
    table = crops.iloc[picked].reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(picked) + 1))
    table["top_label"] = names[first[picked]]
    table["p_top"] = p_top[picked]
    table["second_label"] = names[second[picked]]
    table["p_second"] = p_second[picked]
    table["margin"] = gap[picked]
    return table[list(UNCERTAIN_COLUMNS)]


def animl_id_lists(issues: pd.DataFrame) -> dict[str, str]:
    """``{given label: text}``: one ``image_id<TAB>annotation_id`` line per suspicious crop, in rank order."""
    texts: dict[str, str] = {}
    for label, group in issues.groupby("given_label", sort=True):
        lines = [f"{row.image_id}\t{row.annotation_id}" for row in group.sort_values("rank").itertuples(index=False)]
        texts[str(label)] = "\n".join(lines) + "\n"
    return texts


def id_filenames(labels: Sequence[str]) -> dict[str, str]:
    """A distinct ``<label>.txt`` file name per label (punctuation replaced, as the error galleries do)."""
    names: dict[str, str] = {}
    used: set[str] = set()
    for label in labels:
        stem = Path(gallery_filename(label)).stem
        name = f"{stem}.txt"
        if name in used:  # two labels that differ only in punctuation
            name = f"{stem}_{len(used)}.txt"
        used.add(name)
        names[label] = name
    return names


def split_counts(crops: pd.DataFrame, issues: pd.DataFrame, uncertain: pd.DataFrame) -> pd.DataFrame:
    """``split, crops, label issues, share, uncertain`` per reviewed split, then ``all``."""

    def count(frame: pd.DataFrame, split: str) -> int:
        return len(frame) if split == "all" else int((frame["split"] == split).sum())

    rows = []
    for split in [*[s for s in SPLIT_NAMES if (crops["split"] == s).any()], "all"]:
        total, flagged = count(crops, split), count(issues, split)
        rows.append((split, total, flagged, flagged / total if total else 0.0, count(uncertain, split)))
    return pd.DataFrame(rows, columns=["split", "crops", "label issues", "share", "uncertain"])


def label_counts(crops: pd.DataFrame, issues: pd.DataFrame, uncertain: pd.DataFrame) -> pd.DataFrame:
    """Per given label: reviewed crops, label issues, their share, the suggested labels, uncertain crops."""
    rows = []
    for label, group in crops.groupby("given_label", sort=True):
        mine = issues[issues["given_label"] == label]
        suggested = mine["suggested_label"].value_counts()
        rows.append(
            (
                str(label),
                len(group),
                len(mine),
                len(mine) / len(group),
                ", ".join(f"{name} ({n})" for name, n in suggested.items()),
                int((uncertain["given_label"] == label).sum()),
            )
        )
    columns = ["given label", "crops", "label issues", "share", "suggested instead", "uncertain"]
    return pd.DataFrame(rows, columns=columns).sort_values("label issues", ascending=False, kind="stable")


def thumbnail(crops_dir: Path, path: str, size: int) -> str:
    """A crop as a base64 JPEG at most ``size`` pixels on its longest side.

    Raises:
        ReviewError: the crop cannot be read (deleted or damaged since the check).
    """
    try:
        with Image.open(safe_join(crops_dir, path)) as image:
            small = image.convert("RGB")
            small.thumbnail((size, size))
    except (OSError, ValueError) as err:
        raise ReviewError(f"crop {crops_dir / path} cannot be read: {err}") from err
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _fmt(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return f"{float(value):.3f}"
    return str(value)


def review_page(
    crops_dir: Path,
    crops: pd.DataFrame,
    issues: pd.DataFrame,
    uncertain: pd.DataFrame,
    settings: ReviewSettings,
    context: Mapping[str, Any],
) -> str:
    """``review.html`` as one string: counts, suspicious crops grouped by given label, uncertain crops."""
    shown = issues.head(settings.page_crops)
    groups = []
    for label in label_counts(crops, issues, uncertain)["given label"]:
        mine = shown[shown["given_label"] == label]
        if not len(mine):
            continue
        tiles = [
            {
                "src": thumbnail(crops_dir, str(row["file"]), settings.thumbnail_size),
                "rank": int(row["rank"]),
                "given": str(row["given_label"]),
                "suggested": str(row["suggested_label"]),
                "p_given": _fmt(row["p_given"]),
                "p_suggested": _fmt(row["p_suggested"]),
                "where": f"{row['split']} · {row['location']}",
                "ids": f"{row['image_id']} · {row['annotation_id']}",
            }
            for row in mine.to_dict("records")
        ]
        total = int((issues["given_label"] == label).sum())
        groups.append({"label": str(label), "tiles": tiles, "total": total})
    unsure = [
        {
            "src": thumbnail(crops_dir, str(row["file"]), settings.thumbnail_size),
            "rank": int(row["rank"]),
            "given": str(row["given_label"]),
            "top": f"{row['top_label']} {_fmt(row['p_top'])}",
            "second": f"{row['second_label']} {_fmt(row['p_second'])}",
            "where": f"{row['split']} · {row['location']}",
        }
        for row in uncertain.head(settings.page_uncertain).to_dict("records")
    ]

    def table(frame: pd.DataFrame) -> dict[str, Any]:
        numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
        rows = [[_fmt(v) for v in row] for row in frame.itertuples(index=False)]
        return {"columns": [str(c) for c in frame.columns], "rows": rows, "numeric": numeric}

    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("animl_lightning.train", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return environment.get_template(TEMPLATE).render(
        generated=datetime.now().strftime("%Y-%m-%d %H:%M"),
        splits=table(split_counts(crops, issues, uncertain)),
        per_label=table(label_counts(crops, issues, uncertain)),
        groups=groups,
        shown=len(shown),
        issues=len(issues),
        uncertain=unsure,
        uncertain_total=len(uncertain),
        settings=settings,
        **context,
    )


@dataclass(frozen=True)
class ReviewResult:
    """What :func:`review_run` wrote and found."""

    folder: Path
    crops: int
    issues: int
    uncertain: int
    per_split: pd.DataFrame


def review_tables(
    frames: Mapping[str, pd.DataFrame], prepared: PreparedDataset, labels: Sequence[str], settings: ReviewSettings
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``(crops, label issues, uncertain)`` of the scored crops; their crop files must exist.

    Raises:
        ReviewError: a scored crop's file is missing or damaged (deleted since prepare.py made it).
    """
    crops, probs = crop_table(frames, prepared.frame, labels)
    missing, damaged = check_crop_files(prepared.crops_dir, crops["file"].tolist())
    if missing or damaged:
        bad = [*missing, *damaged]
        raise ReviewError(
            f"{len(bad)} reviewed crops are missing or damaged under {prepared.crops_dir} (deleted since prepare.py "
            f"made them?), e.g. {bad[:5]}; run prepare.py again, then train and review"
        )
    issues = rank_label_issues(crops, probs, labels, settings.method, settings.filter_by)
    uncertain = uncertain_crops(crops, probs, labels, settings.uncertain_top_probability, settings.uncertain_margin)
    return crops, issues, uncertain


def write_review(folder: Path, issues: pd.DataFrame, uncertain: pd.DataFrame, html: str, labels: Sequence[str]) -> None:
    """Write the review files as a set (each atomically, Ctrl-C held back); id lists of labels no longer
    suspicious are removed."""
    id_texts = animl_id_lists(issues)
    filenames = id_filenames(labels)
    ids_dir = folder / IDS_DIRNAME
    with interrupts_deferred():
        for name, frame in ((ISSUES_FILENAME, issues), (UNCERTAIN_FILENAME, uncertain)):
            with atomic_write(folder / name, "w") as handle:
                frame.to_csv(handle, index=False, lineterminator="\n", float_format="%.6g")
        for label, text in id_texts.items():
            atomic_write_text(ids_dir / filenames[label], text)
        current = {filenames[label] for label in id_texts}
        for name in filenames.values():
            if name not in current:
                (ids_dir / name).unlink(missing_ok=True)
        atomic_write_text(folder / PAGE_FILENAME, html)


def review_run(
    run_dir: str | Path,
    settings: ReviewSettings,
    train_frames: Mapping[str, pd.DataFrame] | None = None,
    run: RunPredictions | None = None,
) -> ReviewResult:
    """Review a run's out-of-sample predictions and write ``<run_dir>/review/``.

    Args:
        run_dir: a finished ``train.py`` run folder.
        settings: the ``review`` block.
        train_frames: out-of-sample predictions of the train crops (``{"train": frame}``, from the folds), or None.
        run: the run's predictions when already read.
    """
    run = run or load_run_predictions(run_dir)
    frames = {**run.frames, **(train_frames or {})}
    crops, issues, uncertain = review_tables(frames, run.prepared, run.labels, settings)
    context = {
        "title": f"label review of {run.run_dir.name}",
        "run_dir": str(run.run_dir.resolve()),
        "data_dir": run.record.data_dir,
        "calibrated": run.record.calibrated,
        "temperature": run.record.temperature,
        "reviewed_splits": [s for s in SPLIT_NAMES if s in frames],
    }
    html = review_page(run.prepared.crops_dir, crops, issues, uncertain, settings, context)
    folder = run.run_dir / REVIEW_DIRNAME
    write_review(folder, issues, uncertain, html, run.labels)
    return ReviewResult(folder, len(crops), len(issues), len(uncertain), split_counts(crops, issues, uncertain))
