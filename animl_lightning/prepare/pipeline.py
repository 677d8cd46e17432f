"""The prepare pipeline: run the stages in order, skip the ones whose outputs are current, report.

Stages (:data:`STAGES`, each a :class:`~animl_lightning.prepare.stage.Stage` in the module that does its work):
ingest -> images -> detect -> boxes -> crops -> labels -> dataset -> splits; with ``folders.root`` a ``folders``
stage first derives the CCT file that ingest reads (:mod:`animl_lightning.prepare.folders`), and the detect stage
runs only with ``detector.model_file`` (:mod:`animl_lightning.prepare.detect`). This module owns what lies between
them: the lock, the log, ``prepare_info.json``, the errors (named after their stage) and the summary.

Resumability has two layers. Inside a stage, per-file work (downloads, crops) skips what is already on disk and
complete, because every file is written atomically. Across stages, ``prepare_info.json`` records a fingerprint of
each finished stage's inputs and settings; a re-run whose fingerprint matches skips the stage's work. The info file
is rewritten (atomically) after every finished stage, so a run killed at any point resumes from the last one.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from animl_lightning import __version__
from animl_lightning.core.contract import INFO_FILENAME, DatasetError, read_prepare_info, write_prepare_info
from animl_lightning.core.errors import AnimlError, InputFileError
from animl_lightning.core.files import remove_stale_temporaries, run_lock
from animl_lightning.core.issues import REPORT_FILENAME, PrepareReport
from animl_lightning.core.taxonomy import TaxonomyError
from animl_lightning.prepare.boxes import BoxesStage
from animl_lightning.prepare.config import PrepareSettings
from animl_lightning.prepare.crop_stage import CROP_PATHS_KEY, CROPS_MADE_WITH_KEY, CropsStage, crop_record
from animl_lightning.prepare.dataset import DatasetStage
from animl_lightning.prepare.demo import generate_demo_project
from animl_lightning.prepare.detect import DetectStage
from animl_lightning.prepare.folders import (
    FOLDERS_CCT_FILENAME,
    FoldersStage,
    folder_dataset_name,
    split_without_locations,
)
from animl_lightning.prepare.folders import STAGE as STAGE_FOLDERS
from animl_lightning.prepare.images import ImagesStage
from animl_lightning.prepare.ingest import IngestStage
from animl_lightning.prepare.labels import LabelsStage
from animl_lightning.prepare.split_diagnosis import SplitDiagnosis
from animl_lightning.prepare.splits import ALL_LABELS, SplitsStage, format_shares
from animl_lightning.prepare.stage import PrepareRun, Stage

log = logging.getLogger(__name__)

# The stages in the order they run: the one list of them (the summary shows them in this order). A new stage is a
# class in the module that does its work and a line here.
STAGES: tuple[Stage, ...] = (
    FoldersStage(),
    IngestStage(),
    ImagesStage(),
    DetectStage(),
    BoxesStage(),
    CropsStage(),
    LabelsStage(),
    DatasetStage(),
    SplitsStage(),
)


class PrepareError(InputFileError):
    """A stage could not run on its input; the message names the stage, file, record and field."""


@dataclass
class StageResult:
    """How one stage went, for the summary table."""

    name: str
    status: str  # "ran" or "skipped (current)"
    seconds: float
    detail: str = ""
    counts: dict[str, int] = field(default_factory=dict)


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


def run_prepare(
    settings: PrepareSettings, stages: Sequence[Stage] = STAGES, command: str = "prepare.py"
) -> PrepareSummary:
    """Run each of ``stages`` that ``settings`` want, in order; see the module docstring for resume semantics.

    Holds the output folder's lock for the whole run: a second ``prepare.py`` on the same folder is refused, its
    error naming the ``command`` the first one was started as (``prepare.py``, ``animl-prepare``).
    """
    with run_lock(settings.output_dir, command) as output_dir, run_log(output_dir):
        return _run_prepare(settings, output_dir, stages)


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


def _run_prepare(settings: PrepareSettings, output_dir: Path, stages: Sequence[Stage]) -> PrepareSummary:
    remove_stale_temporaries(output_dir)
    taxonomy_file = settings.labels.taxonomy_file
    if taxonomy_file and not Path(taxonomy_file).is_file():
        # Checked before the long stages; its content is checked against the labels once they are known.
        raise TaxonomyError(f"labels.taxonomy_file: {taxonomy_file} does not exist")

    run, warnings = _start_run(settings, output_dir)
    summary = PrepareSummary(output_dir=output_dir, dataset=run.dataset, report=run.report, warnings=warnings)
    for stage in stages:
        if stage.wanted(run):
            summary.stages.append(_run_stage(stage, run))
    summary.split_table = run.split_table
    summary.split_diagnosis = run.split_diagnosis
    _write_report(run.report, output_dir)
    return summary


def _start_run(settings: PrepareSettings, output_dir: Path) -> tuple[PrepareRun, list[str]]:
    """The run's inputs and the ``prepare_info.json`` it will write (from the last run's); the summary's warnings."""
    report = PrepareReport()
    folders_root = settings.folders.root
    coco_file, images_dir = _resolve_inputs(settings, output_dir)
    dataset = settings.dataset or (folder_dataset_name(folders_root) if folders_root else Path(coco_file).stem)
    split, warnings = settings.split, list[str]()
    if folders_root is not None and settings.folders.location_level is None:
        split, warnings = split_without_locations(settings.split)
        for warning in warnings:
            log.warning("%s", warning)
            report.add(
                STAGE_FOLDERS, "split_without_locations", warning, field="folders.location_level", action="changed"
            )
    info = _load_info(output_dir) if not settings.force else {}
    previous = info.get("stages", {}) if info.get("version") == __version__ else {}
    # What the crops on disk were cut with: recorded when a crops stage finishes (an interrupted redo keeps the old
    # record, so it is redone whole again); an older prepare_info.json has only the settings of its last run.
    crops_made_with = info.get(CROPS_MADE_WITH_KEY) or info.get("crops")
    info = {
        "version": __version__,
        "dataset": dataset,
        "coco_file": str(coco_file),
        "images_dir": str(images_dir),
        "detections_file": settings.detections_file,
        "crops": crop_record(settings.crops),
        CROPS_MADE_WITH_KEY: crops_made_with,
        CROP_PATHS_KEY: info.get(CROP_PATHS_KEY),
        "settings": dataclasses.asdict(settings),
        "stages": dict(previous),
    }
    report.info.update({"dataset": dataset, "coco_file": str(coco_file), "images_dir": str(images_dir)})
    if folders_root is not None:
        report.info["folders_root"] = folders_root
    run = PrepareRun(
        settings=settings,
        output_dir=output_dir,
        report=report,
        dataset=dataset,
        coco_file=coco_file,
        images_dir=images_dir,
        split=split,
        previous=previous,
        info=info,
    )
    return run, warnings


def _run_stage(stage: Stage, run: PrepareRun) -> StageResult:
    """Run one stage; record its fingerprint once it finished; keep the report whatever stops it."""
    start = time.perf_counter()
    try:
        outcome = stage.run(run)
        fingerprint = stage.fingerprint(run)
        if fingerprint is not None:
            run.info["stages"][stage.name] = fingerprint
            write_prepare_info(run.info, run.output_dir / INFO_FILENAME)
    except PrepareError:
        _write_report_after_failure(run.report, run.output_dir)
        raise
    except AnimlError as err:
        _write_report_after_failure(run.report, run.output_dir)
        raise PrepareError(f"{stage.name} stage: {err}") from err
    except BaseException:
        # Whatever stopped the stage (a full disk, Ctrl-C, a bug), the report of what was done so far is kept.
        _write_report_after_failure(run.report, run.output_dir)
        raise
    result = StageResult(stage.name, outcome.status, time.perf_counter() - start, outcome.detail, outcome.counts)
    log.info("stage %s: %s in %.1fs %s", stage.name, result.status, result.seconds, result.detail)
    return result


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
