"""``review.folds=K``: out-of-sample probabilities for a run's train crops, from K fits over folds of whole locations.

The run's own model trained on its train crops, so its probabilities for them say nothing about their labels. The
train locations are dealt into K folds (:func:`assign_folds`: whole locations, folds of similar crop counts); fold
``k``'s model is a ``train.py`` fit with the run's own saved settings (``RUN/.hydra/config.yaml``) on a dataset
folder of its own (:func:`fold_frame`):

- train: the run's train crops at the locations of the other folds;
- val: the run's val crops, so checkpoint choice, early stopping and calibration work as in the run;
- test: the run's train crops at fold ``k``'s locations, the crops it scores.

No crop is ever scored by a model that trained on its location. The fold's ``metrics/predictions_test.csv`` holds
the probabilities (calibrated when the run is). Everything lives under ``RUN/review/folds_<K>/``:
``folds.json`` (the assignment), and per fold ``fold_<k>/data/`` (the fold's dataset, its ``crops`` a link to the
run's), ``fold_<k>/run/`` (the fit) and ``fold_<k>/train_stderr.log``. A finished fold is never fitted again; an
interrupted one resumes from its ``last.ckpt``, so running the same command again continues where it stopped.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from animl_lightning.core.contract import (
    GROUP_COLUMN,
    INFO_FILENAME,
    LABEL_INDEX_FILENAME,
    LocationKey,
    write_classification_csv,
    write_splits,
)
from animl_lightning.core.files import atomic_write_bytes, atomic_write_json, read_json_file
from animl_lightning.core.taxonomy import TAXONOMY_FILENAME
from animl_lightning.train.label_review import REVIEW_DIRNAME, ReviewError, RunPredictions, read_predictions
from animl_lightning.train.prediction_record import (
    PREDICTIONS_RECORD_FILENAME,
    dataset_fingerprint,
    read_predictions_record,
)

log = logging.getLogger(__name__)

FOLDS_RECORD_FILENAME = "folds.json"
STDERR_FILENAME = "train_stderr.log"
# The role of a crop in a fold's dataset; written as the split_group key "<role>|<location>".
ROLE_TRAIN, ROLE_VAL, ROLE_SCORED = "train", "val", "scored"
ROLE_SPLIT = {ROLE_TRAIN: "train", ROLE_VAL: "val", ROLE_SCORED: "test"}
# Columns load_prepared_dataset adds to classification_ds.csv's own.
_LOADED_COLUMNS = ("split", "label_idx")
EXIT_INTERRUPTED = 130


def train_locations(frame: pd.DataFrame) -> pd.Series:
    """Crops per ``(dataset, location)`` of the train split, in sorted order."""
    train = frame[frame["split"] == "train"]
    return train.groupby([train["dataset"].astype(str), train["location"].astype(str)]).size().sort_index()


def assign_folds(crops_per_location: pd.Series, folds: int, seed: int) -> dict[LocationKey, int]:
    """``{(dataset, location): fold}`` with folds 1..``folds``, every fold at least one location.

    Largest locations first, each to the fold with the fewest crops so far, so folds hold similar numbers of crops;
    ``seed`` breaks ties between locations of equal size.

    Raises:
        ReviewError: fewer train locations than folds.
    """
    keys: list[LocationKey] = [(str(d), str(loc)) for d, loc in crops_per_location.index]
    if folds > len(keys):
        raise ReviewError(
            f"review.folds: {folds} folds need at least {folds} train locations, the run's dataset has {len(keys)}; "
            f"use review.folds={len(keys)} or fewer"
        )
    counts = crops_per_location.to_numpy(dtype=np.int64)
    shuffled = np.random.default_rng(seed).permutation(len(keys))
    order = shuffled[np.argsort(-counts[shuffled], kind="stable")]
    loads = np.zeros(folds, dtype=np.int64)
    assignment: dict[LocationKey, int] = {}
    for i in order:
        fold = int(np.argmin(loads))
        assignment[keys[i]] = fold + 1
        loads[fold] += counts[i]
    return dict(sorted(assignment.items()))


def fold_frame(frame: pd.DataFrame, fold_of: Mapping[LocationKey, int], fold: int) -> pd.DataFrame:
    """The ``classification_ds.csv`` of fold ``fold``: its role per crop in ``split_group`` (``<role>|<location>``).

    Args:
        frame: the run's dataset as loaded (with its ``split`` column).
        fold_of: :func:`assign_folds`.
        fold: the fold (1-based).
    """
    keys = list(zip(frame["dataset"].astype(str), frame["location"].astype(str), strict=True))
    split = frame["split"].astype(str).to_numpy()
    role = np.full(len(frame), "", dtype=object)
    in_fold = np.array([fold_of.get(key) == fold for key in keys], dtype=bool)
    role[(split == "train") & in_fold] = ROLE_SCORED
    role[(split == "train") & ~in_fold] = ROLE_TRAIN
    role[split == "val"] = ROLE_VAL
    keep = role != ""
    out: pd.DataFrame = frame.loc[keep, [c for c in frame.columns if c not in _LOADED_COLUMNS]].copy()
    out[GROUP_COLUMN] = [
        f"{r}|{loc}" for r, (_, loc) in zip(role[keep], np.asarray(keys, dtype=object)[keep], strict=True)
    ]
    return out.reset_index(drop=True)


def fold_splits(frame: pd.DataFrame) -> dict[str, list[list[str]]]:
    """``splits.json`` of a :func:`fold_frame`: each role's ``[dataset, split_group]`` pairs in its split."""
    splits: dict[str, list[list[str]]] = {"train": [], "val": [], "test": []}
    pairs = frame[["dataset", GROUP_COLUMN]].astype(str).drop_duplicates()
    for dataset, group in pairs.itertuples(index=False):
        splits[ROLE_SPLIT[str(group).split("|", 1)[0]]].append([str(dataset), str(group)])
    return splits


