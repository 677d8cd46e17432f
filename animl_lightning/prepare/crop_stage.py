"""The crops stage of ``prepare.py``: one JPEG per box, each image decoded once, in a pool of processes.

The pixels come from the crop rule (:mod:`animl_lightning.core.crop_rule`), cut in the worker processes by
:mod:`animl_lightning.prepare.crop_workers`; this module plans the work per image, skips crops that are already there
and valid (so a re-run after a crash only does what is missing), and reports every box that gives no crop.

Ctrl-C stops the stage after the image each process is on (a second Ctrl-C at once): the crops written so far are
kept and counted, and :class:`~animl_lightning.core.errors.InterruptedWork` says how many, so the same command resumes.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import math
import multiprocessing
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from animl_lightning.core.contract import CROPS_DIRNAME, check_crop_files
from animl_lightning.core.errors import InterruptedWork
from animl_lightning.core.files import UnsafePathError, remove_stale_temporaries, safe_join
from animl_lightning.core.imaging import turbojpeg
from animl_lightning.core.issues import PrepareReport
from animl_lightning.prepare.config import CropSettings
from animl_lightning.prepare.crop_workers import (
    FALLBACK_PREFIX,
    LOSSLESS,
    CropJob,
    ImageJob,
    Outcome,
    crop_images,
    set_stop_request,
    worker_init,
)
from animl_lightning.prepare.stage import SKIPPED, PrepareRun, Stage, StageOutcome, fingerprint_of, frame_digest, need

log = logging.getLogger(__name__)

STAGE = "crops"
# prepare_info.json: the crop settings the crops on disk were cut with (written when a crops stage finishes), and how
# the last crops stage made its crops with crops.lossless (the report's LOSSLESS and FALLBACK_PREFIX counts).
CROPS_MADE_WITH_KEY = "crops_made_with"
CROP_PATHS_KEY = "crop_paths"
# Chunks queued or running per worker: enough to keep every worker busy, few enough that nothing long is left to
# drain when the stage stops.
_IN_FLIGHT_PER_WORKER = 2


@contextlib.contextmanager
def _stop_on_interrupt() -> Iterator[ctypes.c_bool]:
    """Turn the first Ctrl-C into a stop request that every crop process sees; a second one interrupts at once."""
    stop = multiprocessing.RawValue(ctypes.c_bool, False)

    def request_stop(signum: int, frame: object) -> None:
        stop.value = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    try:
        previous = signal.signal(signal.SIGINT, request_stop)
    except ValueError:  # not the main thread, where Python delivers signals: no Ctrl-C to handle here
        previous = None
    set_stop_request(stop)
    try:
        yield stop
    finally:
        set_stop_request(None)
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork where it is safe enough, as it starts workers in milliseconds; forkserver otherwise.

    fork is unsafe when another thread may hold a lock the child needs. Daemon threads (tqdm's monitor, a test's
    S3 server) are tolerated: the workers only decode and write files. Any other live thread means forkserver,
    which preloads this module so that each worker starts without re-importing PIL and numpy.
    """
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if sys.platform.startswith("linux") and all(t.daemon for t in others):
        return multiprocessing.get_context("fork")
    if sys.platform == "win32":
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _run_pool(
    chunks: list[list[ImageJob]],
    workers: int,
    params: tuple[str, int | None, int, bool, bool],
    record: Callable[[list[Outcome]], None],
    progress: tqdm[Any],
    stop: ctypes.c_bool,
) -> list[list[ImageJob]]:
    """Run ``chunks`` in a process pool; return the chunks lost to a dead worker (a broken pool).

    Chunks are submitted as results come back, so that a stop request leaves only the running ones to finish (each
    after its current image); the chunks never submitted are not lost, only left for the next run.
    """
    lost: list[list[ImageJob]] = []
    pool_workers = max(1, min(workers, len(chunks)))
    with ProcessPoolExecutor(
        max_workers=pool_workers,
        mp_context=_pool_context(),
        initializer=worker_init,
        initargs=(Image.MAX_IMAGE_PIXELS, stop),
    ) as pool:
        try:
            in_flight: dict[Future[list[Outcome]], list[ImageJob]] = {}
            position = 0
            while True:
                while position < len(chunks) and len(in_flight) < pool_workers * _IN_FLIGHT_PER_WORKER:
                    if stop.value:
                        break
                    try:
                        in_flight[pool.submit(crop_images, chunks[position], *params)] = chunks[position]
                    except BrokenProcessPool:  # a worker already died: nothing more can be submitted to this pool
                        lost.extend(chunks[position:])
                        position = len(chunks)
                        break
                    position += 1
                if not in_flight:
                    break
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    chunk = in_flight.pop(future)
                    try:
                        outcomes = future.result()
                    except BrokenProcessPool:
                        lost.append(chunk)
                        continue
                    record(outcomes)
                    progress.update(len(chunk))
        except BaseException:
            # A second Ctrl-C (or a bug): queued chunks must not run while the pool is closed.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return lost


