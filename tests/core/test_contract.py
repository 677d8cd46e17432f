from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from animl_lightning.core.contract import (
    CSV_FILENAME,
    LABEL_INDEX_FILENAME,
    REQUIRED_COLUMNS,
    SPLITS_FILENAME,
    DatasetError,
    load_prepared_dataset,
    read_classification_csv,
    read_label_index,
    read_splits,
    write_classification_csv,
    write_label_index,
    write_splits,
)
from tests.fixtures.files import solid_jpeg


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "path": ["p/a.jpg___crop_1.jpg", "p/b.jpg___crop_2.jpg", "p/c.jpg___crop_3.jpg"],
            "dataset": ["ds", "ds", "ds"],
            "location": ["007", "12", "cam b"],
            "dataset_class": ["gray fox", "skunk", "gray fox"],
            "confidence": [1.0, 0.9, 1.0],
            "label": ["fox", "skunk", "fox"],
            "image_id": ["i1", "i2", "i3"],
        }
    )


def _write_dataset(root: Path, frame: pd.DataFrame, splits: dict[str, list[list[str]]]) -> None:
    write_classification_csv(frame, root / CSV_FILENAME)
    write_label_index(frame["label"], root / LABEL_INDEX_FILENAME)
    write_splits(splits, root / SPLITS_FILENAME)
    for rel in frame["path"]:
        crop = root / "crops" / rel
        crop.parent.mkdir(parents=True, exist_ok=True)
        crop.write_bytes(solid_jpeg((8, 8), (10, 20, 30)))


def test_round_trip_keeps_locations_as_strings(tmp_path: Path) -> None:
    frame = _frame()
    write_classification_csv(frame, tmp_path / CSV_FILENAME)
    back = read_classification_csv(tmp_path / CSV_FILENAME)
    assert list(back.columns[: len(REQUIRED_COLUMNS)]) == list(REQUIRED_COLUMNS)
    # "007" would become 7 if pandas guessed the type.
    assert back["location"].tolist() == ["007", "12", "cam b"]
    assert back["confidence"].dtype == float


def test_label_index_sorted_and_validated(tmp_path: Path) -> None:
    order = write_label_index(["skunk", "fox", "fox"], tmp_path / "li.json")
    assert order == ["fox", "skunk"]
    assert json.loads((tmp_path / "li.json").read_text()) == {"0": "fox", "1": "skunk"}
    assert read_label_index(tmp_path / "li.json") == ["fox", "skunk"]
    (tmp_path / "gap.json").write_text('{"0": "a", "2": "b"}')
    with pytest.raises(DatasetError, match="without gaps"):
        read_label_index(tmp_path / "gap.json")


def test_splits_overlap_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": [["ds", "a"]], "val": [["ds", "a"]], "test": []}))
    with pytest.raises(DatasetError, match="both 'train' and 'val'"):
        read_splits(path)
    with pytest.raises(DatasetError, match="disjoint"):
        write_splits({"train": [["ds", "a"]], "val": [["ds", "a"]]}, tmp_path / "out.json")


def test_splits_without_test_key_read_as_empty_and_numeric_locations_become_strings(tmp_path: Path) -> None:
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": [["ds", 1]], "val": [["ds", "2"]]}))
    assert read_splits(path) == {"train": [("ds", "1")], "val": [("ds", "2")], "test": []}


def test_load_prepared_dataset_assigns_splits(tmp_path: Path) -> None:
    _write_dataset(tmp_path, _frame(), {"train": [["ds", "007"], ["ds", "cam b"]], "val": [["ds", "12"]]})
    prepared = load_prepared_dataset(tmp_path)
    assert prepared.labels == ["fox", "skunk"]
    assert prepared.frame["split"].tolist() == ["train", "val", "train"]
    assert prepared.frame["label_idx"].tolist() == [0, 1, 0]
    assert len(prepared.split_frame("test")) == 0


def test_load_prepared_dataset_reports_every_mismatch(tmp_path: Path) -> None:
    frame = _frame()
    _write_dataset(tmp_path, frame, {"train": [["ds", "007"]], "val": [["ds", "12"]], "test": []})
    (tmp_path / "crops" / frame["path"][0]).unlink()
    (tmp_path / LABEL_INDEX_FILENAME).write_text('{"0": "fox"}')
    with pytest.raises(DatasetError) as err:
        load_prepared_dataset(tmp_path)
    message = str(err.value)
    assert "['skunk']" in message and "label_index.json" in message
    assert "['ds', 'cam b']" in message
    assert "1 crop files are missing" in message


def test_bad_confidence_names_row_and_field(tmp_path: Path) -> None:
    frame = _frame()
    frame["confidence"] = frame["confidence"].astype(object)
    frame.loc[1, "confidence"] = "high"
    write_classification_csv(frame, tmp_path / CSV_FILENAME)
    with pytest.raises(DatasetError, match=r"row 3 \(p/b.jpg___crop_2.jpg\), field 'confidence'"):
        read_classification_csv(tmp_path / CSV_FILENAME)


def test_unsafe_crop_path_is_refused(tmp_path: Path) -> None:
    frame = _frame()
    _write_dataset(tmp_path, frame, {"train": [["ds", "007"], ["ds", "12"], ["ds", "cam b"]], "val": []})
    frame.loc[0, "path"] = "../../etc/passwd"
    write_classification_csv(frame, tmp_path / CSV_FILENAME)
    with pytest.raises(DatasetError, match="escapes"):
        load_prepared_dataset(tmp_path)
