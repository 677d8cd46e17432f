"""The backbone configs people fine-tune now: each composes, builds with random weights, promises the preprocessing its
pretrained weights expect, and takes one real optimisation step."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning
import pytest
import torch
from hydra.utils import instantiate
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from animl_lightning.core.errors import ConfigError
from animl_lightning.train.classifier import CropClassifier, built_input_size
from animl_lightning.train.datamodule import resolve_input_size
from tests.fixtures.hydra import compose_train

LABELS = ["bird", "fox", "skunk"]


@dataclass(frozen=True)
class Promise:
    """What a model config's header comment says it gives, and the size its training step runs at."""

    model_name: str
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    # Convolutional networks take any size, so their step runs on small crops; the ViT takes only its own.
    step_size: int


PROMISES = {
    "effnetv2_s": Promise("tf_efficientnetv2_s", 300, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD, 1.0, 32),
    "convnextv2_nano": Promise("convnextv2_nano", 224, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, 0.875, 32),
    "vit_small_dinov2": Promise("vit_small_patch14_dinov2", 224, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, 1.0, 224),
    "effnet_lite0": Promise("tf_efficientnet_lite0", 224, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD, 0.875, 32),
}


def build(tmp_path: Path, config: str, *overrides: str) -> CropClassifier:
    """``model=<config>`` as train.py builds it (after the default recipe), with random weights and 3 labels."""
    cfg = compose_train(tmp_path / "data", tmp_path / "out", [f"model={config}", "model.pretrained=false", *overrides])
    classifier = instantiate(cfg.model, class_names=LABELS, optimizer=instantiate(cfg.optimizer), _convert_="all")
    assert isinstance(classifier, CropClassifier)
    return classifier


def head_of(classifier: CropClassifier) -> nn.Module:
    head: nn.Module = classifier.model.get_classifier()  # type: ignore[operator]  # timm models all have one
    return head


@pytest.mark.parametrize("config", sorted(PROMISES))
def test_backbone_promises_its_preprocessing(tmp_path: Path, config: str) -> None:
    promise = PROMISES[config]
    classifier = build(tmp_path, config)
    assert classifier.hparams["model_name"] == promise.model_name
    data_config = classifier.data_config
    assert data_config["input_size"] == [3, promise.input_size, promise.input_size]
    assert data_config["mean"] == pytest.approx(promise.mean)
    assert data_config["std"] == pytest.approx(promise.std)
    assert data_config["interpolation"] == "bicubic"
    assert data_config["crop_pct"] == pytest.approx(promise.crop_pct)
    # The network takes that size: convolutional ones any size, the ViT only the one it was built for.
    assert built_input_size(classifier.model) in (None, ((promise.input_size,) * 2, True))
    assert head_of(classifier).out_features == len(LABELS)


@pytest.mark.parametrize("config", sorted(PROMISES))
def test_backbone_takes_one_optimisation_step(tmp_path: Path, config: str) -> None:
    size = PROMISES[config].step_size
    classifier = build(tmp_path, config)
    # What train.py does with data.image_size; the ViT keeps its configured size, so this is a no-op for it.
    classifier.data_config = resolve_input_size(classifier.data_config, size)
    generator = torch.Generator().manual_seed(0)
    # Two crops: the smallest batch BatchNorm trains on (the convolutional networks end at 1x1 on 32 px crops).
    images = torch.randn(2, 3, size, size, generator=generator)
    labels = torch.tensor([0, 2])
    loader = DataLoader(TensorDataset(images, labels, torch.arange(2)), batch_size=2)
    before = {name: p.detach().clone() for name, p in classifier.model.named_parameters()}
    trainer = lightning.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(classifier, train_dataloaders=loader)
    assert trainer.global_step == 1
    assert torch.isfinite(trainer.callback_metrics["train/batch_loss"])
    params = dict(classifier.model.named_parameters())
    reached = {name for name, p in params.items() if p.grad is not None}
    # The loss reaches every parameter (DINOv2's mask_token serves only its pretraining) ...
    assert set(params) - reached <= {"mask_token"}
    # ... and the step moved every one with a gradient, from the first convolution to the new head. (Some get an
    # exactly zero gradient: a BatchNorm bias followed by a convolution and another BatchNorm shifts nothing.)
    learning = [name for name in reached if bool(params[name].grad.count_nonzero())]  # type: ignore[union-attr]
    assert [name for name in learning if torch.equal(params[name], before[name])] == []
    stem = next(name for name, p in params.items() if p.ndim == 4)
    head = {name for name, p in params.items() if any(p is q for q in head_of(classifier).parameters())}
    assert stem in learning and head and head <= set(learning)


def test_vit_refuses_another_input_size_before_training(tmp_path: Path) -> None:
    classifier = build(tmp_path, "vit_small_dinov2")
    with pytest.raises(ConfigError, match=r"model.model_kwargs.img_size=448 together with data.image_size"):
        classifier.data_config = resolve_input_size(classifier.data_config, 448)
    # Both set together build the network for that size, and the data config follows it.
    resized = build(tmp_path, "vit_small_dinov2", "model.model_kwargs.img_size=448")
    assert resized.data_config["input_size"] == [3, 448, 448]
    resized.data_config = resolve_input_size(resized.data_config, 448)