def _chunks(jobs: list[ImageJob], workers: int) -> list[list[ImageJob]]:
    size = max(1, min(16, math.ceil(len(jobs) / (workers * 4))))
    return [jobs[i : i + size] for i in range(0, len(jobs), size)]


def _build_jobs(
    boxes: pd.DataFrame, images_dir: Path, crops_dir: Path
) -> tuple[list[ImageJob], dict[int, tuple[str, str, str]]]:
    """Group boxes by image; returns the jobs and, per refused row, (kind, message, record)."""
    refused: dict[int, tuple[str, str, str]] = {}
    file_names = boxes["file_name"].to_numpy(dtype=object)
    crop_paths = boxes["crop_path"].to_numpy(dtype=object)
    coords = boxes[["x", "y", "w", "h"]].to_numpy(dtype=float)
    widths = boxes["width"].to_numpy(dtype=float, na_value=np.nan)
    heights = boxes["height"].to_numpy(dtype=float, na_value=np.nan)
    jobs: list[ImageJob] = []
    groups = pd.Series(np.arange(len(boxes))).groupby(file_names, sort=False).indices
    for file_name, rows in groups.items():
        try:
            source = safe_join(images_dir, str(file_name))
        except UnsafePathError as err:
            for row in rows:
                refused[int(row)] = ("unsafe_path", str(err), str(file_name))
            continue
        crops = []
        for row in rows:
            try:
                target = safe_join(crops_dir, str(crop_paths[row]))
            except UnsafePathError as err:
                refused[int(row)] = ("unsafe_path", str(err), str(crop_paths[row]))
                continue
            crops.append(CropJob(int(row), tuple(coords[row].tolist()), str(target)))  # type: ignore[arg-type]
        if not crops:
            continue
        w, h = widths[rows[0]], heights[rows[0]]
        recorded = (int(w), int(h)) if np.isfinite(w) and np.isfinite(h) else None
        jobs.append(ImageJob(str(source), str(file_name), recorded, tuple(crops)))
    return jobs, refused


