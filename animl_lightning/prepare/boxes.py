"""The boxes stage: one row per box to crop, from ground-truth annotations or, failing that, from MegaDetector.

Rules:

* Every annotation with a box gives a ground-truth box (``source="gt"``, confidence 1.0), whatever else its image
  has. Boxes are clamped to the image again now that every available image's size is known (idempotent for boxes
  clamped at ingest).
* An image whose annotations have no box at all takes its boxes from MegaDetector results (``file == file_name``),
  the ``detections_file`` and/or the detect stage's own results (:mod:`animl_lightning.prepare.detect`), looked up in
  that order: detections whose category name is ``detections.category`` with ``conf >= detections.threshold``
  (``source="md"``). Its ``dataset_class`` is the image's annotated category, so the image must have exactly one
  distinct box-less category (``empty`` aside); several are reported as ambiguous and skipped.
  :func:`detector_candidates` lists these images, so that the detect stage runs MegaDetector on exactly the images
  whose boxes it would use.
* Box-less ``empty`` annotations, and images without annotations, give no boxes (there is nothing to crop).
* Images with several boxes keep all of them; ``detections.single_animal_only=true`` reproduces the old
  ``md_to_queried_images`` rule that dropped such images entirely (reported).
* Only images that are available (``available`` column of the images stage) give boxes; the images stage already
  reported the others.

Crop names are stable and unique per box (pipeline.md 2.6): ``<file_name>___crop_<annotation_id>.jpg`` for
ground-truth boxes and ``<file_name>___crop<NN>_<detector>.jpg`` for detector boxes, ``NN`` being the detection's
position in the image's original list. Path separators in annotation ids and the detector name become ``_``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from animl_lightning.core.cct import CctProject, suspect_paths
from animl_lightning.core.files import UnsafePathError, safe_relative
from animl_lightning.core.image_boxes import clip_boxes
from animl_lightning.core.issues import PrepareReport
from animl_lightning.core.megadetector import DetectionResults, load_detections
from animl_lightning.prepare.config import DetectionSettings
from animl_lightning.prepare.stage import PrepareRun, Stage, StageOutcome, need

log = logging.getLogger(__name__)

STAGE = "boxes"
EMPTY_CATEGORY = "empty"
BOX_COLUMNS = (
    "image_id",
    "file_name",
    "location",
    "datetime",
    "seq_id",
    "annotation_id",
    "dataset_class",
    "confidence",
    "source",
    "x",
    "y",
    "w",
    "h",
    "width",
    "height",
    "crop_path",
)
_IMAGE_FIELDS = ("image_id", "file_name", "location", "datetime", "seq_id", "width", "height")


def path_component(name: str) -> str:
    """``name`` made safe as part of one path component: ``/`` and ``\\`` become ``_``."""
    return name.replace("/", "_").replace("\\", "_")


def gt_crop_path(file_name: str, annotation_id: str) -> str:
    """Crop path of a ground-truth box, relative to the crops folder."""
    return f"{file_name}___crop_{path_component(annotation_id)}.jpg"


def md_crop_path(file_name: str, index: int, detector: str) -> str:
    """Crop path of the detection at ``index`` in the image's list, relative to the crops folder."""
    return f"{file_name}___crop{index:02d}_{path_component(detector or 'unknown')}.jpg"


def _empty_boxes() -> pd.DataFrame:
    frame = pd.DataFrame({c: pd.Series(dtype="str") for c in BOX_COLUMNS})
    for column in ("confidence", "x", "y", "w", "h"):
        frame[column] = frame[column].astype(float)
    for column in ("width", "height"):
        frame[column] = frame[column].astype("Int64")
    return frame


def _ground_truth(annotations: pd.DataFrame, images: pd.DataFrame, position: np.ndarray) -> pd.DataFrame:
    rows = images.iloc[position].reset_index(drop=True)
    frame = rows.loc[:, list(_IMAGE_FIELDS)]
    frame["annotation_id"] = annotations["annotation_id"].to_numpy()
    frame["dataset_class"] = annotations["category"].to_numpy()
    frame["confidence"] = 1.0
    frame["source"] = "gt"
    for column in ("x", "y", "w", "h"):
        frame[column] = annotations[column].to_numpy(dtype=float)
    frame["crop_path"] = (
        frame["file_name"] + "___crop_" + frame["annotation_id"].str.replace("/", "_").str.replace("\\", "_") + ".jpg"
    )
    return frame


