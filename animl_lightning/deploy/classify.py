"""Classify MegaDetector detections with a trained checkpoint and write the results back as MegaDetector JSON.

Input is a MegaDetector results file (boxes normalised to [0, 1]), a COCO Camera Traps file (ground-truth boxes in
absolute pixels, treated as "animal" detections with conf 1.0), or a folder of crops (each crop one full-frame
detection). Every "animal" detection at or above ``threshold`` is cropped in memory with the checkpoint's crop
rule, preprocessed like at training time, and classified in batches.

The output is the input file with, added:

- ``classification_categories``: ``{"0": label, ...}`` (the checkpoint's label index), and with thresholds
  ``unknown`` and the taxa (:mod:`animl_lightning.deploy.decisions`); ``classification_category_descriptions`` when
  the checkpoint has a taxonomy;
- per classified detection, ``classifications``: ``[[id_str, conf], ...]`` for every label with calibrated
  probability >= ``min_conf``, sorted by confidence (descending), rounded to 4 digits; an empty list when no
  label reaches ``min_conf``;
- per image that could not be read, ``failure`` (prefixed :data:`FAILURE_PREFIX`) and ``detections: null``, as
  MegaDetector's format and validator require;
- with ``classify.smoothing=image|sequence``, MegaDetector's smoothing (:mod:`animl_lightning.deploy.smoothing`): a
  detection whose class changed keeps its original list under ``classifications_before_smoothing``;
- ``info.format_version`` (at least "1.6"), ``info.classifier``, ``info.classification_completion_time``
  (``YYYY-mm-dd HH:MM:SS``, local time) and ``info.classifier_metadata``.

Boxes, detection confidences and every other field are copied untouched. The output is written atomically, also
while the job runs (every ``save_interval_s`` seconds, without ``classification_completion_time``). A rerun with
the same output file keeps the classifications of images whose detections are unchanged and classifies the rest;
images that failed with :data:`FAILURE_PREFIX` are tried again. The output is never one of the input files, and a
run in which every detection it tried failed writes nothing (:class:`ClassifyInputError`), so a wrong ``images_dir``
cannot replace a good output with failures.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from numpy.typing import NDArray

from animl_lightning.core.cct import CctError, load_cct
from animl_lightning.core.errors import AnimlError, ConfigError, require
from animl_lightning.core.files import (
    UnsafePathError,
    atomic_write,
    atomic_write_json,
    check_writable,
    read_json_file,
    safe_join,
    same_file,
)
from animl_lightning.core.imaging import image_display_size
from animl_lightning.core.issues import PrepareReport
from animl_lightning.core.megadetector import DetectionsError, read_results_strict
from animl_lightning.core.smoothing import SMOOTHING_LEVELS, SmoothingOptions
from animl_lightning.deploy.decisions import ThresholdRule, decision_categories
from animl_lightning.deploy.inference import (
    IMAGE_ERROR_PREFIX,
    CropRequests,
    LoadedClassifier,
    Predictor,
    classify_requests,
    load_classifier,
    top_k,
)
from animl_lightning.deploy.onnx_cache import AUTO, OnnxCache, resolve_cache_dir
from animl_lightning.deploy.onnx_runtime import INPUT_NAME, OnnxClassifier, onnxruntime_available
from animl_lightning.deploy.quantize import PRECISIONS, Int8Settings
from animl_lightning.deploy.smoothing import (
    BEFORE_SMOOTHING,
    ImageSequence,
    SmoothingSummary,
    sequences_from_cct,
    sequences_from_times,
    smooth_results,
)

log = logging.getLogger(__name__)

# The MegaDetector results format written (the current one); 1.6 needs it as a string.
FORMAT_VERSION = "1.6"
BACKENDS = ("auto", "torch", "onnxruntime")
FAILURE_PREFIX = "classification failed: "
# output_csv: the category the JSON reports first for a detection, and its probability.
DECISION_COLUMNS = ("decision", "decision_score")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# A CCT or crops-folder input has no detector categories of its own; its boxes become this category.
ANIMAL_CATEGORIES = {"1": "animal"}
# backend=auto exports to ONNX (no cached model yet) only for jobs of at least this many crops, where the export
# pays for itself. Measured on the 2-core CPU of benchmarks/bench_classify.py (efficientnet_b3, 288 px): the export
# costs about as much as 450 crops' worth of ONNX Runtime's savings over PyTorch, so 1000 leaves a 2x margin.
AUTO_EXPORT_MIN_CROPS = 1000


class ClassifyInputError(AnimlError, ValueError):
    """An input file or folder is unusable; the message names the file, the record and the field."""


@dataclass(frozen=True)
class ClassifySettings:
    """The ``detections.*`` and ``classify.*`` settings of ``configs/classify.yaml``."""

    threshold: float = 0.8
    category: str = "animal"
    min_conf: float = 0.1
    batch_size: int = 64
    num_workers: int = 2
    top_k: int = 3
    save_interval_s: float = 300.0
    resume: bool = True
    backend: str = "auto"
    thresholds: bool = True
    smoothing: str = "none"
    sequence_file: str | None = None
    max_gap_s: float = 3.0
    smoothing_options: SmoothingOptions = field(default_factory=SmoothingOptions)
    precision: str = "fp32"
    cache_dir: str | None = AUTO
    auto_export_min_crops: int = AUTO_EXPORT_MIN_CROPS
    int8: Int8Settings = field(default_factory=Int8Settings)

    def __post_init__(self) -> None:
        require(self.backend in BACKENDS, "backend", f"must be one of {list(BACKENDS)}, got {self.backend!r}")
        require(self.precision in PRECISIONS, "precision", f"must be one of {list(PRECISIONS)}, got {self.precision!r}")
        require(
            not (self.precision == "int8" and self.backend == "torch"),
            "precision",
            "int8 runs on ONNX Runtime: use backend=auto or backend=onnxruntime with precision=int8",
        )
        require(
            self.auto_export_min_crops >= 0,
            "classify.auto_export_min_crops",
            f"must be >= 0, got {self.auto_export_min_crops}",
        )
        levels = list(SMOOTHING_LEVELS)
        require(self.smoothing in levels, "classify.smoothing", f"must be one of {levels}, got {self.smoothing!r}")
        require(self.max_gap_s >= 0, "classify.max_gap_s", f"must be >= 0, got {self.max_gap_s}")
        require(0.0 <= self.threshold <= 1.0, "detections.threshold", f"must be in [0, 1], got {self.threshold}")
        require(bool(self.category), "detections.category", "must not be empty")
        require(0.0 <= self.min_conf <= 1.0, "classify.min_conf", f"must be in [0, 1], got {self.min_conf}")
        require(self.batch_size >= 1, "classify.batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.num_workers >= 0, "classify.num_workers", f"must be >= 0, got {self.num_workers}")
        require(self.top_k >= 1, "classify.top_k", f"must be >= 1, got {self.top_k}")
        require(self.save_interval_s >= 0, "classify.save_interval_s", f"must be >= 0, got {self.save_interval_s}")


@dataclass
class ClassifySummary:
    """What a classify run did; ``failures`` lists ``{"file", "detection", "message"}`` for every failed crop.

    ``images_to_classify`` counts the images whose detections this run tried (not those kept from a previous run).
    """

    images: int = 0
    detections: int = 0
    detections_eligible: int = 0
    detections_classified: int = 0
    detections_resumed: int = 0
    detections_failed: int = 0
    images_failed: int = 0
    images_skipped_failed_input: int = 0
    seconds: float = 0.0
    failures: list[dict[str, Any]] = field(default_factory=list)
    smoothing: SmoothingSummary | None = None
    detections_below_threshold: int = 0
    images_to_classify: int = 0

    @property
    def nothing_classified(self) -> bool:
        """Every detection this run tried failed and none was kept from a previous run.

        An output would then hold no classification at all; a wrong ``images_dir`` fails every image.
        """
        return self.detections_failed > 0 and self.detections_classified == 0 and self.detections_resumed == 0

    def failure_note(self) -> str:
        """How many detections and images failed in this run, and the first reason; empty when none failed."""
        if not self.failures:
            return ""
        first = self.failures[0]
        tried = self.detections_classified + self.detections_failed
        images = len({failure["file"] for failure in self.failures})
        reason = " ".join(str(first["message"]).split())  # one line, whatever the decoder's message holds
        return (
            f"{self.detections_failed} of {tried} detections in {images} of {self.images_to_classify} images could "
            f"not be classified (first: {first['file']}: {reason})"
        )

    @property
    def crops_per_second(self) -> float:
        """Detections classified in this run per second of classification."""
        return self.detections_classified / self.seconds if self.seconds > 0 else float("nan")

    def table(self) -> str:
        """A short human-readable summary."""
        rows = [
            ("images", self.images),
            ("detections", self.detections),
            ("detections to classify", self.detections_eligible),
            ("classified now", self.detections_classified),
            ("kept from a previous run", self.detections_resumed),
            ("failed detections", self.detections_failed),
            ("failed images", self.images_failed),
            ("images failed in the input", self.images_skipped_failed_input),
            ("crops per second", f"{self.crops_per_second:.1f}"),
            ("below their label's threshold", self.detections_below_threshold),
        ]
        if self.smoothing is not None:
            rows.append(
                (
                    f"changed by smoothing ({self.smoothing.level})",
                    self.smoothing.detections_changed_image + self.smoothing.detections_changed_sequence,
                )
            )
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


# --------------------------------------------------------------------------------------------------------------
# inputs


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


# --------------------------------------------------------------------------------------------------------------
# classification


def classifications_of(probabilities: NDArray[np.floating[Any]], min_conf: float) -> list[list[Any]]:
    """``[[id_str, conf], ...]`` for labels with probability >= ``min_conf``, descending, rounded to 4 digits."""
    p = np.asarray(probabilities, dtype=np.float64)
    order = np.argsort(-p, kind="stable")
    return [[str(int(i)), round(float(p[i]), 4)] for i in order if p[i] >= min_conf]


def _version_at_least(version: Any, minimum: str) -> str:
    try:
        return str(version) if float(version) >= float(minimum) else minimum
    except (TypeError, ValueError):
        return minimum


@dataclass
class _Target:
    """The detection a crop request belongs to."""

    image: int
    detection: int


def _eligible(detection: dict[str, Any], animal_ids: set[str], threshold: float) -> bool:
    return str(detection["category"]) in animal_ids and float(detection["conf"]) >= threshold


def _same_detections(a: Any, b: Any) -> bool:
    def key(detections: Any) -> list[tuple[str, float, tuple[float, ...]]]:
        return [(str(d["category"]), float(d["conf"]), tuple(float(v) for v in d["bbox"])) for d in detections or []]

    try:
        return key(a) == key(b)
    except (KeyError, TypeError, ValueError):
        return False


def count_eligible(results: dict[str, Any], settings: ClassifySettings) -> int:
    """Detections of ``results`` a run classifies or resumes: what ``backend=auto`` sizes the job by.

    Counted before resuming, so a resumed run picks the backend its first run picked (resume needs the same one).
    """
    animal_ids = {str(k) for k, v in results["detection_categories"].items() if v == settings.category}
    count = 0
    for image in results["images"]:
        failure = image.get("failure")
        if failure and not str(failure).startswith(FAILURE_PREFIX):
            continue
        count += sum(_eligible(d, animal_ids, settings.threshold) for d in image.get("detections") or [])
    return count


class _Job:
    """State of one classify run: the output dict being filled, the CSV rows, and the pending requests."""

    def __init__(
        self,
        loaded: LoadedClassifier,
        results: dict[str, Any],
        images_dir: Path,
        settings: ClassifySettings,
        previous: dict[str, Any] | None,
        previous_rows: pd.DataFrame | None,
        want_csv: bool,
        backend: str,
    ) -> None:
        self.loaded = loaded
        self.want_csv = want_csv
        self.settings = settings
        self.output = copy.deepcopy(results)
        self.summary = ClassifySummary(images=len(self.output["images"]))
        self.failed_images: set[int] = set()
        self.rows: dict[tuple[int, int], dict[str, Any]] = {}
        categories = self.output["detection_categories"]
        animal_ids = {str(k) for k, v in categories.items() if v == settings.category}
        if not animal_ids:
            log.warning(
                "detection_categories %s has no %r category: nothing to classify", categories, settings.category
            )
        self.rule = decision_rule(loaded, settings)
        self.categories = decision_categories(loaded.labels, loaded.taxonomy)
        labels_only = loaded.labels.to_dict()
        self.output["classification_categories"] = self.categories.names if self.rule else labels_only
        if loaded.taxonomy is not None:
            self.output["classification_category_descriptions"] = {
                k: v for k, v in self.categories.descriptions.items() if k in self.output["classification_categories"]
            }
        info = self.output.setdefault("info", {})
        info["classifier_metadata"] = dict(info.get("classifier_metadata") or {}) | run_metadata(
            loaded, settings, backend
        )
        previous_images = {}
        if previous is not None:
            previous_images = {img.get("file"): img for img in previous.get("images", []) if isinstance(img, dict)}
        previous_csv = _index_rows(previous_rows)

        items: list[tuple[str, tuple[float, float, float, float] | None, bool]] = []
        self.targets: list[_Target] = []
        for i, image in enumerate(self.output["images"]):
            detections = image.get("detections") or []
            self.summary.detections += len(detections)
            # Classifications of another classifier would not match our classification_categories.
            for detection in detections:
                detection.pop("classifications", None)
                detection.pop(BEFORE_SMOOTHING, None)
            failure = image.get("failure")
            if failure and not str(failure).startswith(FAILURE_PREFIX):
                self.summary.images_skipped_failed_input += 1
                continue
            image.pop("failure", None)
            eligible = [j for j, d in enumerate(detections) if _eligible(d, animal_ids, settings.threshold)]
            self.summary.detections_eligible += len(eligible)
            if not eligible:
                continue
            if self._resume(i, image, eligible, previous_images.get(image["file"]), previous_csv):
                continue
            self.summary.images_to_classify += 1
            try:
                path = str(safe_join(images_dir, image["file"]))
            except UnsafePathError as error:
                self._image_failed(i, f"{IMAGE_ERROR_PREFIX}{error}", eligible)
                continue
            for j in eligible:
                x, y, w, h = (float(v) for v in detections[j]["bbox"])
                items.append((path, (x, y, w, h), True))
                self.targets.append(_Target(i, j))
        self.requests = CropRequests.build(items)

    def _resume(
        self,
        i: int,
        image: dict[str, Any],
        eligible: list[int],
        before: dict[str, Any] | None,
        previous_csv: dict[tuple[str, int], dict[str, Any]],
    ) -> bool:
        """Copy a finished image's classifications (and CSV rows) from the previous output; True when done."""
        if not self.settings.resume or before is None or before.get("failure"):
            return False
        if not _same_detections(image.get("detections"), before.get("detections")):
            return False
        old = before["detections"]
        if not all(isinstance(old[j].get("classifications"), list) for j in eligible):
            return False
        rows = [previous_csv.get((image["file"], j)) for j in eligible]
        if self.want_csv and any(row is None for row in rows):
            return False  # the CSV needs the top-k scores, which the JSON (filtered at min_conf) does not keep
        for j, row in zip(eligible, rows, strict=True):
            # A smoothed output resumes from what the model said; smoothing runs again over the whole output.
            image["detections"][j]["classifications"] = old[j].get(BEFORE_SMOOTHING, old[j]["classifications"])
            if row is not None:
                self.rows[(i, j)] = row
        self.summary.detections_resumed += len(eligible)
        return True

    def _image_failed(self, i: int, message: str, detections: list[int]) -> None:
        image = self.output["images"][i]
        if "failure" not in image:
            image["failure"] = FAILURE_PREFIX + message
            self.summary.images_failed += 1
            # MegaDetector's format: an image that failed has detections null (they are written so, see write()).
            self.failed_images.add(i)
        for j in detections:
            self._row(i, j, failure=message)
            self.summary.detections_failed += 1
            self.summary.failures.append({"file": image["file"], "detection": j, "message": message})

    def _row(self, i: int, j: int, failure: str = "", probabilities: NDArray[np.float32] | None = None) -> None:
        image = self.output["images"][i]
        detection = image["detections"][j]
        row: dict[str, Any] = {
            "file": image["file"],
            "detection": j,
            "category": str(detection["category"]),
            "conf": float(detection["conf"]),
            "x": float(detection["bbox"][0]),
            "y": float(detection["bbox"][1]),
            "w": float(detection["bbox"][2]),
            "h": float(detection["bbox"][3]),
            "failure": failure,
        }
        k = min(self.settings.top_k, len(self.loaded.class_names))
        if probabilities is not None:
            indices, scores = top_k(probabilities[None, :], k)
            for rank in range(k):
                row[f"label_{rank + 1}"] = self.loaded.class_names[int(indices[0, rank])]
                row[f"score_{rank + 1}"] = round(float(scores[0, rank]), 6)
        else:
            for rank in range(k):
                row[f"label_{rank + 1}"] = ""
                row[f"score_{rank + 1}"] = float("nan")
        self.rows[(i, j)] = row

    def apply(self, request_index: int, probabilities: NDArray[np.float32], error: str) -> None:
        """Store the result of one crop request."""
        target = self.targets[request_index]
        if error:
            if error.startswith(IMAGE_ERROR_PREFIX):
                self._image_failed(target.image, error, [target.detection])
            else:
                file = self.output["images"][target.image]["file"]
                self._row(target.image, target.detection, failure=error)
                self.summary.detections_failed += 1
                self.summary.failures.append({"file": file, "detection": target.detection, "message": error})
            return
        detection = self.output["images"][target.image]["detections"][target.detection]
        classifications = classifications_of(probabilities, self.settings.min_conf)
        decision = self.rule.decide(probabilities, self.categories) if self.rule is not None else None
        if decision is not None:
            # The reported category first, then what the model said (module docstring of deploy.decisions).
            classifications = [[decision[0], round(decision[1], 4)], *classifications]
            self.summary.detections_below_threshold += 1
        detection["classifications"] = classifications
        self._row(target.image, target.detection, probabilities=probabilities)
        self.summary.detections_classified += 1

    def finish_info(self, classifier_name: str) -> None:
        """Fill ``info`` for a complete output."""
        info = self.output.setdefault("info", {})
        info["format_version"] = _version_at_least(info.get("format_version"), FORMAT_VERSION)
        info["classifier"] = classifier_name
        info["classification_completion_time"] = datetime.now().strftime("%Y-%m-%d %H:%M:%S")

    def csv_frame(self) -> pd.DataFrame:
        """One row per classified (or failed) detection, in image and detection order.

        ``decision`` and ``decision_score`` are what the JSON reports first for the detection (the label, or below
        its threshold ``unknown`` or a taxon, after smoothing), read from the JSON itself so the two never
        disagree; the ``label_<k>`` columns are what the model said.
        """
        k = min(self.settings.top_k, len(self.loaded.class_names))
        columns = ["file", "detection", "category", "conf", "x", "y", "w", "h", "failure", *DECISION_COLUMNS]
        for rank in range(1, k + 1):
            columns += [f"label_{rank}", f"score_{rank}"]
        names: Mapping[str, str] = self.output.get("classification_categories") or {}
        rows = []
        for i, j in sorted(self.rows):
            detections = self.output["images"][i].get("detections") or []
            reported = detections[j].get("classifications") if j < len(detections) else None
            first = reported[0] if reported and i not in self.failed_images else None
            decision = {"decision": "", "decision_score": float("nan")}
            if first is not None:
                decision = {"decision": names.get(str(first[0]), str(first[0])), "decision_score": float(first[1])}
            rows.append({**self.rows[(i, j)], **decision})
        return pd.DataFrame(rows, columns=columns)

    def write(self, output_file: Path, output_csv: Path | None, partial_info: bool) -> None:
        """Write the output JSON (and CSV) atomically; an image that failed has ``detections: null``."""
        if partial_info:
            self.output.setdefault("info", {}).pop("classification_completion_time", None)
        images = [
            {**image, "detections": None} if i in self.failed_images else image
            for i, image in enumerate(self.output["images"])
        ]
        atomic_write_json(output_file, {**self.output, "images": images})
        if output_csv is not None:
            with atomic_write(output_csv, "w") as handle:
                self.csv_frame().to_csv(handle, index=False, lineterminator="\n")


