"""Hydra multirun sweeps, Optuna, the sweep summary, wandb run identity and the SLURM launcher config."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, read_write

from animl_lightning import cli
from animl_lightning.hydra_callbacks import SweepSummary
from animl_lightning.train.sweeps import (
    ROW_FILENAME,
    SUMMARY_COLUMNS,
    SUMMARY_FILENAME,
    metric_on_test_split,
    override_items,
    process_rank,
    read_run_results,
    read_sweep_rows,
    summary_frame,
    sweep_row,
    write_run_results,
    write_sweep_row,
    write_sweep_summary,
)
from tests.fixtures.datasets import make_prepared_dataset
from tests.fixtures.hydra import CONFIG_DIR, REPO_ROOT
from tests.fixtures.scripts import SCRIPT_OVERRIDES, run_train_script

LABELS = ["bird", "fox", "skunk"]
SPLITS = ["train", "val", "test"]


def compose_config(overrides: Sequence[str]) -> DictConfig:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


# ---------------------------------------------------------------- configs (fast)


def test_optuna_search_config_composes_and_parses() -> None:
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override
    from optuna.distributions import LogUniformDistribution, UniformDistribution

    cfg = compose_config(["hparams_search=optuna", "hydra.sweeper.n_trials=7"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.mode == RunMode.MULTIRUN
    assert sweeper.direction == "maximize" and sweeper.n_trials == 7
    minimising = compose_config(["hparams_search=optuna", "monitor=val/loss", "monitor_mode=min"])
    assert minimising.hydra.sweeper.direction == "minimize"
    params = dict(sweeper.params)
    assert set(params) == {"optimizer.lr", "optimizer.weight_decay", "model.label_smoothing"}
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    distributions = {o.key_or_group: create_optuna_distribution_from_override(o) for o in parsed}
    lr = distributions["optimizer.lr"]
    assert isinstance(lr, LogUniformDistribution) and (lr.low, lr.high) == (1e-5, 1e-2)
    assert isinstance(distributions["optimizer.weight_decay"], UniformDistribution)
    smoothing = distributions["model.label_smoothing"]
    assert isinstance(smoothing, UniformDistribution) and 0.0 <= smoothing.low < smoothing.high < 1.0
    # every searched key exists in the composed config (a typo would only fail at the first trial)
    for key in params:
        assert OmegaConf.select(cfg, key) is not None, key


def test_optuna_recipe_search_composes_every_choice() -> None:
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override
    from optuna.distributions import CategoricalDistribution

    cfg = compose_config(["hparams_search=optuna_recipe"])
    params = dict(cfg.hydra.sweeper.params)
    assert {"optimizer.lr", "model.finetune_epochs", "scheduler", "eval.tta", "model.drop_path_rate"} <= set(params)
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    for override in parsed:
        distribution = create_optuna_distribution_from_override(override)
        if isinstance(distribution, CategoricalDistribution):
            # Each value a trial can get composes into a config that holds it (a group option that does not exist,
            # or a key a recipe does not know, would only fail at that trial).
            for choice in distribution.choices:
                trial = compose_config(["hparams_search=optuna_recipe", f"{override.key_or_group}={choice}"])
                if override.key_or_group == "scheduler":
                    assert trial.scheduler._target_.endswith("." + {"cosine": "CosineAnnealingLR"}.get(choice, choice))
                else:
                    assert str(OmegaConf.select(trial, override.key_or_group)) == str(choice)
        else:
            assert OmegaConf.select(cfg, override.key_or_group) is not None, override.key_or_group


@pytest.mark.parametrize("launcher", ["slurm", "submitit_slurm"])
def test_slurm_launcher_config_composes(launcher: str) -> None:
    cfg = compose_config([f"hydra/launcher={launcher}", "hydra.launcher.partition=gpu"])
    params = cfg.hydra.launcher
    assert params._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert params.partition == "gpu"
    assert str(params.submitit_folder).endswith(".submitit/%j")
    for key in ("timeout_min", "gpus_per_node", "tasks_per_node", "cpus_per_task", "nodes", "mem_gb"):
        assert key in params
    launcher_object = instantiate(params)
    assert type(launcher_object).__name__ == "SlurmLauncher"
    if launcher == "slurm":
        assert params.cpus_per_task == 8 and params.gpus_per_node == 1 and params.timeout_min == 720


def test_hydra_config_registers_the_sweep_summary_callback() -> None:
    cfg = compose_config([])
    assert cfg.hydra.callbacks.sweep_summary._target_ == "animl_lightning.hydra_callbacks.SweepSummary"
    assert isinstance(instantiate(cfg.hydra.callbacks.sweep_summary), SweepSummary)
    assert "data_dir" in cfg.hydra.job.config.override_dirname.exclude_keys


def test_label_smoothing_reaches_the_classifier() -> None:
    cfg = compose_config(["model=tiny", "model.label_smoothing=0.15"])
    model = instantiate(cfg.model, class_names=LABELS, optimizer=None, scheduler=None, _convert_="all")
    assert model.hparams["label_smoothing"] == pytest.approx(0.15)


# ---------------------------------------------------------------- sweep summary logic (fast)


def test_metric_names_and_overrides() -> None:
    assert metric_on_test_split("val/balanced_accuracy") == "test/balanced_accuracy"
    assert metric_on_test_split("val/loss") == "test/loss"
    assert metric_on_test_split("train/loss") is None and metric_on_test_split("loss") is None
    assert override_items(["optimizer.lr=0.001", "+trainer.x=1", "~callbacks.lr_monitor", "model=tiny"]) == {
        "optimizer.lr": "0.001",
        "trainer.x": "1",
        "callbacks.lr_monitor": "",
        "model": "tiny",
    }
    assert process_rank({}) == 0
    assert process_rank({"SLURM_PROCID": "3"}) == 3
    assert process_rank({"RANK": "1", "SLURM_PROCID": "0"}) == 1


def test_summary_rebuilt_from_row_files(tmp_path: Path) -> None:
    results = {"monitor": "val/top1", "monitor_value": 0.75, "metrics": {"test/top1": 0.5, "val/top1": 0.75}}
    for job, lr in ((1, "0.01"), (0, "0.001")):
        run = tmp_path / "nested" / str(job)
        row = sweep_row(job, [f"optimizer.lr={lr}", "data_dir=/d"], "COMPLETED", run, results)
        write_sweep_row(run, row)
    failed = sweep_row(2, ["optimizer.lr=1.0", "data_dir=/d"], "FAILED", tmp_path / "2", None, "val/top1")
    write_sweep_row(tmp_path / "2", failed)
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / ROW_FILENAME).write_text("{not json")

    path = write_sweep_summary(tmp_path)
    assert path == tmp_path / SUMMARY_FILENAME
    frame = pd.read_csv(path)
    # only the swept key gets a column; data_dir is the same in every job
    assert list(frame.columns) == [*SUMMARY_COLUMNS, "optimizer.lr"]
    assert list(frame["job"]) == [0, 1, 2]
    assert list(frame["status"]) == ["COMPLETED", "COMPLETED", "FAILED"]
    assert list(frame["optimizer.lr"]) == [0.001, 0.01, 1.0]
    assert frame.loc[0, "best_val"] == 0.75 and frame.loc[0, "test"] == 0.5
    assert frame.loc[2, ["best_val", "test"]].isna().all()
    assert frame.loc[2, "monitor"] == "val/top1"
    assert frame.loc[0, "overrides"] == "optimizer.lr=0.001 data_dir=/d"
    assert len(read_sweep_rows(tmp_path)) == 3
    assert not list(tmp_path.glob("*.tmp*"))


def test_empty_summary_has_the_columns() -> None:
    assert list(summary_frame([]).columns) == list(SUMMARY_COLUMNS)


def test_run_results_round_trip(tmp_path: Path) -> None:
    write_run_results(tmp_path, "val/loss", float("nan"), {"test/loss": 0.5, "val/loss": float("inf")})
    payload = read_run_results(tmp_path)
    assert payload == {
        "monitor": "val/loss",
        "monitor_value": None,
        "metrics": {"test/loss": 0.5, "val/loss": None},
        "data_dir": None,
        "checkpoint": None,
    }
    assert read_run_results(tmp_path / "missing") is None
    (tmp_path / "results.json").write_text("[1, 2")
    assert read_run_results(tmp_path) is None


def job_return(tmp_path: Path, mode: RunMode, status: JobStatus = JobStatus.COMPLETED) -> JobReturn:
    hydra_node = {
        "mode": mode,
        "runtime": {"output_dir": str(tmp_path / "4")},
        "job": {"num": 4},
        "overrides": {"task": ["optimizer.lr=0.5"]},
        "sweep": {"dir": str(tmp_path)},
    }
    ret = JobReturn(overrides=["optimizer.lr=0.5"], hydra_cfg=OmegaConf.create({"hydra": hydra_node}))
    ret.status = status
    return ret


def test_sweep_summary_callback_writes_rank_zero_multirun_rows_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    config = OmegaConf.create({"monitor": "val/balanced_accuracy"})
    write_run_results(tmp_path / "4", "val/balanced_accuracy", 0.9, {"test/balanced_accuracy": 0.8})
    callback = SweepSummary()

    callback.on_job_end(config, job_return(tmp_path, RunMode.RUN))
    assert not (tmp_path / "4" / ROW_FILENAME).exists()
    monkeypatch.setenv("SLURM_PROCID", "1")
    callback.on_job_end(config, job_return(tmp_path, RunMode.MULTIRUN))
    assert not (tmp_path / "4" / ROW_FILENAME).exists()

    monkeypatch.setenv("SLURM_PROCID", "0")
    callback.on_job_end(config, job_return(tmp_path, RunMode.MULTIRUN))
    row = json.loads((tmp_path / "4" / ROW_FILENAME).read_text())
    assert (row["job"], row["status"], row["best_val"], row["test"]) == (4, "COMPLETED", 0.9, 0.8)
    callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    frame = pd.read_csv(tmp_path / SUMMARY_FILENAME)
    assert list(frame["job"]) == [4] and frame.loc[0, "run_dir"] == str(tmp_path / "4")


def test_the_summary_is_rebuilt_after_each_job_in_the_default_sweep_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As Hydra's run_job calls the callback: with the job's config, and a JobReturn holding a copy of the hydra node
    alone, in which the default sweep.dir (outputs/${task_name}/multirun/...) does not resolve by itself."""
    for name in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    callback = SweepSummary()
    sweep = compose_config(["hydra.mode=MULTIRUN"])
    sweep_dir = Path(str(sweep.hydra.sweep.dir))
    assert sweep_dir.parts[:3] == ("outputs", "train", "multirun")  # the default, not a test's literal folder
    for num, lr in enumerate(("0.1", "0.2")):
        config = compose_config(["hydra.mode=MULTIRUN", f"optimizer.lr={lr}"])
        OmegaConf.copy_cache(from_config=sweep, to_config=config)  # as Hydra's launcher does: the same ${now:...}
        with read_write(config.hydra):
            config.hydra.job.num = num
            config.hydra.runtime.output_dir = str(tmp_path / sweep_dir / str(num))
        HydraConfig.instance().set_config(config)
        job = JobReturn(overrides=[f"optimizer.lr={lr}"], hydra_cfg=copy.deepcopy(HydraConfig.instance().cfg))
        job.status = JobStatus.COMPLETED
        write_run_results(config.hydra.runtime.output_dir, "val/balanced_accuracy", 0.5 + num, {})
        callback.on_job_end(config, job)
        summary = pd.read_csv(sweep_dir / SUMMARY_FILENAME)
        assert summary["job"].tolist() == list(range(num + 1))  # this job's row is there before the sweep ends
        assert summary["best_val"].tolist() == [0.5 + n for n in range(num + 1)]


