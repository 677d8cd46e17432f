"""int8 for CPU serving: export, bundle, ONNX server and classify with ONNX Runtime static quantization.

The checkpoint is the tiny model with a prepared dataset (``dataset_checkpoint`` in conftest): its val split (24
crops) calibrates the int8 model and measures its agreement with float32; that untrained model agrees on 23 of them,
which the refusal test relies on (a floor of 1.0 is then missed).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from animl_lightning.deploy.classify import ClassifySettings, classify_detections
from animl_lightning.deploy.classify_inputs import read_detections_file
from animl_lightning.deploy.export import onnx_identity, sidecar_path
from animl_lightning.deploy.inference import LoadedClassifier, load_classifier
from animl_lightning.deploy.int8_settings import Int8Settings
from animl_lightning.deploy.onnx_cache import OnnxCache, identity_key
from animl_lightning.deploy.onnx_runtime import OnnxClassifier
from animl_lightning.deploy.quantize import QuantizationError, build_int8, crop_batches, val_crops
from tests.fixtures.models import write_megadetector_file
from tests.fixtures.scripts import run_in_process

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

LENIENT = Int8Settings(min_agreement=0.5)


@pytest.fixture(scope="module")
def loaded(dataset_checkpoint: Path) -> LoadedClassifier:
    return load_classifier(dataset_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory: pytest.TempPathFactory, loaded: LoadedClassifier) -> Path:
    """A cache holding the float32 and the int8 model of the checkpoint (built once for this module)."""
    folder = tmp_path_factory.mktemp("int8_cache")
    settings = ClassifySettings(precision="int8", cache_dir=str(folder), int8=LENIENT)
    from animl_lightning.deploy.runtimes import onnx_predictor

    onnx_predictor(loaded, settings)
    return folder


def _run(module: str, args: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """``python -m animl_lightning.<module> ARGS`` in this process; its exit status."""
    import importlib

    main = importlib.import_module(f"animl_lightning.{module}").main
    return run_in_process(main, [f"animl_lightning.{module}", *args], monkeypatch)


def test_export_below_the_floor_says_so_in_one_line_and_writes_nothing(
    dataset_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out" / "model.onnx"
    args = [
        f"checkpoint={dataset_checkpoint}",
        f"output={output}",
        "precision=int8",
        "int8.min_agreement=1.0",
        "cache_dir=null",  # the whole build: export, calibration, check
    ]
    assert _run("export", args, monkeypatch) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("export: error: ")]
    assert len(errors) == 1, captured.err
    assert "precision=int8: top-1 agreement with fp32 0.9583 on 24 val crops (min_agreement 1.0)" in errors[0]
    assert "below int8.min_agreement, so nothing was written" in errors[0]
    assert not output.exists() and not sidecar_path(output).exists()
    assert not output.parent.exists() or not any(output.parent.iterdir())


def test_export_int8_reports_agreement_and_recall_and_writes_a_quantized_model(
    dataset_checkpoint: Path,
    loaded: LoadedClassifier,
    warm_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    output = tmp_path / "model.int8.onnx"
    args = [
        f"checkpoint={dataset_checkpoint}",
        f"output={output}",
        "precision=int8",
        "int8.min_agreement=0.9",
        f"cache_dir={warm_cache}",
    ]
    assert _run("export", args, monkeypatch) == 0
    printed = capsys.readouterr().out
    assert "int8: top-1 agreement with fp32 0.9583 on 24 val crops (min_agreement 0.9)" in printed
    assert all(f"\n{label} " in printed for label in loaded.class_names)
    assert "(onnx int8," in printed

    side = json.loads(sidecar_path(output).read_text())
    assert side["precision"] == "int8"
    report = side["int8"]
    assert report["top1_agreement"] == 0.9583 and report["min_agreement"] == 0.9
    assert report["split"] == "val" and report["check_crops"] == 24 and report["calibration_crops"] == 24
    assert set(report["recall"]) == set(loaded.class_names)
    for row in report["recall"].values():
        assert row["support"] == 8
        assert row["change"] == pytest.approx(row["int8"] - row["fp32"], abs=1e-4)
    graph = onnx.load_from_string(output.read_bytes()).graph
    assert any(node.op_type == "QuantizeLinear" for node in graph.node)

    # The report is what the two models do on the val crops.
    fp32_file, _, _ = OnnxCache(warm_cache).paths(identity_key(onnx_identity(loaded)))
    fp32, int8 = OnnxClassifier(fp32_file), OnnxClassifier(output)
    crops = val_crops(loaded, Int8Settings())
    same = [
        np.argmax(fp32(inputs), axis=1) == np.argmax(int8(inputs), axis=1)
        for _, inputs in crop_batches(crops.paths, crops.check, loaded.transform, 16)
    ]
    assert round(float(np.concatenate(same).mean()), 4) == report["top1_agreement"]


def test_int8_needs_the_prepared_dataset(loaded: LoadedClassifier, tmp_path: Path) -> None:
    with pytest.raises(QuantizationError, match=r"set int8.data_dir=PATH to where it is now"):
        build_int8(loaded, Int8Settings(data_dir=str(tmp_path / "moved")), bytes, onnx_identity(loaded))


def test_torchscript_has_no_int8(
    dataset_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [f"checkpoint={dataset_checkpoint}", f"output={tmp_path / 'm.pt'}", "format=torchscript", "precision=int8"]
    assert _run("export", args, monkeypatch) == 2
    assert "precision=int8: int8 is made with ONNX Runtime: use format=onnx or format=animl" in capsys.readouterr().err


def test_classify_int8_from_the_cache(
    loaded: LoadedClassifier, warm_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    detections_file, images_dir, _ = write_megadetector_file(tmp_path)
    results = read_detections_file(detections_file)
    common: dict[str, Any] = {"threshold": 0.8, "num_workers": 0, "cache_dir": str(warm_cache), "precision": "int8"}
    with caplog.at_level(logging.INFO, logger="animl_lightning.deploy"):
        lenient = ClassifySettings(**common, int8=LENIENT)
        classify_detections(loaded, results, images_dir, tmp_path / "int8.json", lenient)
    assert "loaded the int8 ONNX model from the cache" in caplog.text and "built" not in caplog.text
    metadata = json.loads((tmp_path / "int8.json").read_text())["info"]["classifier_metadata"]
    assert metadata["precision"] == "int8" and metadata["backend"] == "onnxruntime"
    # The floor is checked on a cached model too.
    with pytest.raises(QuantizationError, match=r"below int8.min_agreement"):
        strict = ClassifySettings(**common, int8=Int8Settings(min_agreement=1.0))
        classify_detections(loaded, results, images_dir, tmp_path / "strict.json", strict)
    assert not (tmp_path / "strict.json").exists()


def test_animl_bundle_serves_the_int8_model_when_asked(
    loaded: LoadedClassifier, warm_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("model_archiver")
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from animl_lightning.core.serving import BundleError
    from animl_lightning.deploy.animl_bundle import write_animl_bundle
    from animl_lightning.deploy.server import create_app

    folder = tmp_path / "bundle"
    bundle = write_animl_bundle(loaded, folder, precision="int8", int8=LENIENT, cache=OnnxCache(warm_cache))
    assert bundle.int8_report is not None and bundle.int8_report["top1_agreement"] == 0.9583
    description = json.loads((folder / "bundle.json").read_text())
    assert description["onnx_int8_file"] == "model.int8.onnx" and description["int8"]["top1_agreement"] == 0.9583
    assert json.loads((folder / "mlmodel.json").read_text())["int8"]["recall"].keys() == set(loaded.class_names)
    dockerfile = (folder / "Dockerfile.onnx").read_text()
    assert "COPY model.onnx model.int8.onnx bundle.json /opt/ml/model/" in dockerfile
    assert "ENV ANIML_PRECISION=int8" in dockerfile
    assert "## int8" in (folder / "README.md").read_text()

    request = json.loads((folder / "sample_request.json").read_text())
    expected = {
        "fp32": json.loads((folder / "sample_response.json").read_text()),
        "int8": json.loads((folder / "sample_response_int8.json").read_text()),
    }
    assert expected["fp32"] != expected["int8"]
    for precision in ("fp32", "int8"):
        monkeypatch.setenv("ANIML_PRECISION", precision)
        with TestClient(create_app(folder, threads=1)) as client:
            answer = client.post("/invocations", json=request)
        assert answer.status_code == 200 and answer.json() == expected[precision], precision

    # A bundle exported without int8 says so when int8 is asked of it.
    description.pop("onnx_int8_file")
    (folder / "bundle.json").write_text(json.dumps(description))
    with pytest.raises(BundleError, match=r"has no int8 model \(field 'onnx_int8_file'\)"):
        create_app(folder, precision="int8")


def test_calibration_method_is_one_of_onnx_runtimes(
    dataset_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        f"checkpoint={dataset_checkpoint}",
        f"output={tmp_path / 'model.onnx'}",
        "precision=int8",
        "int8.calibration_method=kl",
    ]
    assert _run("export", args, monkeypatch) == 2
    err = capsys.readouterr().err
    assert "int8.calibration_method: must be one of minmax, entropy, percentile, got 'kl'" in err
    assert "Traceback" not in err and not (tmp_path / "model.onnx").exists()


def test_each_calibration_method_makes_its_own_cached_int8_model(
    loaded: LoadedClassifier, warm_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from animl_lightning.deploy.export import cached_onnx

    cache = OnnxCache(warm_cache)

    def fp32_model() -> bytes:
        return cached_onnx(loaded, cache, lambda data: data)[1].data

    percentile = Int8Settings(min_agreement=0.0, calibration_method="percentile")
    with caplog.at_level(logging.INFO, logger="animl_lightning.deploy"):
        _, data, report = build_int8(loaded, percentile, fp32_model, onnx_identity(loaded), cache)
    # The minmax model of warm_cache is not taken for the percentile one.
    assert "built the int8 ONNX model" in caplog.text, caplog.text
    assert report["calibration_method"] == "percentile" and 0.0 <= report["top1_agreement"] <= 1.0
    graph = onnx.load_from_string(data).graph
    assert any(node.op_type == "QuantizeLinear" for node in graph.node)
    minmax = build_int8(loaded, LENIENT, fp32_model, onnx_identity(loaded), cache)[1]
    # The 99.999th percentile clips the largest activations: other ranges, other quantization scales.
    assert data != minmax
