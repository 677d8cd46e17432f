"""MegaDetector results files (format v1.x): reading and validation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from animl_lightning.megadetector import STANDARD_CATEGORIES, Detection, DetectionsError, load_detections
from animl_lightning.report import PrepareReport


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "md.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


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
    results = load_detections(_write(tmp_path, data), report)
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
    results = load_detections(_write(tmp_path, data), PrepareReport())
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
    ],
)
def test_unusable_files_raise(tmp_path: Path, text: str, match: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(DetectionsError, match=match) as err:
        load_detections(path, PrepareReport())
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("detection", "field"),
    [
        ({"category": 1, "conf": 0.9, "bbox": [0.1, 0.1, 0.2, 0.2]}, "category"),
        ({"category": "1", "conf": "0.9", "bbox": [0.1, 0.1, 0.2, 0.2]}, "conf"),
        ({"category": "1", "conf": 1.5, "bbox": [0.1, 0.1, 0.2, 0.2]}, "conf"),
        ({"category": "1", "conf": True, "bbox": [0.1, 0.1, 0.2, 0.2]}, "conf"),
        ({"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.2]}, "bbox"),
        ({"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, None, 0.2]}, "bbox"),
        ({"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, -0.2, 0.2]}, "bbox"),
        ("not a detection", "detections"),
    ],
)
def test_bad_detections_are_reported_and_keep_their_index(tmp_path: Path, detection: Any, field: str) -> None:
    good = {"category": "1", "conf": 0.9, "bbox": [0.5, 0.5, 0.1, 0.1]}
    data = _results([{"file": "cam/a.jpg", "detections": [detection, good]}])
    report = PrepareReport()
    results = load_detections(_write(tmp_path, data), report)
    assert [d.index for d in results.images["cam/a.jpg"]] == [1]  # the good one keeps its original position
    [issue] = report.issues
    assert (issue.kind, issue.record, issue.field) == ("invalid_detection", "cam/a.jpg#0", field)
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
    results = load_detections(_write(tmp_path, data), report)
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
