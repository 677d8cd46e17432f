"""Checkpoints: the one reader, atomic writes, the best checkpoint kept across a resume, ``last.ckpt`` every epoch.

:func:`read_checkpoint` is training's reader of a checkpoint (``train=false``, resume checks, the report): the model
part (labels, model name, preprocessing, crop rule, calibration, thresholds, taxonomy) is read by its owner,
:class:`animl_lightning.core.model_file.DeployableModel` (``weights_only=True``, one clear error per way a file can
be unusable), and the CropClassifier's ``hyper_parameters`` are checked on top. The checkpoint keys of the model part
(``CALIBRATION_KEY``, ``THRESHOLDS_KEY``) and ``CheckpointError`` are that module's, named here too for callers that
import them from here.

:class:`AtomicCheckpointIO` writes every checkpoint through a temporary file in the checkpoint's own folder, flushed
and fsynced, then renamed over the old one: Lightning's own writer goes through the system temp folder, and when
that is another file system its fallback truncates ``last.ckpt`` before copying, so a kill or a full disk lost the
previous checkpoint.

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

import io
import logging
import random
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from animl_lightning.core.crop_rule import CropRule
from animl_lightning.core.errors import require
from animl_lightning.core.files import atomic_write, atomic_write_bytes
from animl_lightning.core.model_file import CALIBRATION_KEY as CALIBRATION_KEY
from animl_lightning.core.model_file import LEGACY_REQUIRED_HPARAMS, DeployableModel, load_checkpoint_dict
from animl_lightning.core.model_file import THRESHOLDS_KEY as THRESHOLDS_KEY
from animl_lightning.core.model_file import CheckpointError as CheckpointError
from animl_lightning.core.model_file import temperature_of as temperature_of
from animl_lightning.core.taxonomy import Taxonomy

log = logging.getLogger(__name__)

# Rank 0's generator states (all a single-process resume needs) and, under DDP, every rank's, indexed by global rank.
RNG_STATES_KEY = "rng_states"
RNG_STATES_PER_RANK_KEY = "rng_states_per_rank"
# What train.py always stores in hyper_parameters (besides the crop rule); a checkpoint without them cannot resume.
REQUIRED_HPARAMS = LEGACY_REQUIRED_HPARAMS


@dataclass(frozen=True)
class CheckpointContents:
    """A checkpoint written by ``train.py``, read and checked by :func:`read_checkpoint`.

    Attributes:
        path: the file.
        raw: the whole loaded dict (Lightning's keys and ours).
        model: its model part (:class:`~animl_lightning.core.model_file.DeployableModel`).
    """

    path: Path
    raw: dict[str, Any]
    model: DeployableModel
    sha256: str = ""

    @property
    def hparams(self) -> dict[str, Any]:
        """``hyper_parameters``: the CropClassifier's constructor arguments."""
        hparams: dict[str, Any] = self.raw["hyper_parameters"]
        return hparams

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The LightningModule's weights."""
        state: dict[str, torch.Tensor] = self.raw["state_dict"]
        return state

    @property
    def class_names(self) -> list[str]:
        """Labels in index order."""
        return self.model.class_names

    @property
    def model_name(self) -> str:
        """The timm architecture."""
        return self.model.model_name

    @property
    def data_config(self) -> dict[str, Any]:
        """The preprocessing (timm data config keys)."""
        return dict(self.model.preprocessing)

    @property
    def crop_rule(self) -> CropRule:
        """How the training crops were cut."""
        return self.model.crop_rule

    @property
    def calibration(self) -> dict[str, Any] | None:
        """The temperature record (``calibrate=true``), or None."""
        return None if self.model.calibration is None else dict(self.model.calibration)

    @property
    def temperature(self) -> float:
        """The calibration temperature (1.0 when the checkpoint was never calibrated)."""
        return self.model.temperature

    @property
    def thresholds(self) -> dict[str, Any] | None:
        """The per-label threshold record (``thresholds.target_precision``), or None."""
        return None if self.model.thresholds is None else dict(self.model.thresholds)

    @property
    def taxonomy(self) -> Taxonomy | None:
        """The labels' taxonomy (``labels.taxonomy_file`` at prepare time), or None."""
        return self.model.taxonomy


def read_checkpoint(path: str | Path) -> CheckpointContents:
    """Load a ``train.py`` checkpoint with ``weights_only=True`` and check it is one.

    The file and its model part are read by :meth:`DeployableModel.read
    <animl_lightning.core.model_file.DeployableModel.read>`; training also needs the CropClassifier's
    ``hyper_parameters`` (a model file without them can be deployed, not resumed or evaluated).

    Raises:
        CheckpointError: missing, a folder, empty, truncated or not a PyTorch file, holding pickled objects (that
            could run code), or lacking what ``train.py`` stores (``hyper_parameters.model_name``, ``class_names``,
            ``data_config``, the crop rule, ``state_dict``).
    """
    source = Path(path)
    raw, sha256 = load_checkpoint_dict(source)
    model = DeployableModel.from_checkpoint(raw, source, sha256)
    hparams = raw.get("hyper_parameters")
    if not isinstance(hparams, dict):
        raise CheckpointError(f"checkpoint {source}: field 'hyper_parameters' is missing: not written by train.py")
    missing = [key for key in REQUIRED_HPARAMS if key not in hparams]
    if missing:
        raise CheckpointError(
            f"checkpoint {source}: hyper_parameters lacks {missing}: not a CropClassifier checkpoint of train.py"
        )
    return CheckpointContents(path=source, raw=raw, model=model, sha256=sha256)


def update_checkpoint(path: str | Path, key: str, record: Mapping[str, Any]) -> None:
    """Store ``record`` under the top-level ``key`` of a saved checkpoint (an atomic rewrite of the file)."""
    update_checkpoint_keys(path, {key: record})


def update_checkpoint_keys(path: str | Path, records: Mapping[str, Mapping[str, Any]]) -> None:
    """Store each record under its top-level key, in one atomic rewrite of the file (a B3 checkpoint is ~100 MB)."""
    contents = read_checkpoint(path)
    for key, record in records.items():
        contents.raw[key] = dict(record)
    buffer = io.BytesIO()
    torch.save(contents.raw, buffer)
    atomic_write_bytes(contents.path, buffer.getvalue())


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint writer, but atomic in the checkpoint's own folder (see the module docstring)."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        # Serialised in memory first (as Lightning's own writer does): torch.save into a file that hits a full disk
        # fails with an opaque RuntimeError, a plain write with the OSError that names the cause.
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(Path(path), buffer.getvalue())


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
        require(
            bool(filename) and "/" not in filename and not filename.endswith(".ckpt"),
            "callbacks.last_checkpoint.filename",
            f"must be a plain name without '/' or '.ckpt', got {filename!r}",
        )
        require(every_n_epochs >= 1, "callbacks.last_checkpoint.every_n_epochs", f"must be >= 1, got {every_n_epochs}")
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