def onnx_cache(settings: ClassifySettings) -> OnnxCache | None:
    """The ONNX model cache of ``classify.cache_dir`` (None when it is off)."""
    folder = resolve_cache_dir(settings.cache_dir)
    return None if folder is None else OnnxCache(folder)


def resolve_backend(loaded: LoadedClassifier, settings: ClassifySettings, crops: int) -> str:
    """The backend a job of ``crops`` crops runs on: ``torch`` or ``onnxruntime``.

    ``auto``: PyTorch on CUDA or without ONNX Runtime; on the CPU, ONNX Runtime when the exported model is in the
    cache (it is then faster from the first crop), or when the job has at least ``classify.auto_export_min_crops``
    crops (the export, paid once, is won back), else PyTorch, so ``auto`` never makes a job slower than
    ``backend=torch``. ``precision=int8`` always runs on ONNX Runtime.

    Raises:
        ConfigError: ``onnxruntime`` or int8 asked for on a CUDA device, or when ONNX Runtime is not installed.
    """
    on_cpu = loaded.device.type == "cpu"
    wanted = settings.backend
    if settings.precision == "int8":
        wanted = "onnxruntime"
    if wanted == "auto":
        if not (on_cpu and onnxruntime_available()):
            return "torch"
        from animl_lightning.deploy.export import onnx_identity

        cache = onnx_cache(settings)
        if cache is not None and cache.has(onnx_identity(loaded)):
            log.info("backend=auto: ONNX Runtime (the exported model is in the cache %s)", cache.folder)
            return "onnxruntime"
        if crops >= settings.auto_export_min_crops:
            log.info(
                "backend=auto: ONNX Runtime (%d crops >= classify.auto_export_min_crops=%d pay for the export)",
                crops,
                settings.auto_export_min_crops,
            )
            return "onnxruntime"
        log.info(
            "backend=auto: PyTorch (no exported model in the cache and %d crops < classify.auto_export_min_crops=%d; "
            "backend=onnxruntime exports once and caches it)",
            crops,
            settings.auto_export_min_crops,
        )
        return "torch"
    what = "precision=int8" if settings.precision == "int8" else "backend=onnxruntime"
    if wanted == "onnxruntime" and not on_cpu:
        other = "" if settings.precision == "int8" else " or backend=torch"
        raise ConfigError(f"{what} runs on the CPU; use device=cpu{other} (not {loaded.device})")
    if wanted == "onnxruntime" and not onnxruntime_available():
        raise ConfigError(f"{what}: ONNX Runtime is not installed (pip install -e '.[deploy]')")
    return wanted


