"""Every option of every train.py config group composes and instantiates (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import lightning
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig

from animl_lightning.cli import instantiate_named
from animl_lightning.train.classifier import CropClassifier
from animl_lightning.train.datamodule import CropDataModule
from animl_lightning.train.run import resolve_precision
from animl_lightning.train.tables import MetricTables
from tests.fixtures.hydra import CONFIG_DIR, compose_train

LABELS = ["bird", "fox", "skunk"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def compose(tmp_path: Path, *overrides: str) -> DictConfig:
    cfg: DictConfig = compose_train(tmp_path / "data", tmp_path / "out", overrides)
    return cfg


def test_every_group_has_the_documented_options() -> None:
    assert options("model") == [
        "base",
        "convnext_tiny",
        "convnextv2_nano",
        "effnet_b0",
        "effnet_b3",
        "effnet_lite0",
        "effnetv2_s",
        "resnet50",
        "tiny",
        "vit_small_dinov2",
    ]
    assert options("debug") == ["default", "fast", "fdr", "limit", "overfit", "profiler"]
    assert options("optimizer") == ["adamw", "rmsprop"]
    assert options("scheduler") == ["cosine", "none", "step_decay", "warmup_cosine"]
    assert options("recipe") == ["modern", "seed", "transfer"]
    assert options("trainer") == ["cpu", "ddp", "default", "gpu"]
    assert options("logger") == ["csv", "none", "tensorboard", "wandb"]
    assert set(options("experiment")) >= {"animl_b3"}


def test_defaults_and_the_readme_command_compose(tmp_path: Path) -> None:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from animl_lightning.config_schemas import register_schemas

    register_schemas("train")  # what train.py does before Hydra composes
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = hydra_compose("train", overrides=["model=effnet_b3", "trainer.devices=1"])
    assert cfg.model.model_name == "efficientnet_b3" and cfg.model.pretrained is True
    assert cfg.data_dir == "data/demo" and cfg.seed == 42
    assert cfg.monitor == "val/balanced_accuracy" and cfg.monitor_mode == "max"
    assert (cfg.train, cfg.test, cfg.ckpt_path, cfg.calibrate) == (True, True, None, False)
    assert cfg.optimizer._target_ == "torch.optim.AdamW"
    assert cfg.scheduler._target_.endswith("CosineAnnealingLR")
    assert list(cfg.logger) == ["csv"]
    assert cfg.callbacks.model_checkpoint.filename == "best" and not cfg.callbacks.model_checkpoint.save_last
    assert cfg.callbacks.last_checkpoint.filename == "last"
    callbacks = list(cfg.callbacks)
    # trainer.checkpoint_callback is the first ModelCheckpoint: it must be the one that keeps the best
    assert callbacks.index("model_checkpoint") < callbacks.index("last_checkpoint")


@pytest.mark.parametrize("model", [m for m in options("model") if m != "base"])
def test_model_options_instantiate(tmp_path: Path, model: str) -> None:
    cfg = compose(tmp_path, f"model={model}", "model.pretrained=false")
    classifier = instantiate(cfg.model, class_names=LABELS, optimizer=instantiate(cfg.optimizer), _convert_="all")
    assert isinstance(classifier, CropClassifier)
    assert classifier.model.get_classifier().out_features == 3
    assert classifier.data_config["input_size"][0] == 3


@pytest.mark.parametrize("optimizer", options("optimizer"))
@pytest.mark.parametrize("scheduler", options("scheduler"))
def test_optimizer_and_scheduler_options(tmp_path: Path, optimizer: str, scheduler: str) -> None:
    cfg = compose(
        tmp_path, f"optimizer={optimizer}", f"scheduler={scheduler}", "optimizer.lr=0.01", "trainer.max_epochs=5"
    )
    model = instantiate(
        cfg.model,
        class_names=LABELS,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.scheduler else None,
        _convert_="all",
    )
    configured = model.configure_optimizers()
    opt = configured["optimizer"] if isinstance(configured, dict) else configured
    # warmup_cosine starts the first epoch at warmup_start_factor x lr
    first = 0.01 * (cfg.scheduler.warmup_start_factor if scheduler == "warmup_cosine" else 1.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(first)
    if scheduler == "none":
        assert isinstance(configured, torch.optim.Optimizer)
    else:
        assert configured["lr_scheduler"]["interval"] == "epoch"
    if scheduler == "step_decay":
        sched = configured["lr_scheduler"]["scheduler"]
        for _ in range(12):
            opt.step()
            sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.97**5)  # x0.97 per 2.4 epochs
    if scheduler == "warmup_cosine":
        sched = configured["lr_scheduler"]["scheduler"]
        rates = []
        for _ in range(cfg.trainer.max_epochs):
            rates.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        # up to the full rate after the warmup epochs, then down along the cosine
        assert rates[cfg.scheduler.warmup_epochs] == pytest.approx(0.01)
        assert rates[-1] < rates[cfg.scheduler.warmup_epochs] and rates[0] < rates[cfg.scheduler.warmup_epochs]


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainer_options_instantiate(tmp_path: Path, trainer: str) -> None:
    cfg = compose(tmp_path, f"trainer={trainer}")
    if trainer == "gpu" and not torch.cuda.is_available():
        assert cfg.trainer.accelerator == "gpu"
        return
    if trainer == "ddp":
        assert (cfg.trainer.strategy, cfg.trainer.devices, cfg.trainer.num_nodes) == ("ddp", 2, 1)
        assert cfg.trainer.sync_batchnorm is True
    precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    instance = instantiate(cfg.trainer, precision=precision, logger=False)
    assert isinstance(instance, lightning.Trainer)


@pytest.mark.parametrize("logger", options("logger"))
def test_logger_options_instantiate(tmp_path: Path, logger: str) -> None:
    cfg = compose(tmp_path, f"logger={logger}")
    loggers = instantiate_named(cfg.get("logger"), "logger")
    assert len(loggers) == (0 if logger == "none" else 1)
    for instance in loggers:
        assert str(tmp_path / "out") in str(instance.save_dir)


def test_callbacks_and_data_instantiate(tmp_path: Path) -> None:
    cfg = compose(tmp_path, "callbacks.early_stopping.patience=3")
    callbacks = instantiate_named(cfg.callbacks, "callbacks")
    kinds = {type(c).__name__ for c in callbacks}
    assert {"BestCheckpoint", "LastCheckpoint", "EarlyStopping", "LearningRateMonitor", "MetricTables"} <= kinds
    checkpoint = next(c for c in callbacks if isinstance(c, ModelCheckpoint))
    assert checkpoint.monitor == "val/balanced_accuracy" and checkpoint.dirpath == str(tmp_path / "out" / "checkpoints")
    assert next(c for c in callbacks if isinstance(c, EarlyStopping)).patience == 3
    assert next(c for c in callbacks if isinstance(c, MetricTables)).dirpath == tmp_path / "out" / "metrics"
    datamodule = instantiate(cfg.data)
    assert isinstance(datamodule, CropDataModule) and datamodule.image_size == 64


def test_experiment_reproduces_the_seed_settings() -> None:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = hydra_compose("train", overrides=["experiment=animl_b3"])
    assert cfg.model.model_name == "efficientnet_b3" and cfg.model.pretrained is True
    assert cfg.data.label_weighted is True and cfg.data.batch_size == 80 and cfg.data.num_workers == 4
    assert cfg.trainer.max_epochs == 50
    assert cfg.optimizer.lr == pytest.approx(3e-5) and cfg.optimizer.weight_decay == pytest.approx(1e-6)
    assert cfg.optimizer._target_ == "torch.optim.RMSprop" and cfg.optimizer.momentum == 0.9
    assert cfg.scheduler._target_.endswith("StepLR")


def test_debug_fast_is_a_tiny_cpu_run(tmp_path: Path) -> None:
    cfg = compose(tmp_path, "debug=fast")
    assert cfg.model.model_name == "test_efficientnet" and cfg.trainer.accelerator == "cpu"
    assert cfg.data.num_workers == 0 and cfg.trainer.max_epochs == 2


def test_demo_experiment_is_a_small_cpu_friendly_run() -> None:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = hydra_compose("train", overrides=["experiment=demo"])
    assert cfg.model.model_name == "test_efficientnet" and cfg.model.pretrained is False
    assert cfg.data_dir == "data/demo" and cfg.data.image_size == 96 and cfg.trainer.max_epochs == 15
