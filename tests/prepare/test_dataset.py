"""The dataset stage: crop_ok filter, min_locs, columns, sorting, and a round trip through dataset_files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from animl_lightning.core.contract import (
    REQUIRED_COLUMNS,
    load_prepared_dataset,
    read_classification_csv,
    read_label_index,
    write_splits,
)
from animl_lightning.core.issues import PrepareReport
from animl_lightning.prepare.dataset import (
    DATASET_COLUMNS,
    EmptyDatasetError,
    build_dataset_frame,
    write_dataset_files,
)


def labelled_boxes() -> pd.DataFrame:
    """fox at 3 locations, bird at 2, skunk at 1; one failed crop; locations given as ints on purpose."""
    rows = [
        ("img9", 3, "Fox", "fox", True),
        ("img1", 1, "Fox", "fox", True),
        ("img2", 2, "gray fox", "fox", True),
        ("img3", 1, "bird", "bird", True),
        ("img4", 2, "bird", "bird", True),
        ("img5", 2, "bird", "bird", False),
        ("img6", 1, "skunk", "skunk", True),
    ]
    return pd.DataFrame(
        {
            "image_id": [r[0] for r in rows],
            "file_name": [f"cam/{r[0]}.jpg" for r in rows],
            "location": [r[1] for r in rows],
            "datetime": "2024-01-01T00:00:00",
            "seq_id": "",
            "annotation_id": [f"a{i}" for i in range(len(rows))],
            "dataset_class": [r[2] for r in rows],
            "confidence": 1.0,
            "source": "gt",
            "crop_path": [f"cam/{r[0]}.jpg___crop_a{i}.jpg" for i, r in enumerate(rows)],
            "label": [r[3] for r in rows],
            "crop_ok": [r[4] for r in rows],
        }
    )


def test_columns_sorting_and_crop_ok_filter() -> None:
    report = PrepareReport()
    frame = build_dataset_frame(labelled_boxes(), "island", None, report)
    assert tuple(frame.columns) == DATASET_COLUMNS
    assert tuple(frame.columns[: len(REQUIRED_COLUMNS)]) == REQUIRED_COLUMNS
    assert frame["path"].tolist() == sorted(frame["path"])
    assert "cam/img5.jpg___crop_a5.jpg" not in set(frame["path"])
    assert len(frame) == 6
    assert set(frame["dataset"]) == {"island"}
    assert frame["location"].tolist() == ["1", "2", "1", "2", "1", "3"]  # ints became strings
    assert report.counts["dataset"]["crop_failed_dropped"] == 1


def test_min_locs_drops_and_reports_labels_with_their_location_count() -> None:
    report = PrepareReport()
    frame = build_dataset_frame(labelled_boxes(), "island", 2, report)
    assert set(frame["label"]) == {"fox", "bird"}
    (issue,) = report.issues_of("dataset", "label_below_min_locs")
    assert issue.record == "skunk"
    assert "1 location" in issue.message and "min_locs=2" in issue.message
    report = PrepareReport()
    frame = build_dataset_frame(labelled_boxes(), "island", 3, report)
    assert set(frame["label"]) == {"fox"}
    assert sorted(i.record or "" for i in report.issues_of("dataset", "label_below_min_locs")) == ["bird", "skunk"]


def test_min_locs_removing_everything_is_a_clear_error() -> None:
    with pytest.raises(EmptyDatasetError, match="min_locs=5"):
        build_dataset_frame(labelled_boxes(), "island", 5, PrepareReport())
    boxes = labelled_boxes().assign(crop_ok=False)
    with pytest.raises(EmptyDatasetError, match="none of the 7 labelled boxes has a crop"):
        build_dataset_frame(boxes, "island", None, PrepareReport())
    # The message names the cause the earlier stages recorded, not only the symptom.
    report = PrepareReport()
    for _ in range(7):
        report.add("images", "download_failed", "s3://bucket/key: ReadTimeoutError")
    with pytest.raises(EmptyDatasetError, match="because of images: 7 download_failed"):
        build_dataset_frame(boxes, "island", None, report)
    with pytest.raises(ValueError, match="label"):
        build_dataset_frame(labelled_boxes().drop(columns="label"), "island", None, PrepareReport())


def test_duplicate_crop_paths_are_reported_once_kept() -> None:
    boxes = pd.concat([labelled_boxes(), labelled_boxes().iloc[[0]]], ignore_index=True)
    report = PrepareReport()
    frame = build_dataset_frame(boxes, "island", None, report)
    assert frame["path"].is_unique
    assert len(report.issues_of("dataset", "duplicate_crop_path")) == 1


def test_write_read_round_trip(tmp_path: Path) -> None:
    frame = build_dataset_frame(labelled_boxes(), "island", None, PrepareReport())
    labels = write_dataset_files(frame, tmp_path)
    assert labels == ["bird", "fox", "skunk"]
    assert read_label_index(tmp_path / "label_index.json") == labels
    back = read_classification_csv(tmp_path / "classification_ds.csv")
    assert list(back.columns) == list(DATASET_COLUMNS)
    for column in DATASET_COLUMNS:
        if column == "confidence":
            assert back[column].tolist() == frame[column].tolist()
        else:
            assert back[column].astype(str).tolist() == frame[column].astype(str).tolist()

    # With crops and splits the folder loads as a prepared dataset.
    for rel in frame["path"]:
        target = tmp_path / "crops" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(target, format="JPEG")
    write_splits(
        {"train": [("island", "1")], "val": [("island", "2")], "test": [("island", "3")]}, tmp_path / "splits.json"
    )
    prepared = load_prepared_dataset(tmp_path)
    assert prepared.labels == labels
    assert sorted(prepared.frame["split"].unique().tolist()) == ["test", "train", "val"]
