"""Boxes against their image's size: clamping boxes to the image, and reading sizes the CCT file does not give.

Both run at ingest (:mod:`animl_lightning.core.cct`) and again in prepare's images and boxes stages, once every
available image's size is known.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from animl_lightning.core.files import UnsafePathError, safe_join
from animl_lightning.core.issues import PrepareReport

log = logging.getLogger(__name__)

# Animl rounds x and w separately (pipeline.md 2.1), so a box touching the right or bottom edge can overshoot it by
# up to one pixel. Such boxes are clamped and counted, not reported one by one.
ROUNDING_TOLERANCE_PX = 1.0
_EPS = 1e-6


def clip_boxes(
    annotations: pd.DataFrame,
    images: pd.DataFrame,
    report: PrepareReport,
    *,
    stage: str = "boxes",
    file: str | Path | None = None,
) -> pd.DataFrame:
    """Clamp boxes to their image and drop boxes entirely outside it.

    Idempotent: boxes already inside their image are untouched and not reported again, so it runs at ingest (for
    images whose size the CCT gives) and again after :func:`fill_image_sizes` (for the rest). Where an image's size
    is unknown only the left and top edges (0) are enforced. Overshoots within :data:`ROUNDING_TOLERANCE_PX` (Animl's
    rounding) are clamped and counted as ``clamped_rounding``; larger ones are reported as ``bbox_clamped``.

    Args:
        annotations: the annotations table (``image_id``, ``x, y, w, h``; rows without a box have NaN).
        images: the images table (``image_id``, ``width``, ``height``).
        report: receives ``bbox_outside_image`` (dropped) and ``bbox_clamped`` issues.
        stage: report stage name.
        file: file named in the issues.

    Returns:
        A new annotations table.
    """
    position = pd.Index(images["image_id"].to_numpy(dtype=object)).get_indexer(
        annotations["image_id"].to_numpy(dtype=object)
    )
    return clip_with_positions(annotations, images, position, report, stage, file)


def clip_with_positions(
    annotations: pd.DataFrame,
    images: pd.DataFrame,
    position: np.ndarray,
    report: PrepareReport,
    stage: str,
    file: str | Path | None,
) -> pd.DataFrame:
    """:func:`clip_boxes` with each annotation's image position in ``images`` known (-1: not there)."""
    if annotations.empty:
        return annotations
    found = position >= 0
    widths = images["width"].to_numpy(dtype=float, na_value=np.nan)
    heights = images["height"].to_numpy(dtype=float, na_value=np.nan)
    width = np.where(found, widths[np.where(found, position, 0)], np.nan)
    height = np.where(found, heights[np.where(found, position, 0)], np.nan)
    width = np.where(np.isnan(width), np.inf, width)
    height = np.where(np.isnan(height), np.inf, height)

    x, y, w, h = (annotations[c].to_numpy(dtype=float) for c in ("x", "y", "w", "h"))
    has_box = np.isfinite(x) & np.isfinite(y) & np.isfinite(w) & np.isfinite(h)
    x1, y1 = x + w, y + h
    cx0, cy0 = np.clip(x, 0, width), np.clip(y, 0, height)
    cx1, cy1 = np.clip(x1, 0, width), np.clip(y1, 0, height)
    outside = has_box & ((cx1 - cx0 <= _EPS) | (cy1 - cy0 <= _EPS))
    overshoot = np.nan_to_num(
        np.max(np.abs(np.stack([cx0 - x, cy0 - y, cx1 - x1, cy1 - y1])), axis=0), nan=0.0, posinf=0.0
    )
    changed = has_box & ~outside & (overshoot > _EPS)
    reported = changed & (overshoot > ROUNDING_TOLERANCE_PX)

    ids = annotations["annotation_id"].to_numpy(dtype=object)
    for i in np.flatnonzero(outside):
        report.add(
            stage,
            "bbox_outside_image",
            f"bbox [{x[i]:g}, {y[i]:g}, {w[i]:g}, {h[i]:g}] lies outside its {_size_text(width[i], height[i])} image",
            file=file,
            record=ids[i],
            field="bbox",
            action="dropped",
        )
    for i in np.flatnonzero(reported):
        report.add(
            stage,
            "bbox_clamped",
            f"bbox [{x[i]:g}, {y[i]:g}, {w[i]:g}, {h[i]:g}] overlaps the edge of its "
            f"{_size_text(width[i], height[i])} image; clamped to "
            f"[{cx0[i]:g}, {cy0[i]:g}, {cx1[i] - cx0[i]:g}, {cy1[i] - cy0[i]:g}]",
            file=file,
            record=ids[i],
            field="bbox",
            action="clamped",
        )
    if outside.any():
        report.count(stage, "boxes_outside_image", int(outside.sum()))
    if changed.any():
        report.count(stage, "boxes_clamped", int(reported.sum()))
        report.count(stage, "boxes_clamped_rounding", int((changed & ~reported).sum()))
    if not (outside.any() or changed.any()):
        return annotations
    result = annotations.copy()
    result["x"] = np.where(changed, cx0, x)
    result["y"] = np.where(changed, cy0, y)
    result["w"] = np.where(changed, cx1 - cx0, w)
    result["h"] = np.where(changed, cy1 - cy0, h)
    kept: pd.DataFrame = result.loc[~outside].reset_index(drop=True)
    return kept