def _boxless_classes(boxless: pd.DataFrame) -> pd.Series:
    """The distinct non-``empty`` categories of each image in ``boxless`` (its box-less annotations)."""
    counted = boxless.loc[boxless["category"] != EMPTY_CATEGORY]
    return counted.groupby("image_id", sort=False)["category"].unique()


def _results_for(file_name: str, detections: Sequence[DetectionResults]) -> DetectionResults | None:
    """The first results that list ``file_name`` (among its images or its failures)."""
    for results in detections:
        if file_name in results.images or file_name in results.failures:
            return results
    return None


def _detector_boxes(
    boxless: pd.DataFrame,
    images: pd.DataFrame,
    detections: Sequence[DetectionResults],
    settings: DetectionSettings,
    report: PrepareReport,
) -> pd.DataFrame:
    """Boxes for the images whose annotations have no box; ``boxless`` has their box-less annotations."""
    classes = _boxless_classes(boxless)
    report.count(STAGE, "empty_images_without_box", int(boxless["image_id"].nunique() - len(classes)))
    if classes.empty:
        return _empty_boxes()
    rows = pd.Index(images["image_id"].to_numpy(dtype=object)).get_indexer(classes.index.to_numpy(dtype=object))
    columns = {f: images[f].to_numpy(dtype=object) for f in _IMAGE_FIELDS}
    sources = ", ".join(str(d.source) for d in detections)
    records: list[dict[str, object]] = []
    for image_id, names, row in zip(classes.index, classes.to_numpy(), rows, strict=True):
        file_name = str(columns["file_name"][row])
        results = _results_for(file_name, detections)
        source_file = results.source if results is not None else None

        def skip(
            kind: str,
            message: str,
            field: str | None = None,
            *,
            image_id: object = image_id,
            source: Path | None = source_file,
        ) -> None:
            report.add(STAGE, kind, message, file=source, record=str(image_id), field=field)

        if len(names) > 1:
            skip("ambiguous_class", f"no box and several annotated categories {sorted(names)}", "category_id")
            continue
        if not detections:
            skip(
                "no_box",
                "annotations have no box and no MegaDetector results were given (detections_file, detector.model_file)",
                "bbox",
            )
            continue
        if results is None:
            skip(
                "not_in_detections",
                f"annotations have no box and {file_name!r} is in no MegaDetector results ({sources})",
                "file",
            )
            continue
        if file_name in results.failures:
            skip("detector_failure", f"the detector failed on {file_name!r}: {results.failures[file_name]}", "file")
            continue
        found = results.images[file_name]
        detector = results.detector
        width, height = columns["width"][row], columns["height"][row]
        if pd.isna(width) or pd.isna(height):
            skip("size_unknown", "image size unknown: detector boxes cannot be converted to pixels", "width")
            continue
        kept = [
            d
            for d in found
            if results.detection_categories.get(d.category) == settings.category and d.conf >= settings.threshold
        ]
        if not kept:
            skip(
                "no_detection",
                f"no {settings.category!r} detection with conf >= {settings.threshold} among {len(found)}",
                "detections",
            )
            continue
        for d in kept:
            x, y, w, h = d.bbox
            records.append(
                {
                    **{f: columns[f][row] for f in _IMAGE_FIELDS},
                    "annotation_id": "",
                    "dataset_class": str(names[0]),
                    "confidence": d.conf,
                    "source": "md",
                    "x": x * int(width),
                    "y": y * int(height),
                    "w": w * int(width),
                    "h": h * int(height),
                    "crop_path": md_crop_path(file_name, d.index, detector),
                    "_record": f"{file_name}#{d.index}",
                    "_source": "" if results.source is None else str(results.source),
                }
            )
    if not records:
        return _empty_boxes()
    frame = pd.DataFrame.from_records(records)
    # clip_boxes names records by annotation_id; detector boxes are named file#index in the report, per results file.
    clipped = [
        clip_boxes(part.assign(annotation_id=part["_record"]), images, report, stage=STAGE, file=str(source) or None)
        for source, part in frame.groupby("_source", sort=False)
    ]
    return pd.concat(clipped, ignore_index=True).assign(annotation_id="").drop(columns=["_record", "_source"])