def onnx_predictor(loaded: LoadedClassifier, settings: ClassifySettings) -> OnnxClassifier:
    """An ONNX Runtime session of ``loaded`` at ``settings.precision``, from the ONNX model cache when it is there.

    Raises:
        QuantizationError: int8 asked for and it cannot be made, or is below ``int8.min_agreement``.
    """
    from animl_lightning.deploy.export import cached_onnx, onnx_identity

    cache = onnx_cache(settings)
    if settings.precision == "int8":
        from animl_lightning.deploy.quantize import build_int8

        def fp32_model() -> bytes:
            return cached_onnx(loaded, cache, lambda data: data)[1].data

        session, _, _ = build_int8(loaded, settings.int8, fp32_model, onnx_identity(loaded), cache)
        return session
    started = time.perf_counter()
    session, _ = cached_onnx(loaded, cache, lambda data: OnnxClassifier(data, INPUT_NAME))
    if cache is None:
        log.info("exported the model to ONNX for ONNX Runtime in %.1f s (no cache)", time.perf_counter() - started)
    return session


def make_predictor(loaded: LoadedClassifier, backend: str, settings: ClassifySettings | None = None) -> Predictor:
    """Model inputs -> calibrated probabilities, on ``backend`` (``torch`` or ``onnxruntime``, resolved).

    PyTorch runs the model in channels-last memory format (several times faster for convolutions on the CPU);
    ONNX Runtime runs the exported model (:func:`onnx_predictor`; without ``settings``: float32, exported in memory,
    no cache).
    """
    if backend == "onnxruntime":
        return onnx_predictor(loaded, settings or ClassifySettings(cache_dir=None))
    network = loaded.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def predict(images: NDArray[np.float32]) -> NDArray[np.float32]:
        batch = torch.from_numpy(images).to(loaded.device, non_blocking=True)
        batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            logits = network(batch)
        return torch.softmax(logits.float() / loaded.temperature, dim=-1).cpu().numpy()

    return predict


