"""The crops stage of ``prepare.py``: one JPEG per box, each image decoded once, in a pool of processes.

The pixels come from the crop rule (:mod:`animl_lightning.core.crop_rule`); this module plans the work per image,
skips crops that are already there and valid (so a re-run after a crash only does what is missing), writes each crop
atomically, and reports every box that gives no crop.

Ctrl-C stops the stage after the image each process is on (a second Ctrl-C at once): the crops written so far are
kept and counted, and :class:`~animl_lightning.core.errors.InterruptedWork` says how many, so the same command resumes.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageFile
from tqdm import tqdm

from animl_lightning.core.crop_files import crop_is_valid, encode_crop
from animl_lightning.core.crop_rule import (
    Box,
    CropError,
    CropRule,
    CropWindow,
    crop_window,
    cut_region,
    draft_reduction,
    output_size,
    plan_window,
    render,
    render_cut,
)
from animl_lightning.core.errors import InterruptedWork
from animl_lightning.core.files import TMP_MARKER, UnsafePathError, remove_stale_temporaries, safe_join
from animl_lightning.core.imaging import ImageLoadError, cut_jpeg, decode_image, read_header, turbojpeg
from animl_lightning.core.issues import PrepareReport
from animl_lightning.prepare.config import CropSettings

log = logging.getLogger(__name__)

STAGE = "crops"
# Report counts of the crops written by each path when crops.lossless is on: cut losslessly, or decoded and encoded
# again with the reason (FALLBACK_PREFIX + progressive, colour_mode, not_jpeg, rotated, sampling, padded,
# library_missing, rejected).
LOSSLESS = "lossless"
FALLBACK_PREFIX = "lossless_fallback_"
# Chunks queued or running per worker: enough to keep every worker busy, few enough that nothing long is left to
# drain when the stage stops.
_IN_FLIGHT_PER_WORKER = 2

# The stop request of the running crop stage, in every process: a byte in shared memory, so that the Ctrl-C handler
# only stores a value (taking a lock in a signal handler can deadlock) and a worker reads it between images.
_stop_requested: ctypes.c_bool | None = None


def _save_crop(data: bytes, path: Path) -> None:
    """Write crop JPEG bytes through a temporary sibling and a rename.

    Unlike :func:`animl_lightning.core.files.atomic_write` this does not fsync: a crash (even kill -9) still leaves
    either no file or the whole file, and after a power loss a damaged crop fails :func:`crop_is_valid` on the next
    run and is redone. An fsync per crop would cost more than encoding it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TMP_MARKER}")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        tmp.chmod(0o644)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class _CropJob:
    row: int
    box: Box
    target: str


@dataclass(frozen=True)
class _ImageJob:
    source: str
    file_name: str
    recorded_size: tuple[int, int] | None
    crops: tuple[_CropJob, ...]


@dataclass(frozen=True)
class _Outcome:
    """What happened to one crop (``row`` >= 0) or to a whole image (``row`` == -1)."""

    row: int
    status: str  # written, redone, skipped, failed, note
    kind: str = ""
    message: str = ""
    file: str = ""
    path: str = ""  # with crops.lossless, how a written crop was made: LOSSLESS or FALLBACK_PREFIX + reason


def _plan(
    crops: Sequence[_CropJob], size: tuple[int, int], strategy: str, max_size: int | None, out: list[_Outcome]
) -> list[tuple[_CropJob, CropWindow, tuple[int, int]]]:
    planned = []
    for job in crops:
        try:
            window = crop_window(job.box, size, strategy)
        except CropError as err:
            out.append(_Outcome(job.row, "failed", "degenerate_box", str(err)))
            continue
        planned.append((job, window, output_size(window, max_size)))
    return planned


def _rescaled(job: _ImageJob, full_size: tuple[int, int], out: list[_Outcome]) -> tuple[_CropJob, ...]:
    """The job's boxes in pixels of the image as displayed, noting a size the CCT file got wrong."""
    if job.recorded_size is None or job.recorded_size == full_size:
        return job.crops
    rx, ry = full_size[0] / job.recorded_size[0], full_size[1] / job.recorded_size[1]
    out.append(
        _Outcome(
            -1,
            "note",
            "image_size_mismatch",
            f"the CCT file gives {job.recorded_size[0]}x{job.recorded_size[1]} but the image is "
            f"{full_size[0]}x{full_size[1]} as displayed; boxes are rescaled to it",
            job.source,
        )
    )
    return tuple(
        _CropJob(c.row, (c.box[0] * rx, c.box[1] * ry, c.box[2] * rx, c.box[3] * ry), c.target) for c in job.crops
    )


