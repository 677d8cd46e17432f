"""CropClassifier: weights files, a training step, hyperparameters and checkpoints."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning
import pytest
import timm
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from animl_lightning.core.crop_rule import CropRule
from animl_lightning.train.classifier import CropClassifier
from animl_lightning.train.pretrained import PretrainedFileError

LABELS = ["bird", "fox", "skunk"]


def make_model(**kwargs: object) -> CropClassifier:
    settings: dict[str, object] = {
        "model_name": "test_efficientnet",
        "class_names": LABELS,
        "optimizer": functools.partial(torch.optim.AdamW, lr=1e-3),
        **kwargs,
    }
    return CropClassifier(**settings)  # type: ignore[arg-type]


def fake_loader(n: int = 12, size: int = 32, batch_size: int = 4) -> DataLoader[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, size, size, generator=generator)
    labels = torch.arange(n) % len(LABELS)
    return DataLoader(TensorDataset(images, labels, torch.arange(n)), batch_size=batch_size)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_file_loads_backbone_and_replaces_head(tmp_path: Path, suffix: str) -> None:
    source = timm.create_model("test_efficientnet", num_classes=7)
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    model = make_model(pretrained=True, pretrained_file=str(path))  # the file wins: no hub download
    loaded = model.model.state_dict()
    assert torch.equal(loaded["conv_stem.weight"], state["conv_stem.weight"])
    assert torch.equal(loaded["bn1.running_mean"], state["bn1.running_mean"])
    assert loaded["classifier.weight"].shape == (3, state["classifier.weight"].shape[1])


def test_pretrained_file_from_a_lightning_checkpoint_keeps_same_shape_head(tmp_path: Path) -> None:
    trained = make_model()
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": trained.state_dict(), "epoch": 3}, path)
    model = make_model(pretrained_file=str(path))
    for key, value in trained.model.state_dict().items():
        assert torch.equal(model.model.state_dict()[key], value), key


def test_pretrained_file_for_another_architecture_names_file_and_keys(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), path)
    with pytest.raises(PretrainedFileError, match=r"resnet\.pth does not fit") as info:
        make_model(pretrained_file=str(path))
    message = str(info.value)
    assert "missing from the file" in message and "conv_stem.weight" in message
    assert "unexpected keys" in message


def test_pretrained_file_shape_mismatch_and_bad_files(tmp_path: Path) -> None:
    state = timm.create_model("test_efficientnet", num_classes=3).state_dict()
    state["conv_stem.weight"] = torch.zeros(4, 3, 3, 3)
    torch.save(state, tmp_path / "shapes.pth")
    with pytest.raises(PretrainedFileError, match=r"shape mismatches, e\.g\. \['conv_stem\.weight"):
        make_model(pretrained_file=str(tmp_path / "shapes.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(PretrainedFileError, match=r"junk\.pth: cannot read weights"):
        make_model(pretrained_file=str(tmp_path / "junk.pth"))
    with pytest.raises(PretrainedFileError, match="not found"):
        make_model(pretrained_file=str(tmp_path / "absent.pth"))


def test_training_step_returns_a_loss_that_trains_the_head() -> None:
    model = make_model()
    images, labels, index = next(iter(fake_loader()))
    loss = model.training_step((images, labels, index), 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.model.get_classifier().weight.grad is not None
    probs = model.predict_step(images, 0)
    assert probs.shape == (4, 3)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(4))


def test_hparams_hold_plain_class_names_and_data_config() -> None:
    from omegaconf import ListConfig

    model = make_model(class_names=ListConfig(LABELS), crop_rule={"strategy": "pad", "max_size": 256})
    hparams = model.hparams
    assert hparams["class_names"] == LABELS and type(hparams["class_names"]) is list
    assert hparams["model_name"] == "test_efficientnet"
    assert hparams["crop_rule"] == {
        "strategy": "pad",
        "max_size": 256,
        "lossless": False,
    } and model.crop_rule == CropRule("pad", 256)
    assert hparams["data_config"]["input_size"] == [3, 160, 160]  # timm's cfg for test_efficientnet
    assert set(hparams["data_config"]) >= {"input_size", "mean", "std", "interpolation", "crop_pct"}
    assert "optimizer" not in hparams and "scheduler" not in hparams
    model.data_config = {**model.data_config, "input_size": [3, 64, 64]}
    assert model.hparams["data_config"]["input_size"] == [3, 64, 64]


def test_checkpoint_loads_with_weights_only(tmp_path: Path) -> None:
    model = make_model(scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5))
    model.data_config = {**model.data_config, "input_size": [3, 32, 32]}
    trainer = lightning.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, train_dataloaders=fake_loader(), val_dataloaders=fake_loader())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    raw = torch.load(path, weights_only=True)
    assert raw["hyper_parameters"]["class_names"] == LABELS
    assert raw["hyper_parameters"]["data_config"]["input_size"] == [3, 32, 32]
    restored = CropClassifier.from_checkpoint(path)
    assert restored.class_names == LABELS and not restored.training
    assert restored.data_config["input_size"] == [3, 32, 32]
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    assert "val/balanced_accuracy" in trainer.callback_metrics
    assert "val/top3" in trainer.callback_metrics


class _RecordTrainable(Callback):
    def __init__(self) -> None:
        self.trainable: list[int] = []
        self.backbone_bn_training: list[bool] = []

    def on_train_batch_start(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, batch: object, idx: int
    ) -> None:
        assert isinstance(pl_module, CropClassifier)
        self.trainable.append(sum(p.requires_grad for p in pl_module.model.parameters()))
        self.backbone_bn_training.append(pl_module.model.bn1.training)


def test_finetune_epochs_train_only_the_head_first(tmp_path: Path) -> None:
    model = make_model(finetune_epochs=1)
    stem_before = model.model.conv_stem.weight.detach().clone()
    record = _RecordTrainable()
    trainer = lightning.Trainer(
        max_epochs=2,
        limit_train_batches=1,
        limit_val_batches=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
        default_root_dir=tmp_path,
    )
    head_params = sum(1 for _ in model.model.get_classifier().parameters())
    all_params = sum(1 for _ in model.model.parameters())
    trainer.fit(model, train_dataloaders=fake_loader())
    assert record.trainable == [head_params, all_params]
    assert record.backbone_bn_training == [False, True]
    assert not torch.equal(model.model.conv_stem.weight, stem_before)  # trained in epoch 2


def test_configure_optimizers_without_optimizer_raises() -> None:
    with pytest.raises(ValueError, match="optimizer"):
        make_model(optimizer=None).configure_optimizers()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"class_names": ["only"]}, "at least 2"),
        ({"class_names": ["a", "a"]}, "duplicates"),
        ({"drop_rate": 1.5}, "model.drop_rate"),
        ({"label_smoothing": -0.1}, "model.label_smoothing"),
        ({"finetune_epochs": -1}, "model.finetune_epochs"),
        ({"crop_rule": {"strategy": "circle"}}, "crop_rule.*crops.strategy"),
        ({"model_name": "no_such_model_xyz"}, "model.model_name"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_model(**kwargs)


def test_pretrained_download_failure_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from animl_lightning.train.pretrained import PretrainedWeightsError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    with pytest.raises(PretrainedWeightsError, match=r"model\.pretrained_file=PATH"):
        make_model(model_name="efficientnet_b0", pretrained=True)
