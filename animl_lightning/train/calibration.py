"""Temperature scaling and expected calibration error.

Temperature scaling (Guo et al. 2017) divides the logits by one scalar ``T`` fitted on held-out data by minimising the
negative log-likelihood. It never changes the arg-max, so accuracy, precision and recall are untouched; only the
confidences move. The fitted value lives in the checkpoint under the top-level key ``"calibration"``
(:data:`~animl_lightning.core.model_file.CALIBRATION_KEY`), which Lightning ignores when it resumes or loads a
module, and which :func:`~animl_lightning.train.checkpointing.read_checkpoint` reads back.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from numpy.typing import ArrayLike, NDArray
from typing_extensions import override

from animl_lightning.core.errors import DataError
from animl_lightning.core.model_file import CALIBRATION_KEY
from animl_lightning.train.checkpointing import update_checkpoint
from animl_lightning.train.classifier import CropClassifier

log = logging.getLogger(__name__)

# Inverse temperatures searched by fit_temperature: T in [0.02, 50] covers every model seen in practice, and the
# bounds keep a degenerate split (all correct, or all wrong) from sending T to 0 or infinity.
MIN_TEMPERATURE = 0.02
MAX_TEMPERATURE = 50.0


def _as_logits_and_labels(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.ndim != 2:
        raise DataError(f"logits must have shape (N, C), got {tuple(logits.shape)}")
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise DataError(f"labels must have shape ({logits.shape[0]},), got {tuple(labels.shape)}")
    if logits.shape[0] == 0:
        raise DataError("cannot fit a temperature on zero samples")
    x = logits.detach().to(torch.float64).cpu()
    y = labels.detach().to(torch.int64).cpu()
    if int(y.min()) < 0 or int(y.max()) >= x.shape[1]:
        raise DataError(f"labels must be in [0, {x.shape[1] - 1}], got values in [{int(y.min())}, {int(y.max())}]")
    if not torch.isfinite(x).all():
        raise DataError("logits contain NaN or infinite values")
    return x, y


def temperature_nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``."""
    x, y = _as_logits_and_labels(logits, labels)
    return float(torch.nn.functional.cross_entropy(x / temperature, y))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, tolerance: float = 1e-6) -> float:
    """Fit the temperature that minimises the negative log-likelihood of ``labels``.

    The NLL is convex in the inverse temperature ``b = 1/T`` (log-sum-exp of ``b * z`` minus a linear term), so a
    golden-section search over ``b`` finds the global minimum without a learning rate, never diverges, and is
    deterministic. The search is bounded to ``T`` in [:data:`MIN_TEMPERATURE`, :data:`MAX_TEMPERATURE`].

    Args:
        logits: uncalibrated logits, shape (N, C).
        labels: true class indices, shape (N,).
        tolerance: width of the final bracket on ``b``.

    Returns:
        The fitted temperature (``> 1`` for an over-confident model).
    """
    x, y = _as_logits_and_labels(logits, labels)

    def nll(inverse_temperature: float) -> float:
        return float(torch.nn.functional.cross_entropy(x * inverse_temperature, y))

    low, high = 1.0 / MAX_TEMPERATURE, 1.0 / MIN_TEMPERATURE
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = low, high
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(c), nll(d)
    while b - a > tolerance:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(d)
    best = (a + b) / 2.0
    return 1.0 / best