def _crop_one_image_lossless(job: _ImageJob, rule: CropRule, quality: int, redo: bool) -> list[_Outcome]:
    """:func:`_crop_one_image` under ``crops.lossless``: cut what the header allows, decode only for the rest.

    Crops smaller than ``max_size`` are the cut bytes as they are; larger ones are cut, decoded at the DCT scale that
    reaches the cap and encoded. The image is decoded whole only for the crops that fall back (see
    :data:`FALLBACK_PREFIX`), and when libjpeg-turbo rejects the file, so that a damaged image is reported as before.
    """
    out: list[_Outcome] = []
    try:
        header = read_header(job.source)
    except ImageLoadError as err:
        return [_Outcome(c.row, "failed", err.kind, str(err)) for c in job.crops]
    todo: list[tuple[_CropJob, CropWindow, tuple[int, int]]] = []
    existed: set[int] = set()
    for crop in _rescaled(job, header.full_size, out):
        try:
            window = plan_window(crop.box, header.full_size, rule, header.mcu)
        except CropError as err:
            out.append(_Outcome(crop.row, "failed", "degenerate_box", str(err)))
            continue
        size = output_size(window, rule.max_size)
        target = Path(crop.target)
        if target.exists():
            if not redo and crop_is_valid(target, size):
                out.append(_Outcome(crop.row, "skipped"))
                continue
            existed.add(crop.row)
        todo.append((crop, window, size))
    reason = header.fallback or ("library_missing" if turbojpeg() is None else "")
    cut = [t for t in todo if not reason and not t[1].padded]
    made = cut_jpeg(header.data, [cut_region(w) for _, w, _ in cut]) if cut else []
    if made is None:
        reason, cut, made = "rejected", [], []

    def save(crop: _CropJob, data: bytes, path: str) -> None:
        try:
            _save_crop(data, Path(crop.target))
        except OSError as err:
            out.append(_Outcome(crop.row, "failed", "crop_failed", f"{crop.target}: {err}"))
            return
        out.append(_Outcome(crop.row, "redone" if crop.row in existed else "written", path=path))

    for (crop, window, size), data in zip(cut, made, strict=True):
        save(
            crop,
            data if size == (window.width, window.height) else encode_crop(render_cut(data, size), quality),
            LOSSLESS,
        )
    rest = [t for t in todo if t not in cut]
    if not rest:
        return out
    planned = [(w, s) for _, w, s in rest]
    try:
        decoded = decode_image(Path(job.source), lambda _size: draft_reduction(planned), header.data)
    except ImageLoadError as err:
        done = {o.row for o in out}
        out.extend(_Outcome(c.row, "failed", err.kind, str(err)) for c in job.crops if c.row not in done)
        return out
    for crop, window, size in rest:
        try:
            data = encode_crop(render(decoded.pixels, window, size, decoded.scale), quality)
        except ValueError as err:
            out.append(_Outcome(crop.row, "failed", "crop_failed", f"{crop.target}: {err}"))
            continue
        save(crop, data, FALLBACK_PREFIX + (reason or "padded"))
    return out


def _crop_one_image(
    job: _ImageJob, strategy: str, max_size: int | None, quality: int, redo: bool = False
) -> list[_Outcome]:
    out: list[_Outcome] = []
    if job.recorded_size is not None and not redo:
        # Resume fast path: every crop already there with the size this box gives; the image is not opened.
        planned = _plan(job.crops, job.recorded_size, strategy, max_size, [])
        if len(planned) == len(job.crops) and all(crop_is_valid(Path(c.target), o) for c, _, o in planned):
            return [_Outcome(c.row, "skipped") for c in job.crops]

    todo: list[tuple[_CropJob, CropWindow, tuple[int, int]]] = []
    existed: set[int] = set()

    def choose(full_size: tuple[int, int]) -> int:
        crops = _rescaled(job, full_size, out)
        for crop, window, size in _plan(crops, full_size, strategy, max_size, out):
            target = Path(crop.target)
            if target.exists():
                if not redo and crop_is_valid(target, size):
                    out.append(_Outcome(crop.row, "skipped"))
                    continue
                existed.add(crop.row)
            todo.append((crop, window, size))
        return draft_reduction([(w, s) for _, w, s in todo]) if max_size is not None else 1

    try:
        decoded = decode_image(Path(job.source), choose)
    except ImageLoadError as err:
        done = {o.row for o in out}
        out.extend(_Outcome(c.row, "failed", err.kind, str(err)) for c in job.crops if c.row not in done)
        return out
    for crop, window, size in todo:
        try:
            _save_crop(encode_crop(render(decoded.pixels, window, size, decoded.scale), quality), Path(crop.target))
        except (OSError, ValueError) as err:
            out.append(_Outcome(crop.row, "failed", "crop_failed", f"{crop.target}: {err}"))
            continue
        out.append(_Outcome(crop.row, "redone" if crop.row in existed else "written"))
    return out


