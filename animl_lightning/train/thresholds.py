"""Per-label confidence thresholds chosen on val, their val and test figures, and taxonomy rollups (pure functions).

A threshold answers "at which confidence can the model label foxes on its own?". ``classify`` applies it to a
detection whose best label is L: the detection keeps L when its probability is at least L's threshold, and is
``unknown`` (or, with a taxonomy, the lowest taxon that passes) otherwise. So, on val, for label L and a threshold
t, the crops the model *labels L on its own* are those whose best label is L with probability >= t, and:

- ``precision(t)`` = the share of them that are L; ``recall(t)`` = their number that are L over L's crops;
- ``coverage`` of a label = the share of its crops the model labels on its own, with every label's threshold
  applied (a fox predicted as a dog above the dog threshold is covered, wrongly);
- the chosen threshold is the **lowest** t (a candidate is a probability the model gave one of those crops) with
  ``precision(t) >= thresholds.target_precision`` (default 0.95) and at least ``thresholds.min_support`` crops
  (default 10) labelled L at t, so that a precision measured on two crops cannot pass. A label that never reaches
  it gets none, with the reason (no val crops; never predicted; target not reached).

Thresholds are chosen from val only (:func:`choose_thresholds` takes no other split) and reported on val and test,
next to the same figures at 0.5. With a taxonomy the same is done at every rank on rolled-up probabilities (a
taxon's probability is the sum over its labels; a crop's truth is its label's taxon; crops whose label has no
taxon at a rank are left out there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from animl_lightning.core.errors import ConfigError, require, require_known_keys
from animl_lightning.core.taxonomy import RANKS, Taxonomy
from animl_lightning.train.scores import confusion_of, per_label_table

COMPARISON_THRESHOLD = 0.5
THRESHOLD_COLUMNS: tuple[str, ...] = (
    "rank",
    "label",
    "threshold",
    "reason",
    "val_support",
    "val_precision",
    "val_recall",
    "val_coverage",
    "test_support",
    "test_precision",
    "test_recall",
    "test_coverage",
    "val_precision_at_0.5",
    "val_recall_at_0.5",
    "val_coverage_at_0.5",
    "test_precision_at_0.5",
    "test_recall_at_0.5",
    "test_coverage_at_0.5",
)


@dataclass(frozen=True)
class ThresholdSettings:
    """``thresholds.*``: the val precision each label's threshold must reach, and the crops it must rest on.

    ``target_precision`` None turns thresholds off.
    """

    target_precision: float | None = 0.95
    min_support: int = 10

    def __post_init__(self) -> None:
        target = self.target_precision
        require(
            target is None or 0.0 < target <= 1.0,
            "thresholds.target_precision",
            f"must be in (0, 1] or null, got {target}",
        )
        require(self.min_support >= 1, "thresholds.min_support", f"must be >= 1, got {self.min_support}")

    @classmethod
    def from_mapping(cls, values: Any) -> ThresholdSettings:
        """From the ``thresholds`` config block; an unknown key is named."""
        values = dict(values or {})
        require_known_keys(values, cls.__dataclass_fields__, "thresholds")
        if values.get("target_precision") is not None:
            values["target_precision"] = float(values["target_precision"])
        if "min_support" in values:
            values["min_support"] = int(values["min_support"])
        return cls(**values)


@dataclass(frozen=True)
class Choice:
    """One label's threshold (None when it has none) and why."""

    threshold: float | None
    reason: str


def choose_threshold(confidence: np.ndarray, correct: np.ndarray, target: float, min_support: int) -> Choice:
    """The lowest threshold over the crops predicted as one label (``confidence`` = its probability).

    Args:
        confidence: the label's probability on each crop whose best label it is.
        correct: whether each of those crops truly is the label.
        target: the precision to reach.
        min_support: the fewest crops labelled at the threshold.
    """
    if len(confidence) == 0:
        return Choice(None, "never the best label on val")
    order = np.argsort(-confidence, kind="stable")
    values = confidence[order]
    hits = np.cumsum(correct[order])
    # At a candidate value v every crop with confidence >= v counts: the last index of each run of equal values.
    last = np.r_[np.flatnonzero(values[1:] != values[:-1]), len(values) - 1]
    counts = last + 1
    precision = hits[last] / counts
    ok = (precision >= target - 1e-12) & (counts >= min_support)
    if not ok.any():
        if counts[-1] < min_support:
            return Choice(None, f"fewer than {min_support} val crops predicted")
        return Choice(None, f"val precision never reaches {target:g} with >= {min_support} crops")
    lowest = int(np.flatnonzero(ok)[-1])  # values are descending: the last ok candidate is the lowest threshold
    return Choice(float(values[last[lowest]]), "")


def choose_thresholds(
    probs: np.ndarray, target: np.ndarray, names: Sequence[str], settings: ThresholdSettings
) -> dict[str, Choice]:
    """Every label's threshold, from val probabilities and labels only (module docstring)."""
    if settings.target_precision is None:
        raise ConfigError("thresholds.target_precision: is null, so thresholds are off")
    probs = np.asarray(probs, dtype=np.float64)
    target = np.asarray(target, dtype=np.int64)
    predicted = probs.argmax(axis=1) if len(target) else np.zeros(0, dtype=np.int64)
    confidence = probs.max(axis=1) if len(target) else np.zeros(0)
    out = {}
    for j, name in enumerate(names):
        if not (target == j).any():
            out[name] = Choice(None, "no val crops")
            continue
        mask = predicted == j
        out[name] = choose_threshold(
            confidence[mask], target[mask] == j, settings.target_precision, settings.min_support
        )
    return out


