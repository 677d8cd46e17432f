"""Checkpoint callbacks: LastCheckpoint's validation (its every-epoch writes are tested end to end in test_train.py)
and BestCheckpoint's resume in a new folder, on real Lightning fits of a model with scripted validation scores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from animl_lightning.train.checkpointing import BestCheckpoint, LastCheckpoint, carry_checkpoints


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"filename": "last.ckpt"}, "filename"), ({"filename": "a/b"}, "filename"), ({"every_n_epochs": 0}, "every")],
)
def test_last_checkpoint_refuses_bad_settings(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LastCheckpoint(tmp_path, **kwargs)


def test_last_checkpoint_state_key_differs_from_an_unmonitored_model_checkpoint(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    # Both unmonitored, as with callbacks.model_checkpoint.monitor=null: Lightning needs distinct state keys.
    assert LastCheckpoint(tmp_path).state_key != ModelCheckpoint(tmp_path, filename="best").state_key


# --- BestCheckpoint: a resume in a new folder keeps the best checkpoint ------------------------------------------


class ScriptedScore(lightning.LightningModule):
    """A tiny model whose validation score at epoch ``e`` is ``scores[e]``."""

    def __init__(self, scores: list[float]) -> None:
        super().__init__()
        self.scores = scores
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/score", self.scores[self.current_epoch])

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test/loss", self.layer(batch[0]).pow(2).mean())

    def test_dataloader(self) -> DataLoader[Any]:
        return self.val_dataloader()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(TensorDataset(torch.randn(2, 2)), batch_size=2)


def _trainer(folder: Path, epochs: int) -> lightning.Trainer:
    best = BestCheckpoint(dirpath=folder, filename="best", monitor="val/score", mode="max", save_top_k=1)
    return lightning.Trainer(
        max_epochs=epochs,
        callbacks=[best, LastCheckpoint(folder)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )


def _fit(
    folder: Path, epochs: int, ckpt_path: Path | None = None, scores: tuple[float, ...] = (0.5, 0.9, 0.3, 0.4)
) -> BestCheckpoint:
    trainer = _trainer(folder, epochs)
    trainer.fit(ScriptedScore(list(scores)), ckpt_path=ckpt_path, weights_only=False)
    best = trainer.checkpoint_callback
    assert isinstance(best, BestCheckpoint)
    return best


def test_resume_in_a_new_folder_keeps_the_best_checkpoint(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    _fit(first, 2)  # scores 0.5, 0.9: best is epoch 1
    best = _fit(second, 4, first / "last.ckpt")  # resumed epochs score 0.3 and 0.4: worse
    assert Path(best.best_model_path) == second / "best.ckpt"
    assert float(best.best_model_score) == pytest.approx(0.9)  # type: ignore[arg-type]
    assert torch.load(second / "best.ckpt", weights_only=False)["epoch"] == 1
    assert torch.load(second / "last.ckpt", weights_only=False)["epoch"] == 3
    assert (first / "best.ckpt").is_file()  # the old folder is left as it was


def test_evaluating_a_carried_checkpoint_copies_nothing(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    _fit(first, 2)
    _fit(second, 4, first / "last.ckpt")
    (first / "best.ckpt").write_bytes(b"not a checkpoint")  # would land in second/ if evaluation carried again
    _trainer(second, 4).test(ScriptedScore([0.0]), ckpt_path=second / "best.ckpt", weights_only=False, verbose=False)
    assert torch.load(second / "best.ckpt", weights_only=False)["epoch"] == 1


def test_resume_in_a_new_folder_still_replaces_a_worse_best(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    scores = (0.5, 0.9, 0.3, 0.95)  # the last resumed epoch beats the carried best
    _fit(first, 2, scores=scores)
    best = _fit(second, 4, first / "last.ckpt", scores=scores)
    assert float(best.best_model_score) == pytest.approx(0.95)  # type: ignore[arg-type]
    assert torch.load(second / "best.ckpt", weights_only=False)["epoch"] == 3
    assert sorted(p.name for p in second.iterdir()) == ["best.ckpt", "last.ckpt"]


def test_carry_checkpoints_skips_missing_files(tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    (old / "a.ckpt").write_bytes(b"weights")
    carried = carry_checkpoints({str(old / "a.ckpt"): 0.7, str(old / "gone.ckpt"): 0.8}, tmp_path / "new", copy=True)
    assert carried == {str(tmp_path / "new" / "a.ckpt"): 0.7}
    assert (tmp_path / "new" / "a.ckpt").read_bytes() == b"weights"
    assert carry_checkpoints({str(old / "a.ckpt"): 0.7}, tmp_path / "other", copy=False) == {
        str(tmp_path / "other" / "a.ckpt"): 0.7
    }
    assert not (tmp_path / "other").exists()  # a non-writing rank only maps the paths
