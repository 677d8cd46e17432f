"""The prepare pipeline: run the stages in order, skip the ones whose outputs are current, report.

Stages: ingest -> images -> detect -> boxes -> crops -> labels -> dataset -> splits; with ``folders.root`` a
``folders`` stage first derives the CCT file that ingest reads (:mod:`animl_lightning.prepare.folders`), and the
detect stage runs only with ``detector.model_file`` (:mod:`animl_lightning.prepare.detect`).

Resumability has two layers. Inside a stage, per-file work (downloads, crops) skips what is already on disk and
complete, because every file is written atomically. Across stages, ``prepare_info.json`` records a fingerprint of
each finished stage's inputs and settings; a re-run whose fingerprint matches skips the stage's work. The info file
is rewritten (atomically) after every finished stage, so a run killed at any point resumes from the last one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from animl_lightning import __version__
from animl_lightning.core.cct import load_cct
from animl_lightning.core.contract import (
    CROPS_DIRNAME,
    CSV_FILENAME,
    INFO_FILENAME,
    SPLIT_REPORT_FILENAME,
    SPLITS_FILENAME,
    DatasetError,
    check_crop_files,
    read_prepare_info,
    read_splits,
    write_prepare_info,
)
from animl_lightning.core.errors import AnimlError
from animl_lightning.core.files import atomic_write_text, remove_stale_temporaries, run_lock
from animl_lightning.core.issues import REPORT_FILENAME, PrepareReport
from animl_lightning.core.megadetector import DetectionResults, load_detections
from animl_lightning.core.taxonomy import TAXONOMY_FILENAME, TaxonomyError, read_taxonomy
from animl_lightning.prepare.boxes import collect_boxes
from animl_lightning.prepare.config import PrepareSettings
from animl_lightning.prepare.crop_stage import FALLBACK_PREFIX, LOSSLESS, make_crops
from animl_lightning.prepare.dataset import build_dataset_frame, write_dataset_files
from animl_lightning.prepare.demo import generate_demo_project
from animl_lightning.prepare.detect import RESULTS_FILENAME, run_detect_stage
from animl_lightning.prepare.folders import (
    FOLDERS_CCT_FILENAME,
    build_folder_source,
    folder_dataset_name,
    split_without_locations,
)
from animl_lightning.prepare.images import ensure_images
from animl_lightning.prepare.labels import apply_labels
from animl_lightning.prepare.splits import (
    ALL_LABELS,
    SplitDiagnosis,
    format_shares,
    make_splits,
    review_splits,
    write_split_files,
)

log = logging.getLogger(__name__)

STAGES = ("ingest", "images", "detect", "boxes", "crops", "labels", "dataset", "splits")
STAGE_CROPS = "crops"
# prepare_info.json: the crop settings the crops on disk were cut with (written when a crops stage finishes).
CROPS_MADE_WITH_KEY = "crops_made_with"
# prepare_info.json: how the last crops stage made its crops with crops.lossless (cut losslessly, or fallen back to
# decode and encode, by reason: the crop stage's report counts).
CROP_PATHS_KEY = "crop_paths"
STAGE_FOLDERS = "folders"


class PrepareError(AnimlError, ValueError):
    """A stage could not run on its input; the message names the stage, file, record and field."""


@dataclass
class StageResult:
    """How one stage went, for the summary table."""

    name: str
    status: str  # "ran" or "skipped (current)"
    seconds: float
    detail: str = ""


@dataclass
class PrepareSummary:
    """What ``run_prepare`` did and where its outputs are."""

    output_dir: Path
    dataset: str
    stages: list[StageResult] = field(default_factory=list)
    split_table: pd.DataFrame | None = None
    split_diagnosis: SplitDiagnosis | None = None
    report: PrepareReport = field(default_factory=PrepareReport)
    warnings: list[str] = field(default_factory=list)


def run_prepare(settings: PrepareSettings) -> PrepareSummary:
    """Run every stage for ``settings``; see the module docstring for resume semantics.

    Holds the output folder's lock for the whole run: a second ``prepare.py`` on the same folder is refused.
    """
    with run_lock(settings.output_dir, "prepare.py") as output_dir, run_log(output_dir):
        return _run_prepare(settings, output_dir)


@contextmanager
def run_log(output_dir: Path) -> Iterator[Path]:
    """Copy this run's log lines (INFO and up) to ``<output_dir>/logs/prepare_<date>_<time>.log``."""
    path = output_dir / "logs" / f"prepare_{time.strftime('%Y-%m-%d_%H-%M-%S')}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()


