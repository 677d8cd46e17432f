"""The figures of ``report.html``: training curves and the reliability diagram, as embedded PNGs (matplotlib)."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# A reliability point averages at least this many crops (fewer make a zig-zag of noise), with between
# RELIABILITY_MIN_BINS and RELIABILITY_MAX_BINS points per split.
RELIABILITY_CROPS_PER_BIN = 30
RELIABILITY_MIN_BINS = 3
RELIABILITY_MAX_BINS = 15


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def file_png(path: Path) -> str | None:
    return base64.b64encode(path.read_bytes()).decode("ascii") if path.is_file() else None


def training_curves(history: pd.DataFrame) -> str | None:
    """Loss, balanced accuracy and learning rate per epoch, as one embedded PNG (None without a history)."""
    if history.empty or "epoch" not in history.columns:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 3.4))
    FigureCanvasAgg(figure)
    panels = (
        ("loss", ["train/loss", "val/loss"]),
        ("balanced accuracy", ["train/balanced_accuracy", "val/balanced_accuracy"]),
        ("learning rate", ["lr", "lr_backbone"]),
    )
    for k, (title, columns) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, 3, k)
        for column in columns:
            if column in history.columns and history[column].notna().any():
                axes.plot(history["epoch"], history[column], marker="o", markersize=3, label=column)
        axes.set_title(title)
        axes.set_xlabel("epoch")
        if len(columns) > 1:
            axes.legend(fontsize=8)
    figure.tight_layout()
    return _png(figure)


def reliability_bins(crops: int) -> int:
    """Points of a reliability curve over ``crops`` crops: about :data:`RELIABILITY_CROPS_PER_BIN` crops each,
    between :data:`RELIABILITY_MIN_BINS` and :data:`RELIABILITY_MAX_BINS`."""
    return int(min(RELIABILITY_MAX_BINS, max(RELIABILITY_MIN_BINS, crops // RELIABILITY_CROPS_PER_BIN)))


def reliability_points(confidence: np.ndarray, correct: np.ndarray) -> pd.DataFrame:
    """``confidence, accuracy, crops`` per bin of equally many crops (by rising confidence), :func:`reliability_bins`
    bins: equal-count bins keep every point on the same number of crops, where equal-width bins leave a few crops
    alone at low confidence and draw noise."""
    order = np.argsort(confidence, kind="stable")
    rows = [
        (float(confidence[part].mean()), float(correct[part].mean()), len(part))
        for part in np.array_split(order, min(reliability_bins(len(order)), len(order)))
        if len(part)
    ]
    return pd.DataFrame(rows, columns=["confidence", "accuracy", "crops"])


def reliability_diagram(predictions: dict[str, pd.DataFrame], labels: list[str]) -> tuple[str | None, list[str]]:
    """Accuracy against confidence per split (the diagonal is perfect calibration), as an embedded PNG, and one line
    per split saying how many crops each point rests on."""
    if not predictions:
        return None, []
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect")
    notes = []
    for split, frame in predictions.items():
        if frame.empty:
            continue
        confidence = frame[labels].to_numpy(dtype=float).max(axis=1)
        correct = (frame["prediction"] == frame["label"]).to_numpy(dtype=float)
        points = reliability_points(confidence, correct)
        axes.plot(points["confidence"], points["accuracy"], marker="o", label=split)
        few = len(frame) < RELIABILITY_MIN_BINS * RELIABILITY_CROPS_PER_BIN
        notes.append(
            f"{split}: {len(frame)} crops in {len(points)} bins of about {len(frame) // max(len(points), 1)} crops"
            + (" (too few crops for a close reading: each point is uncertain)" if few else "")
        )
    axes.set_xlabel("confidence (top probability)")
    axes.set_ylabel("accuracy")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.legend()
    axes.set_title("reliability")
    figure.tight_layout()
    return _png(figure), notes
