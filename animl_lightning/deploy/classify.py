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
- per image that could not be read, ``failure`` (prefixed ``classification failed: ``) and ``detections: null``, as
  MegaDetector's format and validator require;
- with ``classify.smoothing=image|sequence``, MegaDetector's smoothing (:mod:`animl_lightning.deploy.smoothing`): a
  detection whose class changed keeps its original list under ``classifications_before_smoothing``;
- ``info.format_version`` (at least "1.6"), ``info.classifier``, ``info.classification_completion_time``
  (``YYYY-mm-dd HH:MM:SS``, local time) and ``info.classifier_metadata``.

Boxes, detection confidences and every other field are copied untouched. The output is written atomically, also
while the job runs (every ``save_interval_s`` seconds, without ``classification_completion_time``). A rerun with
the same output file keeps the classifications of images whose detections are unchanged and classifies the rest;
images that failed so are tried again. The output is never one of the input files, and a
run in which every detection it tried failed writes nothing (:class:`ClassifyInputError`), so a wrong ``images_dir``
cannot replace a good output with failures.

The inputs are read by :mod:`animl_lightning.deploy.classify_inputs`, the output is kept by
:mod:`animl_lightning.deploy.classify_job`, and the runtime is chosen from :mod:`animl_lightning.deploy.runtimes`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from animl_lightning.core.errors import require
from animl_lightning.core.files import check_writable, read_json_file, same_file
from animl_lightning.core.smoothing import SMOOTHING_LEVELS, SmoothingOptions
from animl_lightning.deploy.classify_inputs import (
    ClassifyInputError,
    detections_from_cct,
    detections_from_crops_folder,
    read_detections_file,
)
from animl_lightning.deploy.classify_job import ClassifyJob, ClassifySummary, count_eligible, load_previous
from animl_lightning.deploy.inference import (
    CropRequests,
    LoadedClassifier,
    Predictor,
    classify_requests,
    load_classifier,
)
from animl_lightning.deploy.int8_settings import Int8Settings
from animl_lightning.deploy.onnx_cache import AUTO
from animl_lightning.deploy.runtimes import AUTO_EXPORT_MIN_CROPS, check_runtime, make_predictor, resolve_backend
from animl_lightning.deploy.smoothing import (
    ImageSequence,
    SmoothingSummary,
    sequences_from_cct,
    sequences_from_times,
    smooth_results,
)

log = logging.getLogger(__name__)


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
        check_runtime(self.backend, self.precision)
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
        results: a validated MegaDetector results dict (:mod:`animl_lightning.deploy.classify_inputs`); it is not
            modified.
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
        previous, previous_rows = load_previous(output_path, csv_path, loaded, settings, backend)
    job = ClassifyJob(
        loaded, results, Path(images_dir), settings, previous, previous_rows, csv_path is not None, backend
    )
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
