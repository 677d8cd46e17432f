"""The bookkeeping of one classify run: the output being filled, its CSV rows, what a rerun keeps, the summary.

A :class:`ClassifyJob` copies the input results, drops classifications another classifier wrote, keeps those of a
previous run of this classifier (:func:`load_previous`) for images whose detections are unchanged, and lists a crop
request per detection left to classify; :meth:`ClassifyJob.apply` stores each answer, and :meth:`ClassifyJob.write`
writes the JSON (and CSV) atomically.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from animl_lightning.core.files import UnsafePathError, atomic_write, atomic_write_json, read_json_file, safe_join
from animl_lightning.deploy.classify_inputs import FORMAT_VERSION, ClassifyInputError
from animl_lightning.deploy.decisions import ThresholdRule, decision_categories
from animl_lightning.deploy.inference import IMAGE_ERROR_PREFIX, CropRequests, LoadedClassifier, top_k
from animl_lightning.deploy.smoothing import BEFORE_SMOOTHING, SmoothingSummary

log = logging.getLogger(__name__)

FAILURE_PREFIX = "classification failed: "
# output_csv: the category the JSON reports first for a detection, and its probability.
DECISION_COLUMNS = ("decision", "decision_score")


class JobSettings(Protocol):
    """The settings a job reads (classify's ``ClassifySettings`` has them; it runs the job, so it is not imported)."""

    @property
    def threshold(self) -> float: ...

    @property
    def category(self) -> str: ...

    @property
    def min_conf(self) -> float: ...

    @property
    def top_k(self) -> int: ...

    @property
    def resume(self) -> bool: ...

    @property
    def thresholds(self) -> bool: ...

    @property
    def precision(self) -> str: ...


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
class CropTarget:
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


def count_eligible(results: dict[str, Any], settings: JobSettings) -> int:
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


class ClassifyJob:
    """State of one classify run: the output dict being filled, the CSV rows, and the pending requests."""

    def __init__(
        self,
        loaded: LoadedClassifier,
        results: dict[str, Any],
        images_dir: Path,
        settings: JobSettings,
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
        self.targets: list[CropTarget] = []
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
                self.targets.append(CropTarget(i, j))
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


def decision_rule(loaded: LoadedClassifier, settings: JobSettings) -> ThresholdRule | None:
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


def run_metadata(loaded: LoadedClassifier, settings: JobSettings, backend: str) -> dict[str, Any]:
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
    }


def _index_rows(rows: pd.DataFrame | None) -> dict[tuple[str, int], dict[str, Any]]:
    if rows is None or rows.empty or not {"file", "detection"} <= set(rows.columns):
        return {}
    records = rows.to_dict(orient="records")
    return {(str(r["file"]), int(r["detection"])): {str(k): v for k, v in r.items()} for r in records}


def load_previous(
    output_file: Path, output_csv: Path | None, loaded: LoadedClassifier, settings: JobSettings, backend: str
) -> tuple[dict[str, Any] | None, pd.DataFrame | None]:
    """The output (and CSV) a previous run of this classifier wrote, to resume; ``(None, None)`` when there is none
    or it was written with other settings (:func:`run_metadata`).

    Raises:
        ClassifyInputError: ``output_file`` exists but cannot be read, or another classifier wrote it.
    """
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