def make_crops(
    boxes: pd.DataFrame,
    images_dir: Path,
    crops_dir: Path,
    settings: CropSettings,
    report: PrepareReport,
    redo: bool = False,
) -> pd.DataFrame:
    """Write one JPEG per box to ``crops_dir / crop_path``; return ``boxes`` with a ``crop_ok`` column.

    Each image is decoded once for all its boxes, in ``settings.workers`` processes (in this process when it is 1).
    Crops that exist, are complete JPEGs and have the expected size are skipped without decoding the image, so a
    re-run after a crash only does the missing work. A missing, truncated or corrupt image, an unsafe path or a
    degenerate box is reported (stage ``crops``) and its crops get ``crop_ok=False``; the run goes on.

    Args:
        boxes: the boxes table (``file_name``, ``crop_path``, ``x, y, w, h``, ``width``, ``height``).
        images_dir: folder holding ``<file_name>``.
        crops_dir: output folder.
        settings: strategy, max_size, lossless, workers, JPEG quality.
        report: receives the issues and the counts ``written``, ``redone``, ``skipped``, ``failed``; with
            ``lossless``, also how many written crops were cut losslessly (``lossless``) and how many fell back, by
            reason (``lossless_fallback_<reason>``).
        redo: write every crop again, also those already there (they were cut with other settings).
    """
    images_dir, crops_dir = Path(images_dir), Path(crops_dir)
    crops_dir.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temporaries(crops_dir)
    if stale:
        report.count(STAGE, "stale_temporaries_removed", stale)
    ok = np.zeros(len(boxes), dtype=bool)
    if boxes.empty:
        return boxes.assign(crop_ok=ok)
    jobs, refused = _build_jobs(boxes, images_dir, crops_dir)
    for kind, message, name in refused.values():
        report.add(STAGE, kind, message, record=name, field="file_name", action="skipped")
    report.count(STAGE, "failed", len(refused))

    workers = settings.resolved_workers
    strategy, max_size, quality, lossless = settings.strategy, settings.max_size, settings.quality, settings.lossless
    if lossless and turbojpeg() is None:
        # turbojpeg() has said why, once, in this process; each crop is counted as library_missing.
        log.warning("crops.lossless: libturbojpeg is not available, so every crop is decoded and encoded again")
    file_of = {c.row: job.source for job in jobs for c in job.crops}
    counts = {"written": 0, "redone": 0, "skipped": 0, "failed": 0}
    paths: dict[str, int] = {}

    def record(outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            if outcome.status == "note":
                report.add(STAGE, outcome.kind, outcome.message, file=outcome.file, field="width", action="rescaled")
                continue
            counts[outcome.status] += 1
            if outcome.status == "failed":
                report.add(
                    STAGE,
                    outcome.kind,
                    outcome.message,
                    file=file_of.get(outcome.row),
                    record=str(boxes["crop_path"].iat[outcome.row]),
                    field="bbox" if outcome.kind == "degenerate_box" else "file_name",
                )
            else:
                ok[outcome.row] = True
                if outcome.path:
                    paths[outcome.path] = paths.get(outcome.path, 0) + 1

    progress = tqdm(total=len(jobs), unit="img", desc="crops", disable=not sys.stderr.isatty())
    with _stop_on_interrupt() as stop:
        try:
            chunks = _chunks(jobs, workers)
            if workers == 1 or len(chunks) == 1:
                for chunk in chunks:
                    record(crop_images(chunk, strategy, max_size, quality, redo, lossless))
                    progress.update(len(chunk))
                    if stop.value:
                        break
            else:
                params = (strategy, max_size, quality, redo, lossless)
                lost = _run_pool(chunks, workers, params, record, progress, stop)
                if lost and not stop.value:
                    # A worker died (killed for memory, or a decoder crashed on a hostile file) and took its pool's
                    # pending tasks with it: retry those images one per task, then any still dying each in a fresh
                    # single-worker pool, so that only the culprit is lost.
                    log.warning("a crop worker died; retrying %d images", sum(len(c) for c in lost))
                    lost = _run_pool(
                        [[job] for chunk in lost for job in chunk], workers, params, record, progress, stop
                    )
                for chunk in lost:  # empty once stopped: nothing is submitted after a stop request
                    if _run_pool([chunk], 1, params, record, progress, stop):
                        record(
                            [
                                Outcome(c.row, "failed", "worker_crashed", f"{job.source}: the crop worker died on it")
                                for job in chunk
                                for c in job.crops
                            ]
                        )
        finally:
            progress.close()
    for name, value in counts.items():
        report.count(STAGE, name, value)
    for name, value in sorted(paths.items()):
        report.count(STAGE, name, value)
    fallbacks = sum(v for k, v in paths.items() if k != LOSSLESS)
    if fallbacks:
        log.info(
            "crops: %d cut losslessly, %d decoded and encoded again (%s)",
            paths.get(LOSSLESS, 0),
            fallbacks,
            ", ".join(f"{k.removeprefix(FALLBACK_PREFIX)}: {v}" for k, v in sorted(paths.items()) if k != LOSSLESS),
        )
    if stop.value:
        # Crops an earlier run wrote for images this one did not reach are there too.
        present = int(ok.sum()) + sum(Path(c.target).is_file() for job in jobs for c in job.crops if not ok[c.row])
        raise InterruptedWork(
            f"interrupted: {present} of {len(boxes)} crops written; run the same command again to resume"
        )
    log.info(
        "crops: %d written, %d redone, %d already done, %d failed",
        *(counts[k] for k in ("written", "redone", "skipped", "failed")),
    )
    return boxes.assign(crop_ok=ok)


class CropsStage(Stage):
    """Current when the boxes, images folder and crop settings are those of the last complete run and every crop is
    intact; other crop settings make every crop again, failures are retried on every run."""

    name = STAGE

    def fingerprint(self, run: PrepareRun) -> str | None:
        """The boxes' paths and coordinates, the images folder and the crop settings; None while a crop failed."""
        boxes = need(run.boxes, "the boxes table")
        if "crop_ok" in boxes and not bool(boxes["crop_ok"].all()):
            return None
        crops = dataclasses.asdict(run.settings.crops) | {"workers": None}
        return fingerprint_of(frame_digest(boxes, ["crop_path", "x", "y", "w", "h"]), str(run.images_dir), crops)

    def run(self, run: PrepareRun) -> StageOutcome:
        """Leave the boxes with ``crop_ok`` on ``run.boxes``."""
        boxes, report, crops_dir = need(run.boxes, "the boxes table"), run.report, run.output_dir / CROPS_DIRNAME
        now = crop_record(run.settings.crops)
        changed = _changed_crop_settings(run.info.get(CROPS_MADE_WITH_KEY), now) if crops_dir.is_dir() else []
        if changed:
            log.warning("crop settings changed (%s): making every crop again", ", ".join(changed))
            message = f"every crop is made again: {', '.join(changed)}"
            report.add(STAGE, "crop_settings_changed", message, field="crops", action="redone")
        outcome = StageOutcome()
        current = not changed and run.is_current(self.name, self.fingerprint(run))
        if current and _crops_intact(crops_dir, boxes["crop_path"], report):
            boxes = boxes.assign(crop_ok=True)
            outcome.status = SKIPPED
        else:
            # force=true, or other crop settings: crops already there were cut otherwise and are written again.
            redo = run.settings.force or bool(changed)
            boxes = make_crops(boxes, run.images_dir, crops_dir, run.settings.crops, report, redo=redo)
            counts = report.counts.get(STAGE, {})
            run.info[CROP_PATHS_KEY] = {
                k: v for k, v in counts.items() if k == LOSSLESS or k.startswith(FALLBACK_PREFIX)
            }
        run.boxes = boxes
        outcome.counts = {"crops": int(boxes["crop_ok"].sum()), "boxes": len(boxes)}
        outcome.detail = f"{outcome.counts['crops']}/{outcome.counts['boxes']} crops"
        if bool(boxes["crop_ok"].all()):
            run.info[CROPS_MADE_WITH_KEY] = now
        return outcome


def crop_record(settings: CropSettings) -> dict[str, Any]:
    """The crop settings that decide the crops' pixels, as ``prepare_info.json`` records them."""
    return {
        "strategy": settings.strategy,
        "max_size": settings.max_size,
        "quality": settings.quality,
        "lossless": settings.lossless,
    }


def _changed_crop_settings(before: Any, now: dict[str, Any]) -> list[str]:
    """``crops.<key>: <old> -> <new>`` for each crop setting the crops on disk were not cut with."""
    if not isinstance(before, dict):
        return []
    # Crops made before crops.lossless existed were decoded and encoded again: lossless=false.
    before = {"lossless": False} | before
    return [f"crops.{key}: {before.get(key)} -> {value}" for key, value in now.items() if before.get(key) != value]


def _crops_intact(root: Path, relative: pd.Series, report: PrepareReport) -> bool:
    """Whether every crop is still there and a complete JPEG: one emptied or truncated since would break training."""
    missing, damaged = check_crop_files(root, relative.astype(str).tolist())
    if damaged:
        report.count(STAGE, "damaged_crops_redone", len(damaged))
        log.warning("%d crops were damaged since the last run (e.g. %s); making them again", len(damaged), damaged[0])
    return not missing and not damaged
