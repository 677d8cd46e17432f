"""Train a crop classifier on a ``prepare.py`` output folder and report per-label precision/recall.

    python train.py model=effnet_b3 trainer.devices=1            # configs/train.yaml + overrides
    python train.py train=false ckpt_path=outputs/.../best.ckpt  # evaluate a checkpoint, write the same tables
    python train.py ckpt_path=outputs/.../checkpoints/last.ckpt  # resume an interrupted run

After fitting, the best checkpoint is evaluated with the test loop on the train crops (eval transform, no
augmentation), the val crops and the test crops; ``MetricTables`` writes ``metrics/*.csv`` from those runs and the
per-label table is printed at the end.

Precision: ``trainer.precision=auto`` (the default) becomes ``bf16-mixed`` when training on a CUDA GPU that supports
bf16 and ``32-true`` otherwise (see :func:`resolve_precision`); any Lightning value can be given instead.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from animl_lightning.calibration import TemperatureCalibration
from animl_lightning.classifier import CropClassifier
from animl_lightning.datamodule import CropDataModule
from animl_lightning.dataset_files import SPLIT_NAMES, DatasetError
from animl_lightning.metric_tables import MetricTables

log = logging.getLogger("train")

PREPARE_INFO_FILENAME = "prepare_info.json"
REPO_ROOT = Path(__file__).resolve().parent


def resolve_precision(precision: str | int, accelerator: str) -> str | int:
    """Turn ``precision: auto`` into ``bf16-mixed`` on a bf16-capable CUDA GPU, else ``32-true``.

    Other values pass through unchanged.
    """
    if str(precision) != "auto":
        return precision
    wants_gpu = str(accelerator) in {"auto", "gpu", "cuda"}
    if wants_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def read_crop_rule(data_dir: str | Path) -> tuple[str, int | None]:
    """The crop rule recorded by prepare.py (``prepare_info.json``: ``crops.strategy``, ``crops.max_size``).

    Returns ``("square", None)`` (prepare.py's default) when the file does not exist.
    """
    path = Path(data_dir) / PREPARE_INFO_FILENAME
    if not path.is_file():
        log.info("%s not found; recording crop rule 'square' (no max size) in the checkpoint", path)
        return "square", None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON: {err}") from err
    crops = info.get("crops") if isinstance(info, dict) else None
    if isinstance(crops, dict):
        strategy, max_size = crops.get("strategy", "square"), crops.get("max_size")
    elif isinstance(info, dict):
        strategy, max_size = info.get("crops.strategy", "square"), info.get("crops.max_size")
    else:
        raise DatasetError(f"{path}: expected a JSON object")
    if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int)):
        raise DatasetError(f"{path}: field 'crops.max_size' must be an integer or null, got {max_size!r}")
    return str(strategy), max_size


def instantiate_named(section: DictConfig | None, group: str) -> list[Any]:
    """Instantiate every entry of a named dict of configs (``callbacks``, ``logger``); null entries are skipped."""
    if not section:
        return []
    objects = []
    for key, entry in section.items():
        if entry is None:
            continue
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            name = str(key)
            raise ValueError(f"{group}.{name}: expected a config with a _target_, got {entry!r}")
        objects.append(instantiate(entry))
    return objects


def build_model(cfg: DictConfig, datamodule: CropDataModule) -> CropClassifier:
    """A new classifier from ``cfg.model`` sized by the dataset, or the one in ``ckpt_path`` when ``train=false``."""
    labels = datamodule.labels
    if cfg.train:
        strategy, max_size = read_crop_rule(cfg.data_dir)
        scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
        model: CropClassifier = instantiate(
            cfg.model,
            class_names=labels,
            optimizer=instantiate(cfg.optimizer),
            scheduler=scheduler,
            crop_strategy=strategy,
            crop_max_size=max_size,
            _convert_="all",
        )
    else:
        if not cfg.ckpt_path:
            raise ValueError("train=false needs ckpt_path=PATH of the checkpoint to evaluate")
        if not Path(cfg.ckpt_path).is_file():
            raise ValueError(f"ckpt_path: {cfg.ckpt_path} does not exist")
        model = CropClassifier.from_checkpoint(cfg.ckpt_path)
        if model.class_names != labels:
            raise ValueError(
                f"ckpt_path {cfg.ckpt_path} was trained on labels {model.class_names}, but {cfg.data_dir} has "
                f"{labels}; evaluate it on a dataset with the same label_index.json"
            )
    # The checkpoint records the preprocessing actually used (data.image_size may override the model default).
    model.data_config = datamodule.set_data_config(model.data_config)
    return model


def evaluate(
    trainer: Trainer,
    model: CropClassifier,
    datamodule: CropDataModule,
    ckpt_path: str | None,
    with_test: bool,
) -> dict[str, float]:
    """Run the test loop on the train (eval transform), val and test crops; return every logged metric.

    ``ckpt_path`` is loaded before the first split (``"best"`` = the checkpoint callback's best file); the others
    reuse those weights. Empty splits are skipped with a log line.
    """
    results: dict[str, float] = {}
    for split in SPLIT_NAMES:
        if split == "test" and not with_test:
            log.info("test=false: not evaluating the test split")
            continue
        if datamodule.split_size(split) == 0:
            log.info("the %s split has no crops; skipping its evaluation", split)
            continue
        model.test_split = datamodule.test_split = split
        try:
            outputs = trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True, verbose=False)
        finally:
            model.test_split = datamodule.test_split = "test"
        ckpt_path = None
        for output in outputs:
            results.update({k: float(v) for k, v in output.items()})
    return results


def print_tables(per_label: pd.DataFrame, overall: pd.DataFrame) -> None:
    """Print the per-label and overall tables to the terminal (rich tables)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()

    def show(frame: pd.DataFrame, title: str) -> None:
        table = Table(title=title)
        for column in frame.columns:
            table.add_column(str(column), justify="left" if frame[column].dtype == object else "right")
        for row in frame.itertuples(index=False):
            table.add_row(*(_format_cell(v) for v in row))
        console.print(table)

    show(overall, "overall")
    show(per_label, "per label (type_I_error = 1 - precision, type_II_error = 1 - recall)")


def _format_cell(value: object) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved run config as plain containers, for loggers (without Hydra's own ``hydra`` node)."""
    config: dict[str, Any] = {}
    for key in cfg:
        if key == "hydra":
            continue
        value = cfg[key]
        config[str(key)] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return config


def monitored_value(cfg: DictConfig, results: Mapping[str, float], trainer: Trainer) -> float | None:
    """The monitored metric for sweepers: its value on the evaluated best checkpoint, else the best seen."""
    if cfg.monitor in results:
        return float(results[cfg.monitor])
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.best_model_score is not None:
        return float(callback.best_model_score)
    value = trainer.callback_metrics.get(cfg.monitor)
    return float(value) if value is not None else None


def train(cfg: DictConfig) -> float | None:
    """Fit (unless ``train=false``), evaluate the best checkpoint on every split, return ``cfg.monitor``'s value.

    Call ``HydraConfig().set_config(cfg)`` first when ``cfg`` was composed outside ``@hydra.main``.
    """
    if not cfg.get("data_dir"):
        raise ValueError("data_dir must be set to a prepare.py output folder")
    seed_everything(cfg.seed, workers=True)

    datamodule: CropDataModule = instantiate(cfg.data)
    # Reading the labels validates the whole dataset (labels, splits, crop files) before anything is built.
    log.info("dataset %s: labels %s", cfg.data_dir, datamodule.labels)
    model = build_model(cfg, datamodule)
    callbacks = instantiate_named(cfg.get("callbacks"), "callbacks")
    if cfg.get("calibrate"):
        callbacks.append(TemperatureCalibration())
    loggers: list[Logger] = instantiate_named(cfg.get("logger"), "logger")
    precision = resolve_precision(cfg.trainer.get("precision", "auto"), cfg.trainer.get("accelerator", "auto"))
    log.info("precision: %s", precision)
    uses_wandb = any(isinstance(logger, WandbLogger) for logger in loggers)
    try:
        trainer: Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, precision=precision)
        for logger in loggers:
            logger.log_hyperparams(run_config(cfg))

        eval_ckpt: str | None = None
        if cfg.train:
            trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
            # With calibrate=true rank 0 rewrites best.ckpt in on_fit_end; no rank may load it before that is done.
            trainer.strategy.barrier("calibrated")
            checkpoint = trainer.checkpoint_callback
            if isinstance(checkpoint, ModelCheckpoint) and checkpoint.best_model_path:
                eval_ckpt = "best"
                log.info("evaluating the best checkpoint %s", checkpoint.best_model_path)
            else:
                log.warning("no best checkpoint was saved; evaluating the final weights")
        results = evaluate(trainer, model, datamodule, eval_ckpt, with_test=bool(cfg.test))

        tables = next((c for c in callbacks if isinstance(c, MetricTables)), None)
        if trainer.is_global_zero:
            if tables is not None:
                print_tables(tables.per_label, tables.overall)
                log.info("tables written to %s", tables.dirpath)
            else:
                log.info("results: %s", results)
        return monitored_value(cfg, results, trainer)
    finally:
        if uses_wandb:
            import wandb

            wandb.finish()


def _user_error(err: BaseException) -> str | None:
    """The message of a bad-input error raised by our code (shown without a traceback), else None."""
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        return _user_error(err.__cause__)
    if isinstance(err, DatasetError):
        return str(err)
    if isinstance(err, ValueError):
        traceback = err.__traceback__
        while traceback is not None and traceback.tb_next is not None:
            traceback = traceback.tb_next
        origin = Path(traceback.tb_frame.f_code.co_filename).resolve() if traceback is not None else None
        if origin is not None and (
            origin == Path(__file__).resolve() or REPO_ROOT / "animl_lightning" in origin.parents
        ):
            return str(err)
    return None


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point (see the module docstring)."""
    try:
        return train(cfg)
    except Exception as err:
        message = _user_error(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