def write_fold_dataset(source: Path, frame: pd.DataFrame, folder: Path) -> None:
    """A prepared dataset folder for one fold: its CSV and splits, the run's label index, crop rule and taxonomy,
    and ``crops`` linked to the run's crops (nothing is copied)."""
    write_classification_csv(frame, folder / "classification_ds.csv")
    write_splits(fold_splits(frame), folder / "splits.json")
    for name in (LABEL_INDEX_FILENAME, INFO_FILENAME, TAXONOMY_FILENAME):
        if (source / name).is_file():
            atomic_write_bytes(folder / name, (source / name).read_bytes())
    link = folder / "crops"
    target = (source / "crops").resolve()
    if link.is_symlink() and link.readlink() != target:
        link.unlink()
    if not link.is_symlink():
        link.symlink_to(target, target_is_directory=True)


def _override(key: str, value: str | Path) -> str:
    # Quoted, so that a path with spaces, commas or '=' reaches train.py as one value.
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"++{key}='{text}'"


def fold_command(
    train_command: Sequence[str], run_dir: Path, fold_data: Path, fold_run: Path, resume: Path | None
) -> list[str]:
    """``train.py`` with the run's saved config as its primary config, on the fold's dataset, into the fold's folder.

    Loggers and ``report.html`` are off: a fold is a means to probabilities, not a run to share.
    """
    return [
        *train_command,
        "--config-path",
        str((run_dir / ".hydra").resolve()),
        "--config-name",
        "config",
        _override("data_dir", fold_data.resolve()),
        _override("hydra.run.dir", fold_run.resolve()),
        # the saved config has no hydra node: the fold's log is train.log as in a run (configs/hydra/default.yaml)
        "hydra.job.name=train",
        "++train=true",
        "++test=true",
        _override("ckpt_path", resume.resolve()) if resume is not None else "++ckpt_path=null",
        "++logger=null",
        "++report.enabled=false",
    ]


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The run's saved settings (``.hydra/config.yaml``), checked to be those of a training run."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise ReviewError(
            f"review.folds: {run_dir} has no .hydra/config.yaml, the run's settings the folds are fitted with"
        )
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ReviewError(f"{path}: not YAML: {err}") from err
    if not isinstance(config, dict):
        raise ReviewError(f"{path}: expected a mapping of settings")
    if config.get("train") is False:
        raise ReviewError(
            f"review.folds: {run_dir} is an evaluation (train=false); its model settings are not the checkpoint's. "
            "Give the folder of the run that trained it"
        )
    return config


def fold_record(run: RunPredictions, folds: int, seed: int, fold_of: Mapping[LocationKey, int]) -> dict[str, Any]:
    """What ``folds.json`` holds: the settings and the run dataset's fingerprint the folds were made for."""
    return {
        "folds": folds,
        "seed": seed,
        "fingerprint": run.record.fingerprint,
        "locations": [[d, loc, k] for (d, loc), k in fold_of.items()],
    }


def _check_folds_record(path: Path, expected: Mapping[str, Any]) -> None:
    if not path.is_file():
        atomic_write_json(path, dict(expected))
        return
    found = read_json_file(path, ReviewError)
    if found != dict(expected):
        raise ReviewError(
            f"{path.parent} holds folds made with other settings (review.fold_seed) or another dataset; "
            f"delete {path.parent} to fit the folds again"
        )


def fold_done(fold_run: Path) -> bool:
    """Whether a fold's fit finished: its predictions and their record are written."""
    metrics = fold_run / "metrics"
    return (metrics / PREDICTIONS_RECORD_FILENAME).is_file() and (metrics / "predictions_test.csv").is_file()


