"""Image-, sequence- and location-level tables from crop predictions (pure functions).

Camera traps shoot bursts, and users judge a classifier per event and per camera. From the crop predictions of a
split (``predictions_<split>.csv``) and each crop's image, sequence and location (``classification_ds.csv``):

- **A group's prediction** (an image, or a sequence) is the label with the highest mean probability over its
  crops. With ``eval.smoothing=image|sequence`` the crops' top labels are first smoothed by MegaDetector's rules
  (:mod:`animl_lightning.core.smoothing`; ``image`` within each image, ``sequence`` within each image then across
  each sequence, each crop's top probability as its classification confidence and its ``confidence`` column as its
  detection confidence), and the group's prediction is its most frequent smoothed label (ties: the higher mean
  probability).
- **Multi-species groups count once per species present.** A group whose crops carry *k* true labels is *k*
  units, each with the group's one prediction: at most one of them is right. A sequence of a deer and a fox
  predicted "deer" counts a deer true positive, a fox false negative and a deer false positive (the model gave
  the event one label where it held two species).
- Per-label and overall tables then follow exactly the crop-level definitions (:mod:`animl_lightning.train.scores`)
  over units instead of crops: ``n`` is the number of units, ``loss`` the mean negative log of the group's mean
  probability of the true label, ``top3`` whether the true label is among the three highest mean probabilities.
- ``per_location.csv``: per split and location, the crops, sequences, crop-level top-1 and balanced accuracy, and
  the crop-level recall of every label present there (``recall_<label>``, empty where the label is absent).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from animl_lightning.core.errors import DataError
from animl_lightning.core.smoothing import SMOOTHING_LEVELS, SmoothingOptions, smooth_group
from animl_lightning.train.calibration import expected_calibration_error, per_label_calibration_error
from animl_lightning.train.scores import confusion_of, macro_scores, per_label_table

GROUP_LEVELS = ("image", "sequence")
GROUP_COLUMNS = ("image", "sequence", "location", "confidence")


@dataclass(frozen=True)
class GroupUnits:
    """The units of one level: one per (group, true label present in it)."""

    group: np.ndarray
    target: np.ndarray
    prediction: np.ndarray
    probabilities: np.ndarray


def _check(probs: np.ndarray, target: np.ndarray, keys: np.ndarray) -> None:
    if probs.ndim != 2 or len(probs) != len(target) or len(keys) != len(target):
        raise DataError(f"probabilities {probs.shape}, targets {target.shape} and group keys {keys.shape} differ")


def smoothed_top_labels(
    probs: np.ndarray,
    images: np.ndarray,
    sequences: np.ndarray,
    detection_confidence: np.ndarray,
    level: str,
    other_labels: Sequence[int] = (),
    options: SmoothingOptions | None = None,
) -> np.ndarray:
    """Each crop's top label after MegaDetector smoothing at ``level`` (``none``: the argmax, unchanged)."""
    if level not in SMOOTHING_LEVELS:
        raise DataError(f"eval.smoothing: must be one of {list(SMOOTHING_LEVELS)}, got {level!r}")
    options = options or SmoothingOptions()
    labels = probs.argmax(axis=1).astype(np.int64) if len(probs) else np.zeros(0, dtype=np.int64)
    if level == "none" or not len(labels):
        return labels
    confidence = probs.max(axis=1)
    relevant = np.asarray(detection_confidence, dtype=np.float64) >= options.detection_confidence_threshold
    other = frozenset(int(i) for i in other_labels)
    passes = [images] if level == "image" else [images, sequences]
    for keys in passes:
        codes, _ = pd.factorize(pd.Series(keys, dtype=object))
        for members in pd.Series(np.arange(len(labels))).groupby(codes).indices.values():
            rows = np.asarray(members, dtype=np.int64)[relevant[members]]
            if len(rows) < 2:
                continue
            smoothed = smooth_group(labels[rows].tolist(), confidence[rows].tolist(), other, options)
            labels[rows] = np.asarray(smoothed, dtype=np.int64)
    return labels


