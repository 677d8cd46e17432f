"""One training run: fit, evaluate the best checkpoint on every split, print and record the results.

``train.py`` instantiates the data module, the classifier, the callbacks, the loggers and the trainer from the
config and hands them to :func:`fit_and_evaluate`; everything after that is here, typed and checked like the rest.

After fitting, the best checkpoint is evaluated with the test loop on the train crops (eval transform, no
augmentation), the val crops and the test crops; :class:`~animl_lightning.train.tables.MetricTables` collects the
tables of each and writes them together at the end (``metrics/*.csv``), and the per-label table is printed.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from lightning import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger

from animl_lightning.core.contract import SPLIT_NAMES
from animl_lightning.core.crop_rule import CropRule
from animl_lightning.core.errors import ConfigError, require
from animl_lightning.core.files import remove_stale_temporaries
from animl_lightning.core.model_file import THRESHOLDS_KEY, CheckpointError
from animl_lightning.core.taxonomy import RANKS, TAXONOMY_KEY, Taxonomy
from animl_lightning.train.checkpointing import (
    CheckpointContents,
    read_checkpoint,
    update_checkpoint_keys,
)
from animl_lightning.train.classifier import CropClassifier
from animl_lightning.train.datamodule import CropDataModule
from animl_lightning.train.prediction_record import write_predictions_record
from animl_lightning.train.report import ReportSettings, build_report, report_settings
from animl_lightning.train.sweeps import write_run_results
from animl_lightning.train.tables import MetricTables
from animl_lightning.train.thresholds import ThresholdSettings, choose_for_run, rank_per_label_table

log = logging.getLogger(__name__)


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


def callbacks_for_loggers(callbacks: list[Any], loggers: list[Any]) -> list[Any]:
    """The callbacks that can run with these loggers: Lightning refuses a learning-rate monitor without one."""
    if loggers:
        return callbacks
    return [c for c in callbacks if not isinstance(c, LearningRateMonitor)]


def resume_hint(output_dir: str) -> str:
    """After Ctrl-C: how to continue this run (a new command gets a new run folder, so it is not the same one)."""
    last = Path(output_dir) / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return "interrupted before the first epoch finished; nothing to resume, run the same command to start again"
    return f"interrupted; resume with the same command plus ckpt_path={last} hydra.run.dir={output_dir}"


# Lightning's DDP strategy names that have a ``<name>_find_unused_parameters_true`` variant.
DDP_STRATEGIES = ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")


def resolve_strategy(strategy: Any, finetune_epochs: int) -> Any:
    """With head-first training (``model.finetune_epochs > 0``), let DDP find the parameters that get no gradient.

    The backbone is frozen after DDP has wrapped the model, so in the head-only epochs its parameters take no part in
    the loss, and plain DDP stops at the second step ("parameters that were not used in producing the loss").
    DDP's search for unused parameters leaves their gradients unset, so they stay exactly as they were (no weight
    decay either). Other strategies and values pass through unchanged.
    """
    if finetune_epochs > 0 and isinstance(strategy, str) and strategy in DDP_STRATEGIES:
        log.info(
            "model.finetune_epochs=%d under DDP: trainer.strategy=%s_find_unused_parameters_true",
            finetune_epochs,
            strategy,
        )
        return f"{strategy}_find_unused_parameters_true"
    return strategy


def check_checkpoint_fits(contents: CheckpointContents, labels: list[str], crop_rule: CropRule, data_dir: str) -> None:
    """Refuse a checkpoint trained on other labels or crops than the dataset's (resume and ``train=false``).

    Raises:
        CheckpointError: naming the checkpoint, the dataset and what differs.
    """
    if contents.class_names != labels:
        raise CheckpointError(
            f"checkpoint {contents.path} was trained on labels {contents.class_names}, but {data_dir} has {labels}; "
            "use a dataset with the same label_index.json"
        )
    if contents.crop_rule != crop_rule:
        raise CheckpointError(
            f"checkpoint {contents.path} was trained on crops cut with {contents.crop_rule.to_dict()}, but "
            f"{data_dir} was prepared with {crop_rule.to_dict()}; use a dataset prepared with the same crops.* settings"
        )


def model_to_evaluate(ckpt_path: str | None, labels: list[str], crop_rule: CropRule, data_dir: str) -> CropClassifier:
    """The classifier of ``ckpt_path`` for ``train=false``, checked against the dataset."""
    if not ckpt_path:
        raise ConfigError("ckpt_path: train=false needs ckpt_path=PATH of the checkpoint to evaluate")
    contents = read_checkpoint(ckpt_path)
    check_checkpoint_fits(contents, labels, crop_rule, data_dir)
    return CropClassifier.from_checkpoint(contents)


def checkpoint_data_dir(ckpt_path: str) -> str | None:
    """The prepared dataset a checkpoint was trained on (``hyper_parameters.data_dir``), if it still exists."""
    data_dir = read_checkpoint(ckpt_path).hparams.get("data_dir")
    return str(data_dir) if isinstance(data_dir, str) and Path(data_dir).is_dir() else None


@dataclass(frozen=True)
class RunSettings:
    """The top-level keys of ``configs/train.yaml`` a run needs after its objects are built."""

    train: bool
    test: bool
    ckpt_path: str | None
    monitor: str
    output_dir: str | None
    thresholds: ThresholdSettings = field(default_factory=ThresholdSettings)
    report: ReportSettings | None = field(default_factory=ReportSettings)


RUN_KEYS = ("train", "test", "ckpt_path", "monitor", "thresholds", "report")


def run_settings(values: Any, output_dir: str | None) -> RunSettings:
    """:class:`RunSettings` from the :data:`RUN_KEYS` of ``configs/train.yaml`` (plain values)."""
    values = dict(values or {})
    return RunSettings(
        train=bool(values.get("train", True)),
        test=bool(values.get("test", True)),
        ckpt_path=values.get("ckpt_path"),
        monitor=str(values.get("monitor", "val/balanced_accuracy")),
        output_dir=output_dir,
        thresholds=ThresholdSettings.from_mapping(values.get("thresholds")),
        report=report_settings(values.get("report")),
    )


def fit_and_evaluate(
    trainer: Trainer, model: CropClassifier, datamodule: CropDataModule, settings: RunSettings
) -> float | None:
    """Fit (unless ``train=false``), evaluate every split on the best checkpoint, write the tables and
    ``results.json``, print the tables; return the monitored metric (for sweepers).
    """
    if trainer.is_global_zero:
        # A save killed mid-write leaves its temporary beside the checkpoints; the checkpoints themselves are whole.
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
                remove_stale_temporaries(callback.dirpath)
    eval_ckpt: str | None = None
    if settings.train:
        with _interrupt_as_keyboard_interrupt(trainer):
            trainer.fit(model, datamodule=datamodule, ckpt_path=settings.ckpt_path, weights_only=True)
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
    with _interrupt_as_keyboard_interrupt(trainer):
        results = evaluate(trainer, model, datamodule, eval_ckpt, with_test=settings.test)

    tables = next((c for c in trainer.callbacks if isinstance(c, MetricTables)), None)  # type: ignore[attr-defined]
    if tables is not None:
        taxonomy = datamodule.prepared.taxonomy
        record = add_thresholds_and_ranks(tables, taxonomy, settings.thresholds)
        tables.write(trainer)
        if trainer.is_global_zero and tables.writes_predictions and tables.evaluations:
            # Ties the predictions tables to this dataset's files, for the label review that joins them by path.
            evaluations = tables.evaluations
            write_predictions_record(
                tables.dirpath,
                datamodule.data_dir,
                next(iter(evaluations.values())).labels,
                model.temperature,
                {split: len(evaluation.predictions) for split, evaluation in evaluations.items()},
            )
        if trainer.is_global_zero and settings.train and eval_ckpt:
            # best.ckpt carries what classify and export need beside the weights and the temperature.
            records = {TAXONOMY_KEY: taxonomy.to_dict()} if taxonomy is not None else {}
            if record is not None:
                records[THRESHOLDS_KEY] = record
            if records:
                update_checkpoint_keys(eval_ckpt, records)
                log.info("%s stored in %s", " and ".join(records), eval_ckpt)
    if trainer.is_global_zero:
        if tables is not None:
            print_tables(tables.per_label, tables.overall, tables.level_per_label("sequence"))
            log.info("tables written to %s", tables.dirpath)
        else:
            log.info("results: %s", results)
    value = monitored_value(settings.monitor, results, trainer)
    if trainer.is_global_zero and settings.output_dir is not None:
        # Read by the sweep summary (animl_lightning.hydra_callbacks): best val metric and the test metrics.
        evaluated = eval_ckpt if settings.train else settings.ckpt_path
        write_run_results(settings.output_dir, settings.monitor, value, results, datamodule.data_dir, evaluated)
        if tables is not None and settings.report is not None:
            write_report(trainer, settings.output_dir, settings.report)
    return value


def write_report(trainer: Trainer, output_dir: str, report: ReportSettings) -> Path | None:
    """``report.html`` in the run folder, uploaded as a wandb artifact with ``logger=wandb``.

    The tables and checkpoints are already written: a report that cannot be built costs a warning, not the run.
    """
    try:
        path = build_report(output_dir, report)
    except Exception as err:  # the report is derived from files already saved; the run itself succeeded
        log.warning(
            "report.html could not be built (%s: %s); rebuild it with python -m animl_lightning.report run_dir=%s",
            type(err).__name__,
            err,
            output_dir,
        )
        return None
    log.info("report: %s", path)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            artifact = wandb.Artifact(f"report-{logger.experiment.id}", type="report")
            artifact.add_file(str(path), name=path.name)
            logger.experiment.log_artifact(artifact)
    return path


def add_thresholds_and_ranks(
    tables: MetricTables, taxonomy: Taxonomy | None, settings: ThresholdSettings
) -> dict[str, Any] | None:
    """Add ``thresholds.csv`` (chosen on val) and ``per_label_<rank>.csv`` to the tables; return the record.

    None when thresholds are off or there is no val evaluation.
    """
    evaluations = tables.evaluations
    labels = next(iter(evaluations.values())).labels if evaluations else []

    index = {name: i for i, name in enumerate(labels)}
    arrays = {
        split: (e.predictions[labels].to_numpy(dtype=float), e.predictions["label"].map(index).to_numpy(dtype=int))
        for split, e in evaluations.items()
    }
    if taxonomy is not None:
        for rank in RANKS:
            if not taxonomy.taxa(rank):
                continue
            rows = [rank_per_label_table(*arrays[split], taxonomy, rank, split) for split in arrays]
            tables.add_table(f"per_label_{rank}.csv", pd.concat(rows, ignore_index=True))
    val = arrays.get("val")
    if settings.target_precision is None or val is None:
        return None
    result = choose_for_run(val, arrays.get("test"), labels, settings, taxonomy)
    tables.add_table("thresholds.csv", result.table)
    missing = [label for label, value in result.record["per_label"].items() if value is None]
    if missing:
        log.warning(
            "no threshold reaches val precision %s for %s (see thresholds.csv): classify marks them unknown",
            settings.target_precision,
            ", ".join(missing),
        )
    return result.record


@contextmanager
def _interrupt_as_keyboard_interrupt(trainer: Trainer) -> Iterator[None]:
    """Lightning answers Ctrl-C with ``sys.exit(1)`` after its own cleanup; turn that back into an interrupt."""
    try:
        yield
    except SystemExit as exit_:
        if not trainer.interrupted:
            raise
        # Lightning ignores further Ctrl-C during its shutdown and leaves it so; give it back.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt from exit_


def evaluate(
    trainer: Trainer,
    model: CropClassifier,
    datamodule: CropDataModule,
    ckpt_path: str | None,
    with_test: bool,
) -> dict[str, float]:
    """Run the test loop on the train (eval transform), val and test crops; return every logged metric.

    ``ckpt_path`` is loaded before the first split; the others reuse those weights. Empty splits are skipped with
    a log line.
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


def monitored_value(monitor: str, results: Mapping[str, float], trainer: Trainer) -> float | None:
    """The monitored metric for sweepers: its value on the evaluated best checkpoint, else the best seen."""
    if monitor in results:
        return float(results[monitor])
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.best_model_score is not None:
        return float(callback.best_model_score)
    value = trainer.callback_metrics.get(monitor)
    return float(value) if value is not None else None


def check_monitor(monitor: str, model: CropClassifier) -> None:
    """Refuse a ``monitor`` that the classifier never logs, listing the ones it does."""
    available = model.logged_metric_names()
    require(monitor in available, "monitor", f"{monitor!r} is not a logged metric; choose one of {sorted(available)}")


def print_tables(per_label: pd.DataFrame, overall: pd.DataFrame, per_sequence: pd.DataFrame | None = None) -> None:
    """Print the overall table (every level) and the per-label tables of crops and sequences (rich tables)."""
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

    show(overall, "overall (level: crop, image, sequence)")
    show(per_label, "per label, crops (type_I_error = 1 - precision, type_II_error = 1 - recall)")
    if per_sequence is not None and len(per_sequence):
        show(per_sequence, "per label, sequences (one unit per sequence and species present)")


def _format_cell(value: object) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3f}"
    return str(value)