@dataclass(frozen=True)
class _AnnotationPlan:
    """Which annotations give ground-truth boxes and which images look for detector boxes.

    Attributes:
        annotations: the annotations, clamped to their images.
        position: each annotation's row in the images table (-1: unknown image).
        known: the annotation's image is in the images table.
        on_available: ... and is available.
        use_gt: the annotation gives a ground-truth box.
        boxless: the annotation has no box and neither has any other annotation of its image.
        partial: the annotation has no box but another annotation of its image has one.
    """

    annotations: pd.DataFrame
    position: np.ndarray
    known: np.ndarray
    on_available: np.ndarray
    use_gt: np.ndarray
    boxless: np.ndarray
    partial: np.ndarray


def _plan_annotations(project: CctProject, images: pd.DataFrame, report: PrepareReport) -> _AnnotationPlan:
    available = (
        images["available"].to_numpy(dtype=bool) if "available" in images.columns else np.ones(len(images), bool)
    )
    annotations = clip_boxes(project.annotations, images, report, stage=STAGE, file=project.source)
    position = pd.Index(images["image_id"].to_numpy(dtype=object)).get_indexer(
        annotations["image_id"].to_numpy(dtype=object)
    )
    known = position >= 0
    has_box = annotations["w"].notna().to_numpy() & known
    image_has_box = np.zeros(len(images), dtype=bool)
    image_has_box[position[has_box]] = True
    on_available = known & available[np.where(known, position, 0)]
    no_box = known & ~has_box & on_available
    partial = no_box & image_has_box[np.where(known, position, 0)]
    return _AnnotationPlan(
        annotations=annotations,
        position=position,
        known=known,
        on_available=on_available,
        use_gt=has_box & on_available,
        boxless=no_box & ~partial,
        partial=partial,
    )


def detector_candidates(project: CctProject, images: pd.DataFrame) -> list[str]:
    """File names of the images whose boxes :func:`collect_boxes` would take from MegaDetector results.

    Those are the available images without a ground-truth box whose box-less annotations name exactly one category
    other than ``empty``: images that are ``empty`` or ambiguous give no crop whatever a detector finds, so running
    it on them would only cost time (camera-trap exports are often mostly empty images). Sorted, without repeats.
    """
    plan = _plan_annotations(project, images, PrepareReport())  # its issues are the boxes stage's to report
    classes = _boxless_classes(plan.annotations.loc[plan.boxless])
    single = classes.loc[classes.map(len) == 1].index.to_numpy(dtype=object)
    rows = pd.Index(images["image_id"].to_numpy(dtype=object)).get_indexer(single)
    return sorted({str(name) for name in images["file_name"].to_numpy(dtype=object)[rows]})


