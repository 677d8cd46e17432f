"""report.html: built by a real train.py run, parsed section by section and row by row; rebuilt by the command;
rendered by a real headless Chromium (slow); light with 200 labels (slow)."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from animl_lightning.train.galleries import caption_font_size
from animl_lightning.train.report import automation_sentence
from animl_lightning.train.report_figures import reliability_points
from tests.fixtures.browser import Browser
from tests.fixtures.datasets import make_prepared_dataset
from tests.fixtures.hydra import FAST_OVERRIDES
from tests.fixtures.pages import ReportParser, parse_report
from tests.fixtures.scripts import run_command, run_train_script

SECTIONS = [
    "card",
    "dataset",
    "training",
    "results",
    "confusion",
    "calibration",
    "thresholds",
    "locations",
    "galleries",
    "review",
]
# What a reader sees: the page at a laptop's width, captions no smaller than this (px).
READER_WIDTH = 1280
MIN_CAPTION_PX = 11
# The galleries' tile size a user gets (configs/callbacks/default.yaml, error_galleries.tile_size).
TILE_SIZE = 160
# The documented ceiling for a run with 200 labels (README, "report.html").
MAX_BYTES_200_LABELS = 3_000_000


def parse(path: Path) -> ReportParser:
    return parse_report(path)


def _train(data_dir: Path, run: Path, *extra: str) -> None:
    result = run_train_script(
        [f"data_dir={data_dir}", f"hydra.run.dir={run}", *FAST_OVERRIDES, "trainer.max_epochs=3", *extra],
        cwd=run.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    data = make_prepared_dataset(root / "data", per_label=8, size=48)
    (data / "taxonomy.csv").write_text(
        "label,class,order,family,genus,species\nbird,aves,,,,\n"
        "fox,mammalia,carnivora,canidae,vulpes,\nskunk,mammalia,carnivora,mephitidae,mephitis,\n"
    )
    folder = root / "run"
    _train(data, folder, "thresholds.min_support=2", "thresholds.target_precision=0.8")
    return folder


def test_every_section_table_row_and_image_is_there(run: Path) -> None:
    report = run / "report.html"
    assert report.is_file()
    page = parse(report)
    assert page.sections == SECTIONS
    assert page.scripts == 0  # readable without JavaScript
    metrics = run / "metrics"
    expected_rows = {
        "overall": len(pd.read_csv(metrics / "overall.csv")),
        "per label, crop level": len(pd.read_csv(metrics / "per_label.csv")),
        "per label, image level": len(pd.read_csv(metrics / "per_label_image.csv")),
        "per label, sequence level": len(pd.read_csv(metrics / "per_label_sequence.csv")),
        "per family": len(pd.read_csv(metrics / "per_label_family.csv")),
        "per class": len(pd.read_csv(metrics / "per_label_class.csv")),
        "at each label's threshold": len(pd.read_csv(metrics / "thresholds.csv")),
        "at 0.5, for comparison": len(pd.read_csv(metrics / "thresholds.csv")),
        "per location": len(pd.read_csv(metrics / "per_location.csv")),
        "crops, images and locations per label and split": 3,
        "split report (split_report.csv)": len(pd.read_csv(run.parent / "data" / "split_report.csv"))
        if (run.parent / "data" / "split_report.csv").is_file()
        else None,
    }
    for title, rows in expected_rows.items():
        if rows is None:
            continue
        assert page.tables.get(title) == rows, title
    assert page.tables["versions"] >= 5 and page.tables["calibration"] >= 1
    alts = [alt for alt, _ in page.images]
    assert "training curves" in alts and "reliability diagram" in alts
    assert {"confusion matrix train", "confusion matrix val", "confusion matrix test"} <= set(alts)
    for alt, src in page.images:
        assert src.startswith("data:image/png;base64,"), alt  # self-contained
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
            image.verify()
    text = report.read_text(encoding="utf-8")
    assert "python train.py data_dir=" in text  # the command that made it
    assert "Known limits" in text and "Intended use" in text


@pytest.mark.slow
def test_the_command_rebuilds_the_same_page(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "report.html").unlink()
    result = run_command("report", [f"run_dir={copy}"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote" in result.stdout
    rebuilt, original = parse(copy / "report.html"), parse(run / "report.html")
    assert rebuilt.sections == original.sections and rebuilt.tables == original.tables
    assert len(rebuilt.images) == len(original.images)

    result = run_command("report", [f"run_dir={tmp_path}"])
    assert result.returncode == 2
    assert "has no metrics/per_label.csv" in result.stderr and result.stderr.strip().count("\n") == 0


@pytest.mark.slow
def test_wandb_gets_the_report_as_an_artifact(run: Path, tmp_path: Path) -> None:
    data = run.parent / "data"
    folder = tmp_path / "wandb_run"
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    result = run_train_script(
        [f"data_dir={data}", f"hydra.run.dir={folder}", *FAST_OVERRIDES, "trainer.max_epochs=1", "logger=wandb"],
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (folder / "report.html").is_file()
    offline = next((folder / "wandb").glob("offline-run-*"))
    run_id = offline.name.rsplit("-", 1)[1]
    # Offline, wandb records the logged artifact in the run's .wandb file (uploaded by `wandb sync`).
    records = next(offline.glob("run-*.wandb")).read_bytes()
    assert f"report-{run_id}".encode() in records and b"report.html" in records


@pytest.mark.slow
def test_a_real_browser_renders_every_image(run: Path, tmp_path: Path, browser: Browser) -> None:
    layout = browser.layout(run / "report.html", tmp_path)
    assert [i["alt"] for i in layout["images"] if not i["ok"]] == []
    assert len(layout["images"]) == len(parse(run / "report.html").images)
    image = browser.screenshot(run / "report.html", tmp_path / "report.png", READER_WIDTH, 2400)
    assert image.size == (READER_WIDTH, 2400)
    # Not a blank page: the rendered screenshot has text and plots.
    assert len(set(image.convert("L").getdata())) > 20


# --- what a biologist reads, laid out by Chromium at 1280 px --------------------------------------------------------


@pytest.fixture(scope="module")
def layout(run: Path, tmp_path_factory: pytest.TempPathFactory, browser: Browser) -> dict[str, Any]:
    return browser.layout(run / "report.html", tmp_path_factory.mktemp("layout"), width=READER_WIDTH)


def test_error_galleries_are_shown_at_a_readable_size(layout: dict[str, Any]) -> None:
    galleries = [i for i in layout["images"] if i["alt"].startswith("gallery ")]
    assert galleries
    for image in galleries:
        # The captions are drawn into the PNG: they shrink with it.
        shown_px = caption_font_size(TILE_SIZE) * image["shown"] / image["natural"]
        assert shown_px >= MIN_CAPTION_PX, image
    assert layout["captions"] and min(c["px"] for c in layout["captions"]) >= MIN_CAPTION_PX


def test_the_thresholds_stay_on_the_page(layout: dict[str, Any]) -> None:
    assert layout["page_width"] <= READER_WIDTH  # no sideways scrolling of the page
    tables = {t["title"]: t for t in layout["tables"]}
    for title in ("at each label's threshold", "at 0.5, for comparison"):
        table = tables[title]
        assert table["width"] <= table["available"] and not table["scrolls"], table


def test_column_headers_are_words(layout: dict[str, Any]) -> None:
    headers = {h for t in layout["tables"] for h in t["header"]}
    assert headers
    raw = [h for h in headers if "_" in h or h in ("ece", "n", "tp", "fp", "fn", "top1")]
    assert raw == []
    assert {"false-alarm rate (1 - precision)", "calibration error (ECE)", "val coverage"} <= headers


def test_the_crop_rule_reads_as_text(run: Path) -> None:
    page = parse(run / "report.html")
    crops = next(row[1] for row in page.cells["model card"] if row[0] == "crops")
    assert "{" not in crops and "strategy" not in crops
    square = "a square around each box (side = the box's longer side, shifted inside the image)"
    assert crops == f"{square}, saved at most 48 px on its longer side"  # the fixture's crops.max_size


def test_the_header_names_the_run_folder_not_a_path_of_this_machine(run: Path) -> None:
    page = parse(run / "report.html")
    header = page.texts["run-header"]
    assert f"run folder {run.name}" in header
    assert str(run.parent) not in header and "/" not in header.split(" · ")[0]
    data = next(row[1] for row in page.cells["model card"] if row[0] == "data")
    assert data.startswith("data (") and str(run.parent) not in data


def test_reliability_points_rest_on_enough_crops(run: Path) -> None:
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.3, 1.0, 45)
    points = reliability_points(confidence, rng.uniform(size=45) < confidence)
    assert points["crops"].tolist() == [15, 15, 15]  # 3 bins, not 15 bins of 3
    assert points["confidence"].is_monotonic_increasing
    many = reliability_points(rng.uniform(size=3000), np.ones(3000))
    assert len(many) == 15 and many["crops"].min() == 200
    # The run's 24 val crops: 3 bins, and the page says so.
    note = parse(run / "report.html").texts["reliability-bins"]
    assert "val: 24 crops in 3 bins of about 8 crops (too few crops" in note


def test_one_sentence_says_what_the_model_can_do_alone(run: Path) -> None:
    thresholds = pd.read_csv(run / "metrics" / "thresholds.csv")
    labels = thresholds[thresholds["rank"] == "label"]
    accepted = labels["threshold"].notna().sum()
    val_share = (labels["val_coverage"] * labels["val_support"]).sum() / labels["val_support"].sum()
    verdict = parse(run / "report.html").texts["verdict"]
    assert verdict.startswith(f"At a val precision of 0.8, {accepted} of {len(labels)} labels can be accepted")
    assert f"covering {val_share:.0%} of val crops" in verdict
    none = labels.assign(threshold=np.nan)
    assert "none of the 3 labels can be accepted automatically" in automation_sentence(none, 0.95)
    assert "No per-label thresholds were chosen" in automation_sentence(None, None)


def test_without_a_label_review_the_page_says_how_to_get_one(run: Path) -> None:
    assert not (run / "review").exists()
    hint = parse(run / "report.html").texts["review-hint"]
    assert "python -m animl_lightning.review run_dir=" in hint


@pytest.mark.slow
def test_a_run_with_200_labels_stays_light(tmp_path: Path) -> None:
    labels = [f"species_{i:03d}" for i in range(200)]
    data = make_prepared_dataset(tmp_path / "data", labels=labels, per_label=1, size=32, seed=3)
    folder = tmp_path / "run"
    _train(data, folder, "data.image_size=32", "trainer.max_epochs=1", "data.batch_size=64")
    report = folder / "report.html"
    size = report.stat().st_size
    assert size < MAX_BYTES_200_LABELS, size
    page = parse(report)
    assert page.tables["per label, crop level"] == 600  # every row is there, folded
    assert "<details><summary>per label, crop level (600 rows" in report.read_text(encoding="utf-8")
    assert not any(alt.startswith("confusion matrix") for alt, _ in page.images)  # too many labels for an image
    assert page.tables["val: the 30 largest confusions"] <= 30


def test_a_review_that_does_not_match_the_run_is_a_warning_not_a_crash(run: Path, tmp_path: Path) -> None:
    from animl_lightning.train.report import build_report

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "review").mkdir()
    issues = copy / "review" / "label_issues.csv"
    issues.write_text("split,file,given_label,suggested_label\nval,gone/0.jpg,fox,bird\n")
    page = parse(build_report(copy))
    assert page.sections[-1] == "review" and "likely label errors per split" not in page.tables
    assert "val crops are not in this run's predictions (e.g. gone/0.jpg)" in page.texts["review-warning"]
    issues.write_text("rank,file\n1,a.jpg\n")
    page = parse(build_report(copy))
    assert "columns ['split', 'given_label', 'suggested_label'] are missing" in page.texts["review-warning"]
