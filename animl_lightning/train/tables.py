"""The callback that turns the classifier's per-split metric state into tables, plots and prediction files.

The module counts (confusion matrices and scalar metrics live in
:class:`~animl_lightning.train.classifier.CropClassifier`); this callback only reads and formats. It collects every
test-loop run: ``train.py`` evaluates the best checkpoint with the test loop once per split (train crops in eval mode,
val, test), then calls :meth:`MetricTables.write`, which writes the whole set under ``dirpath`` at once (Ctrl-C held
back while it writes), so the folder never holds the tables of some splits only:

- ``per_label.csv``: ``split, label, precision, recall, type_I_error, type_II_error, support, tp, fp, fn, ece``
  (definitions in :mod:`animl_lightning.train.scores`), one row per evaluated split and label;
- ``per_label_image.csv`` and ``per_label_sequence.csv``: the same columns, one unit per image or sequence and true
  label (:mod:`animl_lightning.train.levels`; ``eval.smoothing`` applies there);
- ``per_location.csv``: per split and location, crops, sequences, top-1, balanced accuracy and recall per label;
- ``overall.csv``: per split and ``level`` (crop, image, sequence) ``n, loss, top1, top3, balanced_accuracy,
  precision_macro, recall_macro, ece``;
- ``confusion_<split>.csv`` / ``confusion_<split>.png``;
- ``predictions_<split>.csv``: ``path, label, prediction`` then one probability column per label name.

With a ``WandbLogger`` the same tables go to wandb as Tables, plus a wandb confusion matrix per split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from torchmetrics.utilities.distributed import gather_all_tensors
from typing_extensions import override

from animl_lightning.core.contract import SPLIT_NAMES
from animl_lightning.core.errors import require
from animl_lightning.core.files import atomic_write, atomic_write_bytes, interrupts_deferred
from animl_lightning.core.smoothing import SMOOTHING_LEVELS, SmoothingOptions
from animl_lightning.train.calibration import expected_calibration_error, per_label_calibration_error
from animl_lightning.train.classifier import CropClassifier
from animl_lightning.train.levels import (
    GROUP_LEVELS,
    group_units,
    level_tables,
    per_location_table,
    smoothed_top_labels,
)
from animl_lightning.train.scores import (
    PER_LABEL_COLUMNS,
    confusion_frame,
    confusion_png,
    macro_scores,
    overall_table,
    per_label_table,
)

log = logging.getLogger(__name__)

SCALAR_METRICS: tuple[str, ...] = ("loss", "top1", "top3")


@dataclass(frozen=True)
class SplitEvaluation:
    """What one test-loop run over a split produced (every rank holds the gathered values).

    Attributes:
        split: the split's name.
        labels: label names in index order.
        confusion: ``C[i, j]`` = crops of true label ``i`` predicted as ``j``.
        overall: the split's overall row (``n``, ``loss``, ``top1``, ...).
        per_label: the split's per-label rows.
        predictions: ``path, label, prediction`` and one probability column per label, sorted by path.
        levels: per group level (image, sequence): its overall values and per-label rows.
        per_location: the split's rows of ``per_location.csv`` (empty without the dataset's group columns).
    """

    split: str
    labels: list[str]
    confusion: np.ndarray
    overall: dict[str, float]
    per_label: pd.DataFrame
    predictions: pd.DataFrame
    levels: dict[str, tuple[dict[str, float], pd.DataFrame]] = field(default_factory=dict)
    per_location: pd.DataFrame = field(default_factory=pd.DataFrame)


class MetricTables(Callback):
    """Collect per-label/overall tables, confusion matrices and predictions of each test-loop run; write them as a set.

    Args:
        dirpath: output folder (``${paths.output_dir}/metrics`` in the configs).
        predictions: write ``predictions_<split>.csv``.
        confusion_plot: write ``confusion_<split>.png``.
        log_to_wandb: also log tables and confusion matrices to a ``WandbLogger`` when one is attached.
        smoothing: ``eval.smoothing``: ``none`` (an image's or sequence's prediction is its highest mean
            probability) or ``image`` / ``sequence`` (MegaDetector's smoothing of the crop labels first).

    Raises:
        TypeError: in ``setup`` when the LightningModule is not a
            :class:`~animl_lightning.train.classifier.CropClassifier` (it owns the metric state this callback reads).
    """

    def __init__(
        self,
        dirpath: str,
        predictions: bool = True,
        confusion_plot: bool = True,
        log_to_wandb: bool = True,
        smoothing: str = "none",
    ) -> None:
        super().__init__()
        require(bool(dirpath), "callbacks.metric_tables.dirpath", "must be set")
        require(
            smoothing in SMOOTHING_LEVELS,
            "eval.smoothing",
            f"must be one of {list(SMOOTHING_LEVELS)}, got {smoothing!r}",
        )
        self._smoothing = smoothing
        self._dirpath = Path(dirpath)
        self._predictions = predictions
        self._confusion_plot = confusion_plot
        self._log_to_wandb = log_to_wandb
        self._evaluations: dict[str, SplitEvaluation] = {}
        self._extra: dict[str, pd.DataFrame] = {}
        self._batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @property
    def dirpath(self) -> Path:
        """Folder the tables are written to."""
        return self._dirpath

    @property
    def writes_predictions(self) -> bool:
        """Whether :meth:`write` writes ``predictions_<split>.csv``."""
        return self._predictions

    @property
    def evaluations(self) -> dict[str, SplitEvaluation]:
        """The collected evaluations by split, in train/val/test order."""
        return {s: self._evaluations[s] for s in SPLIT_NAMES if s in self._evaluations}

    @property
    def per_label(self) -> pd.DataFrame:
        """Per-label rows of every split collected so far, in train/val/test order."""
        frames = [e.per_label for e in self.evaluations.values()]
        if not frames:
            return pd.DataFrame(columns=list(PER_LABEL_COLUMNS))
        return pd.concat(frames, ignore_index=True)

    @property
    def overall(self) -> pd.DataFrame:
        """Overall rows of every split and level collected so far: train/val/test, then crop/image/sequence."""
        frames = []
        for split, evaluation in self.evaluations.items():
            rows = {"crop": evaluation.overall} | {level: values for level, (values, _) in evaluation.levels.items()}
            for level, values in rows.items():
                frame = overall_table({split: values})
                frame.insert(1, "level", level)
                frames.append(frame)
        if not frames:
            empty = overall_table({})
            empty.insert(1, "level", pd.Series(dtype=object))
            return empty
        return pd.concat(frames, ignore_index=True)

    def level_per_label(self, level: str) -> pd.DataFrame:
        """Per-label rows of ``level`` (image or sequence) of every split collected so far."""
        frames = [e.levels[level][1] for e in self.evaluations.values() if level in e.levels]
        if not frames:
            return pd.DataFrame(columns=list(PER_LABEL_COLUMNS))
        return pd.concat(frames, ignore_index=True)

    @property
    def per_location(self) -> pd.DataFrame:
        """``per_location.csv`` rows of every split collected so far."""
        frames = [e.per_location for e in self.evaluations.values() if len(e.per_location)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not isinstance(pl_module, CropClassifier):
            raise TypeError(f"MetricTables reports a CropClassifier's metrics, got {type(pl_module).__name__}")

    def add_table(self, name: str, frame: pd.DataFrame) -> None:
        """Write ``frame`` as ``name`` with the set (thresholds, taxonomy ranks: tables made from the evaluations)."""
        self._extra[name] = frame

    @property
    def extra_tables(self) -> dict[str, pd.DataFrame]:
        """The tables added with :meth:`add_table`."""
        return dict(self._extra)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Tables describe one model: a new fit starts a new report.
        self._evaluations.clear()
        self._extra.clear()

    @override
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._batches = []

    @override
    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batches.append(
            (outputs["probs"].detach().cpu(), outputs["target"].detach().cpu(), outputs["index"].detach().cpu())
        )

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert isinstance(pl_module, CropClassifier)
        split = pl_module.test_split
        labels = list(pl_module.class_names)
        # Collective calls: every rank takes part, in the same order.
        confusion = pl_module.confusion_matrix(split)
        probs, target, index = self._gather_predictions(pl_module, len(labels))
        self._batches = []

        metrics = trainer.callback_metrics
        overall: dict[str, float] = {"n": float(confusion.sum())}
        for name in SCALAR_METRICS:
            value = metrics.get(f"{split}/{name}")
            overall[name] = float(value) if value is not None else float("nan")
        overall.update(macro_scores(confusion))
        table = per_label_table(confusion, labels, split)
        if len(target):
            overall["ece"] = expected_calibration_error(probs, target)
            table["ece"] = per_label_calibration_error(probs, target)
        paths = self._paths(trainer, index)
        predictions = prediction_frame(paths, target, probs, labels)
        levels, per_location = self._levels(trainer, split, paths, probs, target, labels)
        self._evaluations[split] = SplitEvaluation(
            split, labels, confusion, overall, table, predictions, levels, per_location
        )

    def _levels(
        self,
        trainer: Trainer,
        split: str,
        paths: np.ndarray,
        probs: np.ndarray,
        target: np.ndarray,
        labels: list[str],
    ) -> tuple[dict[str, tuple[dict[str, float], pd.DataFrame]], pd.DataFrame]:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "crop_groups"):
            return {}, pd.DataFrame()
        groups = datamodule.crop_groups(split).drop_duplicates("path").set_index("path")
        rows = groups.reindex(pd.Index(paths, dtype=object))
        if rows["image"].isna().any():
            log.warning("%s: some evaluated crops are not in the dataset's table; no image/sequence tables", split)
            return {}, pd.DataFrame()
        images, sequences = rows["image"].to_numpy(dtype=object), rows["sequence"].to_numpy(dtype=object)
        top_labels = None
        if self._smoothing != "none":
            options = SmoothingOptions()
            other = [i for i, name in enumerate(labels) if name in options.other_category_names]
            top_labels = smoothed_top_labels(
                probs, images, sequences, rows["confidence"].to_numpy(dtype=float), self._smoothing, other, options
            )
        levels = {}
        for level, keys in (("image", images), ("sequence", sequences)):
            units = group_units(probs, target, keys, top_labels)
            _, table, values = level_tables(units, labels, split)
            levels[level] = (values, table)
        per_location = per_location_table(
            probs, target, rows["location"].to_numpy(dtype=object), sequences, labels, split
        )
        return levels, per_location

    def write(self, trainer: Trainer) -> None:
        """Write every collected table (global rank 0 only), then log them to wandb when asked to.

        Ctrl-C is held back until the set is complete, and every file is written atomically.
        """
        if not trainer.is_global_zero or not self._evaluations:
            return
        with interrupts_deferred():
            self._write_csv(self.per_label, "per_label.csv")
            self._write_csv(self.overall, "overall.csv")
            for level in GROUP_LEVELS:
                if any(level in e.levels for e in self._evaluations.values()):
                    self._write_csv(self.level_per_label(level), f"per_label_{level}.csv")
            if len(self.per_location):
                self._write_csv(self.per_location, "per_location.csv")
            for name, frame in self._extra.items():
                self._write_csv(frame, name)
            for split, evaluation in self.evaluations.items():
                confusion, labels = evaluation.confusion, evaluation.labels
                self._write_csv(confusion_frame(confusion, labels), f"confusion_{split}.csv", index=True)
                if self._confusion_plot:
                    title = f"{split}: rows = true label, colour = fraction of row"
                    png = confusion_png(confusion, labels, title)
                    atomic_write_bytes(self._dirpath / f"confusion_{split}.png", png)
                if self._predictions:
                    self._write_csv(evaluation.predictions, f"predictions_{split}.csv", float_format="%.6g")
        log.info("wrote the tables of %s to %s", ", ".join(self.evaluations), self._dirpath)
        if self._log_to_wandb:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    for evaluation in self.evaluations.values():
                        self._log_wandb(logger, evaluation)

    def _gather_predictions(
        self, pl_module: LightningModule, num_labels: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._batches:
            probs = torch.cat([b[0] for b in self._batches])
            target = torch.cat([b[1] for b in self._batches])
            index = torch.cat([b[2] for b in self._batches])
        else:
            probs = torch.zeros((0, num_labels))
            target = torch.zeros(0, dtype=torch.long)
            index = torch.zeros(0, dtype=torch.long)
        if pl_module.trainer.world_size > 1:
            # Evaluation shards are unpadded (animl_lightning.train.sampling), so ranks may hold different row counts:
            # gather_all_tensors pads, gathers and trims. Repeats (e.g. from a padding sampler) are removed below.
            device = pl_module.device
            probs, target, index = (
                torch.cat([part.cpu() for part in gather_all_tensors(t.to(device))]) for t in (probs, target, index)
            )
        index_np = index.numpy().astype(np.int64)
        _, first = np.unique(index_np, return_index=True)
        return probs.numpy()[first], target.numpy().astype(np.int64)[first], index_np[first]

    def _paths(self, trainer: Trainer, index: np.ndarray) -> np.ndarray:
        loaders = trainer.test_dataloaders
        loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
        dataset = getattr(loader, "dataset", None)
        if dataset is not None and hasattr(dataset, "paths"):
            paths: np.ndarray = dataset.paths(index)
            return paths
        return index.astype(str).astype(object)

    def _write_csv(self, frame: pd.DataFrame, name: str, index: bool = False, float_format: str | None = None) -> None:
        with atomic_write(self._dirpath / name, "w") as handle:
            frame.to_csv(handle, index=index, lineterminator="\n", float_format=float_format)

    def _log_wandb(self, logger: WandbLogger, evaluation: SplitEvaluation) -> None:
        import wandb

        split, labels = evaluation.split, evaluation.labels
        logger.log_table(key=f"{split}/per_label", dataframe=evaluation.per_label)
        for level, (_, table) in evaluation.levels.items():
            logger.log_table(key=f"{split}/per_label_{level}", dataframe=table)
        if len(evaluation.per_location):
            logger.log_table(key=f"{split}/per_location", dataframe=evaluation.per_location)
        logger.log_table(key="overall", dataframe=self.overall.astype({"n": "float64"}))
        predictions = evaluation.predictions
        if len(predictions):
            index = {name: i for i, name in enumerate(labels)}
            plot = wandb.plot.confusion_matrix(
                y_true=[index[name] for name in predictions["label"]],
                preds=[index[name] for name in predictions["prediction"]],
                class_names=labels,
                title=f"{split} confusion matrix",
            )
            logger.experiment.log({f"{split}/confusion_matrix": plot})


def prediction_frame(paths: np.ndarray, target: np.ndarray, probs: np.ndarray, labels: list[str]) -> pd.DataFrame:
    """``path, label, prediction`` (label names) then one probability column per label, sorted by path."""
    names = np.asarray(labels, dtype=object)
    columns: dict[str, Any] = {
        "path": paths,
        "label": names[target] if len(target) else np.array([], dtype=object),
        "prediction": names[probs.argmax(axis=1)] if len(target) else np.array([], dtype=object),
    }
    frame = pd.DataFrame(columns)
    probabilities = pd.DataFrame(probs, columns=pd.Index(labels))
    return pd.concat([frame, probabilities], axis=1).sort_values("path", kind="stable").reset_index(drop=True)
