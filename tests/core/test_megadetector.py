"""MegaDetector results files (format v1.x): reading and validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from animl_lightning.core.issues import PrepareReport
from animl_lightning.core.megadetector import (
    STANDARD_CATEGORIES,
    Detection,
    DetectionsError,
    detection_problem,
    load_detections,
    read_results_strict,
)
from tests.fixtures.files import write_json


def _results(images: list[Any], **info: Any) -> dict[str, Any]:
    return {
        "info": {"format_version": "1.3", "detector": "md_v5a.0.0.pt", **info},
        "detection_categories": {"1": "animal", "2": "person", "3": "vehicle"},
        "images": images,
    }


def test_reads_a_results_file(tmp_path: Path) -> None:
    data = _results(
        [
            {
                "file": "cam/a.jpg",
                "max_detection_conf": 0.9,
                "detections": [
                    {"category": "1", "conf": 0.93, "bbox": [0.1, 0.2, 0.3, 0.25], "classifications": [["1", 0.9]]},
                    {"category": "2", "conf": 0.5, "bbox": [0.5, 0.5, 0.1, 0.1]},
                ],
            },
            {"file": "cam/empty.jpg", "detections": []},
            {"file": "cam/broken.jpg", "failure": "Failure image access"},
        ]
    )
    report = PrepareReport()
    results = load_detections(write_json(tmp_path / "md.json", data), report)
    assert results.detector == "md_v5a.0.0.pt" and results.format_version == "1.3"
    assert results.detection_categories == STANDARD_CATEGORIES
    assert results.images["cam/a.jpg"][0] == Detection("1", 0.93, (0.1, 0.2, 0.3, 0.25), 0)
    assert results.images["cam/a.jpg"][1].index == 1
    assert results.images["cam/empty.jpg"] == []
    assert results.failures == {"cam/broken.jpg": "Failure image access"}
    assert report.issues == []
    assert report.counts["boxes"]["detections"] == 2


def test_numeric_format_version_from_old_cct_to_md_is_accepted(tmp_path: Path) -> None:
    data = _results([{"file": "a.jpg", "detections": []}], format_version=1.2, detector="cct_to_md")
    results = load_detections(write_json(tmp_path / "md.json", data), PrepareReport())
    assert results.format_version == "1.2" and results.detector == "cct_to_md"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"images": [', "not valid JSON"),
        ("[]", "top level must be a JSON object"),
        ('{"images": {}}', "'images' must be a list"),
        ('{"info": {"format_version": "2.0"}, "images": []}', "not a supported 1.x"),
        ('{"info": [], "images": []}', "info must be an object"),
        ('{"info": {"format_version": "1.3"}, "detection_categories": [], "images": []}', "detection_categories"),
        ('{"info": {"format_version": true}, "images": []}', "not a supported 1.x"),
        ('{"info": {}}', "'images' must be a list, got missing"),
        (b'{"images": ["\xff"]}', "not UTF-8 text at byte 13"),
    ],
)
def test_unusable_files_raise(tmp_path: Path, text: str | bytes, match: str) -> None:
    path = write_json(tmp_path / "md.json", text)
    for read in (lambda: load_detections(path, PrepareReport()), lambda: read_results_strict(path)):
        with pytest.raises(DetectionsError, match=match) as err:
            read()
        assert str(path) in str(err.value)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DetectionsError, match=r"nope\.json does not exist"):
        load_detections(tmp_path / "nope.json", PrepareReport())


NEGATIVE_WIDTH = {"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, -0.2, 0.2]}


@pytest.mark.parametrize(
    ("detection", "field"),
    [
        ({"category": 1, "conf": 0.9, "bbox": [0.1, 0.1, 0.2, 0.2]}, "category"),
        ({"category": "9", "conf": 0.9, "bbox": [0.1, 0.1, 0.2, 0.2]}, "category"),
        ({"category": "1", "conf": "0.9", "bbox": [0.1, 0.1, 0.2, 0.2]}, "conf"),
        ({"category": "1", "conf": 1.5, "bbox": [0.1, 0.1, 0.2, 0.2]}, "conf"),
        ({"category": "1", "conf": True, "bbox": [0.1, 0.1, 0.2, 0.2]}, "conf"),
        ({"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.2]}, "bbox"),
        ({"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, None, 0.2]}, "bbox"),
        (NEGATIVE_WIDTH, "bbox"),
        ("not a detection", "detections"),
    ],
)
def test_bad_detections_are_reported_and_keep_their_index(tmp_path: Path, detection: Any, field: str) -> None:
    good = {"category": "1", "conf": 0.9, "bbox": [0.5, 0.5, 0.1, 0.1]}
    data = _results([{"file": "cam/a.jpg", "detections": [detection, good]}])
    report = PrepareReport()
    results = load_detections(write_json(tmp_path / "md.json", data), report)
    assert [d.index for d in results.images["cam/a.jpg"]] == [1]  # the good one keeps its original position
    [issue] = report.issues
    kind = "degenerate_box" if detection == NEGATIVE_WIDTH else "invalid_detection"
    assert (issue.kind, issue.record, issue.field) == (kind, "cam/a.jpg#0", field)
    assert issue.file == str(tmp_path / "md.json")


def test_bad_image_entries_are_reported(tmp_path: Path) -> None:
    data = _results(
        [
            {"file": "a.jpg", "detections": []},
            {"file": "a.jpg", "detections": [{"category": "1", "conf": 0.9, "bbox": [0, 0, 0.1, 0.1]}]},
            {"file": 5, "detections": []},
            {"file": "b.jpg"},
            {"file": "c.jpg", "detections": {"category": "1"}},
            42,
        ]
    )
    del data["detection_categories"]
    report = PrepareReport()
    results = load_detections(write_json(tmp_path / "md.json", data), report)
    assert results.images == {"a.jpg": []}
    assert results.detection_categories == STANDARD_CATEGORIES
    kinds = [(i.kind, i.record, i.field) for i in report.issues]
    assert kinds == [
        ("missing_detection_categories", None, "detection_categories"),
        ("duplicate_file", "a.jpg", "file"),
        ("invalid_field", "images[2]", "file"),
        ("missing_detections", "b.jpg", "detections"),
        ("invalid_field", "c.jpg", "detections"),
        ("invalid_record", "images[5]", None),
    ]


@pytest.mark.parametrize(
    "detection",
    [
        {"category": "9", "conf": 0.9, "bbox": [0.1, 0.1, 0.2, 0.2]},
        {"category": "1", "conf": -0.1, "bbox": [0.1, 0.1, 0.2, 0.2]},
        ["1", 0.9],
    ],
)
def test_lenient_and_strict_readers_find_the_same_problem(tmp_path: Path, detection: Any) -> None:
    good = {"category": "1", "conf": 0.9, "bbox": [0.5, 0.5, 0.1, 0.1]}
    path = write_json(
        tmp_path / "md.json",
        _results([{"file": "cam/ok.jpg", "detections": []}, {"file": "cam/a.jpg", "detections": [good, detection]}]),
    )
    report = PrepareReport()
    load_detections(path, report)
    [issue] = report.issues
    with pytest.raises(DetectionsError) as err:
        read_results_strict(path)
    # One validation, two policies: the exception is the reported problem, prefixed with the file.
    assert str(err.value) == f"{path}: {issue.message}"
    assert issue.message.startswith("images[1] (cam/a.jpg) detections[1]: ")


def test_strict_reader_leaves_a_zero_size_box_to_the_caller(tmp_path: Path) -> None:
    flat = {"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.2, 0.0]}
    path = write_json(tmp_path / "md.json", _results([{"file": "cam/a.jpg", "detections": [flat]}]))
    report = PrepareReport()
    load_detections(path, report)
    assert [(i.kind, i.field) for i in report.issues] == [("degenerate_box", "bbox")]
    assert read_results_strict(path)["images"][0]["detections"] == [flat]  # classify fails that one crop instead


def test_strict_reader_keeps_every_field(tmp_path: Path) -> None:
    data = _results(
        [
            {
                "file": "cam/a.jpg",
                "max_detection_conf": 0.9,
                "detections": [{"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.2, 0.2], "frame_number": 3}],
            },
            {"file": "cam/b.jpg", "failure": "Failure image access", "detections": None},
            {"file": "cam/c.jpg"},  # neither detections nor failure: nothing to classify, not an error here
        ],
        detection_completion_time="2024-01-01 00:00:00",
    )
    data["classification_categories"] = {"0": "fox"}
    assert read_results_strict(write_json(tmp_path / "md.json", data)) == data


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("detection_categories"), "field 'detection_categories' is missing"),
        (lambda d: d["detection_categories"].update(x="animal"), "field 'detection_categories': 'x'"),
        (lambda d: d["info"].update(format_version="2.0"), "info.format_version '2.0' is not a supported 1.x"),
        (
            lambda d: d["images"].append({"file": "cam/a.jpg", "detections": []}),
            r"images\[1\] \(cam/a.jpg\): field 'file' is listed twice",
        ),
        (lambda d: d["images"].append(7), r"images\[1\] is a int, not an object"),
        (
            lambda d: d["images"][0].update(detections={}),
            r"images\[0\] \(cam/a.jpg\): field 'detections' must be a list",
        ),
        (
            lambda d: d["images"][0]["detections"][0].update(category=1),
            r"detections\[0\]: field 'category' 1 is not in",
        ),
    ],
)
def test_strict_reader_names_record_and_field(tmp_path: Path, change: Any, message: str) -> None:
    data = _results(
        [{"file": "cam/a.jpg", "detections": [{"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.2, 0.2]}]}]
    )
    change(data)
    path = write_json(tmp_path / "md.json", data)
    with pytest.raises(DetectionsError, match=message) as err:
        read_results_strict(path)
    assert str(err.value).startswith(f"{path}: ")


def test_detection_problem_names_position_record_and_field() -> None:
    good = {"category": "2", "conf": 1, "bbox": [0, 0, 1, 1]}
    assert detection_problem(good, 4, "cam/x.jpg", 2, STANDARD_CATEGORIES) is None
    problem = detection_problem(dict(good, conf=float("nan")), 4, "cam/x.jpg", 2, STANDARD_CATEGORIES)
    assert problem is not None
    assert (problem.kind, problem.record, problem.field) == ("invalid_detection", "cam/x.jpg#2", "conf")
    assert problem.message.startswith("images[4] (cam/x.jpg) detections[2]: field 'conf'")