def _size_text(width: float, height: float) -> str:
    if math.isinf(width) or math.isinf(height):
        return "(size unknown)"
    return f"{int(width)}x{int(height)}"


def fill_image_sizes(
    images: pd.DataFrame, images_dir: Path, report: PrepareReport, *, workers: int = 8
) -> pd.DataFrame:
    """Read missing ``width``/``height`` from the image files (header only).

    The size is the displayed one, after EXIF orientation (a 90-degree rotation swaps width and height), because
    Animl's boxes are in displayed coordinates. Only rows with a missing size are read, and only where the file is
    available (``available`` column, when present). Each filled row is reported (``missing_size``, action
    ``filled``); unreadable files are reported and keep a missing size.

    Args:
        images: the images table.
        images_dir: folder holding ``<file_name>``.
        report: receives the issues (stage ``images``).
        workers: threads reading headers (file opening is I/O bound).

    Returns:
        A new images table with the sizes filled in where possible.
    """
    from animl_lightning.core.imaging import ImageLoadError, image_display_size

    missing = (images["width"].isna() | images["height"].isna()).to_numpy(dtype=bool, copy=True)
    if "available" in images.columns:
        missing &= images["available"].to_numpy(dtype=bool)
    rows = np.flatnonzero(missing)
    if len(rows) == 0:
        return images
    file_names = images["file_name"].to_numpy(dtype=object)
    image_ids = images["image_id"].to_numpy(dtype=object)

    def read(row: int) -> tuple[int, tuple[int, int] | str]:
        try:
            return row, image_display_size(safe_join(images_dir, file_names[row]))
        except (ImageLoadError, UnsafePathError) as err:
            return row, str(err)

    result = images.copy()
    widths = result["width"].to_numpy(dtype=float, na_value=np.nan, copy=True)
    heights = result["height"].to_numpy(dtype=float, na_value=np.nan, copy=True)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for row, outcome in pool.map(read, rows.tolist()):
            if isinstance(outcome, str):
                report.add(
                    "images",
                    "size_unreadable",
                    f"width/height missing in the CCT file and unreadable from the image: {outcome}",
                    file=file_names[row],
                    record=image_ids[row],
                    field="width",
                )
                continue
            widths[row], heights[row] = outcome
            report.add(
                "images",
                "missing_size",
                f"width/height missing in the CCT file; read {outcome[0]}x{outcome[1]} from the image",
                file=file_names[row],
                record=image_ids[row],
                field="width",
                action="filled",
            )
    result["width"] = pd.array(widths, dtype="Int64")
    result["height"] = pd.array(heights, dtype="Int64")
    report.count("images", "sizes_filled", int(np.isfinite(widths[rows]).sum()))
    return result
