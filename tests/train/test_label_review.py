"""The label review: cleanlab ranking on known probabilities, folds of whole locations, and the command on a real
train.py run with planted label flips (outputs, Animl id files, the page, one-line refusals); folds and Chromium
(slow)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from animl_lightning.core.contract import GROUP_COLUMN, load_prepared_dataset
from animl_lightning.core.errors import ConfigError
from animl_lightning.train.label_review import (
    ISSUE_COLUMNS,
    UNCERTAIN_COLUMNS,
    ReviewError,
    ReviewSettings,
    animl_id_lists,
    id_filenames,
    rank_label_issues,
    uncertain_crops,
)
from animl_lightning.train.prediction_record import dataset_fingerprint, read_predictions_record
from animl_lightning.train.review_folds import (
    ROLE_SCORED,
    ROLE_TRAIN,
    ROLE_VAL,
    assign_folds,
    fold_frame,
    fold_splits,
    train_locations,
)
from tests.fixtures.browser import Browser
from tests.fixtures.datasets import make_prepared_dataset
from tests.fixtures.hydra import FAST_OVERRIDES
from tests.fixtures.label_noise import flip_dataset_labels, recovery
from tests.fixtures.pages import parse_report
from tests.fixtures.scripts import command, command_env, run_command, run_train_script

LABELS = ["bird", "fox", "skunk"]
# Planted flips per split in the synthetic run (val and test hold one location each, 24 crops).
FLIPS = {"train": 3, "val": 3, "test": 3}


def crops_frame(given: list[str], splits: list[str] | None = None) -> pd.DataFrame:
    n = len(given)
    return pd.DataFrame(
        {
            "annotation_id": [f"a{i}" for i in range(n)],
            "image_id": [f"p:img{i}" for i in range(n)],
            "file": [f"c/{i}.jpg" for i in range(n)],
            "location": ["loc"] * n,
            "sequence": [f"s{i}" for i in range(n)],
            "split": splits or ["val"] * n,
            "given_label": given,
        }
    )


# --- ranking on known probabilities -------------------------------------------------------------------------------


def confident_probs(true: list[int], rng: np.random.Generator, k: int = 3) -> np.ndarray:
    probs = rng.dirichlet(np.ones(k) * 0.3, size=len(true)) * 0.15
    probs[np.arange(len(true)), true] += 0.85
    return probs / probs.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("method", ["self_confidence", "normalized_margin", "confidence_weighted_entropy"])
def test_confidently_contradicted_labels_come_first(method: str) -> None:
    rng = np.random.default_rng(0)
    true = [i % 3 for i in range(60)]
    probs = confident_probs(true, rng)
    given = list(true)
    planted = [4, 17, 33, 50]
    for i in planted:
        given[i] = (true[i] + 1) % 3
    crops = crops_frame([LABELS[g] for g in given])
    issues = rank_label_issues(crops, probs, LABELS, method, "prune_by_noise_rate")
    assert list(issues.columns) == list(ISSUE_COLUMNS)
    assert set(issues["file"].head(len(planted))) == {f"c/{i}.jpg" for i in planted}
    assert issues["rank"].tolist() == list(range(1, len(issues) + 1))
    assert issues["label_quality"].is_monotonic_increasing
    first = issues.iloc[0]
    i = int(first["file"].split("/")[1].split(".")[0])
    # the suggestion is the most probable other label: here the true one
    assert first["suggested_label"] == LABELS[true[i]] and first["given_label"] == LABELS[given[i]]
    assert first["p_given"] == pytest.approx(probs[i, given[i]])
    assert first["p_suggested"] == pytest.approx(probs[i, true[i]])


def test_nothing_to_flag_in_clean_labels() -> None:
    rng = np.random.default_rng(1)
    true = [i % 3 for i in range(45)]
    issues = rank_label_issues(
        crops_frame([LABELS[t] for t in true]),
        confident_probs(true, rng),
        LABELS,
        "self_confidence",
        "prune_by_noise_rate",
    )
    assert issues.empty and list(issues.columns) == list(ISSUE_COLUMNS)


def test_uncertain_crops_by_top_probability_or_margin() -> None:
    probs = np.array(
        [
            [0.90, 0.05, 0.05],  # sure
            [0.45, 0.30, 0.25],  # low top probability
            [0.52, 0.46, 0.02],  # small margin
            [0.34, 0.33, 0.33],  # both, the smallest margin
        ]
    )
    table = uncertain_crops(crops_frame(["bird", "bird", "fox", "skunk"]), probs, LABELS, 0.5, 0.1)
    assert list(table.columns) == list(UNCERTAIN_COLUMNS)
    assert table["file"].tolist() == ["c/3.jpg", "c/2.jpg", "c/1.jpg"]
    assert table.iloc[1][["top_label", "second_label"]].tolist() == ["bird", "fox"]
    assert table["margin"].tolist() == pytest.approx([0.01, 0.06, 0.15])


def test_animl_id_lists_follow_the_ranking_per_given_label() -> None:
    issues = crops_frame(["fox", "bird", "fox"]).assign(rank=[1, 2, 3])
    texts = animl_id_lists(issues)
    assert texts == {"bird": "p:img1\ta1\n", "fox": "p:img0\ta0\np:img2\ta2\n"}
    assert id_filenames(["a b", "a-b", "a/b"]) == {"a b": "a_b.txt", "a-b": "a-b.txt", "a/b": "a_b_2.txt"}


def test_settings_are_checked_with_their_key() -> None:
    with pytest.raises(ConfigError, match=r"review.method: must be one of"):
        ReviewSettings(method="margin")
    with pytest.raises(ConfigError, match=r"review.folds: must be null .* or >= 2, got 1"):
        ReviewSettings(folds=1)
    with pytest.raises(ConfigError, match=r"review.uncertain_margin"):
        ReviewSettings(uncertain_margin=2.0)


# --- folds of whole locations --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def six_locations(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("folds")
    return make_prepared_dataset(root / "data", locations=8, per_label=2, size=16, split_locations=(6, 1, 1))


@pytest.mark.parametrize("folds", [2, 3, 6])
def test_no_crop_is_scored_by_a_model_that_trained_on_its_location(six_locations: Path, folds: int) -> None:
    frame = load_prepared_dataset(six_locations).frame
    fold_of = assign_folds(train_locations(frame), folds, seed=0)
    assert sorted(set(fold_of.values())) == list(range(1, folds + 1))  # every fold has a location
    scored: list[str] = []
    for fold in range(1, folds + 1):
        crops = fold_frame(frame, fold_of, fold)
        role = crops[GROUP_COLUMN].str.split("|").str[0]
        trained = set(crops.loc[role == ROLE_TRAIN, "location"])
        held_out = set(crops.loc[role == ROLE_SCORED, "location"])
        assert trained and held_out and not trained & held_out
        assert set(crops.loc[role == ROLE_VAL, "path"]) == set(frame.loc[frame["split"] == "val", "path"])
        assert not set(crops["path"]) & set(frame.loc[frame["split"] == "test", "path"])
        splits = fold_splits(crops)
        assert {g.split("|")[0] for _, g in splits["test"]} == {ROLE_SCORED}
        scored += crops.loc[role == ROLE_SCORED, "path"].tolist()
    # every train crop is scored exactly once
    assert sorted(scored) == sorted(frame.loc[frame["split"] == "train", "path"])
    assert assign_folds(train_locations(frame), folds, seed=0) == fold_of  # deterministic


def test_more_folds_than_locations_is_refused(six_locations: Path) -> None:
    frame = load_prepared_dataset(six_locations).frame
    with pytest.raises(ReviewError, match=r"review.folds: 7 folds need at least 7 train locations, .* has 6"):
        assign_folds(train_locations(frame), 7, seed=0)


# --- the command on a real run ------------------------------------------------------------------------------------


class ReviewParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.groups: list[str] = []
        self.ranks: list[int] = []
        self.images: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "section" and values.get("id"):
            self.sections.append(str(values["id"]))
        elif tag == "h3" and values.get("data-group"):
            self.groups.append(str(values["data-group"]))
        elif tag == "figure" and values.get("data-rank"):
            self.ranks.append(int(str(values["data-rank"])))
        elif tag == "img":
            self.images.append(str(values.get("src")))
        elif tag == "script":
            self.scripts += 1


@pytest.fixture(scope="module")
def flipped_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, set[str]]:
    """A train.py run on the synthetic dataset with 3 labels flipped in each split."""
    root = tmp_path_factory.mktemp("review")
    data = make_prepared_dataset(root / "data", per_label=8, size=48)
    flipped = flip_dataset_labels(data, FLIPS, seed=5)
    run = root / "run"
    result = run_train_script(
        [f"data_dir={data}", f"hydra.run.dir={run}", *FAST_OVERRIDES, "trainer.max_epochs=4", "logger=none"],
        cwd=root,
        timeout=1800,
    )
    assert result.returncode == 0
    return run, data, flipped


def review(run: Path, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return run_command("review", [f"run_dir={run}", *extra], timeout=timeout)


@pytest.fixture(scope="module")
def reviewed(flipped_run: tuple[Path, Path, set[str]]) -> Path:
    run, _, _ = flipped_run
    result = review(run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "likely label errors" in result.stdout
    assert "with the label review section" in result.stdout  # report.html rebuilt after the review
    return run / "review"


def test_the_run_ties_its_predictions_to_its_dataset(flipped_run: tuple[Path, Path, set[str]]) -> None:
    run, data, _ = flipped_run
    record = read_predictions_record(run / "metrics" / "predictions.json")
    assert record.data_dir == str(data.resolve()) and record.fingerprint == dataset_fingerprint(data)
    assert record.labels == LABELS and not record.calibrated
    for split in ("train", "val", "test"):
        assert record.rows[split] == len(pd.read_csv(run / "metrics" / f"predictions_{split}.csv"))


def test_planted_flips_in_val_and_test_lead_the_list(flipped_run: tuple[Path, Path, set[str]], reviewed: Path) -> None:
    _, data, flipped = flipped_run
    issues = pd.read_csv(reviewed / "label_issues.csv", dtype=str, keep_default_na=False)
    dataset = pd.read_csv(data / "classification_ds.csv", dtype=str)
    split_of = dataset.set_index("path")["location"].map({"loc2": "val", "loc3": "test"})
    out_of_sample = {path for path in flipped if split_of.get(path) in ("val", "test")}
    found, planted = recovery(issues, out_of_sample, "file")
    assert planted == FLIPS["val"] + FLIPS["test"]
    assert found >= 0.6 * planted, (found, planted, issues.head(12))
    # only out-of-sample crops: the run's model trained on the train split
    assert set(issues["split"]) <= {"val", "test"}


def test_label_issues_join_the_dataset(flipped_run: tuple[Path, Path, set[str]], reviewed: Path) -> None:
    run, data, _ = flipped_run
    issues = pd.read_csv(reviewed / "label_issues.csv", dtype=str, keep_default_na=False)
    assert list(issues.columns) == list(ISSUE_COLUMNS) and len(issues)
    dataset = pd.read_csv(data / "classification_ds.csv", dtype=str, keep_default_na=False).set_index("path")
    for row in issues.itertuples(index=False):
        source = dataset.loc[row.file]
        assert (row.image_id, row.location, row.sequence, row.given_label) == (
            source["image_id"],
            source["location"],
            source["sequence"],
            source["label"],
        )
        assert row.suggested_label != row.given_label
    predictions = pd.concat([pd.read_csv(run / "metrics" / f"predictions_{s}.csv") for s in ("val", "test")]).set_index(
        "path"
    )
    for row in issues.head(5).itertuples(index=False):
        assert float(row.p_given) == pytest.approx(predictions.loc[row.file, row.given_label], rel=1e-4)
        assert float(row.p_suggested) == pytest.approx(predictions.loc[row.file, row.suggested_label], rel=1e-4)
    uncertain = pd.read_csv(reviewed / "uncertain.csv")
    assert list(uncertain.columns) == list(UNCERTAIN_COLUMNS)
    assert ((uncertain["p_top"] < 0.5) | (uncertain["margin"] < 0.1)).all()


def test_the_animl_id_files_match_the_csv(reviewed: Path) -> None:
    issues = pd.read_csv(reviewed / "label_issues.csv", dtype=str, keep_default_na=False)
    files = sorted((reviewed / "animl_ids").glob("*.txt"))
    assert [f.stem for f in files] == sorted(issues["given_label"].unique())
    for file in files:
        mine = issues[issues["given_label"] == file.stem].sort_values("rank", key=lambda r: r.astype(int))
        lines = file.read_text(encoding="utf-8").splitlines()
        assert lines == [f"{r.image_id}\t{r.annotation_id}" for r in mine.itertuples(index=False)]


def test_the_page_shows_every_suspicious_crop_grouped_by_given_label(reviewed: Path) -> None:
    issues = pd.read_csv(reviewed / "label_issues.csv", dtype=str, keep_default_na=False)
    page = ReviewParser()
    page.feed((reviewed / "review.html").read_text(encoding="utf-8"))
    assert page.sections == ["counts", "issues", "uncertain"] and page.scripts == 0
    assert sorted(page.groups) == sorted(issues["given_label"].unique())
    assert sorted(page.ranks) == list(range(1, len(issues) + 1))
    for src in page.images:
        assert src.startswith("data:image/jpeg;base64,")  # self-contained
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
            image.verify()


def test_review_again_rewrites_the_same_files(flipped_run: tuple[Path, Path, set[str]], reviewed: Path) -> None:
    run, _, _ = flipped_run
    before = (reviewed / "label_issues.csv").read_bytes()
    (reviewed / "animl_ids" / "stale.txt").write_text("x\ty\n")  # not a label: left alone
    result = review(run, "review.method=self_confidence")
    assert result.returncode == 0, result.stderr[-2000:]
    assert set(pd.read_csv(reviewed / "label_issues.csv")["file"]) == set(pd.read_csv(io.BytesIO(before))["file"])
    assert (reviewed / "animl_ids" / "stale.txt").is_file()
    assert not list(reviewed.rglob("*.tmp-*"))


def _figures(cell: str) -> tuple[float, float]:
    """``"0.750 → 0.875"`` (or ``"0.750"`` when unchanged; ``–`` when undefined) as (before, after)."""
    parts = [float("nan") if part == "–" else float(part) for part in cell.split(" → ")]
    return parts[0], parts[-1]


def _same(value: float, expected: float) -> bool:
    return bool(np.isnan(value) and np.isnan(expected)) or value == pytest.approx(expected, abs=5e-4)


def test_the_report_counts_the_review_and_recomputes_the_table_on_corrected_labels(
    flipped_run: tuple[Path, Path, set[str]], reviewed: Path
) -> None:
    from sklearn.metrics import precision_recall_fscore_support

    run, _, _ = flipped_run
    issues = pd.read_csv(reviewed / "label_issues.csv", dtype=str, keep_default_na=False)
    page = parse_report(run / "report.html")
    assert page.sections[-1] == "review" and "review-hint" not in page.texts
    counts = {row[0]: row for row in page.cells["likely label errors per split"]}
    assert set(counts) == {"val", "test"}  # the train crops were not reviewed (no review.folds)
    per_label = pd.read_csv(run / "metrics" / "per_label.csv")
    for split in ("val", "test"):
        predictions = pd.read_csv(run / "metrics" / f"predictions_{split}.csv")
        mine = issues[issues["split"] == split]
        assert counts[split][1:3] == [str(len(predictions)), str(len(mine))]
        # Independently: scikit-learn on the labels with every flagged crop given its suggested label.
        corrected = predictions["path"].map(mine.set_index("file")["suggested_label"]).fillna(predictions["label"])
        precision, recall, _, support = precision_recall_fscore_support(
            corrected, predictions["prediction"], labels=LABELS, zero_division=np.nan
        )
        before = per_label[per_label["split"] == split].set_index("label")
        rows = {
            row[0]: row for row in page.cells[f"{split}: per label, as evaluated → if the flagged labels were wrong"]
        }
        assert sorted(rows) == LABELS
        for k, label in enumerate(LABELS):
            _, away, to, count, shown_precision, shown_recall = rows[label]
            assert int(away) == (mine["given_label"] == label).sum()
            assert int(to) == (mine["suggested_label"] == label).sum()
            assert _figures(count) == (before.loc[label, "support"], support[k])
            for cell, was, now in (
                (shown_precision, before.loc[label, "precision"], precision[k]),
                (shown_recall, before.loc[label, "recall"], recall[k]),
            ):
                figures = _figures(cell)
                assert _same(figures[0], was) and _same(figures[1], now), (split, label, cell, was, now)


# --- bad input: one line, exit 2, nothing written -----------------------------------------------------------------


def refused(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    line = result.stderr.strip()
    assert line.count("\n") == 0 and line.startswith("review: error: "), line
    for fragment in fragments:
        assert fragment in line, line


@pytest.fixture()
def run_copy(flipped_run: tuple[Path, Path, set[str]], tmp_path: Path) -> Path:
    run, _, _ = flipped_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("review", "checkpoints"))
    return copy


@pytest.mark.slow
def test_a_folder_without_predictions(tmp_path: Path) -> None:
    (tmp_path / "metrics").mkdir()
    refused(review(tmp_path), "has no metrics/predictions_val.csv or predictions_test.csv")
    assert not (tmp_path / "review").exists()
    refused(run_command("review", []), "run_dir: must be set")


def test_a_run_trained_before_the_review(run_copy: Path) -> None:
    (run_copy / "metrics" / "predictions.json").unlink()
    refused(review(run_copy), "was trained before the label review existed", "train=false ckpt_path=")
    assert not (run_copy / "review").exists()


def dataset_moved_for(run: Path, data: Path, moved: Path) -> Path:
    """A copy of the run's dataset at ``moved``, which the run's prediction record now names."""
    shutil.copytree(data, moved)
    record_file = run / "metrics" / "predictions.json"
    record = json.loads(record_file.read_text())
    record["data_dir"] = str(moved)
    record_file.write_text(json.dumps(record))
    return moved


def test_a_dataset_prepared_again_since_the_run(
    flipped_run: tuple[Path, Path, set[str]], run_copy: Path, tmp_path: Path
) -> None:
    moved = dataset_moved_for(run_copy, flipped_run[1], tmp_path / "data")
    frame = pd.read_csv(moved / "classification_ds.csv", dtype=str, keep_default_na=False)
    frame.loc[0, "label"] = "skunk" if frame.loc[0, "label"] != "skunk" else "fox"
    frame.to_csv(moved / "classification_ds.csv", index=False)
    refused(review(run_copy), f"the dataset {moved} changed since", "classification_ds.csv differ")
    assert not (run_copy / "review").exists()


def test_a_deleted_crop(flipped_run: tuple[Path, Path, set[str]], run_copy: Path, tmp_path: Path) -> None:
    moved = dataset_moved_for(run_copy, flipped_run[1], tmp_path / "data")
    gone = pd.read_csv(run_copy / "metrics" / "predictions_val.csv")["path"].iloc[0]
    (moved / "crops" / gone).unlink()
    refused(review(run_copy), "1 reviewed crops are missing or damaged", gone)
    assert not (run_copy / "review").exists()


def test_more_folds_than_train_locations(run_copy: Path) -> None:
    refused(review(run_copy, "review.folds=3"), "review.folds: 3 folds need at least 3 train locations")
    assert not (run_copy / "review" / "label_issues.csv").exists()


@pytest.mark.slow
def test_an_unknown_setting(run_copy: Path) -> None:
    refused(review(run_copy, "+review.folds_count=3"), "review: unknown key(s) ['folds_count']")
    refused(review(run_copy, "review.method=margin"), "review.method: must be one of")


# --- slow: folds, Chromium -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_folds_score_every_train_crop_out_of_sample(flipped_run: tuple[Path, Path, set[str]], tmp_path: Path) -> None:
    run, data, flipped = flipped_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("review"))
    result = review(copy, "review.folds=2", timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fold 1/2" in result.stdout and "fold 2/2" in result.stdout  # progress
    root = copy / "review" / "folds_2"
    folds = json.loads((root / "folds.json").read_text())
    assert sorted(k for _, _, k in folds["locations"]) == [1, 2]
    scored: list[str] = []
    for fold in (1, 2):
        fold_data = load_prepared_dataset(root / f"fold_{fold}" / "data").frame
        trained = set(fold_data.loc[fold_data["split"] == "train", "location"])
        predictions = pd.read_csv(root / f"fold_{fold}" / "run" / "metrics" / "predictions_test.csv")
        locations = set(fold_data.set_index("path").loc[predictions["path"], "location"])
        assert locations and not locations & trained  # never scored by a model that saw its location
        scored += predictions["path"].tolist()
    train_crops = set(load_prepared_dataset(data).frame.query("split == 'train'")["path"])
    assert sorted(scored) == sorted(train_crops)
    issues = pd.read_csv(copy / "review" / "label_issues.csv", dtype=str)
    assert "train" in set(issues["split"]) or not flipped & train_crops

    # a second call fits nothing again
    again = review(copy, "review.folds=2", timeout=3600)
    assert again.returncode == 0 and again.stdout.count("already fitted") == 2, again.stdout[-2000:]


@pytest.mark.slow
def test_folds_resume_after_a_fold_is_killed(flipped_run: tuple[Path, Path, set[str]], tmp_path: Path) -> None:
    run, _, _ = flipped_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("review"))
    root = copy / "review" / "folds_2"
    process = subprocess.Popen(
        command("review", [f"run_dir={copy}", "review.folds=2"]),
        env=command_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = 3600
        last = root / "fold_2" / "run" / "checkpoints" / "last.ckpt"
        start = time.monotonic()
        while not last.is_file() and time.monotonic() - start < deadline and process.poll() is None:
            time.sleep(0.2)
        assert last.is_file(), "fold 2 never saved a checkpoint"
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the review and its train.py, mid-fold
        process.wait()
    first = (root / "fold_1" / "run" / "metrics" / "predictions_test.csv").stat().st_mtime_ns
    result = review(copy, "review.folds=2", timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fold 1/2: already fitted" in result.stdout
    assert "fold 2/2: resuming from last.ckpt" in result.stdout
    assert (root / "fold_1" / "run" / "metrics" / "predictions_test.csv").stat().st_mtime_ns == first
    assert (copy / "review" / "label_issues.csv").is_file()


@pytest.mark.slow
def test_a_real_browser_renders_every_thumbnail(reviewed: Path, tmp_path: Path, browser: Browser) -> None:
    page = reviewed / "review.html"
    layout = browser.layout(page, tmp_path)
    parser = ReviewParser()
    parser.feed(page.read_text(encoding="utf-8"))
    assert [i["alt"] for i in layout["images"] if not i["ok"]] == []
    assert len(layout["images"]) == len(parser.images) > 0
    image = browser.screenshot(page, tmp_path / "review.png", 1280, 1600)
    assert image.size == (1280, 1600)
    assert len(set(image.convert("L").getdata())) > 20  # text and thumbnails, not a blank page