def decision_rule(loaded: LoadedClassifier, settings: ClassifySettings) -> ThresholdRule | None:
    """The checkpoint's thresholds as a rule, when it has them and ``classify.thresholds`` is on."""
    if not settings.thresholds or not loaded.thresholds or not loaded.thresholds.get("per_label"):
        return None
    return ThresholdRule.from_record(loaded.thresholds, loaded.class_names, loaded.taxonomy)


def typical_threshold(loaded: LoadedClassifier) -> float | None:
    """Timelapse's ``typical_classification_threshold``: the median of the per-label thresholds chosen on val.

    None when the checkpoint has no thresholds (Timelapse then uses its default, 0.5).
    """
    per_label = (loaded.thresholds or {}).get("per_label") or {}
    values = [float(v) for v in per_label.values() if v is not None]
    return round(float(np.median(values)), 4) if values else None


def run_metadata(loaded: LoadedClassifier, settings: ClassifySettings, backend: str) -> dict[str, Any]:
    """What decides the classifications of a run (``info.classifier_metadata``); a rerun resumes only if equal."""
    typical = typical_threshold(loaded)
    return ({} if typical is None else {"typical_classification_threshold": typical}) | {
        "thresholds_applied": decision_rule(loaded, settings) is not None,
        "model_name": loaded.model_name,
        "backend": backend,
        "precision": settings.precision,
        "checkpoint": loaded.checkpoint_path.name,
        "checkpoint_sha256": loaded.checkpoint_sha256,
        "temperature": loaded.temperature,
        "detection_threshold": settings.threshold,
        "detection_category": settings.category,
        "min_conf": settings.min_conf,
        # Loose keys, as in every output written so far: a rerun compares them to resume.
        "crop_strategy": loaded.crop_rule.strategy,
        "crop_max_size": loaded.crop_rule.max_size,
        "crop_lossless": loaded.crop_rule.lossless,
    }


