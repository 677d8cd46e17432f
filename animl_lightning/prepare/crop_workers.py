"""The crop work of one image, as the crops stage's worker processes (or the stage itself, with one worker) do it.

Each image is decoded once for all its boxes (or, with ``crops.lossless``, its JPEG data cut without decoding where
the file allows it); each crop is written atomically; whatever goes wrong costs that image's crops only, reported as
:class:`Outcome` values that :func:`animl_lightning.prepare.crop_stage.make_crops` counts.
"""

from __future__ import annotations

import ctypes
import os
import signal
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile

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
from animl_lightning.core.files import TMP_MARKER
from animl_lightning.core.imaging import ImageLoadError, cut_jpeg, decode_image, read_header, turbojpeg

# Report counts of the crops written by each path when crops.lossless is on: cut losslessly, or decoded and encoded
# again with the reason (FALLBACK_PREFIX + progressive, colour_mode, not_jpeg, rotated, sampling, padded,
# library_missing, rejected).
LOSSLESS = "lossless"
FALLBACK_PREFIX = "lossless_fallback_"

# The stop request of the running crop stage, in every process: a byte in shared memory, so that the Ctrl-C handler
# only stores a value (taking a lock in a signal handler can deadlock) and a worker reads it between images.
_stop_requested: ctypes.c_bool | None = None


def set_stop_request(stop: ctypes.c_bool | None) -> None:
    """Make ``stop`` the stop request that :func:`crop_images` reads in this process (None: no stage is running)."""
    global _stop_requested
    _stop_requested = stop


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
class CropJob:
    row: int
    box: Box
    target: str


@dataclass(frozen=True)
class ImageJob:
    source: str
    file_name: str
    recorded_size: tuple[int, int] | None
    crops: tuple[CropJob, ...]


@dataclass(frozen=True)
class Outcome:
    """What happened to one crop (``row`` >= 0) or to a whole image (``row`` == -1)."""

    row: int
    status: str  # written, redone, skipped, failed, note
    kind: str = ""
    message: str = ""
    file: str = ""
    path: str = ""  # with crops.lossless, how a written crop was made: LOSSLESS or FALLBACK_PREFIX + reason


def _plan(
    crops: Sequence[CropJob], size: tuple[int, int], strategy: str, max_size: int | None, out: list[Outcome]
) -> list[tuple[CropJob, CropWindow, tuple[int, int]]]:
    planned = []
    for job in crops:
        try:
            window = crop_window(job.box, size, strategy)
        except CropError as err:
            out.append(Outcome(job.row, "failed", "degenerate_box", str(err)))
            continue
        planned.append((job, window, output_size(window, max_size)))
    return planned


def _rescaled(job: ImageJob, full_size: tuple[int, int], out: list[Outcome]) -> tuple[CropJob, ...]:
    """The job's boxes in pixels of the image as displayed, noting a size the CCT file got wrong."""
    if job.recorded_size is None or job.recorded_size == full_size:
        return job.crops
    rx, ry = full_size[0] / job.recorded_size[0], full_size[1] / job.recorded_size[1]
    out.append(
        Outcome(
            -1,
            "note",
            "image_size_mismatch",
            f"the CCT file gives {job.recorded_size[0]}x{job.recorded_size[1]} but the image is "
            f"{full_size[0]}x{full_size[1]} as displayed; boxes are rescaled to it",
            job.source,
        )
    )
    return tuple(
        CropJob(c.row, (c.box[0] * rx, c.box[1] * ry, c.box[2] * rx, c.box[3] * ry), c.target) for c in job.crops
    )


def _queue_unless_done(
    crop: CropJob,
    window: CropWindow,
    size: tuple[int, int],
    redo: bool,
    todo: list[tuple[CropJob, CropWindow, tuple[int, int]]],
    existed: set[int],
    out: list[Outcome],
) -> None:
    """Queue ``crop`` unless a valid crop of ``size`` is already there (kept unless ``redo``); one that is there but
    is replaced is remembered in ``existed``, so its outcome says ``redone``."""
    target = Path(crop.target)
    if target.exists():
        if not redo and crop_is_valid(target, size):
            out.append(Outcome(crop.row, "skipped"))
            return
        existed.add(crop.row)
    todo.append((crop, window, size))


def _fail_the_rest(job: ImageJob, out: list[Outcome], err: ImageLoadError) -> None:
    """Every crop of ``job`` without an outcome yet fails with the image's error."""
    done = {o.row for o in out}
    out.extend(Outcome(c.row, "failed", err.kind, str(err)) for c in job.crops if c.row not in done)