# ---------------------------------------------------------------- wandb identity and DDP children (fast)


def hydra_node(mode: RunMode, override_dirname: str = "optimizer.lr=0.1", sweep_dir: str = "outputs/s") -> DictConfig:
    return OmegaConf.create(
        {
            "mode": mode,
            "job": {"override_dirname": override_dirname, "num": 3},
            "sweep": {"dir": sweep_dir},
            "run": {"dir": "outputs/run"},
            "overrides": {"task": ["optimizer.lr=0.1", "hparams_search=optuna"]},
        }
    )


def test_wandb_run_identity() -> None:
    assert cli.wandb_run_identity(None) == (None, None)
    assert cli.wandb_run_identity(hydra_node(RunMode.RUN)) == (None, "optimizer.lr=0.1")
    assert cli.wandb_run_identity(hydra_node(RunMode.RUN, "")) == (None, None)
    assert cli.wandb_run_identity(hydra_node(RunMode.MULTIRUN)) == ("outputs/s", "optimizer.lr=0.1")
    assert cli.wandb_run_identity(hydra_node(RunMode.MULTIRUN, "")) == ("outputs/s", "job3")
    long_dir = "/scratch/" + "x" * 200 + "/2026-01-01/10-00-00"
    group, _ = cli.wandb_run_identity(hydra_node(RunMode.MULTIRUN, sweep_dir=long_dir))
    assert group is not None and len(group) == 128 and group.endswith("2026-01-01/10-00-00")


