"""classify's inputs as MegaDetector results: a MegaDetector file, a COCO Camera Traps file, or a folder of crops.

A MegaDetector file is checked and kept as it is (the output copies every field of it). A COCO Camera Traps file's
boxes (absolute pixels) become "animal" detections with conf 1.0, and each file of a crops folder becomes one
full-frame "animal" detection; both are then MegaDetector results with normalised boxes, like a detector's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from animl_lightning.core.cct import CctError, load_cct
from animl_lightning.core.errors import AnimlError, InputFileError
from animl_lightning.core.files import safe_join
from animl_lightning.core.imaging import image_display_size
from animl_lightning.core.issues import PrepareReport
from animl_lightning.core.megadetector import DetectionsError, read_results_strict

log = logging.getLogger(__name__)

# The MegaDetector results format written (the current one); 1.6 needs it as a string.
FORMAT_VERSION = "1.6"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# A CCT or crops-folder input has no detector categories of its own; its boxes become this category.
ANIMAL_CATEGORIES = {"1": "animal"}


class ClassifyInputError(InputFileError):
    """An input file or folder is unusable; the message names the file, the record and the field."""


def read_detections_file(path: str | Path) -> dict[str, Any]:
    """Read a MegaDetector results file, refusing it at the first bad record; the raw dict is kept for the output.

    The format (including the 1.x version, since the output is written as 1.x) is checked by
    :func:`animl_lightning.core.megadetector.read_results_strict`; here its error becomes a
    :class:`ClassifyInputError` naming the setting too.
    """
    try:
        return read_results_strict(path)
    except DetectionsError as error:
        raise ClassifyInputError(f"detections_file: {error}") from error


def detections_from_cct(cct_path: str | Path, images_dir: str | Path) -> dict[str, Any]:
    """Turn the boxes of a COCO Camera Traps file into a MegaDetector results dict.

    The file goes through prepare's ingest (:func:`animl_lightning.core.cct.load_cct`): the same checks, and a bad
    record is skipped and logged, not fatal. Every annotation with a box (absolute pixels) becomes an "animal"
    detection with conf 1.0, in annotation order; annotations without a box are ignored (there is nothing to crop).
    Images missing ``width``/``height`` are measured from the file; an image that cannot be measured gets a
    ``failure`` and ``detections: null``.
    """
    report = PrepareReport()
    try:
        project = load_cct(cct_path, report, key_field="file_name")
    except CctError as error:
        raise ClassifyInputError(f"cct_file: {error}") from error
    for issue in report.issues:
        log.warning("cct_file: skipped: %s", issue.message)
    annotations = project.annotations[project.annotations["w"].notna()]
    boxes: dict[str, list[list[float]]] = {}
    for image_id, x, y, w, h in annotations[["image_id", "x", "y", "w", "h"]].itertuples(index=False):
        boxes.setdefault(str(image_id), []).append([float(x), float(y), float(w), float(h)])
    images: list[dict[str, Any]] = []
    seen: set[str] = set()
    images_table = project.images
    sizes = zip(
        images_table["image_id"].astype(str),
        images_table["file_name"].astype(str),
        images_table["width"].to_numpy(dtype=float, na_value=np.nan),
        images_table["height"].to_numpy(dtype=float, na_value=np.nan),
        strict=True,
    )
    for image_id, name, width, height in sizes:
        if name in seen:
            continue  # one entry per file; the CCT can list an image twice only through a broken export
        seen.add(name)
        entry: dict[str, Any] = {"file": name}
        image_boxes = boxes.get(str(image_id), [])
        if not image_boxes:
            entry["detections"] = []
            images.append(entry)
            continue
        if not (np.isfinite(width) and np.isfinite(height) and width > 0 and height > 0):
            try:
                width, height = image_display_size(safe_join(images_dir, name))
            except AnimlError as error:
                # Without its size the box cannot be normalised; like a MegaDetector failure, it is listed, not retried.
                entry["failure"] = f"cannot read image (needed for its size): {error}"
                entry["detections"] = None
                images.append(entry)
                continue
        w_img, h_img = float(width), float(height)
        entry["detections"] = [
            {"category": "1", "conf": 1.0, "bbox": [x / w_img, y / h_img, w / w_img, h / h_img]}
            for x, y, w, h in image_boxes
        ]
        images.append(entry)
    return {
        "info": {"format_version": FORMAT_VERSION, "detector": "ground truth", "source": str(cct_path)},
        "detection_categories": dict(ANIMAL_CATEGORIES),
        "images": images,
    }


def detections_from_crops_folder(crops_dir: str | Path) -> dict[str, Any]:
    """One full-frame "animal" detection (conf 1.0) per image file below ``crops_dir`` (sorted, recursive)."""
    root = Path(crops_dir)
    if not root.is_dir():
        raise ClassifyInputError(f"crops_dir: {root} is not a folder")
    files = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )
    if not files:
        raise ClassifyInputError(f"crops_dir: {root} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return {
        "info": {"format_version": FORMAT_VERSION, "detector": "crops", "source": str(root)},
        "detection_categories": dict(ANIMAL_CATEGORIES),
        "images": [
            {"file": name, "detections": [{"category": "1", "conf": 1.0, "bbox": [0.0, 0.0, 1.0, 1.0]}]}
            for name in files
        ],
    }
