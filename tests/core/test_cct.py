"""CCT ingest: every validation rule, reported with the record id and the field."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from animl_lightning.core.cct import (
    ANNOTATION_COLUMNS,
    IMAGE_COLUMNS,
    UNKNOWN_LOCATION,
    CctError,
    CctProject,
    load_cct,
)
from animl_lightning.core.image_boxes import clip_boxes, fill_image_sizes
from animl_lightning.core.issues import Issue, PrepareReport
from tests.fixtures.files import write_json

CATEGORIES = [{"id": 0, "name": "empty"}, {"id": 1, "name": "fox"}, {"id": 2, "name": "skunk"}]


def _image(image_id: Any, **fields: Any) -> dict[str, Any]:
    return {
        "id": image_id,
        "file_name": f"proj/cam/{image_id}.jpg",
        "location": "ridge",
        "datetime": "2023-05-01T10:00:00",
        "width": 400,
        "height": 300,
        **fields,
    }


def _annotation(
    annotation_id: Any, image_id: Any, category_id: Any = 1, bbox: Any = (10, 20, 30, 40)
) -> dict[str, Any]:
    record = {"id": annotation_id, "image_id": image_id, "category_id": category_id}
    if bbox is not ...:
        record["bbox"] = list(bbox) if isinstance(bbox, tuple) else bbox
    return record


def _load(
    tmp_path: Path, images: list[Any], annotations: list[Any], categories: list[Any] | None = None, **kw: Any
) -> tuple[CctProject, PrepareReport]:
    data = {
        "info": {"version": "1.0"},
        "images": images,
        "annotations": annotations,
        "categories": categories or CATEGORIES,
    }
    report = PrepareReport()
    return load_cct(write_json(tmp_path / "export.json", data), report, **kw), report


def _only(report: PrepareReport, kind: str) -> Issue:
    found = report.issues_of("ingest", kind)
    assert len(found) == 1, report.issues
    return found[0]


# --- the file as a whole ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"images": [{"id": "a"', "line 1, column"),  # truncated
        ('{"images": [}', "line 1, column 13"),  # malformed
        ("[1, 2]", "top level must be a JSON object"),
        ('{"images": {}, "categories": []}', "'images' must be a list"),
        ('{"images": []}', "'categories' must be a list, got missing"),
        ('{"images": [], "categories": [], "annotations": 5}', "'annotations' must be a list"),
    ],
)
def test_unusable_files_raise_naming_the_file(tmp_path: Path, text: str, match: str) -> None:
    path = write_json(tmp_path / "export.json", text)
    with pytest.raises(CctError, match=match) as err:
        load_cct(path, PrepareReport())
    assert str(path) in str(err.value)


def test_non_utf8_and_missing_files_raise(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"images": ["\xe9"]}')
    with pytest.raises(CctError, match=str(path)):
        load_cct(path, PrepareReport())
    with pytest.raises(CctError, match="does not exist"):
        load_cct(tmp_path / "nope.json", PrepareReport())


def test_animl_export_is_read_into_the_data_model(tmp_path: Path) -> None:
    project, report = _load(
        tmp_path,
        [
            _image("p:1", serving_bucket_key="original/p:1-original.jpg", seq_id="s1"),
            _image("p:2", location=7, width=None, height=None),
            _image("p:3", location=None, datetime=None),
            {"id": "p:4", "file_name": "proj/cam/p4 é.jpg", "location": ""},
        ],
        [_annotation("a1", "p:1"), _annotation("a2", "p:2", 2, bbox=None), _annotation("a3", "p:3", 0, bbox=...)],
    )
    images, annotations = project.images, project.annotations
    assert tuple(images.columns) == IMAGE_COLUMNS and tuple(annotations.columns) == ANNOTATION_COLUMNS
    assert images["location"].tolist() == ["ridge", "7", UNKNOWN_LOCATION, UNKNOWN_LOCATION]
    assert images["s3_key"].tolist() == [
        "original/p:1-original.jpg",
        "proj/cam/p:2.jpg",
        "proj/cam/p:3.jpg",
        "proj/cam/p4 é.jpg",
    ]
    assert images["datetime"].tolist()[2:] == ["", ""] and images["seq_id"].tolist()[0] == "s1"
    assert str(images["width"].dtype) == "Int64" and images["width"].isna().tolist() == [False, True, False, True]
    assert annotations["category"].tolist() == ["fox", "skunk", "empty"]
    assert annotations.loc[0, ["x", "y", "w", "h"]].tolist() == [10.0, 20.0, 30.0, 40.0]
    assert annotations.loc[1:, "w"].isna().all()  # null and missing bbox: an annotation without a box
    assert annotations["category_id"].dtype == np.int64
    assert project.categories == {0: "empty", 1: "fox", 2: "skunk"}
    # A null or empty location is filled in, and each one is reported (the split will treat them as one camera).
    missing = report.issues_of("ingest", "location_missing")
    expected = [("p:3", "location", "filled"), ("p:4", "location", "filled")]
    assert [(i.record, i.field, i.action) for i in missing] == expected
    assert len(report.issues) == 2
    assert report.counts["ingest"]["annotations_with_box"] == 1


def test_integer_ids_become_strings_and_still_match(tmp_path: Path) -> None:
    project, report = _load(tmp_path, [_image(5)], [_annotation(9, 5)])
    assert project.images["image_id"].tolist() == ["5"]
    assert project.annotations[["annotation_id", "image_id"]].values.tolist() == [["9", "5"]]
    assert report.issues == []


# --- record-level problems -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "kind", "field", "record"),
    [
        (_image("a", location=["x"]), "invalid_field", "location", "a"),
        (_image("a", location=3.5), "invalid_field", "location", "a"),
        (_image("a", datetime=20230501), "invalid_field", "datetime", "a"),
        (_image("a", seq_id={"s": 1}), "invalid_field", "seq_id", "a"),
        (_image("a", file_name=7), "invalid_field", "file_name", "a"),
        (_image("a", file_name="../../etc/passwd"), "unsafe_file_name", "file_name", "a"),
        (_image("a", file_name="/abs/a.jpg"), "unsafe_file_name", "file_name", "a"),
        (_image("a", file_name="cam\\a.jpg"), "unsafe_file_name", "file_name", "a"),
        (_image("a", file_name=""), "unsafe_file_name", "file_name", "a"),
        (_image(None), "invalid_id", "id", "images[0]"),
        (_image(True), "invalid_id", "id", "images[0]"),
        (_image("a", corrupt=True), "corrupt_image", "corrupt", "a"),
    ],
)
def test_bad_image_records_are_skipped_and_reported(
    tmp_path: Path, image: dict[str, Any], kind: str, field: str, record: str
) -> None:
    project, report = _load(
        tmp_path, [image, _image("ok")], [_annotation("x", image["id"] if isinstance(image["id"], str) else "zz")]
    )
    assert project.images["image_id"].tolist() == ["ok"]
    issue = _only(report, kind)
    assert (issue.record, issue.field, issue.action) == (record, field, "skipped")
    assert issue.file == str(tmp_path / "export.json")
    # the skipped image's annotation is reported too, not silently lost
    assert len(report.issues_of("ingest", "image_skipped")) + len(report.issues_of("ingest", "dangling_image_id")) == 1


def test_non_object_records_are_reported_by_position(tmp_path: Path) -> None:
    project, report = _load(tmp_path, [_image("a"), "oops"], [_annotation("x", "a"), 5])
    assert len(project.images) == 1 and len(project.annotations) == 1
    assert sorted(i.record for i in report.issues_of("ingest", "invalid_record")) == ["annotations[1]", "images[1]"]


def test_duplicate_ids_keep_the_first(tmp_path: Path) -> None:
    project, report = _load(
        tmp_path,
        [_image("a", location="first"), _image("a", location="second", file_name="other.jpg"), _image("b")],
        [_annotation("x", "a"), _annotation("x", "b"), _annotation("y", "b")],
        [*CATEGORIES, {"id": 1, "name": "coyote"}],
    )
    assert project.images["location"].tolist() == ["first", "ridge"]
    assert project.annotations["image_id"].tolist() == ["a", "b"]
    assert project.categories[1] == "fox"
    duplicates = {(i.record, i.field) for i in report.issues_of("ingest", "duplicate_id")}
    assert duplicates == {("a", "id"), ("x", "id"), ("1", "id")}


def test_duplicate_file_names_keep_the_first(tmp_path: Path) -> None:
    project, report = _load(tmp_path, [_image("a", file_name="same.jpg"), _image("b", file_name="same.jpg")], [])
    assert project.images["image_id"].tolist() == ["a"]
    issue = _only(report, "duplicate_file_name")
    assert (issue.record, issue.field) == ("b", "file_name")


@pytest.mark.parametrize("value", [-3, 0, "400", 12.5, True])
def test_bad_sizes_are_ignored_and_read_later(tmp_path: Path, value: Any) -> None:
    project, report = _load(tmp_path, [_image("a", width=value)], [])
    assert project.images["width"].isna().tolist() == [True]
    issue = _only(report, "invalid_size")
    assert (issue.record, issue.field, issue.action) == ("a", "width", "ignored")


def test_integral_float_sizes_are_accepted(tmp_path: Path) -> None:
    project, report = _load(tmp_path, [_image("a", width=400.0, height=300.0)], [])
    assert project.images[["width", "height"]].values.tolist() == [[400, 300]] and report.issues == []


def test_dangling_references(tmp_path: Path) -> None:
    project, report = _load(
        tmp_path,
        [_image("a")],
        [_annotation("x", "nope"), _annotation("y", "a", 99), _annotation("z", "a", "1"), _annotation("w", None)],
    )
    assert project.annotations.empty
    assert (_only(report, "dangling_image_id").record, _only(report, "dangling_image_id").field) == ("x", "image_id")
    assert (_only(report, "dangling_category_id").record, _only(report, "dangling_category_id").field) == (
        "y",
        "category_id",
    )
    invalid = {(i.record, i.field) for i in report.issues_of("ingest", "invalid_field")}
    assert invalid == {("z", "category_id"), ("w", "image_id")}


@pytest.mark.parametrize(
    "bbox",
    [[1, 2, 3], [1, 2, 3, 4, 5], [None, None, None, None], [1, 2, "3", 4], [1, 2, True, 4], "1,2,3,4", 7],
)
def test_malformed_boxes_drop_the_annotation(tmp_path: Path, bbox: Any) -> None:
    project, report = _load(tmp_path, [_image("a")], [_annotation("x", "a", bbox=bbox), _annotation("y", "a")])
    assert project.annotations["annotation_id"].tolist() == ["y"]
    issue = _only(report, "invalid_bbox")
    assert (issue.record, issue.field, issue.action) == ("x", "bbox", "dropped")


def test_nan_box_written_by_python_is_dropped(tmp_path: Path) -> None:
    text = json.dumps(
        {
            "images": [_image("a")],
            "categories": CATEGORIES,
            "annotations": [_annotation("x", "a", bbox=[1, 2, float("nan"), 4])],
        }
    )
    assert "NaN" in text
    report = PrepareReport()
    project = load_cct(write_json(tmp_path / "export.json", text), report)
    assert project.annotations.empty
    assert _only(report, "invalid_bbox").record == "x"


@pytest.mark.parametrize("bbox", [[10, 10, -5, 20], [10, 10, 5, 0]])
def test_boxes_without_positive_size_are_dropped(tmp_path: Path, bbox: list[float]) -> None:
    project, report = _load(tmp_path, [_image("a")], [_annotation("x", "a", bbox=bbox)])
    assert project.annotations.empty
    issue = _only(report, "bbox_negative_size")
    assert (issue.record, issue.field, issue.action) == ("x", "bbox", "dropped")


def test_old_object_box_form_is_accepted(tmp_path: Path) -> None:
    box = {"left": 5, "top": 6, "width": 70, "height": 80}
    project, report = _load(tmp_path, [_image("a")], [_annotation("x", "a", bbox=box)])
    assert project.annotations.loc[0, ["x", "y", "w", "h"]].tolist() == [5.0, 6.0, 70.0, 80.0]
    assert report.issues == []
    _, report = _load(tmp_path, [_image("a")], [_annotation("x", "a", bbox={"left": 5, "top": None})])
    assert _only(report, "invalid_bbox").record == "x"


def test_boxes_outside_are_dropped_and_overlapping_ones_clamped(tmp_path: Path) -> None:
    project, report = _load(
        tmp_path,
        [_image("a"), _image("b", width=None, height=None)],
        [
            _annotation("out", "a", bbox=[500, 10, 20, 20]),
            _annotation("edge", "a", bbox=[380, -10, 50, 40]),
            _annotation("round", "a", bbox=[350, 250, 51, 51]),  # Animl's rounding: 1 px over
            _annotation("unknown", "b", bbox=[-4, 10, 900, 20]),  # size unknown: only x >= 0 enforced now
        ],
    )
    boxes = project.annotations.set_index("annotation_id")[["x", "y", "w", "h"]]
    assert "out" not in boxes.index
    assert boxes.loc["edge"].tolist() == [380.0, 0.0, 20.0, 30.0]
    assert boxes.loc["round"].tolist() == [350.0, 250.0, 50.0, 50.0]
    assert boxes.loc["unknown"].tolist() == [0.0, 10.0, 896.0, 20.0]
    out = _only(report, "bbox_outside_image")
    assert (out.record, out.field, out.action) == ("out", "bbox", "dropped")
    clamped = {(i.record, i.field, i.action) for i in report.issues_of("ingest", "bbox_clamped")}
    assert clamped == {("edge", "bbox", "clamped"), ("unknown", "bbox", "clamped")}
    assert report.counts["ingest"]["boxes_clamped_rounding"] == 1


def test_clip_boxes_after_sizes_are_known_is_idempotent(tmp_path: Path) -> None:
    project, _ = _load(
        tmp_path, [_image("b", width=None, height=None)], [_annotation("x", "b", bbox=[100, 10, 900, 20])]
    )
    images = project.images.assign(width=pd.array([400], dtype="Int64"), height=pd.array([300], dtype="Int64"))
    report = PrepareReport()
    clipped = clip_boxes(project.annotations, images, report, stage="boxes")
    assert clipped.loc[0, ["x", "w"]].tolist() == [100.0, 300.0]
    assert [(i.stage, i.kind, i.record) for i in report.issues] == [("boxes", "bbox_clamped", "x")]
    again = PrepareReport()
    assert clip_boxes(clipped, images, again).equals(clipped) and again.issues == []


def test_custom_key_field_and_wrong_key_type(tmp_path: Path) -> None:
    project, report = _load(
        tmp_path,
        [_image("a", original_relative_path="cam/a_1.jpg"), _image("b", original_relative_path=5)],
        [],
        key_field="original_relative_path",
    )
    assert project.images["s3_key"].tolist() == ["cam/a_1.jpg", "proj/cam/b.jpg"]
    issue = _only(report, "invalid_field")
    assert (issue.record, issue.field, issue.action) == ("b", "original_relative_path", "ignored")


def test_bad_categories_are_reported(tmp_path: Path) -> None:
    project, report = _load(
        tmp_path,
        [_image("a")],
        [],
        [{"id": "1", "name": "fox"}, {"id": 2, "name": ""}, {"id": 3, "name": "fox"}, {"id": 4, "name": "fox"}],
    )
    assert project.categories == {3: "fox", 4: "fox"}
    assert {(i.kind, i.record, i.field) for i in report.issues} == {
        ("invalid_field", "categories[0]", "id"),
        ("invalid_field", "2", "name"),
        ("duplicate_category_name", "4", "name"),
    }


# --- image sizes -----------------------------------------------------------------------------------------------


def test_fill_image_sizes_uses_displayed_orientation(tmp_path: Path) -> None:
    images_dir = tmp_path / "images"
    (images_dir / "proj/cam").mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 120x80, displayed 80x120
    Image.new("RGB", (120, 80)).save(images_dir / "proj/cam/a.jpg", exif=exif)
    (images_dir / "proj/cam/b.jpg").write_bytes(b"not an image")
    project, _ = _load(tmp_path, [_image("a", width=None), _image("b", height=None), _image("c")], [])
    report = PrepareReport()
    filled = fill_image_sizes(project.images, images_dir, report)
    assert filled[["width", "height"]].astype(object).values.tolist() == [[80, 120], [400, pd.NA], [400, 300]]
    assert [(i.kind, i.record, i.action) for i in report.issues] == [
        ("missing_size", "a", "filled"),
        ("size_unreadable", "b", "skipped"),
    ]


# --- speed -----------------------------------------------------------------------------------------------------


def _big_cct(path: Path, n_annotations: int, n_images: int) -> None:
    rng = np.random.default_rng(0)
    images = [
        {
            "id": f"proj:{i:08x}",
            "file_name": f"proj/cam{i % 50}/dep_{i % 7}/proj-{i:08x}.jpg",
            "serving_bucket_key": f"original/proj:{i:08x}-original.jpg",
            "datetime": "2023-01-01T00:00:00-08:00",
            "location": f"dep_{i % 40}",
            "width": 2048,
            "height": 1536,
        }
        for i in range(n_images)
    ]
    xy = rng.integers(0, 1000, (n_annotations, 2)).tolist()
    wh = rng.integers(1, 500, (n_annotations, 2)).tolist()  # inside the 2048x1536 frame
    annotations = [
        {
            "id": f"{i:024x}",
            "image_id": f"proj:{i % n_images:08x}",
            "category_id": i % 10,
            "sequence_level_annotation": False,
            "bbox": [*xy[i], *wh[i]],
            "confidence": None,
            "validated": True,
            "validated_by": "user",
        }
        for i in range(n_annotations)
    ]
    categories = [{"id": i, "name": f"c{i}"} for i in range(10)]
    path.write_text(
        json.dumps({"info": {"version": "1.0"}, "images": images, "annotations": annotations, "categories": categories})
    )


@pytest.mark.slow
def test_one_million_annotations_ingest_in_seconds(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    _big_cct(path, 1_000_000, 250_000)
    report = PrepareReport()
    start = time.process_time()
    project = load_cct(path, report)
    elapsed = time.process_time() - start
    assert len(project.annotations) == 1_000_000 and len(project.images) == 250_000
    assert elapsed < 15, f"ingest took {elapsed:.1f} s of CPU"
