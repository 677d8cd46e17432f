"""End-to-end train.py runs (model=tiny on CPU) through Hydra's compose API."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.errors import InstantiationException
from PIL import Image

import train as train_script
from animl_lightning.cli import user_error
from animl_lightning.core.contract import DatasetError, read_crop_rule
from animl_lightning.core.crop_rule import CropRule
from animl_lightning.core.files import LOCK_FILENAME
from animl_lightning.core.model_file import MODEL_KEY
from animl_lightning.train.classifier import CropClassifier
from animl_lightning.train.run import resolve_precision
from animl_lightning.train.scores import OVERALL_COLUMNS, PER_LABEL_COLUMNS
from tests.fixtures.datasets import make_prepared_dataset
from tests.fixtures.hydra import FAST_OVERRIDES, REPO_ROOT, compose_config, compose_train
from tests.fixtures.scripts import run_command

LABELS = ["bird", "fox", "skunk"]
SPLITS = ["train", "val", "test"]


TAXONOMY_CSV = """label,class,order,family,genus,species
bird,aves,,,,
fox,mammalia,carnivora,canidae,vulpes,vulpes vulpes
skunk,mammalia,carnivora,mephitidae,mephitis,mephitis mephitis
"""


def run_train(data_dir: Path, output_dir: Path, *overrides: str) -> float | None:
    cfg = compose_train(data_dir, output_dir, overrides)
    return train_script.train(cfg)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # fox has no crop in the test split: its test row must still exist (support 0, recall NaN)
    root = make_prepared_dataset(tmp_path_factory.mktemp("data"), missing=[("test", "fox")])
    (root / "taxonomy.csv").write_text(TAXONOMY_CSV)  # as prepare.py writes it for labels.taxonomy_file
    return root


@pytest.fixture(scope="module")
def fitted(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float | None]:
    output = tmp_path_factory.mktemp("run")
    return output, run_train(data_dir, output)


def read_metrics(output: Path) -> dict[str, pd.DataFrame]:
    metrics = output / "metrics"
    return {
        "per_label": pd.read_csv(metrics / "per_label.csv"),
        "overall": pd.read_csv(metrics / "overall.csv"),
        **{f"predictions_{s}": pd.read_csv(metrics / f"predictions_{s}.csv") for s in SPLITS},
    }


def test_fit_writes_every_table(fitted: tuple[Path, float | None], data_dir: Path) -> None:
    output, value = fitted
    assert (output / "checkpoints" / "best.ckpt").is_file()
    assert (output / "checkpoints" / "last.ckpt").is_file()
    assert (output / "csv" / "metrics.csv").is_file()
    tables = read_metrics(output)

    per_label = tables["per_label"]
    assert list(per_label.columns) == list(PER_LABEL_COLUMNS)
    assert list(zip(per_label["split"], per_label["label"], strict=True)) == [(s, lb) for s in SPLITS for lb in LABELS]
    support = per_label.set_index(["split", "label"])["support"]
    assert support[("train", "bird")] == 16 and support[("val", "fox")] == 8 and support[("test", "fox")] == 0
    test_fox = per_label[(per_label["split"] == "test") & (per_label["label"] == "fox")].iloc[0]
    assert math.isnan(test_fox["recall"]) and math.isnan(test_fox["type_II_error"])
    assert (per_label["tp"] + per_label["fn"] == per_label["support"]).all()
    finite = per_label.dropna(subset=["precision"])
    assert ((finite["type_I_error"] - (1 - finite["precision"])).abs() < 1e-9).all()

    every_level = tables["overall"]
    assert list(every_level.columns) == ["split", "level", *OVERALL_COLUMNS[1:]]
    assert list(every_level["level"]) == ["crop", "image", "sequence"] * len(SPLITS)
    overall = every_level[every_level["level"] == "crop"].drop(columns="level")
    assert list(overall["split"]) == SPLITS
    assert list(overall["n"]) == [48, 24, 16]
    assert overall[["loss", "top1", "top3", "balanced_accuracy"]].notna().all().all()
    val = overall.set_index("split").loc["val"]
    assert value == pytest.approx(val["balanced_accuracy"])
    # balanced accuracy is the mean per-label recall of the table
    val_rows = per_label[per_label["split"] == "val"]
    assert val["balanced_accuracy"] == pytest.approx(val_rows["recall"].mean())

    for split, n in zip(SPLITS, [48, 24, 16], strict=True):
        predictions = tables[f"predictions_{split}"]
        assert list(predictions.columns) == ["path", "label", "prediction", *LABELS]
        assert len(predictions) == n and predictions["path"].is_unique
        assert ((predictions[LABELS].sum(axis=1) - 1).abs() < 1e-4).all()
        assert (data_dir / "crops" / predictions["path"].iloc[0]).is_file()
        confusion = pd.read_csv(output / "metrics" / f"confusion_{split}.csv", index_col=0)
        assert list(confusion.index) == LABELS and list(confusion.columns) == LABELS
        assert confusion.to_numpy().sum() == n
        # the confusion matrix counts exactly the predictions in the predictions file
        crosstab = pd.crosstab(predictions["label"], predictions["prediction"])
        for true_label in crosstab.index:
            for predicted in crosstab.columns:
                assert confusion.loc[true_label, predicted] == crosstab.loc[true_label, predicted]
        with Image.open(output / "metrics" / f"confusion_{split}.png") as image:
            assert image.format == "PNG"
    assert not list((output / "metrics").glob(".*tmp-*"))


def test_checkpoint_is_plain_and_loads_with_weights_only(fitted: tuple[Path, float | None]) -> None:
    output, _ = fitted
    raw = torch.load(output / "checkpoints" / "best.ckpt", weights_only=True)
    hparams = raw["hyper_parameters"]
    assert hparams["class_names"] == LABELS
    assert hparams["model_name"] == "test_efficientnet"
    assert hparams["data_config"]["input_size"] == [3, 64, 64]
    assert hparams["crop_rule"] == {"strategy": "square", "max_size": 64, "lossless": False}
    assert raw[MODEL_KEY]["crop_rule"] == hparams["crop_rule"]
    assert raw[MODEL_KEY]["labels"] == {str(i): label for i, label in enumerate(LABELS)}
    model = CropClassifier.from_checkpoint(output / "checkpoints" / "best.ckpt")
    assert model.class_names == LABELS


def test_evaluating_a_checkpoint_writes_the_same_tables(
    fitted: tuple[Path, float | None], data_dir: Path, tmp_path: Path
) -> None:
    output, value = fitted
    best = output / "checkpoints" / "best.ckpt"
    evaluated = run_train(data_dir, tmp_path, "train=false", f"ckpt_path={best}", "model=effnet_b3")
    assert evaluated == pytest.approx(value)
    assert not (tmp_path / "checkpoints").exists()
    first, second = read_metrics(output), read_metrics(tmp_path)
    for name in ("per_label", "predictions_val", "predictions_test"):
        pd.testing.assert_frame_equal(first[name], second[name], rtol=1e-4)
    pd.testing.assert_frame_equal(first["overall"], second["overall"], rtol=1e-4)


def test_last_checkpoint_is_written_every_epoch_even_without_improvement(data_dir: Path, tmp_path: Path) -> None:
    # Nothing can learn (frozen backbone in eval mode, head at lr 0): the monitored metric never improves after epoch 0.
    run_train(data_dir, tmp_path, "optimizer.lr=0.0", "model.finetune_epochs=10", "trainer.max_epochs=3")
    checkpoints = tmp_path / "checkpoints"
    assert torch.load(checkpoints / "best.ckpt", weights_only=True)["epoch"] == 0
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["epoch"] == 2  # resume continues from here
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]


def test_resume_from_last_checkpoint(fitted: tuple[Path, float | None], data_dir: Path, tmp_path: Path) -> None:
    output, _ = fitted
    last = output / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 1
    run_train(data_dir, tmp_path, f"ckpt_path={last}", "trainer.max_epochs=3")
    resumed = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["epoch"] == 2
    assert resumed["global_step"] == 3 * 6  # 6 steps per epoch, continued from step 12
    logged = pd.read_csv(tmp_path / "csv" / "metrics.csv")
    trained_epochs = set(logged.dropna(subset=["train/loss"])["epoch"].astype(int))
    assert 0 not in trained_epochs and 2 in trained_epochs
    assert (tmp_path / "metrics" / "per_label.csv").is_file()
    # The resumed run's history has the epoch it resumed from (its row travels in last.ckpt), and every other.
    history = pd.read_csv(tmp_path / "history.csv")
    assert history["epoch"].tolist() == [0, 1, 2]
    assert history.loc[history["epoch"] == 1, "val/loss"].notna().all()
    first = pd.read_csv(output / "history.csv").set_index("epoch")
    pd.testing.assert_frame_equal(history.set_index("epoch").loc[[0, 1], first.columns], first)


def test_same_seed_gives_the_same_run(fitted: tuple[Path, float | None], data_dir: Path, tmp_path: Path) -> None:
    output, value = fitted
    again = run_train(data_dir, tmp_path)
    assert again == value
    pd.testing.assert_frame_equal(
        read_metrics(output)["predictions_val"], read_metrics(tmp_path)["predictions_val"], rtol=1e-5
    )


def test_empty_test_split_skips_the_test_rows(tmp_path: Path) -> None:
    data = make_prepared_dataset(tmp_path / "data", split_locations=(3, 1, 0), per_label=4, size=32)
    output = tmp_path / "run"
    value = run_train(data, output, "data.image_size=32")
    assert value is not None
    per_label = pd.read_csv(output / "metrics" / "per_label.csv")
    assert set(per_label["split"]) == {"train", "val"}
    assert list(pd.read_csv(output / "metrics" / "overall.csv")["split"]) == ["train"] * 3 + ["val"] * 3
    assert not (output / "metrics" / "predictions_test.csv").exists()


def test_a_run_without_epochs_and_a_moved_dataset_get_a_report(tmp_path: Path) -> None:
    from animl_lightning.train.report import build_report

    data = make_prepared_dataset(tmp_path / "data", per_label=4, size=32)
    output = tmp_path / "run"
    run_train(data, output, "data.image_size=32", "trainer.max_epochs=0")
    page = (output / "report.html").read_text(encoding="utf-8")
    assert f"<td>{data.name} ({len(pd.read_csv(data / 'classification_ds.csv'))} crops," in page
    assert "No per-epoch history" in page
    data.rename(tmp_path / "moved")
    build_report(output)
    page = (output / "report.html").read_text(encoding="utf-8")
    assert f"the prepared dataset {data.resolve()} is not here (moved?)" in page
    assert 'data-table="per label, crop level"' in page  # the run's own tables are still there


def test_wandb_offline_gets_the_tables(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run_train(data_dir, tmp_path, "logger=wandb", "trainer.max_epochs=1")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = runs[0] / "files" / "media" / "table"
    for split in SPLITS:
        tables = list((media / split).glob("per_label_*.table.json"))
        assert tables, f"no wandb per_label table for {split}"
        payload: dict[str, Any] = json.loads(tables[0].read_text())
        assert payload["columns"] == list(PER_LABEL_COLUMNS)
        assert len(payload["data"]) == len(LABELS)
        assert list((media / split).glob("confusion_matrix*.table.json"))
        for level in ("image", "sequence"):
            level_tables = list((media / split).glob(f"per_label_{level}_*.table.json"))
            assert level_tables and json.loads(level_tables[0].read_text())["columns"] == list(PER_LABEL_COLUMNS)
        assert list((media / split).glob("per_location_*.table.json"))
    assert list(media.glob("overall_*.table.json"))
    assert (tmp_path / "metrics" / "per_label.csv").is_file()
    import wandb

    assert wandb.run is None  # train() finished the run


def test_train_false_needs_a_checkpoint(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ckpt_path"):
        run_train(data_dir, tmp_path, "train=false")


def test_checkpoint_of_other_labels_is_refused(fitted: tuple[Path, float | None], tmp_path: Path) -> None:
    output, _ = fitted
    other = make_prepared_dataset(tmp_path / "other", labels=["cat", "dog"], per_label=1, size=16)
    with pytest.raises(ValueError, match="trained on labels"):
        run_train(other, tmp_path / "run", "train=false", f"ckpt_path={output / 'checkpoints' / 'best.ckpt'}")


def test_inconsistent_dataset_fails_before_training(tmp_path: Path) -> None:
    data = make_prepared_dataset(tmp_path / "data", per_label=1, size=16)
    (data / "label_index.json").write_text(json.dumps({"0": "bird", "1": "fox"}))
    with pytest.raises(DatasetError, match="skunk"):
        run_train(data, tmp_path / "run")
    # Nothing but what the command writes first once it holds the folder: its lock and the config it ran with.
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_FILENAME, ".hydra"]


def test_bad_setting_is_reported_without_traceback(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InstantiationException) as info:
        run_train(data_dir, tmp_path, "data.batch_size=0")
    message = user_error(info.value)
    assert message is not None and "data.batch_size" in message
    assert user_error(ValueError("a bug raised elsewhere")) is None


def test_command_line_error_exits_nonzero_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "train.py", f"data_dir={tmp_path / 'missing'}", "model=tiny", f"hydra.run.dir={tmp_path}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "error: data_dir" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_precision_resolution() -> None:
    assert resolve_precision("auto", "cpu") == "32-true"
    assert resolve_precision("16-mixed", "gpu") == "16-mixed"
    expected = "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    assert resolve_precision("auto", "auto") == expected


def test_crop_rule_from_prepare_info(tmp_path: Path) -> None:
    # No silent default: a dataset without its crop rule cannot tell classify how to cut crops.
    with pytest.raises(DatasetError, match=r"prepare_info\.json does not exist"):
        read_crop_rule(tmp_path)
    (tmp_path / "prepare_info.json").write_text(json.dumps({"crops": {"strategy": "pad", "max_size": 512}}))
    assert read_crop_rule(tmp_path) == CropRule("pad", 512)
    (tmp_path / "prepare_info.json").write_text(json.dumps({"crops": {"strategy": "pad", "max_size": "big"}}))
    with pytest.raises(DatasetError, match=r"crops\.max_size"):
        read_crop_rule(tmp_path)


def test_evaluating_a_checkpoint_finds_its_dataset_by_itself(
    fitted: tuple[Path, float | None], data_dir: Path, tmp_path: Path
) -> None:
    output, _ = fitted
    best = output / "checkpoints" / "best.ckpt"
    assert torch.load(best, weights_only=True)["hyper_parameters"]["data_dir"] == str(data_dir.resolve())
    # data_dir not given: the checkpoint's own dataset, not the default data/demo
    cfg = compose_config(
        "train",
        [
            f"paths.output_dir={tmp_path}",
            f"hydra.run.dir={tmp_path}",
            *FAST_OVERRIDES,
            "train=false",
            f"ckpt_path={best}",
        ],
    )
    assert cfg.data_dir == "data/demo"
    train_script.train(cfg)
    assert pd.read_csv(tmp_path / "metrics" / "per_label.csv").equals(pd.read_csv(output / "metrics" / "per_label.csv"))
    # Its report.html has what is known: the evaluated checkpoint's model and the dataset it was evaluated on.
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    crops = len(pd.read_csv(data_dir / "classification_ds.csv"))
    assert f"<td>{data_dir.name} ({crops} crops," in page and "test_efficientnet" in page


@pytest.mark.parametrize("level", ["image", "sequence"])
def test_image_and_sequence_tables_equal_an_independent_pandas_computation(
    fitted: tuple[Path, float | None], data_dir: Path, level: str
) -> None:
    output, _ = fitted
    dataset = pd.read_csv(data_dir / "classification_ds.csv")
    dataset["image"] = dataset["dataset"] + ":" + dataset["image_id"]
    table = pd.read_csv(output / "metrics" / f"per_label_{level}.csv")
    assert list(table.columns) == list(PER_LABEL_COLUMNS)
    overall = pd.read_csv(output / "metrics" / "overall.csv")
    for split in SPLITS:
        predictions = pd.read_csv(output / "metrics" / f"predictions_{split}.csv")
        joined = predictions.merge(dataset[["path", "image", "sequence"]], on="path", validate="one_to_one")
        # the group's prediction: highest mean probability; one unit per group and true label
        mean = joined.groupby(level)[LABELS].mean()
        predicted = mean.idxmax(axis=1).rename("predicted")
        units = joined[[level, "label"]].drop_duplicates().join(predicted, on=level)
        expected = {}
        for label in LABELS:
            tp = int(((units["label"] == label) & (units["predicted"] == label)).sum())
            fp = int(((units["label"] != label) & (units["predicted"] == label)).sum())
            fn = int(((units["label"] == label) & (units["predicted"] != label)).sum())
            expected[label] = [tp, fp, fn]
        got = table[table["split"] == split].set_index("label")
        assert {label: got.loc[label, ["tp", "fp", "fn"]].tolist() for label in LABELS} == expected
        row = overall[(overall["split"] == split) & (overall["level"] == level)].iloc[0]
        assert row["n"] == len(units)
        assert row["top1"] == pytest.approx((units["label"] == units["predicted"]).mean())
    # The fixture's sequences hold every label of their location, so they really are multi-species units.
    assert (
        table.groupby("split")["support"].sum()["val"]
        > dataset.loc[dataset["path"].str.contains("loc2"), "sequence"].nunique()
    )


def test_per_location_table_equals_an_independent_pandas_computation(
    fitted: tuple[Path, float | None], data_dir: Path
) -> None:
    output, _ = fitted
    dataset = pd.read_csv(data_dir / "classification_ds.csv")
    table = pd.read_csv(output / "metrics" / "per_location.csv")
    assert list(table.columns[:6]) == ["split", "location", "crops", "sequences", "top1", "balanced_accuracy"]
    for split in SPLITS:
        predictions = pd.read_csv(output / "metrics" / f"predictions_{split}.csv")
        joined = predictions.merge(dataset[["path", "location", "sequence"]], on="path", validate="one_to_one")
        joined["hit"] = joined["label"] == joined["prediction"]
        for location, part in joined.groupby("location"):
            row = table[(table["split"] == split) & (table["location"] == location)].iloc[0]
            assert row["crops"] == len(part) and row["sequences"] == part["sequence"].nunique()
            assert row["top1"] == pytest.approx(part["hit"].mean())
            recall = part.groupby("label")["hit"].mean()
            assert row["balanced_accuracy"] == pytest.approx(recall.mean())
            for label in LABELS:
                value = row[f"recall_{label}"]
                assert (np.isnan(value) and label not in recall.index) or value == pytest.approx(recall[label])


def test_eval_smoothing_votes_with_megadetectors_rules(
    fitted: tuple[Path, float | None], data_dir: Path, tmp_path: Path
) -> None:
    from animl_lightning.core.smoothing import SmoothingOptions, smooth_group

    output, _ = fitted
    best = output / "checkpoints" / "best.ckpt"
    run_train(data_dir, tmp_path, "train=false", f"ckpt_path={best}", "eval.smoothing=image")
    dataset = pd.read_csv(data_dir / "classification_ds.csv")
    predictions = pd.read_csv(tmp_path / "metrics" / "predictions_val.csv")
    joined = predictions.merge(dataset[["path", "image_id", "confidence"]], on="path", validate="one_to_one")
    expected_tp = dict.fromkeys(LABELS, 0)
    for _, image in joined.groupby("image_id", sort=False):
        tops = image[LABELS].idxmax(axis=1).tolist()
        confidences = image[LABELS].max(axis=1).tolist()
        votes = pd.Series(smooth_group(tops, confidences, frozenset(), SmoothingOptions())).value_counts()
        best_votes = votes[votes == votes.max()].index
        predicted = image[LABELS].mean()[best_votes].idxmax()
        for label in image["label"].unique():
            expected_tp[label] += int(predicted == label)
    table = pd.read_csv(tmp_path / "metrics" / "per_label_image.csv")
    got = table[table["split"] == "val"].set_index("label")["tp"].to_dict()
    assert got == expected_tp


@pytest.mark.slow
def test_eval_smoothing_must_be_a_known_level(data_dir: Path, tmp_path: Path) -> None:
    result = run_command(
        "train.py", [f"data_dir={data_dir}", f"hydra.run.dir={tmp_path}", "model=tiny", "eval.smoothing=video"]
    )
    assert result.returncode == 2
    assert "eval.smoothing: must be one of ['none', 'image', 'sequence'], got 'video'" in result.stderr
    assert "Traceback" not in result.stderr


def _expected_thresholds(predictions: pd.DataFrame, target: float, min_support: int) -> dict[str, float | None]:
    """Independently: per label, the lowest probability t such that the crops predicted as it with confidence
    >= t are at least ``min_support`` and at least ``target`` right."""
    predictions = predictions.assign(confidence=predictions[LABELS].max(axis=1))
    out: dict[str, float | None] = {}
    for label in LABELS:
        mine = predictions[predictions["prediction"] == label]
        out[label] = None
        if not (predictions["label"] == label).any():
            continue
        for t in sorted(mine["confidence"].unique(), reverse=True):
            chosen = mine[mine["confidence"] >= t]
            if len(chosen) >= min_support and (chosen["label"] == label).mean() >= target:
                out[label] = float(t)
    return out


def _thresholds_csv(run: Path) -> dict[str, float | None]:
    table = pd.read_csv(run / "metrics" / "thresholds.csv")
    rows = table[table["rank"] == "label"].set_index("label")
    assert all(bool(rows.loc[label, "reason"]) for label in LABELS if np.isnan(rows.loc[label, "threshold"]))
    return {label: None if np.isnan(v) else float(v) for label, v in rows["threshold"].items()}


def test_thresholds_are_chosen_on_val_stored_in_the_checkpoint_and_tabled(
    fitted: tuple[Path, float | None], data_dir: Path, tmp_path: Path
) -> None:
    output, _ = fitted
    val = pd.read_csv(output / "metrics" / "predictions_val.csv")
    got = _thresholds_csv(output)
    assert got == pytest.approx(_expected_thresholds(val, 0.95, 10), abs=1e-6)
    raw = torch.load(output / "checkpoints" / "best.ckpt", weights_only=True)
    record = raw["thresholds"]
    assert record["target_precision"] == 0.95 and record["min_support"] == 10
    assert record["per_label"] == pytest.approx(got, abs=1e-6)
    assert raw["taxonomy"]["labels"] == LABELS
    table = pd.read_csv(output / "metrics" / "thresholds.csv")
    assert {"val_precision_at_0.5", "test_coverage"} <= set(table.columns)
    assert set(table["rank"]) == {"label", "class", "order", "family", "genus", "species"}

    # With a lower bar (val has 8 crops per label), thresholds exist and still follow the definition.
    best = output / "checkpoints" / "best.ckpt"
    overrides = ["thresholds.target_precision=0.8", "thresholds.min_support=3"]
    run_train(data_dir, tmp_path, "train=false", f"ckpt_path={best}", *overrides)
    lower = _thresholds_csv(tmp_path)
    assert any(v is not None for v in lower.values())
    assert lower == pytest.approx(_expected_thresholds(val, 0.8, 3), abs=1e-6)


@pytest.mark.parametrize("rank", ["class", "family"])
def test_rank_tables_equal_an_independent_pandas_computation(fitted: tuple[Path, float | None], rank: str) -> None:
    output, _ = fitted
    taxonomy = pd.read_csv(io.StringIO(TAXONOMY_CSV), keep_default_na=False).set_index("label")
    table = pd.read_csv(output / "metrics" / f"per_label_{rank}.csv")
    taxa = sorted(t for t in taxonomy[rank].unique() if t)
    for split in SPLITS:
        predictions = pd.read_csv(output / "metrics" / f"predictions_{split}.csv")
        summed = pd.DataFrame({t: predictions[list(taxonomy.index[taxonomy[rank] == t])].sum(axis=1) for t in taxa})
        truth = predictions["label"].map(taxonomy[rank])
        keep = truth != ""
        predicted = summed[keep].idxmax(axis=1)
        got = table[table["split"] == split].set_index("label")
        for taxon in taxa:
            tp = int(((truth[keep] == taxon) & (predicted == taxon)).sum())
            fp = int(((truth[keep] != taxon) & (predicted == taxon)).sum())
            fn = int(((truth[keep] == taxon) & (predicted != taxon)).sum())
            assert got.loc[taxon, ["tp", "fp", "fn"]].tolist() == [tp, fp, fn], (split, taxon)