def collect_boxes(
    project: CctProject,
    images: pd.DataFrame,
    detections: Sequence[DetectionResults],
    settings: DetectionSettings,
    report: PrepareReport,
) -> pd.DataFrame:
    """Build the boxes table (columns :data:`BOX_COLUMNS`) from the annotations and, optionally, detections.

    Args:
        project: the ingested CCT file (its annotations).
        images: the images table after the images stage (``available``, sizes filled from the files).
        detections: MegaDetector results for images without a ground-truth box, looked up in order (an image is
            taken from the first that lists it); empty for none.
        settings: category, threshold and ``single_animal_only``.
        report: receives every skipped image or box (stage ``boxes``) and the counts.
    """
    plan = _plan_annotations(project, images, report)
    annotations, position, known = plan.annotations, plan.position, plan.known
    if not known.all():
        report.count(STAGE, "annotations_of_unknown_images", int((~known).sum()))
    report.set_count(STAGE, "annotations_on_unavailable_images", int((known & ~plan.on_available).sum()))
    # The images stage names the image; each annotation it takes with it is named here, by its own id.
    annotation_ids = annotations["annotation_id"].to_numpy(dtype=object)
    file_names = images["file_name"].to_numpy(dtype=object)
    for i in np.flatnonzero(known & ~plan.on_available):
        report.add(
            STAGE,
            "annotation_of_unavailable_image",
            f"annotation skipped: its image {file_names[position[i]]} is not available (see the images stage)",
            file=project.source,
            record=str(annotation_ids[i]),
            field="image_id",
        )

    gt = _ground_truth(annotations.loc[plan.use_gt], images, position[plan.use_gt])

    for i in np.flatnonzero(plan.partial & (annotations["category"].to_numpy(dtype=object) != EMPTY_CATEGORY)):
        report.add(
            STAGE,
            "annotation_without_box",
            "annotation has no box but its image has boxed annotations; only those are cropped",
            file=project.source,
            record=str(annotation_ids[i]),
            field="bbox",
        )
    md = _detector_boxes(annotations.loc[plan.boxless], images, detections, settings, report)

    frames = [f for f in (gt, md) if not f.empty]
    boxes = pd.concat(frames, ignore_index=True) if frames else _empty_boxes()
    boxes = boxes.loc[:, list(BOX_COLUMNS)]

    if settings.single_animal_only and not boxes.empty:
        per_image = boxes.groupby("image_id", sort=False)["image_id"].transform("size").to_numpy()
        multi = per_image > 1
        for image_id, n in boxes.loc[multi].groupby("image_id", sort=False).size().items():
            report.add(
                STAGE,
                "multiple_animals",
                f"image has {n} boxes and detections.single_animal_only is set",
                record=str(image_id),
                field="bbox",
                action="dropped",
            )
        boxes = boxes.loc[~multi].reset_index(drop=True)

    paths = boxes["crop_path"].to_numpy(dtype=object)
    box_ids = boxes["annotation_id"].to_numpy(dtype=object)
    box_images = boxes["image_id"].to_numpy(dtype=object)
    unsafe = np.zeros(len(boxes), dtype=bool)
    for row in np.flatnonzero(suspect_paths(paths)).tolist():
        try:
            safe_relative(paths[row])
        except UnsafePathError as err:
            unsafe[row] = True
            report.add(STAGE, "unsafe_crop_path", str(err), record=str(box_images[row]), field="crop_path")
    duplicate = boxes["crop_path"].duplicated(keep="first").to_numpy() & ~unsafe
    for row in np.flatnonzero(duplicate).tolist():
        report.add(
            STAGE,
            "duplicate_crop_path",
            f"crop path {paths[row]!r} is already used by another box; the first is kept",
            record=str(box_ids[row] or box_images[row]),
            field="crop_path",
        )
    boxes = boxes.loc[~(unsafe | duplicate)].reset_index(drop=True)
    for column in ("image_id", "file_name", "location", "datetime", "seq_id", "annotation_id", "dataset_class"):
        boxes[column] = boxes[column].astype("str")
    boxes["source"] = boxes["source"].astype("str")
    boxes["crop_path"] = boxes["crop_path"].astype("str")
    boxes["width"] = boxes["width"].astype("Int64")
    boxes["height"] = boxes["height"].astype("Int64")

    report.set_count(STAGE, "boxes", len(boxes))
    report.set_count(STAGE, "boxes_gt", int((boxes["source"] == "gt").sum()))
    report.set_count(STAGE, "boxes_md", int((boxes["source"] == "md").sum()))
    report.set_count(STAGE, "images_with_boxes", int(boxes["image_id"].nunique()))
    log.info("boxes: %d (%d ground truth, %d detector)", len(boxes), len(gt), len(md))
    return boxes


class BoxesStage(Stage):
    """Always runs (it is quick): the boxes of the detections file, then those of the detect stage."""

    name = STAGE

    def run(self, run: PrepareRun) -> StageOutcome:
        """Leave the boxes table on ``run.boxes``."""
        settings = run.settings
        if settings.detections_file is not None and run.given is None:
            run.given = load_detections(settings.detections_file, run.report)
        detected = run.detected
        boxes = collect_boxes(
            need(run.project, "the ingested project"),
            need(run.images, "the images table"),
            [d for d in (run.given, detected) if d is not None],
            settings.detections,
            run.report,
        )
        run.boxes = boxes
        return StageOutcome(detail=f"{len(boxes)} boxes", counts={"boxes": len(boxes)})