def test_wandb_logger_gets_group_and_name(tmp_path: Path) -> None:
    cfg = compose_config(["logger=wandb", f"paths.output_dir={tmp_path}", "logger.wandb.offline=true"])
    cli.apply_wandb_run_identity(cfg, hydra_node(RunMode.MULTIRUN))
    (logger,) = cli.instantiate_named(cfg.logger, "logger")
    assert logger._wandb_init["group"] == "outputs/s"
    assert logger._wandb_init["name"] == "optimizer.lr=0.1"
    # explicit values are kept
    cfg = compose_config(["logger=wandb", f"paths.output_dir={tmp_path}", "logger.wandb.group=mine"])
    cli.apply_wandb_run_identity(cfg, hydra_node(RunMode.MULTIRUN))
    assert cfg.logger.wandb.group == "mine" and cfg.logger.wandb.name == "optimizer.lr=0.1"


def test_ddp_children_of_a_sweep_job_rerun_only_that_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", "optimizer.lr=0.1,0.2", "hparams_search=optuna"])
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    node = hydra_node(RunMode.MULTIRUN)
    with cli.ddp_children_rerun_this_job(node, "/sweep/3"):
        assert sys.argv == ["train.py", "optimizer.lr=0.1", "hparams_search=optuna", "hydra.mode=RUN"]
        assert node.run.dir == "/sweep/3"
        os.environ["LOCAL_RANK"] = "0"  # what Lightning's launcher leaves behind
    assert sys.argv == ["train.py", "-m", "optimizer.lr=0.1,0.2", "hparams_search=optuna"]
    assert node.run.dir == "outputs/run"
    assert "LOCAL_RANK" not in os.environ
    single = hydra_node(RunMode.RUN)
    with cli.ddp_children_rerun_this_job(single, "/elsewhere"):
        assert sys.argv[1] == "-m" and single.run.dir == "outputs/run"


