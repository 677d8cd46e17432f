"""Export parity: onnxruntime and TorchScript give the checkpoint's calibrated probabilities."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from animl_lightning.core.crop_rule import CropRule
from animl_lightning.deploy.export import sidecar_path
from animl_lightning.deploy.export_formats import export_checkpoint
from animl_lightning.deploy.inference import LoadedClassifier, load_classifier
from animl_lightning.train.calibration import store_calibration
from tests.fixtures.models import CLASS_NAMES, IMAGE_SIZE, write_checkpoint
from tests.fixtures.scripts import run_in_process

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

    return run_in_process(main, ["animl_lightning.export", *args], monkeypatch)


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


def test_a_new_format_is_one_registry_entry(
    calibrated_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from animl_lightning.deploy.export_formats import FORMATS, Exported, ExportFormat, ExportJob

    jobs: list[ExportJob] = []

    def write_fake(job: ExportJob) -> Exported:
        jobs.append(job)
        job.output.write_text(f"fake model of {job.checkpoint.name}", encoding="utf-8")
        return Exported(f"wrote {job.output} (fake)")

    monkeypatch.setitem(FORMATS, "fake", ExportFormat("fake", "file", ("fp32",), "", (), write_fake))
    output = tmp_path / "model.fake"
    assert _main([f"checkpoint={calibrated_checkpoint}", "format=fake", f"output={output}"], monkeypatch) == 0
    assert [(job.format, job.checkpoint, job.output, job.precision) for job in jobs] == [
        ("fake", calibrated_checkpoint, output, "fp32")
    ]
    assert jobs[0].options == {}  # export.yaml has no fake: block
    assert output.read_text(encoding="utf-8") == "fake model of model.ckpt"
    assert capsys.readouterr().out.strip().endswith(f"wrote {output} (fake)")
    # The registry's precisions are checked before the writer runs.
    args = [f"checkpoint={calibrated_checkpoint}", "format=fake", f"output={output}", "precision=int8"]
    assert _main(args, monkeypatch) == 2
    assert len(jobs) == 1
    assert "precision=int8: int8 is made with ONNX Runtime: use format=onnx or format=animl, not fake" in "".join(
        capsys.readouterr()
    )


def test_a_format_gets_the_settings_block_named_after_it(
    calibrated_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from animl_lightning.deploy.export_formats import FORMATS, Exported, ExportJob

    jobs: list[ExportJob] = []

    def record(job: ExportJob) -> Exported:
        jobs.append(job)
        return Exported("recorded")

    monkeypatch.setitem(FORMATS, "animl", dataclasses.replace(FORMATS["animl"], modules=(), write=record))
    args = [f"checkpoint={calibrated_checkpoint}", "format=animl", f"output={tmp_path / 'b'}", "animl.version=7"]
    assert _main(args, monkeypatch) == 0
    assert jobs[0].options == {"model_id": None, "version": 7, "description": None, "default_threshold": 0.5}


def test_the_format_error_lists_every_registered_format(monkeypatch: pytest.MonkeyPatch) -> None:
    from animl_lightning.deploy.export import ExportError
    from animl_lightning.deploy.export_formats import FORMATS, check_format

    with pytest.raises(ExportError) as raised:
        check_format("bogus", "fp32")
    assert str(raised.value) == "format: must be one of ['onnx', 'torchscript', 'animl'], got 'bogus'"
    monkeypatch.setitem(FORMATS, "tflite", dataclasses.replace(FORMATS["onnx"], name="tflite"))
    with pytest.raises(ExportError, match=r"\['onnx', 'torchscript', 'animl', 'tflite'\], got 'bogus'"):
        check_format("bogus", "fp32")
    with pytest.raises(ExportError, match=r"^precision: must be one of \['fp32', 'int8'\], got 'fp16'$"):
        check_format("onnx", "fp16")


def test_a_folder_format_is_not_a_model_file(calibrated_checkpoint: Path, tmp_path: Path) -> None:
    from animl_lightning.deploy.export import ExportError

    with pytest.raises(ExportError, match=r"^format=animl: writes a folder, not one model file$"):
        export_checkpoint(calibrated_checkpoint, "animl", tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