def group_units(
    probs: np.ndarray, target: np.ndarray, keys: np.ndarray, top_labels: np.ndarray | None = None
) -> GroupUnits:
    """Group crops by ``keys`` and form one unit per (group, true label) (module docstring).

    Args:
        probs: ``(n, labels)`` crop probabilities.
        target: true label index per crop.
        keys: the group of each crop (image or sequence key).
        top_labels: smoothed top label per crop; None = predict by the highest mean probability.
    """
    probs = np.asarray(probs, dtype=np.float64)
    target = np.asarray(target, dtype=np.int64)
    keys = np.asarray(keys, dtype=object)
    _check(probs, target, keys)
    if not len(target):
        empty = np.zeros(0, dtype=np.int64)
        return GroupUnits(np.zeros(0, dtype=object), empty, empty, np.zeros((0, probs.shape[1])))
    codes, uniques = pd.factorize(pd.Series(keys, dtype=object))
    groups = len(uniques)
    sums = np.zeros((groups, probs.shape[1]))
    np.add.at(sums, codes, probs)
    counts = np.bincount(codes, minlength=groups).astype(np.float64)
    mean = sums / counts[:, None]
    if top_labels is None:
        prediction = mean.argmax(axis=1)
    else:
        votes = np.zeros_like(sums)
        np.add.at(votes, (codes, np.asarray(top_labels, dtype=np.int64)), 1.0)
        # Most votes; among equal votes the higher mean probability (votes dominate: they differ by >= 1).
        prediction = (votes + mean * 0.5).argmax(axis=1)
    pairs = pd.DataFrame({"group": codes, "target": target}).drop_duplicates().sort_values(["group", "target"])
    group_codes = pairs["group"].to_numpy(dtype=np.int64)
    return GroupUnits(
        group=np.asarray(uniques, dtype=object)[group_codes],
        target=pairs["target"].to_numpy(dtype=np.int64),
        prediction=prediction[group_codes].astype(np.int64),
        probabilities=mean[group_codes],
    )


def level_tables(
    units: GroupUnits, labels: Sequence[str], split: str
) -> tuple[np.ndarray, pd.DataFrame, dict[str, float]]:
    """Confusion matrix, per-label rows and overall values of one level's units (crop-level definitions)."""
    n = len(labels)
    confusion = confusion_of(units.target, units.prediction, n)
    table = per_label_table(confusion, labels, split)
    overall: dict[str, float] = {"n": float(len(units.target))}
    if len(units.target):
        p_true = units.probabilities[np.arange(len(units.target)), units.target]
        overall["loss"] = float(-np.log(np.clip(p_true, 1e-12, None)).mean())
        overall["top1"] = float((units.prediction == units.target).mean())
        k = min(3, n)
        top = np.argsort(-units.probabilities, axis=1, kind="stable")[:, :k]
        overall["top3"] = float((top == units.target[:, None]).any(axis=1).mean())
        overall["ece"] = expected_calibration_error(units.probabilities, units.target)
        table["ece"] = per_label_calibration_error(units.probabilities, units.target)
    else:
        overall.update({"loss": float("nan"), "top1": float("nan"), "top3": float("nan"), "ece": float("nan")})
    overall.update(macro_scores(confusion))
    return confusion, table, overall


def per_location_table(
    probs: np.ndarray,
    target: np.ndarray,
    locations: np.ndarray,
    sequences: np.ndarray,
    labels: Sequence[str],
    split: str,
) -> pd.DataFrame:
    """``split, location, crops, sequences, top1, balanced_accuracy, recall_<label>...`` (module docstring)."""
    target = np.asarray(target, dtype=np.int64)
    prediction = np.asarray(probs).argmax(axis=1) if len(target) else np.zeros(0, dtype=np.int64)
    frame = pd.DataFrame(
        {
            "location": pd.Series(locations, dtype=object),
            "sequence": sequences,
            "target": target,
            "hit": prediction == target,
        }
    )
    rows = []
    for location, part in frame.groupby("location", sort=True):
        recall = part.groupby("target")["hit"].mean()
        row: dict[str, object] = {
            "split": split,
            "location": location,
            "crops": len(part),
            "sequences": part["sequence"].nunique(),
            "top1": float(part["hit"].mean()),
            "balanced_accuracy": float(recall.mean()),
        }
        for index, name in enumerate(labels):
            row[f"recall_{name}"] = float(recall[index]) if index in recall.index else np.nan
        rows.append(row)
    columns = ["split", "location", "crops", "sequences", "top1", "balanced_accuracy", *(f"recall_{n}" for n in labels)]
    return pd.DataFrame(rows, columns=columns)
