"""Per-label and overall metric tables computed from a confusion matrix (pure functions).

Definitions, one-vs-rest per label, with ``C[i, j]`` = number of crops of true label ``i`` predicted as ``j``:

- ``support`` = crops whose true label is this one (row sum); ``tp`` = diagonal; ``fp`` = column sum - tp;
  ``fn`` = row sum - tp.
- ``precision`` = tp / (tp + fp): when the model says "fox", how often it is a fox. **NaN** when the label was never
  predicted in that split (nothing to be right about).
- ``recall`` = tp / support: how many of the foxes the model finds. **NaN** when the split has no crop of the label.
- ``type_I_error`` = 1 - precision and ``type_II_error`` = 1 - recall, as the seed notebook defines them (so they
  are NaN exactly when precision / recall are).

Macro scores (the logged ``balanced_accuracy``, ``precision_macro``, ``recall_macro``) follow scikit-learn:
``balanced_accuracy`` is the mean recall over labels present in the split (``balanced_accuracy_score``), and the
macro precision/recall average over labels that are present or predicted, counting 0/0 as 0
(``precision_recall_fscore_support(average="macro", zero_division=0)``), which is also what torchmetrics computes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from animl_lightning.core.errors import DataError

PER_LABEL_COLUMNS: tuple[str, ...] = (
    "split",
    "label",
    "precision",
    "recall",
    "type_I_error",
    "type_II_error",
    "support",
    "tp",
    "fp",
    "fn",
    "ece",
)
OVERALL_COLUMNS: tuple[str, ...] = (
    "split",
    "n",
    "loss",
    "top1",
    "top3",
    "balanced_accuracy",
    "precision_macro",
    "recall_macro",
    "ece",
)


def _check_confusion(confusion: np.ndarray, labels: Sequence[str] | None = None) -> np.ndarray:
    matrix = np.asarray(confusion)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise DataError(f"confusion matrix must be square, got shape {matrix.shape}")
    if labels is not None and len(labels) != matrix.shape[0]:
        raise DataError(f"confusion matrix is {matrix.shape[0]}x{matrix.shape[1]} but {len(labels)} labels given")
    if (matrix < 0).any():
        raise DataError("confusion matrix has negative counts")
    return matrix.astype(np.int64)


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.full(numerator.shape, np.nan, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def confusion_of(truth: np.ndarray, predicted: np.ndarray, n: int) -> np.ndarray:
    """``C[i, j]`` = items of true label ``i`` predicted as ``j``, from label indices (``n`` labels)."""
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (np.asarray(truth, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    return confusion


def per_label_table(confusion: np.ndarray, labels: Sequence[str], split: str) -> pd.DataFrame:
    """One row per label with precision, recall, Type I/II error and the counts (see module docstring).

    Every label gets a row, also when the split has no crop of it (``support`` 0, recall NaN).
    """
    matrix = _check_confusion(confusion, labels)
    tp = np.diag(matrix)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    precision = _safe_ratio(tp, predicted)
    recall = _safe_ratio(tp, support)
    return pd.DataFrame(
        {
            "split": pd.Series([split] * len(labels), dtype=object),
            "label": pd.Series(list(labels), dtype=object),
            "precision": precision,
            "recall": recall,
            "type_I_error": 1.0 - precision,
            "type_II_error": 1.0 - recall,
            "support": support,
            "tp": tp,
            "fp": predicted - tp,
            "fn": support - tp,
            # Calibration needs the probabilities, not the counts: MetricTables fills it in.
            "ece": np.full(len(labels), np.nan),
        },
        columns=list(PER_LABEL_COLUMNS),
    )


def macro_scores(confusion: np.ndarray) -> dict[str, float]:
    """``balanced_accuracy``, ``precision_macro`` and ``recall_macro`` (NaN for an empty matrix)."""
    matrix = _check_confusion(confusion)
    tp = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    if support.sum() == 0:
        nan = float("nan")
        return {"balanced_accuracy": nan, "precision_macro": nan, "recall_macro": nan}
    recall = _safe_ratio(tp, support)
    precision = _safe_ratio(tp, predicted)
    present = support > 0
    seen = present | (predicted > 0)
    return {
        "balanced_accuracy": float(recall[present].mean()),
        "precision_macro": float(np.nan_to_num(precision[seen], nan=0.0).mean()),
        "recall_macro": float(np.nan_to_num(recall[seen], nan=0.0).mean()),
    }


def overall_table(rows: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    """One row per split (in the given order) with :data:`OVERALL_COLUMNS`; missing values are NaN."""
    records = [
        {"split": split, **{c: float(values.get(c, np.nan)) for c in OVERALL_COLUMNS if c != "split"}}
        for split, values in rows.items()
    ]
    frame = pd.DataFrame(records, columns=list(OVERALL_COLUMNS))
    frame["n"] = frame["n"].astype("Int64")
    return frame


def confusion_frame(confusion: np.ndarray, labels: Sequence[str]) -> pd.DataFrame:
    """The confusion matrix as a DataFrame: index = true label, columns = predicted label."""
    matrix = _check_confusion(confusion, labels)
    return pd.DataFrame(
        matrix,
        index=pd.Index(list(labels), name="true"),
        columns=pd.Index(list(labels), name="predicted"),
    )


def confusion_png(confusion: np.ndarray, labels: Sequence[str], title: str) -> bytes:
    """Render a row-normalised confusion matrix (recall on the diagonal) with counts, as PNG bytes.

    Uses matplotlib's Agg backend through an explicit ``Figure`` so no display or global pyplot state is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    matrix = _check_confusion(confusion, labels)
    support = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, support, out=np.zeros(matrix.shape), where=support > 0)
    n = len(labels)
    side = min(4.0 + 0.45 * n, 40.0)
    figure = Figure(figsize=(side + 1.5, side))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(normalised, vmin=0.0, vmax=1.0, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of true label")
    axes.set_xticks(range(n), labels=list(labels), rotation=90)
    axes.set_yticks(range(n), labels=list(labels))
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    colour = "white" if normalised[i, j] > 0.5 else "black"
                    axes.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7, color=colour)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