def threshold_figures(probs: np.ndarray, target: np.ndarray, thresholds: np.ndarray) -> pd.DataFrame:
    """Per label: ``support, precision, recall, coverage`` with ``thresholds`` applied (NaN = the label has none)."""
    probs = np.asarray(probs, dtype=np.float64)
    target = np.asarray(target, dtype=np.int64)
    n = len(thresholds)
    rows = []
    if len(target):
        predicted = probs.argmax(axis=1)
        confidence = probs.max(axis=1)
        limit = thresholds[predicted]
        auto = np.where(np.isnan(limit), False, confidence >= np.nan_to_num(limit, nan=np.inf))
    for j in range(n):
        if not len(target):
            rows.append((0, np.nan, np.nan, np.nan))
            continue
        truth = target == j
        labelled = auto & (predicted == j)
        support = int(truth.sum())
        precision = (labelled & truth).sum() / labelled.sum() if labelled.any() else np.nan
        recall = (labelled & truth).sum() / support if support else np.nan
        coverage = (auto & truth).sum() / support if support else np.nan
        rows.append((support, float(precision), float(recall), float(coverage)))
    return pd.DataFrame(rows, columns=["support", "precision", "recall", "coverage"])


def threshold_table(
    rank: str,
    names: Sequence[str],
    choices: Mapping[str, Choice],
    splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
) -> pd.DataFrame:
    """``thresholds.csv`` rows of one rank (``label`` for the model's labels): the choice and its figures."""
    chosen = np.array([np.nan if choices[n].threshold is None else choices[n].threshold for n in names])
    at_half = np.full(len(names), COMPARISON_THRESHOLD)
    frame = pd.DataFrame(
        {
            "rank": rank,
            "label": list(names),
            "threshold": chosen,
            "reason": [choices[n].reason for n in names],
        }
    )
    for split in ("val", "test"):
        if split not in splits:
            continue
        probs, target = splits[split]
        figures = threshold_figures(probs, target, chosen)
        half = threshold_figures(probs, target, at_half)
        frame[f"{split}_support"] = figures["support"].to_numpy()
        for column in ("precision", "recall", "coverage"):
            frame[f"{split}_{column}"] = figures[column].to_numpy()
            frame[f"{split}_{column}_at_0.5"] = half[column].to_numpy()
    return frame.reindex(columns=list(THRESHOLD_COLUMNS))


def rolled_up(
    probs: np.ndarray, target: np.ndarray, taxonomy: Taxonomy, rank: str
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(taxa, probabilities, truth)`` at ``rank``: summed probabilities, crops without a taxon there dropped."""
    taxa, matrix = taxonomy.rollup_matrix(rank)
    truth = taxonomy.label_taxon(rank)[np.asarray(target, dtype=np.int64)] if len(target) else np.zeros(0, int)
    keep = truth >= 0
    return taxa, (np.asarray(probs, dtype=np.float64) @ matrix)[keep], truth[keep]


def rank_per_label_table(
    probs: np.ndarray, target: np.ndarray, taxonomy: Taxonomy, rank: str, split: str
) -> pd.DataFrame:
    """``per_label_<rank>.csv`` rows of one split: the crop-level table over rolled-up truths and predictions.

    A crop's predicted taxon is the one with the highest summed probability.
    """
    taxa, rolled, truth = rolled_up(probs, target, taxonomy, rank)
    predicted = rolled.argmax(axis=1) if len(truth) else np.zeros(0, dtype=np.int64)
    return per_label_table(confusion_of(truth, predicted, len(taxa)), taxa, split)


@dataclass(frozen=True)
class ThresholdResult:
    """Everything chosen for a run: the checkpoint record and the ``thresholds.csv`` rows."""

    record: dict[str, Any]
    table: pd.DataFrame


def choose_for_run(
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray] | None,
    names: Sequence[str],
    settings: ThresholdSettings,
    taxonomy: Taxonomy | None = None,
) -> ThresholdResult:
    """Labels' and (with a taxonomy) taxa's thresholds from ``val``; figures on ``val`` and ``test``."""
    choices = choose_thresholds(*val, names, settings)
    splits = {"val": val} | ({"test": test} if test is not None else {})
    tables = [threshold_table("label", names, choices, splits)]
    per_taxon: dict[str, dict[str, float | None]] = {}
    if taxonomy is not None:
        for rank in RANKS:
            taxa, val_probs, val_truth = rolled_up(*val, taxonomy, rank)
            if not taxa:
                continue
            rank_choices = choose_thresholds(val_probs, val_truth, taxa, settings)
            rank_splits = {"val": (val_probs, val_truth)}
            if test is not None:
                _, test_probs, test_truth = rolled_up(*test, taxonomy, rank)
                rank_splits["test"] = (test_probs, test_truth)
            tables.append(threshold_table(rank, taxa, rank_choices, rank_splits))
            per_taxon[rank] = {t: _rounded(c.threshold) for t, c in rank_choices.items()}
    record = {
        "target_precision": settings.target_precision,
        "min_support": settings.min_support,
        "per_label": {name: _rounded(c.threshold) for name, c in choices.items()},
        "per_taxon": per_taxon,
    }
    return ThresholdResult(record=record, table=pd.concat(tables, ignore_index=True))


def _rounded(value: float | None) -> float | None:
    # Stored rounded down to 6 digits so that a crop at exactly the threshold still passes after the round trip.
    return None if value is None else float(np.floor(value * 1e6) / 1e6)