def _index_rows(rows: pd.DataFrame | None) -> dict[tuple[str, int], dict[str, Any]]:
    if rows is None or rows.empty or not {"file", "detection"} <= set(rows.columns):
        return {}
    records = rows.to_dict(orient="records")
    return {(str(r["file"]), int(r["detection"])): {str(k): v for k, v in r.items()} for r in records}


def _load_previous(
    output_file: Path, output_csv: Path | None, loaded: LoadedClassifier, settings: ClassifySettings, backend: str
) -> tuple[dict[str, Any] | None, pd.DataFrame | None]:
    if not output_file.is_file():
        return None, None
    try:
        previous = read_json_file(output_file, ClassifyInputError)
    except ClassifyInputError as error:
        raise ClassifyInputError(
            f"output_file: {error}; it exists but cannot be resumed: delete it or set resume=false"
        ) from error
    expected = loaded.labels.to_dict()
    written = previous.get("classification_categories") if isinstance(previous, dict) else None
    labels_written = {k: v for k, v in written.items() if k in expected} if isinstance(written, dict) else None
    if labels_written != expected:
        raise ClassifyInputError(
            f"output_file: {output_file} exists and was not written by this classifier (its "
            "classification_categories differ); choose another output_file, delete it, or set resume=false"
        )
    # Outputs written before int8 existed were float32.
    metadata = {"precision": "fp32"} | ((previous.get("info") or {}).get("classifier_metadata") or {})
    current = run_metadata(loaded, settings, backend)
    changed = {k: (metadata.get(k), v) for k, v in current.items() if metadata.get(k) != v}
    if changed:
        log.warning("%s was written with other settings %s; classifying every image again", output_file, changed)
        return None, None
    rows = None
    if output_csv is not None and output_csv.is_file():
        rows = pd.read_csv(output_csv, dtype={"file": str, "failure": str}, keep_default_na=False, na_values=[""])
    return previous, rows


