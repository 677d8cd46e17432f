"""Export parity: onnxruntime and TorchScript give the checkpoint's calibrated probabilities."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from animl_lightning.core.crop_rule import CropRule
from animl_lightning.deploy.export import export_checkpoint, sidecar_path
from animl_lightning.deploy.inference import LoadedClassifier, load_classifier
from animl_lightning.train.calibration import store_calibration
from tests.fixtures.models import CLASS_NAMES, IMAGE_SIZE, write_checkpoint

TEMPERATURE = 1.7


@pytest.fixture(scope="module")
def calibrated_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_checkpoint(tmp_path_factory.mktemp("export") / "model.ckpt", crop_rule=CropRule("square", 256))
    store_calibration(path, {"method": "temperature_scaling", "temperature": TEMPERATURE})
    return path


@pytest.fixture(scope="module")
def loaded(calibrated_checkpoint: Path) -> LoadedClassifier:
    return load_classifier(calibrated_checkpoint, device="cpu")


def _inputs() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return [
        torch.randn(batch, 3, size, size, generator=generator)
        for batch in (1, 8)
        for size in (IMAGE_SIZE, IMAGE_SIZE + 32)
    ]


def test_onnx_matches_the_checkpoint(calibrated_checkpoint: Path, loaded: LoadedClassifier, tmp_path: Path) -> None:
    result = export_checkpoint(calibrated_checkpoint, "onnx", tmp_path / "model.onnx")
    assert result.dynamic_size
    session = ort.InferenceSession(str(result.model_file), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    for images in _inputs():
        expected = loaded.probabilities(images).numpy()
        (got,) = session.run(None, {"images": images.numpy()})
        assert got.shape == (images.shape[0], len(CLASS_NAMES))
        assert np.abs(got - expected).max() < 1e-4, images.shape
        # The temperature is applied: the export is not the plain softmax.
        with torch.no_grad():
            plain = torch.softmax(loaded.model(images), dim=1).numpy()
        assert np.abs(got - plain).max() > 1e-3 or images.shape[0] == 1


def test_torchscript_matches_the_checkpoint(
    calibrated_checkpoint: Path, loaded: LoadedClassifier, tmp_path: Path
) -> None:
    result = export_checkpoint(calibrated_checkpoint, "torchscript", tmp_path / "model.pt")
    assert result.dynamic_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(result.model_file))
    for images in _inputs():
        expected = loaded.probabilities(images).numpy()
        with torch.no_grad():
            got = module(images).numpy()
        assert np.abs(got - expected).max() < 1e-4, images.shape
        with torch.no_grad():
            manual = torch.softmax(loaded.model(images) / TEMPERATURE, dim=1).numpy()
        assert np.abs(got - manual).max() < 1e-5


def test_sidecar_describes_the_input(calibrated_checkpoint: Path, loaded: LoadedClassifier, tmp_path: Path) -> None:
    export_checkpoint(calibrated_checkpoint, "torchscript", tmp_path / "model.pt")
    side = json.loads(sidecar_path(tmp_path / "model.pt").read_text())
    assert side["label_index"] == {str(i): name for i, name in enumerate(CLASS_NAMES)}
    assert side["input_size"] == [3, IMAGE_SIZE, IMAGE_SIZE]
    assert side["mean"] == pytest.approx(list(loaded.transform.mean))
    assert side["std"] == pytest.approx(list(loaded.transform.std))
    assert side["interpolation"] == "bicubic"
    assert side["crop_pct"] == pytest.approx(0.95)
    assert (side["crop_strategy"], side["crop_max_size"]) == ("square", 256)
    assert side["temperature"] == pytest.approx(TEMPERATURE)
    assert side["model_name"] == "test_efficientnet"


def _main(args: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """Run the Hydra entry point in this process (as ``python -m animl_lightning.export ARGS``); return its status."""
    from animl_lightning.export import main

    monkeypatch.setattr(sys, "argv", ["animl_lightning.export", *args])
    try:
        main()
    except SystemExit as stop:
        return int(stop.code or 0)
    return 0


def test_cli_exports_and_reports_bad_input_without_traceback(
    calibrated_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "cli" / "model.pt"
    assert _main([f"checkpoint={calibrated_checkpoint}", "format=torchscript", f"output={output}"], monkeypatch) == 0
    assert output.is_file() and sidecar_path(output).is_file()
    assert "wrote" in capsys.readouterr().out
    assert not (tmp_path / "outputs").exists()  # Hydra writes nothing next to the caller

    missing = tmp_path / "missing.ckpt"
    assert _main([f"checkpoint={missing}", "format=onnx", f"output={tmp_path / 'x.onnx'}"], monkeypatch) == 2
    captured = capsys.readouterr()
    assert "missing.ckpt does not exist" in captured.out + captured.err
    assert "Traceback" not in captured.out + captured.err
    assert not (tmp_path / "x.onnx").exists()
    assert _main([f"checkpoint={calibrated_checkpoint}", "format=tflite", f"output={tmp_path / 'y'}"], monkeypatch) == 2
    assert "format: must be one of" in "".join(capsys.readouterr())
