"""``train.py``, ``animl-train`` and ``python -m animl_lightning.train_command``: train a crop classifier on a
``prepare.py`` output folder and report per-label precision/recall.

    python train.py model=effnet_b3 trainer.devices=1            # configs/train.yaml + overrides
    python train.py train=false ckpt_path=outputs/.../best.ckpt  # evaluate a checkpoint, write the same tables
    python train.py ckpt_path=outputs/.../checkpoints/last.ckpt  # resume an interrupted run
    python train.py -m optimizer.lr=1e-4,3e-5                    # a sweep: one job and one folder per value

The Hydra edge only: compose the config, instantiate the data module, classifier, callbacks, loggers and trainer,
and hand them to :func:`animl_lightning.train.run.fit_and_evaluate`. Errors become one line
(:func:`animl_lightning.cli.run_command`). Relative paths (``data_dir``, the run folder under ``outputs/``) are
relative to the current folder, wherever the package is installed.
"""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning import Trainer, seed_everything
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from animl_lightning.cli import (
    apply_wandb_run_identity,
    checked_partial,
    command_name,
    ddp_children_rerun_this_job,
    hydra_config,
    instantiate_named,
    overridden,
    refuse_base_model,
    refuse_unknown_keys,
    run_command,
    run_config,
    save_job_config,
)
from animl_lightning.core.contract import read_crop_rule
from animl_lightning.core.errors import require
from animl_lightning.core.files import run_lock
from animl_lightning.hydra_entry import command_main
from animl_lightning.train.calibration import TemperatureCalibration
from animl_lightning.train.checkpointing import AtomicCheckpointIO, read_checkpoint
from animl_lightning.train.classifier import CropClassifier
from animl_lightning.train.datamodule import CropDataModule
from animl_lightning.train.run import (
    RUN_KEYS,
    callbacks_for_loggers,
    check_checkpoint_fits,
    check_monitor,
    checkpoint_data_dir,
    fit_and_evaluate,
    model_to_evaluate,
    resolve_precision,
    resolve_strategy,
    resolve_sync_batchnorm,
    resume_hint,
    run_settings,
)
from animl_lightning.train.sweeps import process_rank

log = logging.getLogger("train")


def build_model(cfg: DictConfig, datamodule: CropDataModule) -> CropClassifier:
    """A new classifier sized by the dataset (checked against ``ckpt_path`` when resuming), or the checkpoint's."""
    labels, crop_rule = datamodule.labels, read_crop_rule(cfg.data_dir)
    if not cfg.train:
        evaluated = model_to_evaluate(cfg.ckpt_path, labels, crop_rule, str(cfg.data_dir))
        if overridden("eval.tta"):
            evaluated.tta = str(cfg.eval.tta)
        return evaluated
    if cfg.ckpt_path:
        check_checkpoint_fits(read_checkpoint(cfg.ckpt_path), labels, crop_rule, str(cfg.data_dir))
    # Tried once on a stand-in parameter, so that a value the optimizer or scheduler refuses is named now.
    stand_in = [torch.nn.Parameter(torch.zeros(1))]
    optimizer = checked_partial(instantiate(cfg.optimizer), "optimizer", "params", stand_in)
    scheduler = None
    if cfg.scheduler:
        stand_in_optimizer = torch.optim.SGD(stand_in, lr=0.1)
        scheduler = checked_partial(instantiate(cfg.scheduler), "scheduler", "optimizer", stand_in_optimizer)
    model: CropClassifier = instantiate(
        cfg.model,
        class_names=labels,
        optimizer=optimizer,
        scheduler=scheduler,
        crop_rule=crop_rule.to_dict(),
        tta=str(cfg.eval.get("tta", "none")),
        _convert_="all",
    )
    # Where it was trained, so that `train=false ckpt_path=...` finds the dataset by itself.
    model.hparams["data_dir"] = str(Path(cfg.data_dir).resolve())
    return model


def train(cfg: DictConfig) -> float | None:
    """Fit (unless ``train=false``), evaluate the best checkpoint on every split, return ``cfg.monitor``'s value.

    Call ``HydraConfig().set_config(cfg)`` first when ``cfg`` was composed outside ``@hydra.main``.
    """
    refuse_unknown_keys(cfg)
    output_dir = str(cfg.paths.output_dir)
    hydra_cfg = hydra_config()
    refuse_base_model(hydra_cfg)
    with ExitStack() as stack:
        if process_rank(os.environ) == 0 and os.environ.get("LOCAL_RANK", "0") == "0":
            # One process writes a run folder, and writes nothing there before it holds it: a second train.py on a
            # running run's folder is refused before it touches that run's .hydra/ (DDP ranks are not refused).
            stack.enter_context(run_lock(output_dir, command_name("train.py")))
            save_job_config(cfg, hydra_cfg, output_dir)
        return _train_in(stack, cfg, hydra_cfg, output_dir)


def _train_in(stack: ExitStack, cfg: DictConfig, hydra_cfg: DictConfig | None, output_dir: str) -> float | None:
    """The work of :func:`train` once the run folder is this process's; ``stack`` closes what the run opens."""
    if not cfg.train and cfg.ckpt_path and not overridden("data_dir"):
        cfg.data_dir = checkpoint_data_dir(cfg.ckpt_path) or cfg.data_dir
    require(bool(cfg.get("data_dir")), "data_dir", "must be set to a prepare.py output folder")
    seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule: CropDataModule = instantiate(cfg.data)
    model = build_model(cfg, datamodule)
    check_monitor(str(cfg.monitor), model)
    # The checkpoint records the preprocessing actually used (data.image_size may override the model default).
    model.data_config = datamodule.set_data_config(model.data_config)

    callbacks = instantiate_named(cfg.get("callbacks"), "callbacks")
    if cfg.get("calibrate"):
        callbacks.append(TemperatureCalibration())
    apply_wandb_run_identity(cfg, hydra_cfg)
    loggers: list[Logger] = instantiate_named(cfg.get("logger"), "logger")
    callbacks = callbacks_for_loggers(callbacks, loggers)
    accelerator = cfg.trainer.get("accelerator", "auto")
    trainer_args: dict[str, Any] = {
        "callbacks": callbacks,
        "logger": loggers or False,
        "precision": resolve_precision(cfg.trainer.get("precision", "auto"), accelerator),
        "plugins": [AtomicCheckpointIO()],
    }
    if "strategy" in cfg.trainer:
        trainer_args["strategy"] = resolve_strategy(cfg.trainer.strategy, int(model.hparams["finetune_epochs"]))
    if "sync_batchnorm" in cfg.trainer:
        trainer_args["sync_batchnorm"] = resolve_sync_batchnorm(bool(cfg.trainer.sync_batchnorm), accelerator)
    trainer: Trainer = instantiate(cfg.trainer, **trainer_args)
    keys = [key for key in RUN_KEYS if key in cfg]
    settings = run_settings(OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True), output_dir)
    stack.enter_context(ddp_children_rerun_this_job(hydra_cfg, output_dir))
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        # One wandb run per job: a run left open would swallow the next job of a sweep.
        stack.callback(wandb.finish)
    for logger in loggers:
        logger.log_hyperparams(run_config(cfg))
    return fit_and_evaluate(trainer, model, datamodule, settings)


@command_main("train", "train.py")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point (see the module docstring)."""
    output_dir = str(cfg.paths.output_dir)
    return run_command(lambda: train(cfg), "train.py", output_dir, lambda: resume_hint(output_dir))


if __name__ == "__main__":
    main()
