"""Train a crop classifier on a ``prepare.py`` output folder and report per-label precision/recall.

    python train.py model=effnet_b3 trainer.devices=1            # configs/train.yaml + overrides
    python train.py train=false ckpt_path=outputs/.../best.ckpt  # evaluate a checkpoint, write the same tables
    python train.py ckpt_path=outputs/.../checkpoints/last.ckpt  # resume an interrupted run

After fitting, the best checkpoint is evaluated with the test loop on the train crops (eval transform, no
augmentation), the val crops and the test crops; ``MetricTables`` writes ``metrics/*.csv`` from those runs and the
per-label table is printed at the end.

Sweeps: ``python train.py -m optimizer.lr=1e-4,3e-5`` or ``hparams_search=optuna`` run one job per folder of the
sweep; each job writes ``results.json`` (the monitored metric on the best checkpoint, which ``train`` returns, and
every evaluated metric) and ``hydra_callbacks.SweepSummary`` collects them into ``<sweep dir>/sweep_summary.csv``.
With ``logger=wandb`` each job is one wandb run, grouped by sweep and named by its overrides
(:func:`wandb_run_identity`). DDP (``trainer=ddp trainer.devices=N``) also works inside a sweep job
(:func:`ddp_children_rerun_this_job`).

Precision: ``trainer.precision=auto`` (the default) becomes ``bf16-mixed`` when training on a CUDA GPU that supports
bf16 and ``32-true`` otherwise (see :func:`resolve_precision`); any Lightning value can be given instead.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, cast

import hydra
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf, read_write

from animl_lightning.calibration import TemperatureCalibration
from animl_lightning.classifier import CropClassifier
from animl_lightning.datamodule import CropDataModule
from animl_lightning.dataset_files import SPLIT_NAMES, DatasetError
from animl_lightning.metric_tables import MetricTables
from animl_lightning.sweep_summary import write_run_results

log = logging.getLogger("train")

PREPARE_INFO_FILENAME = "prepare_info.json"
REPO_ROOT = Path(__file__).resolve().parent
# Set by Lightning's DDP launcher in the launching process (see ddp_children_rerun_this_job).
DDP_ENV_VARIABLES: tuple[str, ...] = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


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


def resolve_sync_batchnorm(sync_batchnorm: bool, accelerator: str) -> bool:
    """Keep ``trainer.sync_batchnorm`` only where it works: PyTorch's SyncBatchNorm needs CUDA devices."""
    if not sync_batchnorm:
        return False
    on_gpu = str(accelerator) in {"gpu", "cuda"} or (str(accelerator) == "auto" and torch.cuda.is_available())
    if not on_gpu:
        log.info("trainer.sync_batchnorm ignored: SyncBatchNorm needs CUDA devices (accelerator=%s)", accelerator)
    return on_gpu


def wandb_run_identity(hydra_cfg: DictConfig | None) -> tuple[str | None, str | None]:
    """The wandb ``(group, name)`` of a run: a sweep's jobs share the sweep folder as group, named by overrides.

    ``name`` is ``hydra.job.override_dirname`` (the job's overrides, without the keys excluded in
    ``configs/hydra/default.yaml``), falling back to ``job<N>`` in a sweep and to None (wandb's generated name)
    for a single run without overrides; a single run has no group.
    """
    if hydra_cfg is None:
        return None, None
    name = str(hydra_cfg.job.get("override_dirname") or "") or None
    if hydra_cfg.get("mode") != RunMode.MULTIRUN:
        return None, name
    # wandb limits group names to 128 characters; the end of the path (task, date, time) is what tells sweeps apart.
    group = str(hydra_cfg.sweep.dir)[-128:]
    return group, name or f"job{hydra_cfg.job.num}"


def apply_wandb_run_identity(cfg: DictConfig, hydra_cfg: DictConfig | None) -> None:
    """Fill in ``group``/``name`` of WandbLogger configs where they are null (see :func:`wandb_run_identity`)."""
    group, name = wandb_run_identity(hydra_cfg)
    for entry in (cfg.get("logger") or {}).values():
        if isinstance(entry, DictConfig) and str(entry.get("_target_", "")).endswith("WandbLogger"):
            if entry.get("group") is None and group is not None:
                entry.group = group
            if entry.get("name") is None and name is not None:
                entry.name = name


def single_run_argv(argv0: str, task_overrides: Sequence[str]) -> list[str]:
    """The command line that reruns one sweep job on its own (what Lightning gives its DDP child processes).

    Lightning starts DDP ranks 1..N-1 by re-running ``sys.argv`` with ``hydra.run.dir`` appended. In a sweep job
    ``sys.argv`` is the whole sweep (``-m``, comma lists, ``hparams_search=optuna``), so each child would start a
    sweep of its own; this job's own overrides with ``hydra.mode=RUN`` run exactly this job.
    """
    return [argv0, *task_overrides, "hydra.mode=RUN"]