def _run_prepare(settings: PrepareSettings, output_dir: Path) -> PrepareSummary:
    remove_stale_temporaries(output_dir)
    taxonomy_file = settings.labels.taxonomy_file
    if taxonomy_file and not Path(taxonomy_file).is_file():
        # Checked before the long stages; its content is checked against the labels once they are known.
        raise TaxonomyError(f"labels.taxonomy_file: {taxonomy_file} does not exist")

    report = PrepareReport()
    folders_root = settings.folders.root
    coco_file, images_dir = _resolve_inputs(settings, output_dir)
    dataset = settings.dataset or (folder_dataset_name(folders_root) if folders_root else Path(coco_file).stem)
    summary = PrepareSummary(output_dir=output_dir, dataset=dataset, report=report)
    split = settings.split
    if folders_root is not None and settings.folders.location_level is None:
        split, warnings = split_without_locations(settings.split)
        for warning in warnings:
            log.warning("%s", warning)
            report.add(
                STAGE_FOLDERS, "split_without_locations", warning, field="folders.location_level", action="changed"
            )
        summary.warnings.extend(warnings)
    info = _load_info(output_dir) if not settings.force else {}
    previous = info.get("stages", {}) if info.get("version") == __version__ else {}
    crop_settings = {
        "strategy": settings.crops.strategy,
        "max_size": settings.crops.max_size,
        "quality": settings.crops.quality,
        "lossless": settings.crops.lossless,
    }
    # What the crops on disk were cut with: recorded when a crops stage finishes (an interrupted redo keeps the old
    # record, so it is redone whole again); an older prepare_info.json has only the settings of its last run.
    crops_made_with = info.get(CROPS_MADE_WITH_KEY) or info.get("crops")
    info = {
        "version": __version__,
        "dataset": dataset,
        "coco_file": str(coco_file),
        "images_dir": str(images_dir),
        "detections_file": settings.detections_file,
        "crops": crop_settings,
        CROPS_MADE_WITH_KEY: crops_made_with,
        CROP_PATHS_KEY: info.get(CROP_PATHS_KEY),
        "settings": dataclasses.asdict(settings),
        "stages": dict(previous),
    }
    report.info.update({"dataset": dataset, "coco_file": str(coco_file), "images_dir": str(images_dir)})
    if folders_root is not None:
        report.info["folders_root"] = folders_root

    @contextmanager
    def stage(name: str) -> Iterator[StageResult]:
        result = StageResult(name=name, status="ran", seconds=0.0)
        start = time.perf_counter()
        try:
            yield result
        except PrepareError:
            _write_report_after_failure(report, output_dir)
            raise
        except AnimlError as err:
            _write_report_after_failure(report, output_dir)
            raise PrepareError(f"{name} stage: {err}") from err
        except BaseException:
            # Whatever stopped the stage (a full disk, Ctrl-C, a bug), the report of what was done so far is kept.
            _write_report_after_failure(report, output_dir)
            raise
        result.seconds = time.perf_counter() - start
        summary.stages.append(result)
        log.info("stage %s: %s in %.1fs %s", name, result.status, result.seconds, result.detail)

    def finish(name: str, fingerprint: str) -> None:
        info["stages"][name] = fingerprint
        write_prepare_info(info, output_dir / INFO_FILENAME)

    if folders_root is not None:
        with stage(STAGE_FOLDERS) as result:
            source = build_folder_source(
                settings.folders,
                output_dir,
                report,
                # With MegaDetector results (given, or run by the detect stage) the boxes come from them, as for a
                # CCT export without boxes.
                whole_image_boxes=settings.detections_file is None and settings.detector.model_file is None,
                reuse_scan=not settings.force,
            )
            cct_digest = _file_digest(coco_file)
            if source.headers_read == 0 and previous.get(STAGE_FOLDERS) == cct_digest:
                result.status = "skipped (current)"
            result.detail = f"{len(source.images)} images, {source.headers_read} headers read"
            finish(STAGE_FOLDERS, cct_digest)

    coco_digest = _file_digest(coco_file)
    with stage("ingest") as result:
        project = load_cct(coco_file, report, key_field=settings.s3.key_field)
        result.detail = f"{len(project.images)} images, {len(project.annotations)} annotations"

    with stage("images") as result:
        s3 = settings.s3 if settings.s3.bucket else None
        images_fp = _fingerprint(coco_digest, str(images_dir), dataclasses.asdict(settings.s3))
        if s3 is not None:
            # A download killed mid-transfer leaves its temporary file in images_dir; nothing else removes it.
            stale = remove_stale_temporaries(images_dir)
            if stale:
                report.count("images", "stale_temporaries_removed", stale)
        if s3 is not None and previous.get("images") == images_fp:
            # A finished download of the same export: only confirm the files are still there (no S3 requests).
            images = ensure_images(project.images, images_dir, None, report)
            if not bool(images["available"].all()):
                images = ensure_images(project.images, images_dir, s3, report)
            else:
                result.status = "skipped (current)"
        else:
            images = ensure_images(project.images, images_dir, s3, report)
        result.detail = f"{int(images['available'].sum())}/{len(images)} available"
        finish("images", images_fp)

    given: DetectionResults | None = None
    detected: DetectionResults | None = None
    if settings.detector.model_file is not None:
        with stage("detect") as result:
            if settings.detections_file is not None:
                given = load_detections(settings.detections_file, report)
            outcome = run_detect_stage(
                project, images, images_dir, output_dir, settings.detector, given, report, force=settings.force
            )
            detected = outcome.detections
            if outcome.detected == 0:
                result.status = "skipped (current)"
            result.detail = f"{outcome.detected}/{outcome.candidates} images run, {outcome.reused} known"
            if detected is not None:
                report.info["detector_results"] = str(output_dir / RESULTS_FILENAME)
            finish("detect", outcome.fingerprint)

    with stage("boxes") as result:
        if settings.detections_file is not None and given is None:
            given = load_detections(settings.detections_file, report)
        boxes = collect_boxes(
            project, images, [d for d in (given, detected) if d is not None], settings.detections, report
        )
        result.detail = f"{len(boxes)} boxes"

    with stage("crops") as result:
        crops_dir = output_dir / CROPS_DIRNAME
        crops_fp = _fingerprint(
            _frame_digest(boxes, ["crop_path", "x", "y", "w", "h"]),
            str(images_dir),
            dataclasses.asdict(settings.crops) | {"workers": None},
        )
        changed = _changed_crop_settings(crops_made_with, crop_settings) if crops_dir.is_dir() else []
        if changed:
            log.warning("crop settings changed (%s): making every crop again", ", ".join(changed))
            report.add(
                STAGE_CROPS,
                "crop_settings_changed",
                f"every crop is made again: {', '.join(changed)}",
                field="crops",
                action="redone",
            )
        if not changed and previous.get("crops") == crops_fp and _crops_intact(crops_dir, boxes["crop_path"], report):
            boxes = boxes.assign(crop_ok=True)
            result.status = "skipped (current)"
        else:
            # force=true, or other crop settings: crops already there were cut otherwise and are written again.
            redo = settings.force or bool(changed)
            boxes = make_crops(boxes, images_dir, crops_dir, settings.crops, report, redo=redo)
            counts = report.counts.get(STAGE_CROPS, {})
            info[CROP_PATHS_KEY] = {k: v for k, v in counts.items() if k == LOSSLESS or k.startswith(FALLBACK_PREFIX)}
        result.detail = f"{int(boxes['crop_ok'].sum())}/{len(boxes)} crops"
        if bool(boxes["crop_ok"].all()):
            # Only a complete crop stage may be skipped next time; failures are retried on every run.
            info[CROPS_MADE_WITH_KEY] = crop_settings
            finish("crops", crops_fp)

    with stage("labels") as result:
        labelled = apply_labels(boxes, dataset, settings.labels, report)
        result.detail = f"{labelled['label'].nunique()} labels"

    with stage("dataset") as result:
        frame = build_dataset_frame(labelled, dataset, split.min_locs, report, settings.sequences.max_gap_s, split)
        labels = write_dataset_files(frame, output_dir)
        result.detail = f"{len(frame)} crops, {len(labels)} labels"
        taxonomy_path = output_dir / TAXONOMY_FILENAME
        if settings.labels.taxonomy_file:
            taxonomy = read_taxonomy(settings.labels.taxonomy_file, labels)
            atomic_write_text(taxonomy_path, taxonomy.to_csv())
            result.detail += ", taxonomy"
        else:
            taxonomy_path.unlink(missing_ok=True)  # a taxonomy of an earlier run does not describe these labels
        finish("dataset", _file_digest(output_dir / CSV_FILENAME))

    with stage("splits") as result:
        reuse_digest = _file_digest(Path(split.reuse)) if split.reuse else None
        splits_fp = _fingerprint(info["stages"]["dataset"], dataclasses.asdict(split), reuse_digest)
        splits_path = output_dir / SPLITS_FILENAME
        report_path = output_dir / SPLIT_REPORT_FILENAME
        if previous.get("splits") == splits_fp and splits_path.is_file() and report_path.is_file():
            table = pd.read_csv(report_path, dtype={"label": "string", "split": "string"})
            diagnosis = review_splits(frame, read_splits(splits_path), split, report)
            result.status = "skipped (current)"
        else:
            made = make_splits(frame, split, report)
            diagnosis = made.diagnosis
            table = write_split_files(frame, made.splits, output_dir, split.group_by, diagnosis.targets)
        summary.split_table = table
        summary.split_diagnosis = diagnosis
        result.detail = f"{table['split'].nunique() if not table.empty else 0} splits"
        finish("splits", splits_fp)

    _write_report(report, output_dir)
    return summary