def _probabilities_and_labels(probs: ArrayLike, labels: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if p.ndim != 2:
        raise DataError(f"probs must have shape (N, C), got {p.shape}")
    if y.shape != (p.shape[0],):
        raise DataError(f"labels must have shape ({p.shape[0]},), got {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise DataError(f"labels must be in [0, {p.shape[1] - 1}]")
    return p, y


def _binned_gap(confidence: NDArray[np.float64], correct: NDArray[np.float64], n_bins: int) -> float:
    """Sum over equal-width confidence bins of (bin weight) * |accuracy - mean confidence|."""
    if n_bins < 1:
        raise DataError(f"n_bins must be >= 1, got {n_bins}")
    n = confidence.size
    if n == 0:
        return float("nan")
    # Bins are (k/n_bins, (k+1)/n_bins]; a confidence of exactly 0 joins the first bin.
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    conf_sum = np.bincount(bins, weights=confidence, minlength=n_bins)
    correct_sum = np.bincount(bins, weights=correct, minlength=n_bins)
    return float(np.abs(correct_sum - conf_sum).sum() / n)


def expected_calibration_error(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Top-label expected calibration error.

    Each sample's confidence is its highest probability; samples are grouped into ``n_bins`` equal-width bins of
    confidence, and ECE is the sample-weighted mean over bins of |accuracy - mean confidence| (0 = perfectly
    calibrated). NaN for zero samples.
    """
    p, y = _probabilities_and_labels(probs, labels)
    if p.shape[0] == 0:
        return float("nan")
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    return _binned_gap(confidence, correct, n_bins)


def per_label_calibration_error(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> NDArray[np.float64]:
    """Expected calibration error of each label's predictions, shape (C,).

    For label ``c`` this is the ECE of the crops the model *predicts* as ``c``: when the model says "fox" with
    confidence 0.9, is it right 90 % of the time? It matches the per-label precision column (how often the model is
    right when it says "fox"). NaN for a label that is never predicted.
    """
    p, y = _probabilities_and_labels(probs, labels)
    result = np.full(p.shape[1], np.nan, dtype=np.float64)
    if p.shape[0] == 0:
        return result
    predicted = p.argmax(axis=1)
    confidence = p.max(axis=1)
    correct = (predicted == y).astype(np.float64)
    for c in np.unique(predicted):
        mask = predicted == c
        result[c] = _binned_gap(confidence[mask], correct[mask], n_bins)
    return result


def softmax_with_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Class probabilities of calibrated logits (``temperature`` 1.0 leaves them unchanged)."""
    if not temperature > 0:
        raise DataError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(logits.float() / temperature, dim=-1)


def collect_logits(
    model: torch.nn.Module, batches: Iterable[Any], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` in eval mode over ``(images, labels, ...)`` batches; return (logits, labels) on the CPU."""
    logits: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches:
                images, targets = batch[0], batch[1]
                logits.append(model(images.to(device)).float().cpu())
                labels.append(torch.as_tensor(targets).cpu())
    finally:
        model.train(was_training)
    if not logits:
        raise DataError("no batches to calibrate on (is the val split empty?)")
    return torch.cat(logits), torch.cat(labels)


def calibration_record(logits: torch.Tensor, labels: torch.Tensor, split: str = "val") -> dict[str, Any]:
    """Fit a temperature on (logits, labels) and describe it: the dict stored under :data:`CALIBRATION_KEY`."""
    temperature = fit_temperature(logits, labels)
    probs_before = torch.softmax(logits.float(), dim=-1).numpy()
    probs_after = softmax_with_temperature(logits, temperature).numpy()
    y = labels.numpy()
    return {
        "method": "temperature_scaling",
        "temperature": temperature,
        "fitted_on": split,
        "samples": len(y),
        "nll_before": temperature_nll(logits, labels, 1.0),
        "nll_after": temperature_nll(logits, labels, temperature),
        "ece_before": expected_calibration_error(probs_before, y),
        "ece_after": expected_calibration_error(probs_after, y),
    }


def store_calibration(checkpoint_path: str | Path, record: dict[str, Any]) -> None:
    """Add ``record`` to a saved checkpoint under :data:`CALIBRATION_KEY` (atomic rewrite of the file)."""
    update_checkpoint(checkpoint_path, CALIBRATION_KEY, record)


def calibrate_checkpoint(
    checkpoint_path: str | Path, batches: Iterable[Any], device: torch.device | str = "cpu", split: str = "val"
) -> dict[str, Any]:
    """Fit a temperature for a saved checkpoint on ``batches`` of its val split and store it in the checkpoint.

    The model is rebuilt from the checkpoint file (so the temperature belongs to exactly the weights that classify
    and export will load), run in eval mode over ``batches`` (``(images, labels, ...)`` with images already
    preprocessed by the eval transform), and the fit is written back into the file.

    Returns:
        The stored record: temperature, NLL and ECE before and after.
    """
    model = CropClassifier.from_checkpoint(checkpoint_path).inference_network().to(device)
    logits, labels = collect_logits(model, batches, device)
    record = calibration_record(logits, labels, split)
    store_calibration(checkpoint_path, record)
    log.info(
        "temperature %.4f fitted on %d %s crops: ECE %.4f -> %.4f, NLL %.4f -> %.4f (%s)",
        record["temperature"],
        record["samples"],
        split,
        record["ece_before"],
        record["ece_after"],
        record["nll_before"],
        record["nll_after"],
        checkpoint_path,
    )
    return record


class TemperatureCalibration(Callback):
    """At the end of fitting, fit a temperature on the val split for the best checkpoint and store it there.

    Uses ``trainer.checkpoint_callback.best_model_path`` (``last_model_path`` when no metric is monitored) and the
    datamodule's ``val_dataloader()`` (or the val loaders given to ``fit``). Only rank 0 does the work. Runs in
    ``on_fit_end``, after the last checkpoint is written and before ``train.py`` evaluates the best checkpoint.
    """

    def __init__(self, split: str = "val") -> None:
        super().__init__()
        self.split = split
        self.record: dict[str, Any] | None = None

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        checkpoint = trainer.checkpoint_callback
        path = ""
        if checkpoint is not None:
            path = getattr(checkpoint, "best_model_path", "") or getattr(checkpoint, "last_model_path", "")
        if not path or not Path(path).is_file():
            log.warning("calibrate: no saved checkpoint to calibrate; skipped")
            return
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "val_dataloader"):
            batches: Any = datamodule.val_dataloader()
        else:
            batches = trainer.val_dataloaders
        if batches is None:
            raise DataError("calibrate=true needs a val split: the trainer has no val dataloader")
        loaders = batches if isinstance(batches, list | tuple) else [batches]
        device = pl_module.device if pl_module.device.type != "mps" else torch.device("cpu")
        self.record = calibrate_checkpoint(path, itertools.chain.from_iterable(loaders), device, self.split)