@pytest.mark.slow
def test_train_runs_without_wandb_installed(tmp_path: Path) -> None:
    data = make_prepared_dataset(tmp_path / "data", per_label=2, size=32)
    code = (
        "import sys\n"
        "sys.modules['wandb'] = None  # any 'import wandb' now fails as if it were not installed\n"
        "import train\n"
        "from tests.fixtures.hydra import compose_train\n"
        f"cfg = compose_train({str(data)!r}, {str(tmp_path / 'run')!r}, "
        "['trainer.max_epochs=1', 'data.image_size=32', 'callbacks.error_galleries=null'])\n"
        "value = train.train(cfg)\n"
        "assert value is not None\n"
        "assert sys.modules['wandb'] is None\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK")}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "run" / "metrics" / "per_label.csv").is_file()
    assert (tmp_path / "run" / "results.json").is_file()


# ---------------------------------------------------------------- real sweeps (slow)


@pytest.fixture(scope="module")
def sweep_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_prepared_dataset(tmp_path_factory.mktemp("sweep_data"), per_label=3)


def check_job_dir(job_dir: Path) -> dict[str, Any]:
    """Assert a job wrote its own tables and results; return its results.json."""
    per_label = pd.read_csv(job_dir / "metrics" / "per_label.csv")
    assert list(zip(per_label["split"], per_label["label"], strict=True)) == [(s, lb) for s in SPLITS for lb in LABELS]
    assert (job_dir / "checkpoints" / "best.ckpt").is_file()
    results = read_run_results(job_dir)
    assert results is not None
    overall = pd.read_csv(job_dir / "metrics" / "overall.csv")
    overall = overall[overall["level"] == "crop"].set_index("split")
    assert results["monitor_value"] == pytest.approx(overall.loc["val", "balanced_accuracy"])
    return results