def format_summary(summary: PrepareSummary) -> str:
    """A short plain-text summary: one line per stage, the split table, and where the report is."""
    lines = [f"prepared dataset {summary.dataset!r} in {summary.output_dir}", ""]
    lines.append(f"{'stage':<9} {'status':<18} {'time':>7}  detail")
    for stage in summary.stages:
        lines.append(f"{stage.name:<9} {stage.status:<18} {stage.seconds:>6.1f}s  {stage.detail}")
    issues = summary.report.issue_summary()
    if issues:
        lines.append("")
        lines.append("skipped or changed records (details in prepare_report.json):")
        for stage_name, kinds in issues.items():
            for kind, n in sorted(kinds.items()):
                lines.append(f"  {stage_name:<9} {kind:<32} {n:>7}")
    table = summary.split_table
    if table is not None and not table.empty and {"split", "label", "crops"} <= set(table.columns):
        pivot = table.pivot_table(index="label", columns="split", values="crops", aggfunc="sum", fill_value=0)
        pivot = pivot.reindex(columns=[c for c in ("train", "val", "test") if c in pivot.columns])
        lines.append("")
        lines.append("crops per label and split:")
        lines.append(pivot.rename(index={ALL_LABELS: "all labels"}).to_string())
    if summary.split_diagnosis is not None:
        lines.append("")
        lines.append(format_shares(summary.split_diagnosis, table))
        for warning in summary.split_diagnosis.warnings:
            lines.append(f"WARNING: {warning}")
    for warning in summary.warnings:
        lines.append(f"WARNING: {warning}")
    lines.append("")
    lines.append(f"report: {summary.output_dir / REPORT_FILENAME}")
    return "\n".join(lines)