def capture_rng_states() -> dict[str, Any]:
    """The Python, numpy and torch (CPU and CUDA) generator states as values ``torch.load(weights_only=True)`` reads."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    states: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_states`; generators missing from ``states`` are left alone."""
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in states:
        kind, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def rng_states_to_restore(
    checkpoint: Mapping[str, Any], rank: int, world_size: int
) -> tuple[Mapping[str, Any] | None, str | None]:
    """The generator states that process ``rank`` of ``world_size`` restores when resuming from ``checkpoint``.

    Returns:
        ``(states, inexact)``: ``states`` is None when the checkpoint holds none that belong to this rank (the
        generators then keep their seeded state); ``inexact`` says why the resumed run will not draw exactly the
        random numbers of the uninterrupted one, and is None when it will.
    """
    per_rank = checkpoint.get(RNG_STATES_PER_RANK_KEY)
    single = checkpoint.get(RNG_STATES_KEY)
    single = single if isinstance(single, Mapping) else None
    if isinstance(per_rank, list) and per_rank:
        if len(per_rank) == world_size and isinstance(per_rank[rank], Mapping):
            return per_rank[rank], None
        mismatch = f"the checkpoint was saved by {len(per_rank)} DDP processes and this run has {world_size}"
        # One process continues as rank 0 did; with several, no saved state belongs to a given rank.
        return (single if world_size == 1 else None), mismatch
    if single is None:
        return None, "the checkpoint holds no random generator states"
    if world_size == 1:
        return single, None
    return None, f"the checkpoint holds one process's random generator states and this run has {world_size}"