@pytest.mark.slow
def test_multirun_runs_every_job_in_its_own_folder(sweep_data: Path, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    run_train_script(
        ["-m", f"data_dir={sweep_data}", *SCRIPT_OVERRIDES, "optimizer.lr=1e-3,3e-4", f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # nothing written outside the sweep dir
    summary = pd.read_csv(sweep_dir / SUMMARY_FILENAME)
    assert list(summary["job"]) == [0, 1]
    assert list(summary["status"]) == ["COMPLETED", "COMPLETED"]
    assert list(summary["optimizer.lr"]) == [1e-3, 3e-4]
    for job in (0, 1):
        job_dir = sweep_dir / str(job)
        results = check_job_dir(job_dir)
        row = summary.iloc[job]
        assert row["run_dir"] == str(job_dir)
        assert row["best_val"] == pytest.approx(results["monitor_value"])
        assert row["test"] == pytest.approx(results["metrics"]["test/balanced_accuracy"])
        job_config = yaml.safe_load((job_dir / ".hydra" / "config.yaml").read_text())
        assert job_config["optimizer"]["lr"] == [1e-3, 3e-4][job]


@pytest.mark.slow
def test_optuna_sweep_of_two_trials(sweep_data: Path, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "optuna"
    run_train_script(
        [
            "hparams_search=optuna",
            "hydra.sweeper.n_trials=2",
            f"data_dir={sweep_data}",
            *SCRIPT_OVERRIDES,
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path,
    )
    summary = pd.read_csv(sweep_dir / SUMMARY_FILENAME)
    assert list(summary["job"]) == [0, 1]
    assert {"optimizer.lr", "optimizer.weight_decay", "model.label_smoothing"} <= set(summary.columns)
    assert ((summary["optimizer.lr"] >= 1e-5) & (summary["optimizer.lr"] <= 1e-2)).all()
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(summary["best_val"].max())  # maximised, as monitor_mode=max says
    for job in (0, 1):
        job_dir = sweep_dir / str(job)
        check_job_dir(job_dir)
        hparams = torch.load(job_dir / "checkpoints" / "best.ckpt", weights_only=True)["hyper_parameters"]
        assert hparams["label_smoothing"] == pytest.approx(summary.loc[job, "model.label_smoothing"])


@pytest.mark.slow
def test_wandb_offline_sweep_has_one_run_per_job(sweep_data: Path, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "wandb_sweep"
    run_train_script(
        [
            "-m",
            f"data_dir={sweep_data}",
            *SCRIPT_OVERRIDES,
            "logger=wandb",
            "optimizer.lr=1e-3,3e-4",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path,
        env={"WANDB_MODE": "offline"},
    )
    run_ids = set()
    for job in (0, 1):
        runs = list((sweep_dir / str(job) / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, f"job {job}: expected one wandb run, got {runs}"
        run_ids.add(runs[0].name.rsplit("-", 1)[-1])
        media = runs[0] / "files" / "media" / "table"
        for split in SPLITS:
            assert list((media / split).glob("per_label_*.table.json")), f"job {job}: no {split} per-label table"
            assert list((media / split).glob("confusion_matrix*.table.json")), f"job {job}: no {split} confusion"
        assert (sweep_dir / str(job) / "metrics" / "per_label.csv").is_file()
    assert len(run_ids) == 2
    assert len(pd.read_csv(sweep_dir / SUMMARY_FILENAME)) == 2