def _resolve_inputs(settings: PrepareSettings, output_dir: Path) -> tuple[Path, Path]:
    if settings.folders.root is not None:
        # The folders stage writes this CCT file; the images are read where they are.
        return output_dir / FOLDERS_CCT_FILENAME, Path(settings.folders.root)
    if settings.coco_file is None:
        coco_file, images_dir = generate_demo_project(output_dir / "demo_source", settings.demo)
        return Path(coco_file), Path(images_dir)
    assert settings.images_dir is not None  # PrepareSettings enforces this
    return Path(settings.coco_file), Path(settings.images_dir)


def _write_report(report: PrepareReport, output_dir: Path) -> None:
    report.write(output_dir / REPORT_FILENAME)


def _write_report_after_failure(report: PrepareReport, output_dir: Path) -> None:
    """Keep the report of a failed run, but never let a failure to write it (a full disk) hide the real error."""
    try:
        _write_report(report, output_dir)
    except OSError as err:
        log.warning("could not write %s: %s", output_dir / REPORT_FILENAME, err)


def _load_info(output_dir: Path) -> dict[str, Any]:
    path = output_dir / INFO_FILENAME
    if not path.is_file():
        return {}
    try:
        return read_prepare_info(path)
    except DatasetError as err:
        log.warning("ignoring %s (%s); every stage will run", path, err)
        return {}


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _frame_digest(frame: pd.DataFrame, columns: list[str]) -> str:
    hashed = pd.util.hash_pandas_object(frame[columns], index=False)
    return hashlib.sha256(hashed.to_numpy().tobytes()).hexdigest()


def _changed_crop_settings(before: Any, now: dict[str, Any]) -> list[str]:
    """``crops.<key>: <old> -> <new>`` for each crop setting the crops on disk were not cut with."""
    if not isinstance(before, dict):
        return []
    # Crops made before crops.lossless existed were decoded and encoded again: lossless=false.
    before = {"lossless": False} | before
    return [f"crops.{key}: {before.get(key)} -> {value}" for key, value in now.items() if before.get(key) != value]


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _crops_intact(root: Path, relative: pd.Series, report: PrepareReport) -> bool:
    """Whether every crop of a finished crops stage is still there and a complete JPEG (else the stage runs again).

    A crop emptied or truncated after the stage finished would otherwise pass as current and break training.
    """
    missing, damaged = check_crop_files(root, relative.astype(str).tolist())
    if damaged:
        report.count(STAGE_CROPS, "damaged_crops_redone", len(damaged))
        log.warning("%d crops were damaged since the last run (e.g. %s); making them again", len(damaged), damaged[0])
    return not missing and not damaged
