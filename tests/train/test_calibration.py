"""Temperature scaling and expected calibration error."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L  # noqa: N812 (Lightning's documented alias)
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from animl_lightning.deploy.inference import load_classifier
from animl_lightning.train.calibration import (
    MIN_TEMPERATURE,
    TemperatureCalibration,
    calibrate_checkpoint,
    expected_calibration_error,
    fit_temperature,
    per_label_calibration_error,
    softmax_with_temperature,
    temperature_nll,
)
from animl_lightning.train.checkpointing import CALIBRATION_KEY, temperature_of
from tests.fixtures.models import IMAGE_SIZE, tiny_classifier, write_checkpoint


def test_ece_is_zero_when_confidence_matches_accuracy() -> None:
    # 10 samples at confidence 0.8, 8 of them right: accuracy equals confidence in the only bin.
    probs = np.tile([0.8, 0.2], (10, 1))
    labels = np.array([0] * 8 + [1] * 2)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_an_overconfident_model() -> None:
    # Confidence 1.0 everywhere, half wrong: |0.5 - 1.0| = 0.5.
    probs = np.tile([1.0, 0.0], (4, 1))
    labels = np.array([0, 1, 0, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.5)


def test_ece_weights_bins_by_size() -> None:
    # Bin of 0.9 (3 samples, 2 right: gap 0.9 - 2/3) and bin of 0.6 (1 sample, right: gap 0.4).
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    labels = np.array([0, 0, 1, 1])
    expected = 3 / 4 * abs(2 / 3 - 0.9) + 1 / 4 * abs(1.0 - 0.6)
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(expected)


def test_per_label_ece_uses_the_predicted_label() -> None:
    probs = np.array([[0.9, 0.1, 0.0], [0.9, 0.1, 0.0], [0.3, 0.7, 0.0], [0.3, 0.7, 0.0]])
    labels = np.array([0, 1, 1, 1])
    ece = per_label_calibration_error(probs, labels, n_bins=10)
    assert ece[0] == pytest.approx(abs(0.5 - 0.9))  # predicted "0" twice at 0.9, right once
    assert ece[1] == pytest.approx(abs(1.0 - 0.7))  # predicted "1" twice at 0.7, right both times
    assert math.isnan(ece[2])  # never predicted


def test_ece_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="labels"):
        expected_calibration_error(np.ones((3, 2)) / 2, np.array([0, 1]))
    with pytest.raises(ValueError, match="labels must be in"):
        expected_calibration_error(np.ones((2, 2)) / 2, np.array([0, 2]))


def _synthetic_split(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibrated logits by construction: labels are drawn from softmax(logits)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=generator) * 2.0
    labels = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=generator).squeeze(1)
    return logits, labels


def test_temperature_scaling_fixes_an_overconfident_model_on_held_out_data() -> None:
    val_logits, val_labels = _synthetic_split(4000, 5, seed=1)
    test_logits, test_labels = _synthetic_split(4000, 5, seed=2)
    scale = 3.0  # the over-confident model multiplies the calibrated logits by 3
    temperature = fit_temperature(val_logits * scale, val_labels)
    assert temperature == pytest.approx(scale, rel=0.1)

    before = expected_calibration_error(torch.softmax(test_logits * scale, 1).numpy(), test_labels.numpy())
    after = expected_calibration_error(
        softmax_with_temperature(test_logits * scale, temperature).numpy(), test_labels.numpy()
    )
    assert before > 0.1
    assert after < before / 3
    assert temperature_nll(test_logits * scale, test_labels, temperature) < temperature_nll(
        test_logits * scale, test_labels, 1.0
    )
    # Scaling never changes the predicted label.
    assert torch.equal(
        softmax_with_temperature(test_logits, temperature).argmax(1), torch.softmax(test_logits, 1).argmax(1)
    )


def test_fit_temperature_is_bounded_when_every_sample_is_right() -> None:
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0]] * 10)
    labels = torch.tensor([0, 1] * 10)
    temperature = fit_temperature(logits, labels)
    # The NLL only flattens out towards T -> 0; the fit sharpens and stays inside the bounds.
    assert MIN_TEMPERATURE <= temperature < 0.5


def test_fit_temperature_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="zero samples"):
        fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        fit_temperature(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="labels must be in"):
        fit_temperature(torch.zeros(2, 3), torch.tensor([0, 3]))


def _val_loader(n: int = 24) -> DataLoader[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    labels = torch.arange(n) % 4
    return DataLoader(TensorDataset(images, labels, torch.arange(n)), batch_size=8)


def test_calibrate_checkpoint_stores_the_temperature_used_by_inference(tmp_path: Path) -> None:
    checkpoint = write_checkpoint(tmp_path / "model.ckpt")
    record = calibrate_checkpoint(checkpoint, _val_loader())
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert stored[CALIBRATION_KEY]["temperature"] == pytest.approx(record["temperature"])
    assert record["nll_after"] <= record["nll_before"] + 1e-9
    assert record["samples"] == 24
    loaded = load_classifier(checkpoint, device="cpu")
    assert loaded.temperature == pytest.approx(record["temperature"])
    assert load_classifier(checkpoint, device="cpu", apply_calibration=False).temperature == 1.0
    # The calibrated file is still a checkpoint Lightning can load.
    from animl_lightning.train.classifier import CropClassifier

    assert CropClassifier.from_checkpoint(checkpoint).class_names == loaded.class_names


def test_calibration_callback_calibrates_the_best_checkpoint(tmp_path: Path) -> None:
    model = tiny_classifier()
    generator = torch.Generator().manual_seed(0)
    train = DataLoader(
        TensorDataset(
            torch.randn(16, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator), torch.arange(16) % 4, torch.arange(16)
        ),
        batch_size=8,
    )
    callback = TemperatureCalibration()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val/loss"), callback],
    )
    trainer.fit(model, train_dataloaders=train, val_dataloaders=_val_loader())
    assert callback.record is not None
    stored = torch.load(tmp_path / "best.ckpt", map_location="cpu", weights_only=True)
    assert stored[CALIBRATION_KEY]["temperature"] == pytest.approx(callback.record["temperature"])
    assert stored[CALIBRATION_KEY]["fitted_on"] == "val"


def test_temperature_of_reads_the_checkpoint_record() -> None:
    assert temperature_of({}) == 1.0
    assert temperature_of({CALIBRATION_KEY: {"temperature": 2.5}}) == 2.5
    with pytest.raises(ValueError, match="temperature"):
        temperature_of({CALIBRATION_KEY: {"temperature": -1.0}})