def run_fold(command: Sequence[str], stderr_file: Path, fold: int, folds: int) -> None:
    """Run one fold's ``train.py`` (its progress on this terminal); a failure is one line naming its log."""
    stderr_file.parent.mkdir(parents=True, exist_ok=True)
    with stderr_file.open("w", encoding="utf-8") as stderr:
        # train.py's own Ctrl-C hint would name its folder; this command resumes the fold by itself.
        returncode = subprocess.run(list(command), stderr=stderr, check=False).returncode
    if returncode == EXIT_INTERRUPTED:
        raise KeyboardInterrupt
    if returncode != 0:
        lines = [line.strip() for line in stderr_file.read_text(encoding="utf-8", errors="replace").splitlines()]
        errors = [line for line in lines if line.startswith("train.py:")] or [line for line in lines if line]
        last = errors[-1] if errors else f"exit status {returncode}"
        raise ReviewError(f"review.folds: fold {fold}/{folds} failed: {last} (whole log: {stderr_file})")


def collect_fold(fold_run: Path, fold_data: Path, expected: set[str], labels: Sequence[str]) -> pd.DataFrame:
    """A finished fold's test predictions, checked to be of its dataset and to cover exactly its scored crops."""
    record = read_predictions_record(fold_run / "metrics" / PREDICTIONS_RECORD_FILENAME)
    if record.labels != list(labels) or record.fingerprint != dataset_fingerprint(fold_data):
        raise ReviewError(
            f"{fold_run}'s predictions are not of {fold_data} as it is now; delete {fold_run} to fit it again"
        )
    frame = read_predictions(fold_run / "metrics" / "predictions_test.csv", labels)
    found = set(frame["path"].astype(str))
    if found != expected:
        raise ReviewError(
            f"{fold_run}/metrics/predictions_test.csv scores {len(found)} crops, its fold holds {len(expected)}; "
            f"delete {fold_run} to fit it again"
        )
    return frame


def score_train_crops(
    run: RunPredictions,
    folds: int,
    seed: int,
    train_command: Sequence[str],
    launch: Callable[[Sequence[str], Path, int, int], None] = run_fold,
) -> pd.DataFrame:
    """Out-of-sample predictions of every train crop of ``run`` (``path, label, prediction`` + probabilities).

    Args:
        run: the run (its predictions, record and dataset).
        folds: K.
        seed: tie-break of :func:`assign_folds`.
        train_command: how to start ``train.py`` (``[python, -m, animl_lightning.train_command]``).
        launch: runs one fold's command (tests replace it to stop between folds).
    """
    read_run_config(run.run_dir)
    frame = run.prepared.frame
    fold_of = assign_folds(train_locations(frame), folds, seed)
    root = run.run_dir / REVIEW_DIRNAME / f"folds_{folds}"
    root.mkdir(parents=True, exist_ok=True)
    _check_folds_record(root / FOLDS_RECORD_FILENAME, fold_record(run, folds, seed, fold_of))
    parts = []
    for fold in range(1, folds + 1):
        folder = root / f"fold_{fold}"
        data, fit = folder / "data", folder / "run"
        fold_crops = fold_frame(frame, fold_of, fold)
        roles = fold_crops[GROUP_COLUMN].str.split("|", n=1).str[0]
        scored = set(fold_crops.loc[roles == ROLE_SCORED, "path"].astype(str))
        if fold_done(fit):
            log.info("fold %d/%d: already fitted (%s)", fold, folds, fit)
        else:
            write_fold_dataset(run.prepared.root, fold_crops, data)
            last = fit / "checkpoints" / "last.ckpt"
            resume = last if last.is_file() else None
            trained = fold_crops[roles == ROLE_TRAIN]
            missing = sorted(set(run.labels) - set(trained["label"].astype(str)))
            log.info(
                "fold %d/%d: %s on %d crops at %d locations, scoring %d crops at %d locations -> %s",
                fold,
                folds,
                "resuming from last.ckpt, training" if resume else "training",
                len(trained),
                trained["location"].nunique(),
                len(scored),
                sum(1 for k in fold_of.values() if k == fold),
                fit,
            )
            if missing:
                log.warning(
                    "fold %d/%d trains without any crop of %s: its scores for them mean little", fold, folds, missing
                )
            started = time.monotonic()
            launch(fold_command(train_command, run.run_dir, data, fit, resume), folder / STDERR_FILENAME, fold, folds)
            log.info("fold %d/%d: done in %.0f s", fold, folds, time.monotonic() - started)
        parts.append(collect_fold(fit, data, scored, run.labels))
    return pd.concat(parts, ignore_index=True)