def classify_detections(
    loaded: LoadedClassifier,
    results: dict[str, Any],
    images_dir: str | Path,
    output_file: str | Path,
    settings: ClassifySettings | None = None,
    output_csv: str | Path | None = None,
    classifier_name: str | None = None,
) -> ClassifySummary:
    """Classify the detections of a MegaDetector results dict and write the output file (and CSV).

    Args:
        loaded: the classifier, from :func:`animl_lightning.deploy.inference.load_classifier`.
        results: a validated MegaDetector results dict (:func:`read_detections_file`, :func:`detections_from_cct`
            or :func:`detections_from_crops_folder`); it is not modified.
        images_dir: folder the images' ``file`` paths are relative to.
        output_file: MegaDetector JSON to write; an existing one from the same classifier is resumed.
        settings: thresholds, batch size, workers, top-k, save interval, resume.
        output_csv: also write one CSV row per detection with the top-k labels and scores.
        classifier_name: ``info.classifier``; default ``<model_name>/<checkpoint file name>``.

    Returns:
        What was done, including every failure.

    Raises:
        ClassifyInputError: every detection this run tried failed (nothing is written then, so an earlier output
            stays as it was).
    """
    settings = settings or ClassifySettings()
    output_path = Path(output_file)
    csv_path = None if output_csv is None else Path(output_csv)
    backend = resolve_backend(loaded, settings, count_eligible(results, settings))
    previous, previous_rows = (None, None)
    if settings.resume:
        previous, previous_rows = _load_previous(output_path, csv_path, loaded, settings, backend)
    job = _Job(loaded, results, Path(images_dir), settings, previous, previous_rows, csv_path is not None, backend)
    name = classifier_name or f"{loaded.model_name}/{loaded.checkpoint_path.name}"
    log.info(
        "%d images, %d detections to classify (%d kept from a previous run) with %s on %s (%s)",
        job.summary.images,
        len(job.requests),
        job.summary.detections_resumed,
        name,
        loaded.device,
        backend,
    )
    predict = make_predictor(loaded, backend, settings) if len(job.requests) else None
    started = time.perf_counter()
    last_save = time.monotonic()
    for batch in _batches(loaded, predict, job.requests, settings):
        for row, request in enumerate(batch.indices):
            job.apply(int(request), batch.probabilities[row], batch.errors[row])
        # Until something is classified a save could only put failures over a previous, good output.
        has_results = job.summary.detections_classified + job.summary.detections_resumed > 0
        if has_results and time.monotonic() - last_save >= settings.save_interval_s:
            job.write(output_path, csv_path, partial_info=True)
            last_save = time.monotonic()
    job.summary.seconds = time.perf_counter() - started
    if job.summary.nothing_classified:
        note = job.summary.failure_note()
        raise ClassifyInputError(f"every detection failed, so {output_path} was not written: {note}")
    job.summary.smoothing = _smooth(job.output, Path(images_dir), settings)
    job.finish_info(name)
    job.write(output_path, csv_path, partial_info=False)
    if job.summary.failures:
        log.warning("%s; see 'failure' in %s", job.summary.failure_note(), output_path)
    return job.summary


