"""Checkpoint callbacks: the best checkpoint, kept across a resume, and ``last.ckpt`` after every epoch.

A resumed run gets a new Hydra run folder unless ``hydra.run.dir`` names the old one. Lightning's ``ModelCheckpoint``
then forgets the best score (it only restores it into the same folder), so the first epoch after the resume becomes
"best" whatever its score, and the run is evaluated on it. :class:`BestCheckpoint` carries the best checkpoints over.

In Lightning 2.6 (read in 2.6.6's source), ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` only in an
epoch that also saved a top-k checkpoint, that is when the monitored metric improved. A run whose metric plateaus
then leaves ``last.ckpt`` at the best epoch, and ``ckpt_path=<run>/checkpoints/last.ckpt`` silently repeats every
epoch since. A checkpoint
callback without a monitor keeps its latest save, which is what ``last.ckpt`` must be.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from animl_lightning.files import atomic_write

log = logging.getLogger(__name__)


class BestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that, when a run resumes in another folder, copies the kept checkpoints into its own.

    Their scores come along, so a resumed epoch only replaces them when it is better, exactly as in the folder the run
    started in. Checkpoints missing from the old folder are dropped (with a log line); with none left, Lightning's own
    behaviour applies.
    """

    _stage: str | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # Lightning restores callback state for evaluation too (trainer.test(ckpt_path=...)); only a fit carries over.
        self._stage = stage

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        previous_dir = state_dict.get("dirpath", self.dirpath)
        kept: dict[str, Any] = state_dict.get("best_k_models") or {}
        if self._stage != "fit" or self.dirpath is None or previous_dir == self.dirpath or not kept:
            super().load_state_dict(state_dict)
            return
        # Like Lightning's own checkpoint writes, only global rank 0 touches the files.
        is_writer = not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0
        carried = carry_checkpoints(kept, Path(self.dirpath), copy=is_writer)
        if not carried:
            super().load_state_dict(state_dict)
            return
        # max mode: the best has the highest score and the k-th (next to be replaced) the lowest.
        ranked = sorted(carried, key=lambda path: float(carried[path]), reverse=self.mode == "max")
        self.best_k_models = carried
        self.best_model_path, self.kth_best_model_path = ranked[0], ranked[-1]
        self.best_model_score, self.kth_value = carried[ranked[0]], carried[ranked[-1]]
        log.info("resuming in %s: carried %d checkpoint(s) over from %s", self.dirpath, len(carried), previous_dir)


def carry_checkpoints(kept: dict[str, Any], folder: Path, copy: bool) -> dict[str, Any]:
    """``kept`` (path -> score) re-rooted in ``folder``; with ``copy``, the files are copied there atomically.

    Paths whose file is gone are left out. Only one process (global rank 0) should copy; the others get the same
    mapping.
    """
    carried: dict[str, Any] = {}
    for old, score in kept.items():
        source = Path(old)
        if not source.is_file():
            log.warning("checkpoint %s is gone; it is not carried over to %s", source, folder)
            continue
        target = folder / source.name
        if copy and target.resolve() != source.resolve():
            folder.mkdir(parents=True, exist_ok=True)
            with source.open("rb") as src, atomic_write(target) as dst:
                shutil.copyfileobj(src, dst, 1 << 24)
        carried[str(target)] = score
    return carried


class LastCheckpoint(ModelCheckpoint):
    """Write ``<dirpath>/<filename>.ckpt`` at the end of every ``every_n_epochs``-th epoch, replacing the previous one.

    A class of its own so that its saved state never collides with the best-checkpoint callback's (Lightning keys
    callback state by class name and monitor, and both may be unmonitored). ``trainer.checkpoint_callback`` stays
    the best-checkpoint callback as long as that one comes first in the callback list.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last", every_n_epochs: int = 1) -> None:
        if not filename or "/" in filename or filename.endswith(".ckpt"):
            raise ValueError(f"filename must be a plain name without '/' or '.ckpt', got {filename!r}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=None,
            save_top_k=1,
            save_last=False,
            every_n_epochs=every_n_epochs,
            auto_insert_metric_name=False,
            # The same name every time: a resumed run in the same folder overwrites it instead of writing last-v1.
            enable_version_counter=False,
        )

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Nothing in the state matters to a callback that rewrites one file every epoch; skipping it in a new folder
        # also skips Lightning's "dirpath has changed" warning, which is about best-checkpoint bookkeeping.
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            super().load_state_dict(state_dict)
