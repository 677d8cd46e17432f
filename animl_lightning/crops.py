"""Crop geometry, image decoding and the crops stage.

Geometry is pure (:func:`crop_window`, :func:`output_size`): a box in displayed-image pixels becomes the integer
rectangle to cut, the canvas it is placed on (black padding around it) and the saved size.

Strategies (``crops.strategy``):

``square``
    A square of side ``max(w, h)`` centred on the box. At an image edge the square is shifted inward, the same way on
    all four edges (the old rule shifted at the left/top edge only and let the square spill past the right/bottom:
    pipeline.md 2.6). Only when the side exceeds the image's width (height) is the whole width (height) taken and the
    crop padded with black, centred.
``pad``
    The exact box, padded with black (centred) to a square of side ``max(w, h)``.
``exact``
    The exact box.

``crops.max_size`` caps the longer saved side; crops are never enlarged. When it is set, JPEGs are decoded with
libjpeg's DCT scaling at 1/2, 1/4 or 1/8 scale whenever every crop of the image still gets at least its saved size at
that scale; shrinking is done by OpenCV when installed (2x area-average halvings, then bilinear for the last
factor below 2), otherwise by PIL's box (area-average) filter, by whole factors with ``Image.reduce`` first.

Decoding: baseline RGB and grayscale JPEGs (most camera-trap images) are decoded by libjpeg-turbo through
``simplejpeg`` straight into a numpy array, with the same accurate IDCT and upsampling as PIL (the same pixels,
about 15% less CPU, and no repacking into a PIL image); crops are views of that array and are encoded once by
libjpeg-turbo. Everything else (PNG, progressive or CMYK JPEGs, 16-bit, palette, odd files) and any JPEG that
libjpeg-turbo flags as damaged is decoded by PIL, which decides as before whether to accept it.

Images are decoded with their EXIF orientation applied (boxes from Animl are in displayed coordinates; on the fast
path the orientation is a numpy view, and only crops are ever copied) and every crop is converted to RGB: grayscale,
CMYK, palette and 16-bit images are converted (16-bit by keeping the high byte), transparent pixels are composited on
black (the colour of the padding). Truncated files, non-images, missing files and images over PIL's
decompression-bomb limit are refused with :class:`ImageLoadError`, never cropped half-grey.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import multiprocessing
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import simplejpeg
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from animl_lightning.files import TMP_MARKER, UnsafePathError, remove_stale_temporaries, safe_join
from animl_lightning.prepare_config import CROP_STRATEGIES, CropSettings
from animl_lightning.report import PrepareReport

log = logging.getLogger(__name__)

STAGE = "crops"
Box = tuple[float, float, float, float]
# Modes PIL resamples directly; anything else is converted to RGB before resizing.
_RESAMPLABLE_MODES = frozenset({"RGB", "RGBA", "L", "LA", "CMYK"})
_DRAFT_SCALES = (8, 4, 2)
# Area averaging: a proper anti-aliasing filter for shrinking, and the cheapest one PIL has (resizing is single-threaded
# and costs a sizeable fraction of a decode, so it matters for max_size crops).
_DOWNSCALE = Image.Resampling.BOX
# Shrink by whole factors with Image.reduce (a fast box average, the same filter) before the fractional resize.
_REDUCING_GAP = 1.0
_ORIENTATION_TAG = 0x0112
# PIL modes of the JPEGs libjpeg-turbo decodes straight to RGB here (YCbCr/RGB and grayscale).
_FAST_JPEG_MODES = frozenset({"RGB", "L"})
_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"


class ImageLoadError(ValueError):
    """An image cannot be used; ``kind`` is the report kind (``missing_image``, ``truncated_image``, ...)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# --- geometry (pure) -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CropWindow:
    """Where a crop comes from and how it is laid out, in pixels of the displayed full-resolution image.

    Attributes:
        left, top, right, bottom: the rectangle cut from the image; always inside the image.
        canvas_width, canvas_height: the crop's size before ``max_size`` (the square's side for square/pad).
        offset_x, offset_y: where the cut rectangle sits on the canvas; the rest of the canvas is black padding.
    """

    left: int
    top: int
    right: int
    bottom: int
    canvas_width: int
    canvas_height: int
    offset_x: int
    offset_y: int

    @property
    def width(self) -> int:
        """Width of the cut rectangle."""
        return self.right - self.left

    @property
    def height(self) -> int:
        """Height of the cut rectangle."""
        return self.bottom - self.top

    @property
    def padded(self) -> bool:
        """Whether the canvas is larger than the cut rectangle."""
        return (self.width, self.height) != (self.canvas_width, self.canvas_height)


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def _square_span(start: int, end: int, side: int, limit: int) -> tuple[int, int]:
    """Start and length of a ``side``-long span containing [start, end), centred, shifted inside [0, limit)."""
    if side >= limit:
        return 0, limit
    first = start - (side - (end - start)) // 2
    return min(max(first, 0), limit - side), side


