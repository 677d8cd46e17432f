"""Per-crop sampling weights for the training loader.

The old pipeline (pipeline.md 3.5) balanced labels by weighting every crop so that each label's crops add up to the
same total. The functions here are pure numpy so they can be tested without a loader.
"""

from __future__ import annotations

import numpy as np


def label_balanced_weights(labels: np.ndarray, num_labels: int, confidence: np.ndarray | None = None) -> np.ndarray:
    """Weight each crop so that every present label gets the same total weight.

    With ``confidence``, each crop's weight is first multiplied by its box confidence, so inside a label the
    confident boxes are drawn more often, while the label's total stays equal to every other label's.

    The weights sum to ``n = len(labels)`` (each of the ``k`` present labels gets ``n / k``). The old pipeline used
    ``n = sum(confidence)`` instead; a ``WeightedRandomSampler`` only sees relative weights, so both draw the same.
    A label whose crops all have confidence 0 counts as absent and its crops get weight 0.

    Args:
        labels: integer label index per crop, in ``[0, num_labels)``.
        num_labels: size of the label index (labels missing from ``labels`` are fine).
        confidence: optional non-negative weight per crop (the ``confidence`` column).

    Returns:
        ``float64`` array of the same length as ``labels``.

    Raises:
        ValueError: on out-of-range labels, a length mismatch, negative or non-finite confidences, or when every
            weight would be zero.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {labels.shape}")
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    n = labels.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= num_labels:
        raise ValueError(f"labels must be in [0, {num_labels}), got values in [{labels.min()}, {labels.max()}]")

    if confidence is None:
        base = np.ones(n, dtype=np.float64)
    else:
        base = np.asarray(confidence, dtype=np.float64)
        if base.shape != (n,):
            raise ValueError(f"confidence has shape {base.shape}, expected ({n},) to match labels")
        if not np.isfinite(base).all() or (base < 0).any():
            raise ValueError("confidence must be finite and >= 0 for every crop")

    totals = np.bincount(labels, weights=base, minlength=num_labels)
    present = totals > 0
    if not present.any():
        raise ValueError("every crop has weight 0; nothing to sample")
    per_label_total = n / int(present.sum())
    # Absent labels have total 0; dividing by 1 there keeps their (zero) weights at zero without a warning.
    scale = np.where(present, per_label_total / np.where(present, totals, 1.0), 0.0)
    weights: np.ndarray = base * scale[labels]
    return weights


def confidence_weights(confidence: np.ndarray) -> np.ndarray:
    """Weight each crop by its box confidence alone, rescaled so that the weights sum to the number of crops.

    Raises:
        ValueError: on negative or non-finite confidences, or when all are zero.
    """
    base = np.asarray(confidence, dtype=np.float64)
    if base.ndim != 1:
        raise ValueError(f"confidence must be a 1-D array, got shape {base.shape}")
    if base.size == 0:
        return base
    if not np.isfinite(base).all() or (base < 0).any():
        raise ValueError("confidence must be finite and >= 0 for every crop")
    total = base.sum()
    if total <= 0:
        raise ValueError("every crop has confidence 0; nothing to sample")
    weights: np.ndarray = base * (base.size / total)
    return weights
