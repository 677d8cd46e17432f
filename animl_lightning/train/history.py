"""``<run>/history.csv``: one row per epoch of the epoch-level metrics and the learning rate, whatever the logger.

The report's training curves come from this file, so they exist with ``logger=wandb``, ``tensorboard`` or ``none``
as well as with the CSV logger. A row is complete only once the epoch's train metrics are logged, which happens
after its validation; so the row of epoch ``e`` is taken when epoch ``e + 1`` starts, and the last one when the fit
ends. The rows travel in the checkpoint (the callback's state), so a resumed run continues the same history; the
checkpoint of epoch ``e`` is saved before epoch ``e + 1`` starts, so its state also holds the row of epoch ``e``
(a resumed run starts with no logged metrics and could not take that row any more).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from animl_lightning.core.errors import require
from animl_lightning.core.files import atomic_write

HISTORY_FILENAME = "history.csv"


class EpochHistory(Callback):
    """Write ``<dirpath>/history.csv`` (``epoch``, ``lr``, then every ``train/*`` and ``val/*`` epoch metric).

    ``lr`` is the rate of the classifier head, which learns at ``optimizer.lr``; with ``model.backbone_lr_scale``
    the backbone's own rate is ``lr_backbone``.

    Args:
        dirpath: the run folder (not ``metrics/``, which holds the evaluation tables as a set or nothing).
    """

    def __init__(self, dirpath: str) -> None:
        super().__init__()
        require(bool(dirpath), "callbacks.epoch_history.dirpath", "must be set")
        self._path = Path(dirpath) / HISTORY_FILENAME
        self._rows: list[dict[str, float]] = []
        self._lr: dict[str, float] = {"lr": math.nan}
        self._trainer: Trainer | None = None

    @property
    def rows(self) -> list[dict[str, float]]:
        """The recorded epochs."""
        return list(self._rows)

    def _row(self, trainer: Trainer, epoch: int) -> dict[str, float] | None:
        """The row of ``epoch`` from the metrics logged so far; None during the sanity check, without metrics, or
        when the epoch already has its row."""
        if trainer.sanity_checking or any(row["epoch"] == epoch for row in self._rows):
            return None
        values = {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if name.startswith(("train/", "val/")) and "batch" not in name and getattr(value, "numel", lambda: 1)() == 1
        }
        return {"epoch": float(epoch), **self._lr, **values} if values else None

    def _record(self, trainer: Trainer, epoch: int) -> None:
        row = self._row(trainer, epoch)
        if row is None:
            return
        self._rows.append(row)
        if trainer.is_global_zero:
            frame = pd.DataFrame(self._rows)
            with atomic_write(self._path, "w") as handle:
                frame.to_csv(handle, index=False, lineterminator="\n", float_format="%.6g")

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # state_dict() takes no trainer, and a checkpoint needs the row of the epoch it is saved at.
        self._trainer = trainer

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch > 0:
            self._record(trainer, trainer.current_epoch - 1)
        groups = trainer.optimizers[0].param_groups if trainer.optimizers else []
        # The classifier builds its parameter groups backbone first, head last (CropClassifier.configure_optimizers).
        self._lr = {"lr": float(groups[-1]["lr"]) if groups else math.nan}
        if len(groups) > 1:
            self._lr["lr_backbone"] = float(groups[0]["lr"])

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._record(trainer, trainer.current_epoch - 1 if trainer.current_epoch > 0 else 0)

    @override
    def state_dict(self) -> dict[str, Any]:
        rows = [dict(row) for row in self._rows]
        trainer = self._trainer
        # Checkpoints are saved at the end of an epoch, after its metrics are logged and before its row is taken.
        if trainer is not None and trainer.training and (row := self._row(trainer, trainer.current_epoch)):
            rows.append(row)
        return {"rows": rows}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rows = [dict(row) for row in state_dict.get("rows", [])]