def _smooth(output: dict[str, Any], images_dir: Path, settings: ClassifySettings) -> SmoothingSummary | None:
    if settings.smoothing == "none":
        return None
    sequences: dict[str, ImageSequence] | None = None
    if settings.smoothing == "sequence":
        if settings.sequence_file:
            cct = read_json_file(settings.sequence_file, ClassifyInputError)
            if not isinstance(cct, dict) or not isinstance(cct.get("images"), list):
                raise ClassifyInputError(f"classify.sequence_file: {settings.sequence_file} has no 'images' list")
            sequences = sequences_from_cct(cct, settings.max_gap_s)
        else:
            sequences = sequences_from_times(output, images_dir, settings.max_gap_s)
    summary = smooth_results(output, settings.smoothing, settings.smoothing_options, sequences)
    log.info(
        "smoothing (%s): %d detections changed within images, %d across sequences",
        settings.smoothing,
        summary.detections_changed_image,
        summary.detections_changed_sequence,
    )
    return summary


def _batches(
    loaded: LoadedClassifier, predict: Predictor | None, requests: CropRequests, settings: ClassifySettings
) -> Iterator[Any]:
    if predict is None:
        return
    yield from classify_requests(
        predict,
        requests,
        loaded.transform,
        loaded.crop_rule,
        batch_size=settings.batch_size,
        num_workers=settings.num_workers,
    )


