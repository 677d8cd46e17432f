"""The model file: what training writes, a standalone file that round-trips, and one clear error per bad field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from animl_lightning import __version__
from animl_lightning.core.crop_rule import CropRule
from animl_lightning.core.label_index import LabelIndex
from animl_lightning.core.model_file import MODEL_KEY, CheckpointError, DeployableModel, FlipAveraged
from animl_lightning.deploy.inference import load_classifier
from animl_lightning.train.checkpointing import read_checkpoint
from tests.fixtures.hydra import REPO_ROOT
from tests.fixtures.models import CLASS_NAMES, IMAGE_SIZE, write_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("model_file")
    return write_checkpoint(root / "best.ckpt", crop_rule=CropRule("exact", 128), data_dir=root / "data")


def _rewritten(source: Path, target: Path, change: Any) -> Path:
    raw = torch.load(source, weights_only=True)
    change(raw)
    torch.save(raw, target)
    return target


def test_training_writes_the_model_record(checkpoint: Path) -> None:
    raw = torch.load(checkpoint, weights_only=True)
    record = raw[MODEL_KEY]
    assert record["format"] == 1 and record["model_name"] == "test_efficientnet"
    assert record["labels"] == {str(i): label for i, label in enumerate(CLASS_NAMES)}
    assert record["crop_rule"] == {"strategy": "exact", "max_size": 128, "lossless": False}
    assert record["preprocessing"] == raw["hyper_parameters"]["data_config"]
    assert record["preprocessing"]["input_size"] == [3, IMAGE_SIZE, IMAGE_SIZE]
    assert record["provenance"] == {
        "data_dir": str((checkpoint.parent / "data").resolve()),
        "animl_lightning_version": __version__,
    }
    # Lightning's checkpoint is a superset: the weights are its own state_dict's, not a second copy.
    assert all(key.startswith("model.") for key in raw["state_dict"])


def test_a_model_file_round_trips_without_training_state(checkpoint: Path, tmp_path: Path) -> None:
    model = DeployableModel.read(checkpoint)
    target = tmp_path / "model.pt"
    model.save(target)
    raw = torch.load(target, weights_only=True)
    assert set(raw) == {MODEL_KEY, "state_dict"}  # no optimizer, loops or hyper-parameters
    assert target.stat().st_size < checkpoint.stat().st_size
    again = DeployableModel.read(target)
    assert (again.labels, again.crop_rule, again.model_name, again.tta) == (
        LabelIndex.of(CLASS_NAMES),
        CropRule("exact", 128),
        "test_efficientnet",
        "none",
    )
    assert dict(again.preprocessing) == dict(model.preprocessing) and again.data_dir == model.data_dir
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    expected = load_classifier(checkpoint, device="cpu").probabilities(images)
    torch.testing.assert_close(load_classifier(target, device="cpu").probabilities(images), expected)
    # Deployable, but not a training checkpoint: resuming or evaluating it needs the CropClassifier's settings.
    with pytest.raises(CheckpointError, match=r"not written by train\.py"):
        read_checkpoint(target)


def test_the_network_has_the_tta_built_in(checkpoint: Path) -> None:
    model = DeployableModel.read(checkpoint)
    plain = model.network()
    assert not plain.training and not isinstance(plain, FlipAveraged)
    flipped = DeployableModel(**{**model.__dict__, "tta": "hflip"}).network()
    assert isinstance(flipped, FlipAveraged)
    images = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = (plain(images) + plain(torch.flip(images, dims=[-1]))) / 2
        torch.testing.assert_close(flipped(images), expected)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda raw: raw[MODEL_KEY].update(format=2), r"animl_model\.format' must be 1"),
        (lambda raw: raw[MODEL_KEY].pop("labels"), r"animl_model' lacks \['labels'\]"),
        (lambda raw: raw[MODEL_KEY].update(labels={"0": "a", "2": "b"}), r"animl_model\.labels': keys must be 0\.\.1"),
        (lambda raw: raw[MODEL_KEY].update(labels={"0": "a", "1": "a"}), r"labels appear more than once: \['a'\]"),
        (lambda raw: raw[MODEL_KEY].update(labels={"0": "a"}), "2 or more labels"),
        (
            lambda raw: raw[MODEL_KEY]["crop_rule"].update(strategy="circle"),
            r"animl_model\.crop_rule'.*crops\.strategy",
        ),
        (lambda raw: raw[MODEL_KEY].update(tta="vflip"), "tta: must be one of"),
        (
            lambda raw: raw[MODEL_KEY].update(preprocessing={"input_size": [3, 64, 64]}),
            "preprocessing: .* is incomplete",
        ),
        (lambda raw: raw.update(calibration={"temperature": 0.0}), r"calibration\.temperature must be > 0"),
        (lambda raw: raw.pop("state_dict"), "field 'state_dict' is missing"),
    ],
)
def test_a_bad_model_record_is_one_clear_error(checkpoint: Path, tmp_path: Path, change: Any, match: str) -> None:
    path = _rewritten(checkpoint, tmp_path / "bad.ckpt", change)
    with pytest.raises(CheckpointError, match=match) as caught:
        load_classifier(path, device="cpu")
    assert str(path) in str(caught.value)


def test_weights_of_another_architecture_are_named(checkpoint: Path, tmp_path: Path) -> None:
    path = _rewritten(checkpoint, tmp_path / "other.ckpt", lambda raw: raw[MODEL_KEY].update(model_name="resnet10t"))
    with pytest.raises(CheckpointError, match=r"other\.ckpt: its weights do not fit resnet10t with 4 labels"):
        load_classifier(path, device="cpu")


def test_deployment_imports_neither_lightning_nor_train() -> None:
    code = (
        "import sys\n"
        "import animl_lightning.deploy.classify, animl_lightning.deploy.export, animl_lightning.deploy.animl_bundle\n"
        "import animl_lightning.deploy.quantize, animl_lightning.deploy.server, animl_lightning.core.model_file\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in {'lightning', 'pytorch_lightning', "
        "'torchmetrics'} or m.startswith('animl_lightning.train'))\n"
        "print(loaded)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
