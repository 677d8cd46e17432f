"""The whole prepare.py through Hydra's compose API, on a small generated project."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from animl_lightning.core.contract import (
    CSV_FILENAME,
    INFO_FILENAME,
    LABEL_INDEX_FILENAME,
    REQUIRED_COLUMNS,
    SPLIT_REPORT_FILENAME,
    SPLITS_FILENAME,
    load_prepared_dataset,
)
from animl_lightning.core.issues import REPORT_FILENAME
from animl_lightning.prepare.pipeline import PrepareSummary, format_summary, run_prepare
from tests.fixtures.hydra import REPO_ROOT, prepare_settings

ROOT = REPO_ROOT
SMALL_DEMO = ["demo.locations=6", "demo.images_per_location=8", "demo.width=160", "demo.height=120"]


def _run(*overrides: str) -> PrepareSummary:
    return run_prepare(prepare_settings(overrides))


def _outputs(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in (CSV_FILENAME, LABEL_INDEX_FILENAME, SPLITS_FILENAME)}


def test_demo_project_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    summary = _run(f"output_dir={out}", "crops.workers=2", *SMALL_DEMO)

    assert [s.name for s in summary.stages] == ["ingest", "images", "boxes", "crops", "labels", "dataset", "splits"]
    prepared = load_prepared_dataset(out)  # cross-checks labels, splits and crop files
    assert list(prepared.frame.columns[: len(REQUIRED_COLUMNS)]) == list(REQUIRED_COLUMNS)
    assert prepared.labels == sorted(prepared.labels)
    assert "empty" not in prepared.labels
    assert set(prepared.frame["split"]) == {"train", "val", "test"}
    # whole locations: no (dataset, location) in two splits
    per_location = prepared.frame.groupby(["dataset", "location"])["split"].nunique()
    assert per_location.max() == 1
    with Image.open(prepared.crops_dir / prepared.frame["path"].iloc[0]) as crop:
        assert crop.mode == "RGB"
        assert crop.width == crop.height  # default crops.strategy=square

    report = json.loads((out / REPORT_FILENAME).read_text())
    assert report["counts"]
    info = json.loads((out / INFO_FILENAME).read_text())
    assert info["crops"]["strategy"] == "square"
    assert set(info["stages"]) >= {"images", "crops", "dataset", "splits"}
    assert (out / SPLIT_REPORT_FILENAME).is_file()
    text = format_summary(summary)
    assert "crops per label and split" in text and "train" in text


def test_second_run_skips_finished_stages_and_changes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    _run(f"output_dir={out}", "crops.workers=1", *SMALL_DEMO)
    first = _outputs(out)
    crop_times = {p: p.stat().st_mtime_ns for p in (out / "crops").rglob("*.jpg")}

    again = _run(f"output_dir={out}", "crops.workers=1", *SMALL_DEMO)
    status = {s.name: s.status for s in again.stages}
    assert status["crops"].startswith("skipped")
    assert status["splits"].startswith("skipped")
    assert _outputs(out) == first
    assert {p: p.stat().st_mtime_ns for p in (out / "crops").rglob("*.jpg")} == crop_times


def test_changed_split_settings_rerun_only_the_split(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    _run(f"output_dir={out}", "crops.workers=1", *SMALL_DEMO)
    again = _run(f"output_dir={out}", "crops.workers=1", "split.test_frac=0", *SMALL_DEMO)
    status = {s.name: s.status for s in again.stages}
    assert status["crops"].startswith("skipped")
    assert status["splits"] == "ran"
    splits = json.loads((out / SPLITS_FILENAME).read_text())
    assert splits["test"] == []
    assert splits["train"] and splits["val"]
    assert load_prepared_dataset(out).split_frame("test").empty


def test_same_seed_gives_byte_identical_outputs(tmp_path: Path) -> None:
    _run(f"output_dir={tmp_path / 'a'}", "crops.workers=1", *SMALL_DEMO)
    _run(f"output_dir={tmp_path / 'b'}", "crops.workers=2", *SMALL_DEMO)
    assert _outputs(tmp_path / "a") == _outputs(tmp_path / "b")


def test_command_line_reports_config_errors_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "prepare.py", f"output_dir={tmp_path}", "crops.strategy=circle"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "crops.strategy" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_images_dir_is_named(tmp_path: Path) -> None:
    coco = tmp_path / "export.json"
    coco.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(Exception, match="images_dir"):
        _run(f"output_dir={tmp_path / 'out'}", f"coco_file={coco}")