def refuse_writing_over_inputs(outputs: dict[str, str | Path | None], inputs: dict[str, str | Path | None]) -> None:
    """Refuse an output that is one of the inputs (also through a symlink or a hard link), or another output.

    Whatever ``resume`` says: the detections file is often the only copy of days of MegaDetector time.

    Raises:
        ClassifyInputError: naming both settings.
    """
    given = [(key, path) for key, path in outputs.items() if path]
    for position, (key, path) in enumerate(given):
        for source_key, source in inputs.items():
            if source and same_file(path, source):
                example = f"{Path(path).stem}_classified{'.csv' if key == 'output_csv' else '.json'}"
                raise ClassifyInputError(
                    f"{key}: {path} is the {source_key}; classify never writes over its input: choose another "
                    f"{key} (e.g. {key}={example})"
                )
        for other_key, other in given[position + 1 :]:
            if same_file(path, other):
                raise ClassifyInputError(f"{other_key}: {other} is the {key} too; give it a name of its own")


def run_classify(
    checkpoint: str | Path,
    output_file: str | Path,
    *,
    detections_file: str | Path | None = None,
    cct_file: str | Path | None = None,
    crops_dir: str | Path | None = None,
    images_dir: str | Path | None = None,
    device: str = "auto",
    settings: ClassifySettings | None = None,
    output_csv: str | Path | None = None,
    classifier_name: str | None = None,
) -> ClassifySummary:
    """``python -m animl_lightning.classify``: read the one input given, load the checkpoint, classify, write.

    The outputs are checked for writability before any work, so a bad ``output_file`` costs no classification.

    Raises:
        ClassifyInputError: no input or several, a missing ``images_dir``, an output that cannot be written or is
            one of the input files, every detection failed.
        CheckpointError: the checkpoint is unusable.
    """
    sources = {
        key: value
        for key, value in (("detections_file", detections_file), ("cct_file", cct_file), ("crops_dir", crops_dir))
        if value
    }
    if len(sources) != 1:
        raise ClassifyInputError(
            f"set exactly one of detections_file, cct_file, crops_dir; got {sorted(sources) or 'none'}"
        )
    inputs = {
        **sources,
        "checkpoint": checkpoint,
        "classify.sequence_file": settings.sequence_file if settings is not None else None,
    }
    refuse_writing_over_inputs({"output_file": output_file, "output_csv": output_csv}, inputs)
    check_writable(output_file, "output_file")
    if settings is not None and settings.sequence_file and not Path(settings.sequence_file).is_file():
        raise ClassifyInputError(f"classify.sequence_file: {settings.sequence_file} does not exist")
    if output_csv:
        check_writable(output_csv, "output_csv")
    if crops_dir:
        folder = Path(crops_dir)
        results = detections_from_crops_folder(folder)
    else:
        if not images_dir:
            raise ClassifyInputError("images_dir: must be set (e.g. images_dir=PATH on the command line)")
        folder = Path(images_dir)
        if not folder.is_dir():
            raise ClassifyInputError(f"images_dir: {folder} is not a folder")
        results = detections_from_cct(cct_file, folder) if cct_file else read_detections_file(str(detections_file))
    settings = settings or ClassifySettings()
    if cct_file and settings.smoothing == "sequence" and not settings.sequence_file:
        settings = dataclasses.replace(settings, sequence_file=str(cct_file))  # MegaDetector's sequence information
    loaded = load_classifier(checkpoint, device=device)
    return classify_detections(
        loaded, results, folder, output_file, settings, output_csv=output_csv, classifier_name=classifier_name
    )
