"""The ``last.ckpt`` that a resume starts from, written after every epoch.

Since Lightning 2.6, ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` only in an epoch that also saved a
top-k checkpoint, that is when the monitored metric improved. A run whose metric plateaus then leaves ``last.ckpt``
at the best epoch, and ``ckpt_path=<run>/checkpoints/last.ckpt`` silently repeats every epoch since. A checkpoint
callback without a monitor keeps its latest save, which is what ``last.ckpt`` must be.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint


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