@contextmanager
def ddp_children_rerun_this_job(hydra_cfg: DictConfig | None, output_dir: str) -> Iterator[None]:
    """In a sweep job, make Lightning's DDP children rerun this job into its folder (not the whole sweep).

    Sets ``sys.argv`` (see :func:`single_run_argv`) and ``hydra.run.dir`` (which Lightning passes to the
    children) for the duration of the job; outside a sweep it does nothing.
    """
    if hydra_cfg is None or hydra_cfg.get("mode") != RunMode.MULTIRUN:
        yield
        return
    saved_argv, saved_run_dir = list(sys.argv), hydra_cfg.run.dir
    saved_env = {name: os.environ.get(name) for name in DDP_ENV_VARIABLES}
    sys.argv = single_run_argv(sys.argv[0], list(hydra_cfg.overrides.task))
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = output_dir
    try:
        yield
    finally:
        sys.argv = saved_argv
        with read_write(hydra_cfg):
            hydra_cfg.run.dir = saved_run_dir
        # The next job of this process starts new DDP children: it needs a new process group, and Lightning must
        # not find this job's LOCAL_RANK (it would think the ranks are launched externally and wait for them).
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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

    ``ckpt_path`` is loaded before the first split; the others
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

    # Logs and CI have no terminal width; a fixed width keeps every column readable there instead of truncated.
    console = Console(width=160) if not sys.stdout.isatty() else Console()

    def show(frame: pd.DataFrame, title: str) -> None:
        table = Table(title=title)
        for column in frame.columns:
            justify: Literal["left", "right"] = "left" if frame[column].dtype == object else "right"
            table.add_column(str(column), justify=justify, no_wrap=True)
        for row in frame.itertuples(index=False):
            table.add_row(*(_format_cell(v) for v in row))
        console.print(table)

    show(overall, "overall")
    show(per_label, "per label (type_I_error = 1 - precision, type_II_error = 1 - recall)")


def _format_cell(value: object) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3f}"
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
    # HydraConfig.get() is typed as the HydraConf dataclass but returns its DictConfig.
    hydra_cfg = cast(DictConfig, HydraConfig.get()) if HydraConfig.initialized() else None
    apply_wandb_run_identity(cfg, hydra_cfg)
    loggers: list[Logger] = instantiate_named(cfg.get("logger"), "logger")
    accelerator = cfg.trainer.get("accelerator", "auto")
    precision = resolve_precision(cfg.trainer.get("precision", "auto"), accelerator)
    log.info("precision: %s", precision)
    trainer_args: dict[str, Any] = {"callbacks": callbacks, "logger": loggers or False, "precision": precision}
    if "sync_batchnorm" in cfg.trainer:
        trainer_args["sync_batchnorm"] = resolve_sync_batchnorm(bool(cfg.trainer.sync_batchnorm), accelerator)
    output_dir = str(cfg.paths.output_dir) if cfg.get("paths") and cfg.paths.get("output_dir") else None
    uses_wandb = any(isinstance(logger, WandbLogger) for logger in loggers)
    try:
        with ddp_children_rerun_this_job(hydra_cfg, output_dir or str(Path.cwd())):
            return _fit_and_evaluate(cfg, model, datamodule, callbacks, loggers, trainer_args, output_dir)
    finally:
        if uses_wandb:
            import wandb

            # One wandb run per job: a run left open would swallow the next job of a sweep.
            wandb.finish()


def _fit_and_evaluate(
    cfg: DictConfig,
    model: CropClassifier,
    datamodule: CropDataModule,
    callbacks: list[Any],
    loggers: list[Logger],
    trainer_args: dict[str, Any],
    output_dir: str | None,
) -> float | None:
    """The body of :func:`train`: fit, evaluate every split, print the tables, write ``results.json``."""
    trainer: Trainer = instantiate(cfg.trainer, **trainer_args)
    for logger in loggers:
        logger.log_hyperparams(run_config(cfg))

    eval_ckpt: str | None = None
    if cfg.train:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
        # With calibrate=true rank 0 rewrites best.ckpt in on_fit_end; no rank may load it before that is done.
        trainer.strategy.barrier("calibrated")
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint) and checkpoint.best_model_path:
            # The path, not "best": with last_checkpoint there are two ModelCheckpoint callbacks, and the first one
            # (trainer.checkpoint_callback) is the one that keeps the best.
            eval_ckpt = checkpoint.best_model_path
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
    value = monitored_value(cfg, results, trainer)
    if trainer.is_global_zero and output_dir is not None:
        # Read by the sweep summary (hydra_callbacks.SweepSummary): best val metric and the test metrics.
        write_run_results(output_dir, str(cfg.monitor), value, results)
    return value


def _user_error(err: BaseException) -> str | None:
    """The message of a bad-input error raised by our code (shown without a traceback), else None."""
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        return _user_error(err.__cause__)
    if isinstance(err, DatasetError):
        return str(err)
    if isinstance(err, pickle.UnpicklingError):
        # torch.load(weights_only=True) refusing a checkpoint that holds more than plain tensors and values
        return f"refusing to load a checkpoint that is not plain weights (weights_only=True): {err}"
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