def _crop_images(
    jobs: Sequence[_ImageJob],
    strategy: str,
    max_size: int | None,
    quality: int,
    redo: bool = False,
    lossless: bool = False,
) -> list[_Outcome]:
    """Worker task: crop several images; one image's failure never stops the others."""
    outcomes: list[_Outcome] = []
    rule = CropRule(strategy, max_size, lossless)
    for job in jobs:
        if _stop_requested is not None and _stop_requested.value:
            break  # the images not started are left for the next run
        try:
            if lossless:
                outcomes.extend(_crop_one_image_lossless(job, rule, quality, redo))
            else:
                outcomes.extend(_crop_one_image(job, strategy, max_size, quality, redo))
        except Exception as err:  # a bug or an odd file must cost one image, not the run
            done = {o.row for o in outcomes}
            outcomes.extend(
                _Outcome(c.row, "failed", "crop_failed", f"{job.source}: {type(err).__name__}: {err}")
                for c in job.crops
                if c.row not in done
            )
    return outcomes


def _worker_init(max_image_pixels: int | None, stop: ctypes.c_bool) -> None:
    global _stop_requested
    # Children must refuse truncated files and enforce the parent's bomb limit whatever a library set before.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    # A terminal sends Ctrl-C to every process of the group. Only the main process acts on it, through ``stop``: a
    # worker that raised would die (breaking the pool) or hand its next task an interrupt instead of a result.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _stop_requested = stop


@contextlib.contextmanager
def _stop_on_interrupt() -> Iterator[ctypes.c_bool]:
    """Turn the first Ctrl-C into a stop request that every crop process sees; a second one interrupts at once."""
    global _stop_requested
    stop = multiprocessing.RawValue(ctypes.c_bool, False)

    def request_stop(signum: int, frame: object) -> None:
        stop.value = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    try:
        previous = signal.signal(signal.SIGINT, request_stop)
    except ValueError:  # not the main thread, where Python delivers signals: no Ctrl-C to handle here
        previous = None
    _stop_requested = stop
    try:
        yield stop
    finally:
        _stop_requested = None
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
    chunks: list[list[_ImageJob]],
    workers: int,
    params: tuple[str, int | None, int, bool, bool],
    record: Callable[[list[_Outcome]], None],
    progress: tqdm[Any],
    stop: ctypes.c_bool,
) -> list[list[_ImageJob]]:
    """Run ``chunks`` in a process pool; return the chunks lost to a dead worker (a broken pool).

    Chunks are submitted as results come back, so that a stop request leaves only the running ones to finish (each
    after its current image); the chunks never submitted are not lost, only left for the next run.
    """
    lost: list[list[_ImageJob]] = []
    pool_workers = max(1, min(workers, len(chunks)))
    with ProcessPoolExecutor(
        max_workers=pool_workers,
        mp_context=_pool_context(),
        initializer=_worker_init,
        initargs=(Image.MAX_IMAGE_PIXELS, stop),
    ) as pool:
        try:
            in_flight: dict[Future[list[_Outcome]], list[_ImageJob]] = {}
            position = 0
            while True:
                while position < len(chunks) and len(in_flight) < pool_workers * _IN_FLIGHT_PER_WORKER:
                    if stop.value:
                        break
                    try:
                        in_flight[pool.submit(_crop_images, chunks[position], *params)] = chunks[position]
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


def _chunks(jobs: list[_ImageJob], workers: int) -> list[list[_ImageJob]]:
    size = max(1, min(16, math.ceil(len(jobs) / (workers * 4))))
    return [jobs[i : i + size] for i in range(0, len(jobs), size)]


def _build_jobs(
    boxes: pd.DataFrame, images_dir: Path, crops_dir: Path
) -> tuple[list[_ImageJob], dict[int, tuple[str, str, str]]]:
    """Group boxes by image; returns the jobs and, per refused row, (kind, message, record)."""
    refused: dict[int, tuple[str, str, str]] = {}
    file_names = boxes["file_name"].to_numpy(dtype=object)
    crop_paths = boxes["crop_path"].to_numpy(dtype=object)
    coords = boxes[["x", "y", "w", "h"]].to_numpy(dtype=float)
    widths = boxes["width"].to_numpy(dtype=float, na_value=np.nan)
    heights = boxes["height"].to_numpy(dtype=float, na_value=np.nan)
    jobs: list[_ImageJob] = []
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
            crops.append(_CropJob(int(row), tuple(coords[row].tolist()), str(target)))  # type: ignore[arg-type]
        if not crops:
            continue
        w, h = widths[rows[0]], heights[rows[0]]
        recorded = (int(w), int(h)) if np.isfinite(w) and np.isfinite(h) else None
        jobs.append(_ImageJob(str(source), str(file_name), recorded, tuple(crops)))
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

    def record(outcomes: list[_Outcome]) -> None:
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
                    record(_crop_images(chunk, strategy, max_size, quality, redo, lossless))
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
                                _Outcome(c.row, "failed", "worker_crashed", f"{job.source}: the crop worker died on it")
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