def crop_one_image_lossless(job: ImageJob, rule: CropRule, quality: int, redo: bool) -> list[Outcome]:
    """:func:`crop_one_image` under ``crops.lossless``: cut what the header allows, decode only for the rest.

    Crops smaller than ``max_size`` are the cut bytes as they are; larger ones are cut, decoded at the DCT scale that
    reaches the cap and encoded. The image is decoded whole only for the crops that fall back (see
    :data:`FALLBACK_PREFIX`), and when libjpeg-turbo rejects the file, so that a damaged image is reported as before.
    """
    out: list[Outcome] = []
    try:
        header = read_header(job.source)
    except ImageLoadError as err:
        return [Outcome(c.row, "failed", err.kind, str(err)) for c in job.crops]
    todo: list[tuple[CropJob, CropWindow, tuple[int, int]]] = []
    existed: set[int] = set()
    for crop in _rescaled(job, header.full_size, out):
        try:
            window = plan_window(crop.box, header.full_size, rule, header.mcu)
        except CropError as err:
            out.append(Outcome(crop.row, "failed", "degenerate_box", str(err)))
            continue
        _queue_unless_done(crop, window, output_size(window, rule.max_size), redo, todo, existed, out)
    reason = header.fallback or ("library_missing" if turbojpeg() is None else "")
    cut = [t for t in todo if not reason and not t[1].padded]
    made = cut_jpeg(header.data, [cut_region(w) for _, w, _ in cut]) if cut else []
    if made is None:
        reason, cut, made = "rejected", [], []

    def save(crop: CropJob, data: bytes, path: str) -> None:
        try:
            _save_crop(data, Path(crop.target))
        except OSError as err:
            out.append(Outcome(crop.row, "failed", "crop_failed", f"{crop.target}: {err}"))
            return
        out.append(Outcome(crop.row, "redone" if crop.row in existed else "written", path=path))

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
        _fail_the_rest(job, out, err)
        return out
    for crop, window, size in rest:
        try:
            data = encode_crop(render(decoded.pixels, window, size, decoded.scale), quality)
        except ValueError as err:
            out.append(Outcome(crop.row, "failed", "crop_failed", f"{crop.target}: {err}"))
            continue
        save(crop, data, FALLBACK_PREFIX + (reason or "padded"))
    return out


def crop_one_image(
    job: ImageJob, strategy: str, max_size: int | None, quality: int, redo: bool = False
) -> list[Outcome]:
    out: list[Outcome] = []
    if job.recorded_size is not None and not redo:
        # Resume fast path: every crop already there with the size this box gives; the image is not opened.
        planned = _plan(job.crops, job.recorded_size, strategy, max_size, [])
        if len(planned) == len(job.crops) and all(crop_is_valid(Path(c.target), o) for c, _, o in planned):
            return [Outcome(c.row, "skipped") for c in job.crops]

    todo: list[tuple[CropJob, CropWindow, tuple[int, int]]] = []
    existed: set[int] = set()

    def choose(full_size: tuple[int, int]) -> int:
        crops = _rescaled(job, full_size, out)
        for crop, window, size in _plan(crops, full_size, strategy, max_size, out):
            _queue_unless_done(crop, window, size, redo, todo, existed, out)
        return draft_reduction([(w, s) for _, w, s in todo]) if max_size is not None else 1

    try:
        decoded = decode_image(Path(job.source), choose)
    except ImageLoadError as err:
        _fail_the_rest(job, out, err)
        return out
    for crop, window, size in todo:
        try:
            _save_crop(encode_crop(render(decoded.pixels, window, size, decoded.scale), quality), Path(crop.target))
        except (OSError, ValueError) as err:
            out.append(Outcome(crop.row, "failed", "crop_failed", f"{crop.target}: {err}"))
            continue
        out.append(Outcome(crop.row, "redone" if crop.row in existed else "written"))
    return out


def crop_images(
    jobs: Sequence[ImageJob],
    strategy: str,
    max_size: int | None,
    quality: int,
    redo: bool = False,
    lossless: bool = False,
) -> list[Outcome]:
    """Worker task: crop several images; one image's failure never stops the others."""
    outcomes: list[Outcome] = []
    rule = CropRule(strategy, max_size, lossless)
    for job in jobs:
        if _stop_requested is not None and _stop_requested.value:
            break  # the images not started are left for the next run
        try:
            if lossless:
                outcomes.extend(crop_one_image_lossless(job, rule, quality, redo))
            else:
                outcomes.extend(crop_one_image(job, strategy, max_size, quality, redo))
        except Exception as err:  # a bug or an odd file must cost one image, not the run
            done = {o.row for o in outcomes}
            outcomes.extend(
                Outcome(c.row, "failed", "crop_failed", f"{job.source}: {type(err).__name__}: {err}")
                for c in job.crops
                if c.row not in done
            )
    return outcomes


def worker_init(max_image_pixels: int | None, stop: ctypes.c_bool) -> None:
    global _stop_requested
    # Children must refuse truncated files and enforce the parent's bomb limit whatever a library set before.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    # A terminal sends Ctrl-C to every process of the group. Only the main process acts on it, through ``stop``: a
    # worker that raised would die (breaking the pool) or hand its next task an interrupt instead of a result.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _stop_requested = stop
