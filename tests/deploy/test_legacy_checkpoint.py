"""A checkpoint written before the model record still loads, and classify and export give the same answers on it.

The old checkpoint is written by hand in the layouts main wrote at 24ace46 and, with lossless crops, at 8d120f4
(:mod:`tests.fixtures.legacy_checkpoint`), around the weights, calibration and thresholds of a checkpoint written now
by a real Lightning fit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from animl_lightning.core.crop_rule import CropRule
from animl_lightning.core.model_file import MODEL_KEY, THRESHOLDS_KEY, DeployableModel
from animl_lightning.deploy.animl_bundle import bundle_description
from animl_lightning.deploy.classify import ClassifySettings, classify_detections
from animl_lightning.deploy.classify_inputs import read_detections_file
from animl_lightning.deploy.export_formats import export_checkpoint
from animl_lightning.deploy.inference import load_classifier
from animl_lightning.train.calibration import store_calibration
from animl_lightning.train.checkpointing import read_checkpoint, update_checkpoint
from animl_lightning.train.classifier import CropClassifier
from tests.fixtures.legacy_checkpoint import LAYOUTS, MAIN_TOP_LEVEL_KEYS, main_hparam_keys, write_legacy_checkpoint
from tests.fixtures.models import CLASS_NAMES, IMAGE_SIZE, write_checkpoint, write_megadetector_file

SETTINGS = ClassifySettings(threshold=0.8, min_conf=0.05, batch_size=3, num_workers=0, top_k=3, backend="torch")
THRESHOLDS = {"per_label": {"bird": 0.6, "deer": 0.7, "fox": 0.8, "rabbit": None}}
# What names the file rather than the model: allowed to differ between the two checkpoints.
FILE_FIELDS = {"checkpoint", "checkpoint_sha256", "classifier", "classification_completion_time"}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layout(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def rule(layout: str) -> CropRule:
    # The older layout has no key for lossless crops; the newer one records them.
    return CropRule("pad", 200, lossless=LAYOUTS[layout])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, layout: str, rule: CropRule) -> tuple[Path, Path]:
    """(new-format checkpoint, the same model in main's old layout)."""
    root = tmp_path_factory.mktemp(f"legacy_{layout}")
    new = write_checkpoint(root / "new" / "best.ckpt", crop_rule=rule, tta="hflip", data_dir=root / "data")
    store_calibration(new, {"method": "temperature_scaling", "temperature": 1.7})
    update_checkpoint(new, THRESHOLDS_KEY, THRESHOLDS)
    (root / "old").mkdir()
    return new, write_legacy_checkpoint(new, root / "old" / "best.ckpt", layout)


def _without_file_fields(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_file_fields(v) for k, v in value.items() if k not in FILE_FIELDS}
    if isinstance(value, list):
        return [_without_file_fields(v) for v in value]
    return value


def test_the_old_checkpoint_has_mains_layout(checkpoints: tuple[Path, Path], layout: str, rule: CropRule) -> None:
    new, old = checkpoints
    raw = torch.load(old, weights_only=True)
    assert list(raw) == [*MAIN_TOP_LEVEL_KEYS, "calibration", "thresholds"]
    assert list(raw["hyper_parameters"]) == main_hparam_keys(layout)
    assert MODEL_KEY not in raw
    # The new layout: the model record, and the crop rule as one hyper-parameter.
    fresh = torch.load(new, weights_only=True)
    assert fresh[MODEL_KEY]["crop_rule"] == fresh["hyper_parameters"]["crop_rule"] == rule.to_dict()
    assert "crop_strategy" not in fresh["hyper_parameters"]


def test_the_model_part_reads_the_same(checkpoints: tuple[Path, Path], rule: CropRule) -> None:
    new, old = (DeployableModel.read(path) for path in checkpoints)
    assert old.labels == new.labels and list(old.labels) == CLASS_NAMES
    assert old.crop_rule == new.crop_rule == rule
    assert dict(old.preprocessing) == dict(new.preprocessing)
    assert (
        (old.model_name, old.tta, old.temperature)
        == (new.model_name, new.tta, new.temperature)
        == (
            "test_efficientnet",
            "hflip",
            1.7,
        )
    )
    assert old.thresholds == new.thresholds == THRESHOLDS
    assert old.data_dir == new.data_dir is not None
    assert old.weights.keys() == new.weights.keys()
    assert all(torch.equal(old.weights[k], new.weights[k]) for k in new.weights)


def test_classify_gives_the_same_answers(checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    detections_file, images_dir, _ = write_megadetector_file(tmp_path)
    written = []
    for name, checkpoint in zip(("new", "old"), checkpoints, strict=True):
        output = tmp_path / name / "classified.json"
        loaded = load_classifier(checkpoint, device="cpu")
        classify_detections(loaded, read_detections_file(detections_file), images_dir, output, SETTINGS)
        written.append(json.loads(output.read_text(encoding="utf-8")))
    new, old = written
    assert any(d.get("classifications") for image in new["images"] for d in image.get("detections") or [])
    assert old["images"] == new["images"]
    assert old["classification_categories"] == new["classification_categories"]
    assert _without_file_fields(old["info"]) == _without_file_fields(new["info"])


def _export_both(checkpoints: tuple[Path, Path], export_format: str, folder: Path) -> list[tuple[Any, dict[str, Any]]]:
    """Each checkpoint exported: (probabilities of three fixed inputs, sidecar)."""
    images = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(3))
    answers = []
    for name, checkpoint in zip(("new", "old"), checkpoints, strict=True):
        result = export_checkpoint(checkpoint, export_format, folder / name / f"model.{export_format}")
        if export_format == "onnx":
            session = ort.InferenceSession(str(result.model_file), providers=["CPUExecutionProvider"])
            probabilities = session.run(None, {"images": images.numpy()})[0]
        else:
            with torch.no_grad():
                probabilities = torch.jit.load(str(result.model_file))(images).numpy()
        answers.append((probabilities, json.loads(result.sidecar_file.read_text(encoding="utf-8"))))
    return answers


def test_export_gives_the_same_model(checkpoints: tuple[Path, Path], rule: CropRule, tmp_path: Path) -> None:
    (new, new_sidecar), (old, old_sidecar) = _export_both(checkpoints, "torchscript", tmp_path)
    np.testing.assert_array_equal(old, new)
    assert _without_file_fields(old_sidecar) == _without_file_fields(new_sidecar)
    assert old_sidecar["label_index"] == {str(i): label for i, label in enumerate(CLASS_NAMES)}
    loose = (old_sidecar["crop_strategy"], old_sidecar["crop_max_size"], old_sidecar["crop_lossless"])
    assert loose == (rule.strategy, rule.max_size, rule.lossless) and old_sidecar["tta"] == "hflip"
    assert old_sidecar["temperature"] == pytest.approx(1.7)
    # The Animl bundle's description (labels, preprocessing, crop rule, temperature, thresholds).
    fresh, legacy = (bundle_description(load_classifier(path, device="cpu")) for path in checkpoints)
    assert _without_file_fields(legacy) == _without_file_fields(fresh)
    assert legacy["crop_rule"] == rule.to_dict()


@pytest.mark.slow
def test_onnx_export_gives_the_same_model(checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    (new, new_sidecar), (old, old_sidecar) = _export_both(checkpoints, "onnx", tmp_path)
    np.testing.assert_array_equal(old, new)
    assert _without_file_fields(old_sidecar) == _without_file_fields(new_sidecar)


def test_training_reads_the_old_checkpoint(checkpoints: tuple[Path, Path], rule: CropRule) -> None:
    new, old = checkpoints
    assert read_checkpoint(old).crop_rule == read_checkpoint(new).crop_rule == rule
    restored = CropClassifier.from_checkpoint(old)
    assert restored.crop_rule == rule and restored.tta == "hflip"
    assert restored.temperature == pytest.approx(1.7)
    reference = CropClassifier.from_checkpoint(new).state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in restored.state_dict().items())
