"""The boxes stage: ground-truth boxes, detector boxes for box-less images, naming, and what is skipped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from animl_lightning.core.cct import CctProject, load_cct
from animl_lightning.core.issues import PrepareReport
from animl_lightning.core.megadetector import DetectionResults, load_detections
from animl_lightning.prepare.boxes import (
    BOX_COLUMNS,
    collect_boxes,
    detector_candidates,
    gt_crop_path,
    md_crop_path,
)
from animl_lightning.prepare.config import DetectionSettings
from tests.fixtures.cct import write_cct

CATEGORIES = [{"id": 0, "name": "empty"}, {"id": 1, "name": "fox"}, {"id": 2, "name": "skunk"}]


def _image(image_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": image_id,
        "file_name": f"cam/{image_id}.jpg",
        "location": "ridge",
        "width": 1000,
        "height": 500,
        **fields,
    }


def _annotation(
    annotation_id: str, image_id: str, category_id: int = 1, bbox: Any = (10, 20, 30, 40)
) -> dict[str, Any]:
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": None if bbox is None else list(bbox),
    }


def _project(tmp_path: Path, images: list[dict[str, Any]], annotations: list[dict[str, Any]]) -> CctProject:
    return load_cct(write_cct(tmp_path / "export.json", images, annotations, CATEGORIES), PrepareReport())


def _detections(
    tmp_path: Path, images: list[dict[str, Any]], detector: str | None = "md_v5a.0.0.pt"
) -> DetectionResults:
    info: dict[str, Any] = {"format_version": "1.3"}
    if detector is not None:
        info["detector"] = detector
    path = tmp_path / "md.json"
    path.write_text(
        json.dumps({"info": info, "detection_categories": {"1": "animal", "2": "person"}, "images": images})
    )
    return load_detections(path, PrepareReport())


def _available(project: CctProject, unavailable: tuple[str, ...] = ()) -> pd.DataFrame:
    return project.images.assign(available=~project.images["image_id"].isin(unavailable))


def _collect(
    project: CctProject,
    detections: DetectionResults | None = None,
    images: pd.DataFrame | None = None,
    **settings: Any,
) -> tuple[pd.DataFrame, PrepareReport]:
    report = PrepareReport()
    boxes = collect_boxes(
        project,
        _available(project) if images is None else images,
        [] if detections is None else [detections],
        DetectionSettings(**settings),
        report,
    )
    return boxes, report


def test_ground_truth_boxes_and_names(tmp_path: Path) -> None:
    project = _project(
        tmp_path,
        [_image("a", file_name="cam 1/été é.jpg", location=3, datetime="2023-01-01", seq_id="s9"), _image("b")],
        [_annotation("a1", "a"), _annotation("a2", "a", 2, (500, 100, 50, 60)), _annotation("b/1", "b")],
    )
    boxes, report = _collect(project)
    assert tuple(boxes.columns) == BOX_COLUMNS
    assert boxes["crop_path"].tolist() == [
        "cam 1/été é.jpg___crop_a1.jpg",
        "cam 1/été é.jpg___crop_a2.jpg",
        "cam/b.jpg___crop_b_1.jpg",
    ]
    first = boxes.iloc[0]
    assert (first["location"], first["datetime"], first["seq_id"], first["dataset_class"]) == (
        "3",
        "2023-01-01",
        "s9",
        "fox",
    )
    assert (first["confidence"], first["source"], first["annotation_id"]) == (1.0, "gt", "a1")
    assert boxes.iloc[1][["x", "y", "w", "h", "width", "height"]].tolist() == [500.0, 100.0, 50.0, 60.0, 1000, 500]
    assert boxes["dataset_class"].tolist() == ["fox", "skunk", "fox"]
    assert report.issues == [] and report.counts["boxes"]["boxes_gt"] == 3
    assert gt_crop_path("x.jpg", "id/1") == "x.jpg___crop_id_1.jpg"


def test_single_animal_only_drops_multi_box_images(tmp_path: Path) -> None:
    project = _project(
        tmp_path, [_image("a"), _image("b")], [_annotation("1", "a"), _annotation("2", "a"), _annotation("3", "b")]
    )
    boxes, _ = _collect(project)
    assert len(boxes) == 3  # multi-animal images keep every box
    boxes, report = _collect(project, single_animal_only=True)
    assert boxes["annotation_id"].tolist() == ["3"]
    [issue] = report.issues
    assert (issue.kind, issue.record, issue.action) == ("multiple_animals", "a", "dropped")


def test_boxless_images_take_detector_boxes(tmp_path: Path) -> None:
    project = _project(
        tmp_path,
        [_image("a"), _image("b"), _image("c")],
        [_annotation("1", "a", 2, None), _annotation("2", "b", 1), _annotation("3", "c", 1, None)],
    )
    detections = _detections(
        tmp_path,
        [
            {
                "file": "cam/a.jpg",
                "detections": [
                    {"category": "1", "conf": 0.95, "bbox": [0.1, 0.2, 0.3, 0.4]},
                    {"category": "1", "conf": 0.5, "bbox": [0.5, 0.5, 0.1, 0.1]},  # below threshold
                    {"category": "2", "conf": 0.99, "bbox": [0.6, 0.1, 0.1, 0.1]},  # a person
                    {"category": "1", "conf": 0.8, "bbox": [0.9, 0.9, 0.2, 0.2]},  # overlaps the edge
                ],
            },
            {"file": "cam/b.jpg", "detections": [{"category": "1", "conf": 0.99, "bbox": [0, 0, 1, 1]}]},
            {"file": "cam/c.jpg", "detections": [{"category": "1", "conf": 0.2, "bbox": [0, 0, 1, 1]}]},
        ],
    )
    boxes, report = _collect(project, detections)
    md = boxes.loc[boxes["source"] == "md"].reset_index(drop=True)
    assert md["crop_path"].tolist() == ["cam/a.jpg___crop00_md_v5a.0.0.pt.jpg", "cam/a.jpg___crop03_md_v5a.0.0.pt.jpg"]
    assert md["dataset_class"].tolist() == ["skunk", "skunk"] and md["annotation_id"].tolist() == ["", ""]
    assert md["confidence"].tolist() == [0.95, 0.8]
    assert md.loc[0, ["x", "y", "w", "h"]].tolist() == pytest.approx([100.0, 100.0, 300.0, 200.0])
    assert md.loc[1, ["x", "y", "w", "h"]].tolist() == pytest.approx([900.0, 450.0, 100.0, 50.0])  # clamped
    # b has a ground-truth box: the detector is not used for it
    assert boxes.loc[boxes["image_id"] == "b", "source"].tolist() == ["gt"]
    [issue] = report.issues_of("boxes", "no_detection")
    assert (issue.record, issue.field) == ("c", "detections")


@pytest.mark.parametrize(("detector", "suffix"), [("models/md v5.pt", "models_md v5.pt"), (None, "unknown")])
def test_detector_name_in_crop_paths(tmp_path: Path, detector: str | None, suffix: str) -> None:
    project = _project(tmp_path, [_image("a")], [_annotation("1", "a", 1, None)])
    detections = _detections(
        tmp_path,
        [{"file": "cam/a.jpg", "detections": [{"category": "1", "conf": 0.9, "bbox": [0, 0, 0.5, 0.5]}]}],
        detector,
    )
    boxes, _ = _collect(project, detections)
    assert boxes["crop_path"].tolist() == [f"cam/a.jpg___crop00_{suffix}.jpg"]
    assert md_crop_path("x.jpg", 123, "d") == "x.jpg___crop123_d.jpg"


def test_what_gives_no_boxes_is_reported(tmp_path: Path) -> None:
    project = _project(
        tmp_path,
        [_image(i) for i in ("amb", "fail", "absent", "empty", "none", "mixed", "gone")],
        [
            _annotation("1", "amb", 1, None),
            _annotation("2", "amb", 2, None),
            _annotation("3", "fail", 1, None),
            _annotation("4", "absent", 1, None),
            _annotation("5", "empty", 0, None),
            _annotation("6", "mixed", 1),
            _annotation("7", "mixed", 2, None),
            _annotation("8", "gone", 1),
        ],
    )
    detections = _detections(
        tmp_path,
        [
            {"file": "cam/amb.jpg", "detections": [{"category": "1", "conf": 0.9, "bbox": [0, 0, 0.5, 0.5]}]},
            {"file": "cam/fail.jpg", "failure": "Failure image access"},
            {"file": "cam/empty.jpg", "detections": [{"category": "1", "conf": 0.9, "bbox": [0, 0, 0.5, 0.5]}]},
        ],
    )
    boxes, report = _collect(project, detections, _available(project, ("gone",)))
    assert boxes["annotation_id"].tolist() == ["6"]
    issues = {(i.kind, i.record, i.field) for i in report.issues}
    assert issues == {
        ("ambiguous_class", "amb", "category_id"),
        ("detector_failure", "fail", "file"),
        ("not_in_detections", "absent", "file"),
        ("annotation_without_box", "7", "bbox"),
        ("annotation_of_unavailable_image", "8", "image_id"),  # listed by the annotation, not only its image
    }
    assert report.counts["boxes"]["empty_images_without_box"] == 1
    assert report.counts["boxes"]["annotations_on_unavailable_images"] == 1


def test_detector_candidates_are_the_images_whose_boxes_would_come_from_detections(tmp_path: Path) -> None:
    project = _project(
        tmp_path,
        [_image(i) for i in ("amb", "one", "two", "empty", "none", "mixed", "gone", "boxed")],
        [
            _annotation("1", "amb", 1, None),
            _annotation("2", "amb", 2, None),
            _annotation("3", "one", 1, None),
            _annotation("4", "two", 2, None),
            _annotation("5", "two", 2, None),  # two box-less annotations of one category: one image, one class
            _annotation("6", "empty", 0, None),
            _annotation("7", "mixed", 1),
            _annotation("8", "mixed", 2, None),
            _annotation("9", "gone", 1, None),
            _annotation("10", "boxed", 1),
        ],
    )
    assert detector_candidates(project, _available(project, ("gone",))) == ["cam/one.jpg", "cam/two.jpg"]


def test_two_results_files_are_read_in_order_each_naming_its_crops(tmp_path: Path) -> None:
    project = _project(
        tmp_path, [_image("a"), _image("b")], [_annotation("1", "a", 1, None), _annotation("2", "b", 1, None)]
    )
    box = [{"category": "1", "conf": 0.9, "bbox": [0, 0, 0.5, 0.5]}]
    (tmp_path / "given").mkdir()
    (tmp_path / "run").mkdir()
    given = _detections(tmp_path / "given", [{"file": "cam/a.jpg", "detections": box}], "md_v5b.0.0.pt")
    run = _detections(
        tmp_path / "run", [{"file": "cam/a.jpg", "detections": []}, {"file": "cam/b.jpg", "detections": box}], "mine.pt"
    )
    report = PrepareReport()
    boxes = collect_boxes(project, _available(project), [given, run], DetectionSettings(), report)
    assert sorted(boxes["crop_path"]) == ["cam/a.jpg___crop00_md_v5b.0.0.pt.jpg", "cam/b.jpg___crop00_mine.pt.jpg"]


def test_without_detections_boxless_images_are_reported(tmp_path: Path) -> None:
    project = _project(tmp_path, [_image("a")], [_annotation("1", "a", 1, None)])
    boxes, report = _collect(project)
    assert boxes.empty and tuple(boxes.columns) == BOX_COLUMNS
    [issue] = report.issues
    assert (issue.kind, issue.record) == ("no_box", "a")


def test_sizes_filled_after_ingest_clamp_boxes_and_convert_detections(tmp_path: Path) -> None:
    project = _project(
        tmp_path,
        [_image("a", width=None, height=None), _image("b", width=None, height=None), _image("c", width=None)],
        [_annotation("1", "a", 1, (150, 10, 100, 20)), _annotation("2", "b", 1, None), _annotation("3", "c", 1, None)],
    )
    detections = _detections(
        tmp_path,
        [
            {"file": f"cam/{x}.jpg", "detections": [{"category": "1", "conf": 0.9, "bbox": [0.5, 0.5, 0.25, 0.25]}]}
            for x in ("b", "c")
        ],
    )
    filled = _available(project).assign(
        width=pd.array([200, 400, None], dtype="Int64"), height=pd.array([100, 200, None], dtype="Int64")
    )
    boxes, report = _collect(project, detections, filled)
    assert boxes.set_index("image_id").loc["a", ["x", "w", "width"]].tolist() == [150.0, 50.0, 200]
    assert boxes.set_index("image_id").loc["b", ["x", "y", "w", "h"]].tolist() == [200.0, 100.0, 100.0, 50.0]
    assert {(i.kind, i.record) for i in report.issues} == {("bbox_clamped", "1"), ("size_unknown", "c")}