def crop_window(box: Box, image_size: tuple[int, int], strategy: str) -> CropWindow:
    """The crop of ``box`` (``[x, y, w, h]`` in pixels) in an image of ``image_size`` (width, height).

    Box edges are rounded to the nearest pixel and clipped to the image.

    Raises:
        ValueError: unknown strategy, non-finite box, empty image, or a box narrower or lower than one pixel once
            rounded and clipped (the crop stage reports it as a skipped box).
    """
    if strategy not in CROP_STRATEGIES:
        raise ValueError(f"crop strategy must be one of {list(CROP_STRATEGIES)}, got {strategy!r}")
    width, height = image_size
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    x, y, w, h = box
    if not all(math.isfinite(v) for v in box):
        raise ValueError(f"box {list(box)} has non-finite values")
    x0 = min(max(_round_half_up(x), 0), width)
    y0 = min(max(_round_half_up(y), 0), height)
    x1 = min(max(_round_half_up(x + w), 0), width)
    y1 = min(max(_round_half_up(y + h), 0), height)
    box_w, box_h = x1 - x0, y1 - y0
    if box_w < 1 or box_h < 1:
        raise ValueError(f"box {list(box)} is smaller than one pixel inside the {width}x{height} image")
    if strategy == "exact":
        return CropWindow(x0, y0, x1, y1, box_w, box_h, 0, 0)
    side = max(box_w, box_h)
    if strategy == "pad":
        return CropWindow(x0, y0, x1, y1, side, side, (side - box_w) // 2, (side - box_h) // 2)
    left, cut_w = _square_span(x0, x1, side, width)
    top, cut_h = _square_span(y0, y1, side, height)
    return CropWindow(left, top, left + cut_w, top + cut_h, side, side, (side - cut_w) // 2, (side - cut_h) // 2)


def output_size(window: CropWindow, max_size: int | None) -> tuple[int, int]:
    """The saved size of a crop: its canvas, scaled down (never up) so the longer side is at most ``max_size``."""
    width, height = window.canvas_width, window.canvas_height
    longest = max(width, height)
    if max_size is None or longest <= max_size:
        return width, height
    factor = max_size / longest
    return max(1, _round_half_up(width * factor)), max(1, _round_half_up(height * factor))


def draft_reduction(crops: Sequence[tuple[CropWindow, tuple[int, int]]]) -> int:
    """The largest JPEG DCT scale divisor (1, 2, 4 or 8) at which every crop keeps at least its saved size."""
    if not crops:
        return 1
    # A crop's cut rectangle is scaled by out/canvas; decoding at 1/k keeps enough pixels while k <= canvas/out.
    slack = min(min(w.canvas_width / out[0], w.canvas_height / out[1]) for w, out in crops)
    for scale in _DRAFT_SCALES:
        if scale <= slack:
            return scale
    return 1


# --- pixels ----------------------------------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    16-bit and 32-bit integer images (``I;16*``, ``I``) keep their high byte (they are treated as 16-bit data);
    ``F`` is clipped to 0-255; transparency (``RGBA``, ``LA``, ``PA``, palette with a transparent colour) is
    composited on black, the colour of the crop padding.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in {"I", "F"}:
        array = np.asarray(image)
        if mode == "F":
            eight = np.clip(array, 0, 255).astype(np.uint8)
        else:
            eight = np.clip(array.astype(np.int64) >> 8, 0, 255).astype(np.uint8)
        return Image.fromarray(eight, mode="L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    elif mode in {"LA", "PA", "La", "RGBa"}:
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (0, 0, 0))
        background.paste(image.convert("RGB"), mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


@dataclass(frozen=True)
class _Layout:
    """Where the resampled cut goes on the saved canvas (``out_size``)."""

    cut: tuple[int, int]
    offset: tuple[int, int]


def _layout(window: CropWindow, out_size: tuple[int, int]) -> _Layout:
    out_w, out_h = out_size
    fx, fy = out_w / window.canvas_width, out_h / window.canvas_height
    cut_w = min(out_w, max(1, _round_half_up(window.width * fx)))
    cut_h = min(out_h, max(1, _round_half_up(window.height * fy)))
    offset_x = min(_round_half_up(window.offset_x * fx), out_w - cut_w)
    offset_y = min(_round_half_up(window.offset_y * fy), out_h - cut_h)
    return _Layout((cut_w, cut_h), (offset_x, offset_y))


def _source_rect(window: CropWindow, scale: tuple[float, float], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """``window``'s cut rectangle in pixels of an image decoded at ``scale`` (``size``), rounded to whole pixels.

    OpenCV resizes whole-pixel rectangles only; at a DCT scale of 1/k the edge moves by at most half a decoded pixel.
    """
    sx, sy = scale
    width, height = size
    left = min(max(_round_half_up(window.left * sx), 0), width - 1)
    top = min(max(_round_half_up(window.top * sy), 0), height - 1)
    right = min(max(_round_half_up(window.right * sx), left + 1), width)
    bottom = min(max(_round_half_up(window.bottom * sy), top + 1), height)
    return left, top, right, bottom


def _shrink(cv2: Any, pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``pixels`` (``(h, w, 4)`` uint8) resized to ``size`` (width, height) with OpenCV.

    Halvings with ``INTER_AREA`` (a 2x2 box average, SIMD in OpenCV) while both sides stay at least twice the target,
    then one ``INTER_LINEAR`` step for the remaining ratio below 2 (where it is close to a box filter). OpenCV's
    ``INTER_AREA`` at other ratios is scalar code, slower than PIL's box filter, hence the split.
    """
    if pixels.strides[0] <= 0 or pixels.strides[1:] != (4, 1):
        pixels = np.ascontiguousarray(pixels)  # a crop of an EXIF-rotated view
    out_w, out_h = size
    height, width = pixels.shape[:2]
    while width >= 2 * out_w and height >= 2 * out_h:
        width, height = width // 2, height // 2
        pixels = cv2.resize(pixels[: 2 * height, : 2 * width], (width, height), interpolation=cv2.INTER_AREA)
    if (width, height) == size:
        return pixels
    # One side may still be over twice its target (a very elongated cut): area-average it, as linear would alias.
    flag = cv2.INTER_AREA if width >= 2 * out_w or height >= 2 * out_h else cv2.INTER_LINEAR
    resized: np.ndarray = cv2.resize(pixels, size, interpolation=flag)
    return resized


@functools.cache
def _opencv() -> Any:
    """OpenCV, single-threaded (crops are already made in parallel processes), or None when it is not installed."""
    try:
        # Optional and heavy: imported on first resize, in the process that resizes (after any fork).
        import cv2
    except ImportError:
        return None
    cv2.setNumThreads(1)
    return cv2


def _render(
    image: Image.Image,
    window: CropWindow,
    out_size: tuple[int, int],
    scale: tuple[float, float] = (1.0, 1.0),
) -> Image.Image:
    """Cut ``window`` (full-resolution coordinates) from ``image`` decoded at ``scale`` and lay it out at
    ``out_size``.

    Resampling is the same as in the crops stage's :func:`_render_pixels` (the same call on the same source
    rectangle), so a crop made here from :func:`load_image` has the pixels the stage saved before JPEG encoding.
    """
    layout = _layout(window, out_size)
    sx, sy = scale
    source = (window.left * sx, window.top * sy, window.right * sx, window.bottom * sy)
    cv2 = _opencv()
    if layout.cut == (window.width, window.height) and scale == (1.0, 1.0):
        cut = to_rgb(image.crop((window.left, window.top, window.right, window.bottom)))
    elif cv2 is not None:
        rgbx = np.asarray(to_rgb(image.crop(_source_rect(window, scale, image.size))).convert("RGBX"))
        cut = Image.fromarray(np.ascontiguousarray(_shrink(cv2, rgbx, layout.cut)[..., :3]))
    elif image.mode in _RESAMPLABLE_MODES:
        cut = to_rgb(image.resize(layout.cut, _DOWNSCALE, box=source, reducing_gap=_REDUCING_GAP))
    else:
        left, top, right, bottom = (_round_half_up(v) for v in source)
        cut = to_rgb(image.crop((left, top, right, bottom))).resize(layout.cut, _DOWNSCALE, reducing_gap=_REDUCING_GAP)
    if layout.cut == out_size:
        return cut
    canvas = Image.new("RGB", out_size, (0, 0, 0))
    canvas.paste(cut, layout.offset)
    return canvas


def crop_image(image: Image.Image, box: Box, strategy: str, max_size: int | None) -> Image.Image:
    """Crop ``box`` (``[x, y, w, h]`` pixels of ``image`` as displayed) with ``strategy``; RGB, saved side capped.

    ``image`` must already be in displayed orientation (see :func:`load_image`). Used by classification at
    inference on :func:`load_image`'s output; the crops stage cuts the same pixels from the decoded array
    (:func:`_render_pixels`), so that training and inference crops are made the same way.

    Raises:
        ValueError: see :func:`crop_window`.
    """
    window = crop_window(box, image.size, strategy)
    return _render(image, window, output_size(window, max_size))


def _pil_view(pixels: np.ndarray) -> Image.Image:
    """A PIL ``RGBX`` image sharing the memory of a C-contiguous ``(h, w, 4)`` uint8 array (no copy)."""
    height, width = pixels.shape[:2]
    return Image.frombuffer("RGBX", (width, height), pixels, "raw", "RGBX", 0, 1)


class _Source:
    """Decoded ``RGBX`` pixels (displayed orientation) and, made on first use, a PIL view of them for resampling."""

    def __init__(self, pixels: np.ndarray) -> None:
        self.pixels = pixels
        self._image: Image.Image | None = None

    def image(self) -> Image.Image:
        if self._image is None:
            # An EXIF-rotated image is a strided view: it is made contiguous once, and only if a crop needs
            # resampling. (Resampling a copy of just the crop would save that copy but not give PIL's exact pixels:
            # box-filter ties at half-pixel edges round differently once the source rectangle is shifted.)
            self.pixels = np.ascontiguousarray(self.pixels)
            self._image = _pil_view(self.pixels)
        return self._image


def _render_pixels(
    source: _Source, window: CropWindow, out_size: tuple[int, int], scale: tuple[float, float] = (1.0, 1.0)
) -> np.ndarray:
    """:func:`_render` on decoded ``RGBX`` pixels (displayed orientation, at ``scale``); returns ``(h, w, 4)``.

    A crop kept at its size is a view of the pixels (no copy); a resampled one is the same PIL call as in
    :func:`_render` on the same source rectangle, so both give identical pixels.
    """
    layout = _layout(window, out_size)
    if layout.cut == (window.width, window.height) and scale == (1.0, 1.0):
        cut = source.pixels[window.top : window.bottom, window.left : window.right]
    elif (cv2 := _opencv()) is not None:
        height, width = source.pixels.shape[:2]
        left, top, right, bottom = _source_rect(window, scale, (width, height))
        cut = _shrink(cv2, source.pixels[top:bottom, left:right], layout.cut)
    else:
        sx, sy = scale
        box = (window.left * sx, window.top * sy, window.right * sx, window.bottom * sy)
        cut = np.asarray(source.image().resize(layout.cut, _DOWNSCALE, box=box, reducing_gap=_REDUCING_GAP))
    if layout.cut == out_size:
        return cut
    out_w, out_h = out_size
    canvas = np.zeros((out_h, out_w, 4), dtype=np.uint8)
    (cut_w, cut_h), (offset_x, offset_y) = layout.cut, layout.offset
    canvas[offset_y : offset_y + cut_h, offset_x : offset_x + cut_w] = cut
    return canvas


# --- decoding --------------------------------------------------------------------------------------------------


def _open(source: Path | io.BytesIO, path: Path) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(source)
    except FileNotFoundError as err:
        raise ImageLoadError("missing_image", f"{path}: file not found") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageLoadError("decompression_bomb", f"{path}: {err}") from err
    except UnidentifiedImageError as err:
        raise ImageLoadError("not_an_image", f"{path}: not a readable image file") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError("unreadable_image", f"{path}: {err}") from err


@contextmanager
def _opened(path: Path) -> Iterator[Image.Image]:
    """Header-only access: the image (and its file) is closed on exit."""
    image = _open(path, path)
    try:
        yield image
    finally:
        image.close()


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block must not lose the image: PIL raises many types here
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _displayed(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def image_display_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image as displayed (after EXIF orientation), read from its header only.

    Raises:
        ImageLoadError: missing, not an image, or over the decompression-bomb limit.
    """
    with _opened(path) as image:
        return _displayed(image.size, _orientation(image))


def orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """``pixels`` (rows, columns, ...) as displayed under EXIF ``orientation`` (1-8): a view, nothing is copied.

    The same transforms as :func:`PIL.ImageOps.exif_transpose`.
    """
    if orientation == 2:
        return pixels[:, ::-1]
    if orientation == 3:
        return pixels[::-1, ::-1]
    if orientation == 4:
        return pixels[::-1]
    if orientation == 5:
        return pixels.swapaxes(0, 1)
    if orientation == 6:
        return pixels[::-1].swapaxes(0, 1)
    if orientation == 7:
        return pixels[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:
        return pixels[:, ::-1].swapaxes(0, 1)
    return pixels


@dataclass(frozen=True)
class DecodedImage:
    """An image decoded in displayed orientation, possibly at reduced (DCT-scaled) size.

    Attributes:
        pixels: ``(height, width, 4)`` uint8 ``RGBX`` (the fourth byte is padding, PIL's own layout for RGB), in
            displayed orientation; for an EXIF-rotated image a strided view of the decoded array.
        full_size: displayed (width, height) at full resolution.
        decoder: ``"simplejpeg"`` (libjpeg-turbo straight into the array) or ``"pil"`` (everything else).
    """

    pixels: np.ndarray
    full_size: tuple[int, int]
    decoder: str = "pil"

    @property
    def size(self) -> tuple[int, int]:
        """Decoded (width, height)."""
        return self.pixels.shape[1], self.pixels.shape[0]

    @property
    def scale(self) -> tuple[float, float]:
        """Decoded size over full size, per axis."""
        return self.size[0] / self.full_size[0], self.size[1] / self.full_size[1]

    @property
    def image(self) -> Image.Image:
        """The pixels as a new PIL RGB image."""
        return _pil_view(np.ascontiguousarray(self.pixels)).convert("RGB")


def _fast_decodable(image: Image.Image) -> bool:
    """Whether libjpeg-turbo (simplejpeg) decodes this file to the same RGB pixels PIL would, straight to an array.

    Baseline (and extended) RGB/YCbCr and grayscale JPEGs, most camera-trap images. Progressive, CMYK/YCCK and
    multi-picture (MPO) files take PIL's path, which handles them and every other format.
    """
    return (
        image.format == "JPEG"
        and image.mode in _FAST_JPEG_MODES
        and not image.info.get("progressive")
        and not image.info.get("progression")
    )


def _decode_fast(data: bytes, raw_size: tuple[int, int], divisor: int) -> np.ndarray | None:
    """Decode JPEG ``data`` at 1/``divisor`` scale to ``RGBX``; None when libjpeg-turbo flags any problem.

    ``strict`` turns libjpeg's recoverable warnings (premature end of data, corrupt entropy data) into errors;
    the caller then lets PIL decide, so a truncated file is still refused and a file with a harmless glitch is
    still accepted exactly as before. Accurate IDCT and fancy upsampling (simplejpeg's defaults, and PIL's) keep the
    pixels identical to PIL's decode.
    """
    raw_w, raw_h = raw_size
    want_w, want_h = -(-raw_w // divisor), -(-raw_h // divisor)
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGBX", min_width=want_w, min_height=want_h, strict=True)
    except ValueError:
        return None
    decoded: np.ndarray = pixels
    # libjpeg scales by M/8; the divisor must be honoured exactly, as PIL's draft would (tiny images may differ).
    return decoded if decoded.shape[:2] == (want_h, want_w) else None


def _decode_pil(image: Image.Image, path: Path, divisor: int, orientation: int) -> np.ndarray:
    if divisor > 1 and image.format == "JPEG":
        raw_w, raw_h = image.size
        # PIL picks the largest power of two <= min(raw // requested); floor(raw / divisor) makes that the divisor.
        image.draft(image.mode, (max(1, raw_w // divisor), max(1, raw_h // divisor)))
    try:
        image.load()
    except OSError as err:
        kind = "truncated_image" if "truncated" in str(err) else "corrupt_image"
        raise ImageLoadError(kind, f"{path}: {err}") from err
    except (SyntaxError, ValueError, EOFError) as err:
        raise ImageLoadError("corrupt_image", f"{path}: {err}") from err
    if orientation != 1:
        ImageOps.exif_transpose(image, in_place=True)
    return np.asarray(to_rgb(image).convert("RGBX"))


def decode_image(path: Path, reduction: Callable[[tuple[int, int]], int] | None = None) -> DecodedImage:
    """Decode ``path`` with its EXIF orientation applied.

    Baseline JPEGs are decoded by libjpeg-turbo through simplejpeg straight into a numpy array (the same pixels as
    PIL, without PIL's per-pixel repacking); everything else, and any JPEG libjpeg-turbo flags as damaged, by PIL.

    Args:
        path: the image file.
        reduction: given the displayed full size, returns the JPEG DCT-scaling divisor to decode at (1, 2, 4 or 8);
            only JPEGs honour it. Scaling happens before the orientation is applied, which is fine because the
            divisor is the same on both axes.

    Raises:
        ImageLoadError: missing, not an image, truncated or corrupt, or over the decompression-bomb limit.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise ImageLoadError("missing_image", f"{path}: file not found") from err
    except OSError as err:
        raise ImageLoadError("unreadable_image", f"{path}: {err}") from err
    image = _open(io.BytesIO(data), path)
    try:
        orientation = _orientation(image)
        full_size = _displayed(image.size, orientation)
        divisor = reduction(full_size) if reduction is not None else 1
        if _fast_decodable(image):
            fast = _decode_fast(data, image.size, divisor)
            if fast is not None:
                return DecodedImage(orient(fast, orientation), full_size, "simplejpeg")
        pixels = _decode_pil(image, path, divisor, orientation)
    finally:
        image.close()
    return DecodedImage(pixels, full_size, "pil")


def load_image(path: Path) -> Image.Image:
    """Decode ``path`` at full resolution, EXIF orientation applied, as RGB.

    Raises:
        ImageLoadError: see :func:`decode_image`.
    """
    return decode_image(path).image


# --- crop files ------------------------------------------------------------------------------------------------


def crop_is_valid(path: Path, size: tuple[int, int] | None = None) -> bool:
    """Cheap check that an existing crop is a complete JPEG (start and end markers, readable header) of ``size``.

    A crop is written through a temporary file and a rename, so a file that exists is complete unless it was damaged
    afterwards; the end-of-image marker catches truncation, the header check a different strategy or ``max_size``.
    """
    try:
        with path.open("rb") as handle:
            head = handle.read(2)
            handle.seek(-2, os.SEEK_END)
            tail = handle.read(2)
        if head != _JPEG_SOI or tail != _JPEG_EOI:
            return False
        with Image.open(path) as image:
            return image.format == "JPEG" and (size is None or image.size == size)
    except (OSError, SyntaxError, ValueError):
        return False


def encode_crop(pixels: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of an ``RGBX`` crop: libjpeg-turbo, 4:2:0 chroma subsampling and accurate DCT like PIL's default."""
    if pixels.strides[0] <= 0 or pixels.strides[1:] != (4, 1):
        pixels = np.ascontiguousarray(pixels)  # libjpeg reads whole rows: a crop of an EXIF-rotated view is copied
    data: bytes = simplejpeg.encode_jpeg(pixels, quality, colorspace="RGBX", colorsubsampling="420")
    return data


def _save_crop(data: bytes, path: Path) -> None:
    """Write crop JPEG bytes through a temporary sibling and a rename.

    Unlike :func:`animl_lightning.files.atomic_write` this does not fsync: a crash (even kill -9) still leaves either
    no file or the whole file, and after a power loss a damaged crop fails :func:`crop_is_valid` on the next run and
    is redone. An fsync per crop would cost more than encoding it.
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


# --- the crops stage -------------------------------------------------------------------------------------------


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


def _plan(
    crops: Sequence[_CropJob], size: tuple[int, int], strategy: str, max_size: int | None, out: list[_Outcome]
) -> list[tuple[_CropJob, CropWindow, tuple[int, int]]]:
    planned = []
    for job in crops:
        try:
            window = crop_window(job.box, size, strategy)
        except ValueError as err:
            out.append(_Outcome(job.row, "failed", "degenerate_box", str(err)))
            continue
        planned.append((job, window, output_size(window, max_size)))
    return planned


def _crop_one_image(job: _ImageJob, strategy: str, max_size: int | None, quality: int) -> list[_Outcome]:
    out: list[_Outcome] = []
    if job.recorded_size is not None:
        # Resume fast path: every crop already there with the size this box gives; the image is not opened.
        planned = _plan(job.crops, job.recorded_size, strategy, max_size, [])
        if len(planned) == len(job.crops) and all(crop_is_valid(Path(c.target), o) for c, _, o in planned):
            return [_Outcome(c.row, "skipped") for c in job.crops]

    todo: list[tuple[_CropJob, CropWindow, tuple[int, int]]] = []
    existed: set[int] = set()

    def choose(full_size: tuple[int, int]) -> int:
        crops = job.crops
        if job.recorded_size is not None and job.recorded_size != full_size:
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
            crops = tuple(
                _CropJob(c.row, (c.box[0] * rx, c.box[1] * ry, c.box[2] * rx, c.box[3] * ry), c.target) for c in crops
            )
        for crop, window, size in _plan(crops, full_size, strategy, max_size, out):
            target = Path(crop.target)
            if target.exists():
                if crop_is_valid(target, size):
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
    source = _Source(decoded.pixels)
    for crop, window, size in todo:
        try:
            _save_crop(encode_crop(_render_pixels(source, window, size, decoded.scale), quality), Path(crop.target))
        except (OSError, ValueError) as err:
            out.append(_Outcome(crop.row, "failed", "crop_failed", f"{crop.target}: {err}"))
            continue
        out.append(_Outcome(crop.row, "redone" if crop.row in existed else "written"))
    return out


def _crop_images(jobs: Sequence[_ImageJob], strategy: str, max_size: int | None, quality: int) -> list[_Outcome]:
    """Worker task: crop several images; one image's failure never stops the others."""
    outcomes: list[_Outcome] = []
    for job in jobs:
        try:
            outcomes.extend(_crop_one_image(job, strategy, max_size, quality))
        except Exception as err:  # a bug or an odd file must cost one image, not the run
            done = {o.row for o in outcomes}
            outcomes.extend(
                _Outcome(c.row, "failed", "crop_failed", f"{job.source}: {type(err).__name__}: {err}")
                for c in job.crops
                if c.row not in done
            )
    return outcomes


def _worker_init(max_image_pixels: int | None) -> None:
    # Children must refuse truncated files and enforce the parent's bomb limit whatever a library set before.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    Image.MAX_IMAGE_PIXELS = max_image_pixels


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
    params: tuple[str, int | None, int],
    record: Callable[[list[_Outcome]], None],
    progress: tqdm[Any],
) -> list[list[_ImageJob]]:
    """Run ``chunks`` in a process pool; return the chunks lost to a dead worker (a broken pool)."""
    lost: list[list[_ImageJob]] = []
    with ProcessPoolExecutor(
        max_workers=max(1, min(workers, len(chunks))),
        mp_context=_pool_context(),
        initializer=_worker_init,
        initargs=(Image.MAX_IMAGE_PIXELS,),
    ) as pool:
        futures = {}
        for position, chunk in enumerate(chunks):
            try:
                futures[pool.submit(_crop_images, chunk, *params)] = chunk
            except BrokenProcessPool:  # a worker already died: nothing more can be submitted to this pool
                lost.extend(chunks[position:])
                break
        for future in as_completed(futures):
            try:
                outcomes = future.result()
            except BrokenProcessPool:
                lost.append(futures[future])
                continue
            record(outcomes)
            progress.update(len(futures[future]))
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
    boxes: pd.DataFrame, images_dir: Path, crops_dir: Path, settings: CropSettings, report: PrepareReport
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
        settings: strategy, max_size, workers, JPEG quality.
        report: receives the issues and the counts ``written``, ``redone``, ``skipped``, ``failed``.
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
    strategy, max_size, quality = settings.strategy, settings.max_size, settings.quality
    file_of = {c.row: job.source for job in jobs for c in job.crops}
    counts = {"written": 0, "redone": 0, "skipped": 0, "failed": 0}

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

    progress = tqdm(total=len(jobs), unit="img", desc="crops", disable=not sys.stderr.isatty())
    try:
        chunks = _chunks(jobs, workers)
        if workers == 1 or len(chunks) == 1:
            for chunk in chunks:
                record(_crop_images(chunk, strategy, max_size, quality))
                progress.update(len(chunk))
        else:
            params = (strategy, max_size, quality)
            lost = _run_pool(chunks, workers, params, record, progress)
            if lost:
                # A worker died (killed for memory, or a decoder crashed on a hostile file) and took its pool's
                # pending tasks with it: retry those images one per task, then any still dying each in a fresh
                # single-worker pool, so that only the culprit is lost.
                log.warning("a crop worker died; retrying %d images", sum(len(c) for c in lost))
                lost = _run_pool([[job] for chunk in lost for job in chunk], workers, params, record, progress)
            for chunk in lost:
                if _run_pool([chunk], 1, params, record, progress):
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
    log.info(
        "crops: %d written, %d redone, %d already done, %d failed",
        *(counts[k] for k in ("written", "redone", "skipped", "failed")),
    )
    return boxes.assign(crop_ok=ok)
