"""The detect stage: MegaDetector run by prepare on the images that need detector boxes (``detector.model_file``).

Which images: those whose boxes the boxes stage would take from MegaDetector results
(:func:`~animl_lightning.prepare.boxes.detector_candidates`: available, no ground-truth box, one box-less category
other than ``empty``) and that the ``detections_file`` does not list. MegaDetector's own batch runner runs them in a
child process (:mod:`animl_lightning.prepare.megadetector_process`, which says why), and writes
``<output_dir>/megadetector_results.json`` in MegaDetector format 1.6; the boxes stage reads it after the
``detections_file``, so crops from it are named after the model file (``info.detector``).

Identity of a result. A result is reused only if it was made under the same *run key* (the model file's SHA-256,
``detector.threshold`` and the installed megadetector version) for an image file of the same size and modification
time. The results file records both in ``info.custom_metadata.animl_lightning``; the run's request file
(``megadetector_run/request.json``) records them for the checkpoint beside it.

Cache and resume. When every image has a reusable result in the results file, the stage does not start MegaDetector
at all. Otherwise the reusable results, from the results file and from the checkpoint of a run that was stopped
(``megadetector_run/checkpoint.json``, or MegaDetector's backup of it if the kill came while it was being written),
are handed to MegaDetector, which skips them: a run killed mid-stage and run again processes each image once (the
images are given as absolute paths, since MegaDetector's resume matches results to images by the path string).
Failed images are not reused: they are tried again on the next run, as failed crops are. ``force=true`` starts over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pandas as pd

from animl_lightning.core.cct import CctProject
from animl_lightning.core.errors import ResourceError
from animl_lightning.core.files import file_sha256, remove_stale_temporaries
from animl_lightning.core.issues import PrepareReport
from animl_lightning.core.megadetector import DetectionResults, load_detections
from animl_lightning.prepare.boxes import detector_candidates
from animl_lightning.prepare.config import DetectorSettings
from animl_lightning.prepare.detector_file import INSTALL_HINT
from animl_lightning.prepare.megadetector_process import CHECKPOINT_BACKUP_SUFFIX, DetectorRequest
from animl_lightning.prepare.stage import SKIPPED, PrepareRun, Stage, StageOutcome, need

log = logging.getLogger(__name__)

STAGE = "detect"
RESULTS_FILENAME = "megadetector_results.json"
RUN_DIRNAME = "megadetector_run"
REQUEST_FILENAME = "request.json"
CHECKPOINT_FILENAME = "checkpoint.json"
STATUS_FILENAME = "status.json"
METADATA_KEY = "animl_lightning"

Stat = tuple[int, int]  # (size in bytes, modification time in ns): an image file as it was when it was detected


class DetectError(ResourceError, RuntimeError):
    """MegaDetector could not run or did not finish; one line (the child's own output is in the log it names)."""


@dataclass(frozen=True)
class DetectOutcome:
    """What the detect stage did.

    Attributes:
        detections: the stage's results, read as the boxes stage reads a detections file; None without candidates.
        fingerprint: run key and image stats, for ``prepare_info.json``.
        candidates: images that need MegaDetector results.
        reused: candidates whose results were already known (results file or checkpoint).
        detected: candidates MegaDetector ran on in this run (0: the results were current, MegaDetector not started).
    """

    detections: DetectionResults | None
    fingerprint: str
    candidates: int
    reused: int
    detected: int


def megadetector_version() -> str:
    """The installed megadetector distribution's version (read from its metadata: importing it is not harmless)."""
    try:
        return version("megadetector")
    except PackageNotFoundError as err:
        raise DetectError(
            f"detector.model_file is set but the megadetector package is not installed: {INSTALL_HINT}"
        ) from err


def image_stats(images_dir: Path, names: Iterable[str]) -> dict[str, Stat]:
    """``(size, mtime_ns)`` of each image; ``(-1, -1)`` for one that cannot be looked at (MegaDetector reports it)."""
    stats: dict[str, Stat] = {}
    for name in names:
        try:
            info = (images_dir / name).stat()
            stats[name] = (info.st_size, info.st_mtime_ns)
        except OSError:
            stats[name] = (-1, -1)
    return stats


def run_key(model_digest: str, threshold: float, md_version: str) -> str:
    """The identity of the results a model, threshold and MegaDetector version give."""
    return hashlib.sha256(json.dumps([model_digest, threshold, md_version]).encode()).hexdigest()


def reusable_results(data: Mapping[str, Any], key: str, stats: Mapping[str, Stat]) -> dict[str, dict[str, Any]]:
    """The entries of a results file (parsed) that hold for the images in ``stats``, by file name.

    An entry holds if the file was written under run key ``key``, its image is still the same file (size and
    modification time as recorded) and it is not a failure.
    """
    info = data.get("info")
    custom = info.get("custom_metadata") if isinstance(info, dict) else None
    meta = custom.get(METADATA_KEY) if isinstance(custom, dict) else None
    if not isinstance(meta, dict) or meta.get("run_key") != key or not isinstance(meta.get("images"), dict):
        return {}
    recorded: dict[str, Any] = meta["images"]
    reused: dict[str, dict[str, Any]] = {}
    for entry in data.get("images") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            continue
        name = entry["file"]
        if name in stats and _same_stat(recorded.get(name), stats[name]) and _is_success(entry):
            reused[name] = entry
    return reused


def checkpoint_results(run_dir: Path, key: str, stats: Mapping[str, Stat]) -> dict[str, dict[str, Any]]:
    """The entries of a stopped run's checkpoint that hold for the images in ``stats``, by file name.

    The checkpoint names images by the absolute paths of that run's request, which also recorded each image's stat;
    a checkpoint of another run key, or one that cannot be read, gives nothing.
    """
    try:
        request = DetectorRequest.read(run_dir / REQUEST_FILENAME)
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if request.run_key != key:
        return {}
    by_path = {absolute: (name, (size, mtime)) for absolute, name, size, mtime in request.images}
    checkpoint = Path(request.checkpoint_path)
    entries: list[Any] | None = None
    # MegaDetector rewrites its checkpoint in place after copying the old one aside: a kill during the write leaves
    # the copy as the last complete checkpoint.
    for candidate in (checkpoint, checkpoint.with_name(checkpoint.name + CHECKPOINT_BACKUP_SUFFIX)):
        try:
            loaded = json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(loaded, dict) and isinstance(loaded.get("checkpoint"), list):
            entries = loaded["checkpoint"]
            break
    reused: dict[str, dict[str, Any]] = {}
    for entry in entries or []:
        if not isinstance(entry, dict) or entry.get("file") not in by_path:
            continue
        name, stat = by_path[entry["file"]]
        if name in stats and stat == stats[name] and _is_success(entry):
            reused[name] = {**entry, "file": name}
    return reused


def _same_stat(recorded: Any, stat: Stat) -> bool:
    return isinstance(recorded, list) and len(recorded) == 2 and (recorded[0], recorded[1]) == stat


def _is_success(entry: Mapping[str, Any]) -> bool:
    return entry.get("failure") is None and isinstance(entry.get("detections"), list)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def run_detect_stage(
    project: CctProject,
    images: pd.DataFrame,
    images_dir: Path,
    output_dir: Path,
    settings: DetectorSettings,
    given: DetectionResults | None,
    report: PrepareReport,
    *,
    force: bool = False,
) -> DetectOutcome:
    """Run MegaDetector where the boxes stage needs it; see the module docstring.

    Args:
        project: the ingested CCT file.
        images: the images table after the images stage (``available``).
        images_dir: the folder holding ``<file_name>``.
        output_dir: the prepared dataset folder (results file, run folder, logs).
        settings: ``detector.*``; ``model_file`` must be set.
        given: the ``detections_file``'s results; the images it lists are not run.
        report: receives the counts (stage ``detect``); the results file's records are reported by the boxes
            stage's reader.
        force: ignore earlier results and checkpoints.

    Raises:
        DetectError: the megadetector package is missing, or MegaDetector stopped (one line naming its log).
    """
    if settings.model_file is None:
        raise DetectError("detector.model_file is not set")
    listed = set(given.images) | set(given.failures) if given is not None else set()
    names = [name for name in detector_candidates(project, images) if name not in listed]
    report.set_count(STAGE, "images", len(names))
    results_path = output_dir / RESULTS_FILENAME
    if not names:
        report.set_count(STAGE, "reused", 0)
        report.set_count(STAGE, "detected", 0)
        return DetectOutcome(None, _fingerprint([]), 0, 0, 0)

    model_file = Path(settings.model_file).absolute()
    model_digest = file_sha256(model_file)
    md_version = megadetector_version()
    key = run_key(model_digest, settings.threshold, md_version)
    stats = image_stats(images_dir, names)
    fingerprint = _fingerprint(key, sorted(stats.items()))
    run_dir = output_dir / RUN_DIRNAME

    known: dict[str, dict[str, Any]] = {}
    if not force:
        previous = _read_json(results_path)
        if isinstance(previous, dict):
            known = reusable_results(previous, key, stats)
        if len(known) == len(names):
            report.set_count(STAGE, "reused", len(names))
            report.set_count(STAGE, "detected", 0)
            log.info("detect: the results in %s are current for all %d images", results_path, len(names))
            return DetectOutcome(load_detections(results_path, report), fingerprint, len(names), len(names), 0)
        known = {**checkpoint_results(run_dir, key, stats), **known}
    else:
        _clear_run_dir(run_dir)

    absolute_dir = Path(images_dir).absolute()
    request = DetectorRequest(
        model_file=str(model_file),
        threshold=settings.threshold,
        batch_size=settings.batch_size,
        device=settings.device,
        checkpoint_path=str(run_dir / CHECKPOINT_FILENAME),
        checkpoint_every=settings.checkpoint_every,
        results_path=str(results_path),
        status_path=str(run_dir / STATUS_FILENAME),
        images=[(str(absolute_dir / name), name, *stats[name]) for name in names],
        seed=[{**entry, "file": str(absolute_dir / name)} for name, entry in known.items()],
        custom_metadata={
            METADATA_KEY: {
                "run_key": key,
                "model_sha256": model_digest,
                "threshold": settings.threshold,
                "megadetector_version": md_version,
                "images": {name: list(stats[name]) for name in names},
            }
        },
        run_key=key,
        parent_pid=os.getpid(),
    )
    detected = len(names) - len(known)
    report.set_count(STAGE, "reused", len(known))
    report.set_count(STAGE, "detected", detected)
    log.info(
        "detect: MegaDetector (%s) on %d images, %d known from an earlier run", model_file.name, detected, len(known)
    )
    _run_child(request, run_dir, output_dir)
    _clear_run_dir(run_dir)
    return DetectOutcome(load_detections(results_path, report), fingerprint, len(names), len(known), detected)


def _clear_run_dir(run_dir: Path) -> None:
    for name in (
        REQUEST_FILENAME,
        CHECKPOINT_FILENAME,
        CHECKPOINT_FILENAME + CHECKPOINT_BACKUP_SUFFIX,
        STATUS_FILENAME,
    ):
        (run_dir / name).unlink(missing_ok=True)


def _run_child(request: DetectorRequest, run_dir: Path, output_dir: Path) -> None:
    """Start :mod:`~animl_lightning.prepare.megadetector_process` on ``request`` and wait for it.

    Its standard output (MegaDetector's messages) goes to ``<output_dir>/logs/detect_<date>_<time>.log``; its
    standard error (the progress bar, warnings, a traceback) to this process's.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run_dir)
    request_path = run_dir / REQUEST_FILENAME
    request.write(request_path)
    status_path = Path(request.status_path)
    status_path.unlink(missing_ok=True)
    log_path = output_dir / "logs" / f"detect_{time.strftime('%Y-%m-%d_%H-%M-%S')}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # The child imports this package by name whatever the working folder (prepare.py run from elsewhere, uninstalled).
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    command = [sys.executable, "-m", "animl_lightning.prepare.megadetector_process", "run", str(request_path)]
    with log_path.open("ab") as log_file:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file, env=env)
        try:
            status = child.wait()
        finally:
            if child.poll() is None:  # prepare itself was interrupted: the child must not run on
                child.kill()
                child.wait()
    if status == 0:
        return
    failure = _read_json(status_path)
    if isinstance(failure, dict) and isinstance(failure.get("error"), str):
        raise DetectError(f"{failure['error']} (MegaDetector's output: {log_path})")
    raise DetectError(f"MegaDetector stopped with exit status {status}; its output is in {log_path}")


class DetectStage(Stage):
    """With ``detector.model_file``: MegaDetector on the images that need detector boxes; current when none did."""

    name = STAGE

    def wanted(self, run: PrepareRun) -> bool:
        """Only with ``detector.model_file``."""
        return run.settings.detector.model_file is not None

    def fingerprint(self, run: PrepareRun) -> str | None:
        """The run key and the image stats of the results (see the module docstring)."""
        return need(run.detect_fingerprint, "the detect stage's fingerprint")

    def run(self, run: PrepareRun) -> StageOutcome:
        """Leave the given detections on ``run.given``, and what this stage found on ``run.detected``."""
        settings = run.settings
        if settings.detections_file is not None:
            run.given = load_detections(settings.detections_file, run.report)
        outcome = run_detect_stage(
            need(run.project, "the ingested project"),
            need(run.images, "the images table"),
            run.images_dir,
            run.output_dir,
            settings.detector,
            run.given,
            run.report,
            force=settings.force,
        )
        run.detected, run.detect_fingerprint = outcome.detections, outcome.fingerprint
        if outcome.detections is not None:
            run.report.info["detector_results"] = str(run.output_dir / RESULTS_FILENAME)
        counts = {"detected": outcome.detected, "candidates": outcome.candidates, "reused": outcome.reused}
        return StageOutcome(
            SKIPPED if outcome.detected == 0 else "ran",
            f"{outcome.detected}/{outcome.candidates} images run, {outcome.reused} known",
            counts,
        )
