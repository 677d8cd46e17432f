"""The crop rule: how a box becomes the pixels a model sees, for training crops, classify and deployment alike.

One rule, one module: the crops stage of ``prepare.py`` (:mod:`animl_lightning.prepare.crop_stage`), the training
data module (crop checks and the eval transform), ``classify``, the TorchServe handler and the ONNX server all call
these functions, so the pixels never differ between training and production.

Geometry is pure (:func:`crop_window`, :func:`output_size`): a box in displayed-image pixels becomes the integer
rectangle to cut, the canvas it is placed on (black padding around it) and the saved size.

Strategies (``crops.strategy``, :class:`CropRule`):

``square``
    A square of side ``max(w, h)`` centred on the box. At an image edge the square is shifted inward, the same way on
    all four edges (the old rule shifted at the left/top edge only and let the square spill past the right/bottom:
    pipeline.md 2.6). Only when the side exceeds the image's width (height) is the whole width (height) taken and the
    crop padded with black, centred.
``pad``
    The exact box, padded with black (centred) to a square of side ``max(w, h)``.
``exact``
    The exact box.

``crops.lossless`` (:attr:`CropRule.lossless`): a baseline JPEG's crop is cut out of its compressed data
(:func:`~animl_lightning.core.imaging.cut_jpeg`), not decoded and encoded again. Such a cut must start on the
photo's MCU grid (8x8 pixels for 4:4:4, 16x8 for 4:2:2, 16x16 for 4:2:0, read from the header), so the rule becomes:
the strategy's crop, grown left and up by less than one MCU so that its origin is on the grid (:func:`align_to_grid`);
it still contains the box and ends where it did. Progressive, CMYK, rotated (EXIF) and non-JPEG files, and crops that
need black padding, keep the strategy's crop, decoded and encoded again. Every consumer reads the same header
(:func:`plan_window`), so a deployment cuts the same rectangle as prepare did, and decodes the same bytes.

``crops.max_size`` caps the longer saved side; crops are never enlarged. When it is set, JPEGs are decoded with
libjpeg's DCT scaling at 1/2, 1/4 or 1/8 scale whenever every crop of the image still gets at least its saved size at
that scale (:func:`draft_reduction`); shrinking is done by OpenCV (2x area-average halvings, then bilinear for the
last factor below 2), or by PIL's box (area-average) filter where OpenCV is missing. Rendering works on the decoded
``RGBX`` array (:func:`render`); a crop kept at its size is a view of it.

The model's preprocessing after the crop is :mod:`animl_lightning.core.preprocessing`; the checks and encoding of
crop files are :mod:`animl_lightning.core.crop_files`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from animl_lightning.core.errors import ConfigError, InputFileError, require
from animl_lightning.core.imaging import (
    DecodedImage,
    ImageHeader,
    cut_jpeg,
    decode_image,
    pil_view,
    read_header,
    rgbx,
    turbojpeg,
)
from animl_lightning.core.preprocessing import EvalTransform

Box = tuple[float, float, float, float]
CROP_STRATEGIES = ("square", "pad", "exact")
# The smallest crops.max_size: below this, crops stop showing an animal.
MIN_MAX_SIZE = 8
_DRAFT_SCALES = (8, 4, 2)
# Area averaging: a proper anti-aliasing filter for shrinking, and the cheapest one PIL has.
_DOWNSCALE = Image.Resampling.BOX
# Shrink by whole factors with Image.reduce (a fast box average, the same filter) before the fractional resize.
_REDUCING_GAP = 1.0


class CropError(InputFileError):
    """A box gives no crop (not finite, or smaller than a pixel once rounded and clipped to the image)."""


@dataclass(frozen=True)
class CropRule:
    """``crops.strategy`` and ``crops.max_size``: what prepare.py cut, recorded in the dataset and the checkpoint.

    Raises:
        ConfigError: an unknown strategy or a ``max_size`` below :data:`MIN_MAX_SIZE`.
    """

    strategy: str = "square"
    max_size: int | None = None
    # False (what a rule recorded before lossless crops means): the strategy's crop, decoded and encoded again.
    lossless: bool = False

    def __post_init__(self) -> None:
        require(isinstance(self.lossless, bool), "crops.lossless", f"must be true or false, got {self.lossless!r}")
        require(
            self.strategy in CROP_STRATEGIES,
            "crops.strategy",
            f"must be one of {list(CROP_STRATEGIES)}, got {self.strategy!r}",
        )
        require(
            self.max_size is None
            or (
                not isinstance(self.max_size, bool) and isinstance(self.max_size, int) and self.max_size >= MIN_MAX_SIZE
            ),
            "crops.max_size",
            f"must be null or an integer >= {MIN_MAX_SIZE}, got {self.max_size!r}",
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``{"strategy", "max_size", "lossless"}``)."""
        return {"strategy": self.strategy, "max_size": self.max_size, "lossless": self.lossless}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str) -> CropRule:
        """Read the form :meth:`to_dict` writes; ``source`` names the file and field in the error."""
        try:
            return cls(strategy=raw["strategy"], max_size=raw.get("max_size"), lossless=raw.get("lossless", False))
        except (KeyError, TypeError, ConfigError) as err:
            raise ConfigError(f"{source}: not a crop rule {{'strategy', 'max_size', 'lossless'}}: {err}") from err


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
        CropError: non-finite box, empty image, or a box narrower or lower than one pixel once
            rounded and clipped (the crop stage reports it as a skipped box).
    """
    if strategy not in CROP_STRATEGIES:
        # Not require(): this runs once per box, and its message would be built on every call (~10% of the call).
        raise ConfigError(f"crops.strategy: must be one of {list(CROP_STRATEGIES)}, got {strategy!r}")
    width, height = image_size
    if width < 1 or height < 1:
        raise CropError(f"image size must be positive, got {width}x{height}")
    x, y, w, h = box
    if not all(math.isfinite(v) for v in box):
        raise CropError(f"box {list(box)} has non-finite values")
    x0 = min(max(_round_half_up(x), 0), width)
    y0 = min(max(_round_half_up(y), 0), height)
    x1 = min(max(_round_half_up(x + w), 0), width)
    y1 = min(max(_round_half_up(y + h), 0), height)
    box_w, box_h = x1 - x0, y1 - y0
    if box_w < 1 or box_h < 1:
        raise CropError(f"box {list(box)} is smaller than one pixel inside the {width}x{height} image")
    if strategy == "exact":
        return CropWindow(x0, y0, x1, y1, box_w, box_h, 0, 0)
    side = max(box_w, box_h)
    if strategy == "pad":
        return CropWindow(x0, y0, x1, y1, side, side, (side - box_w) // 2, (side - box_h) // 2)
    left, cut_w = _square_span(x0, x1, side, width)
    top, cut_h = _square_span(y0, y1, side, height)
    return CropWindow(left, top, left + cut_w, top + cut_h, side, side, (side - cut_w) // 2, (side - cut_h) // 2)


def align_to_grid(window: CropWindow, mcu: tuple[int, int]) -> CropWindow:
    """``window`` grown left and up by less than one MCU (``mcu``: width, height) so its origin is on the MCU grid.

    The right and bottom edges stay, so the crop still contains the box and stays inside the image; a square becomes
    up to ``mcu - 1`` pixels wider or taller. Only for windows without padding (the cut is the whole canvas).
    """
    if window.padded:
        raise CropError(f"a padded crop window cannot be aligned to the MCU grid: {window}")
    left, top = window.left - window.left % mcu[0], window.top - window.top % mcu[1]
    width, height = window.right - left, window.bottom - top
    return CropWindow(left, top, window.right, window.bottom, width, height, 0, 0)


def plan_window(box: Box, full_size: tuple[int, int], rule: CropRule, mcu: tuple[int, int] | None) -> CropWindow:
    """The crop of ``box`` under ``rule`` in an image whose header gives ``mcu`` (None: not cut losslessly).

    Lossless rules align unpadded crops of such images to the grid (:func:`align_to_grid`); everything else is
    :func:`crop_window`.

    Raises:
        CropError: see :func:`crop_window`.
    """
    window = crop_window(box, full_size, rule.strategy)
    if not rule.lossless or mcu is None or window.padded:
        return window
    return align_to_grid(window, mcu)


def cut_region(window: CropWindow) -> tuple[int, int, int, int]:
    """``(x, y, width, height)`` of a window's cut rectangle: the region to cut losslessly."""
    return window.left, window.top, window.width, window.height


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


def render(
    pixels: np.ndarray, window: CropWindow, out_size: tuple[int, int], scale: tuple[float, float] = (1.0, 1.0)
) -> np.ndarray:
    """Cut ``window`` (full-resolution coordinates) from ``RGBX`` pixels decoded at ``scale``, laid out at
    ``out_size``; returns ``(h, w, 4)`` uint8.

    A crop kept at its size is a view of the pixels (no copy). A shrunk one is resampled from the decoded source
    rectangle by OpenCV (or PIL's box filter without OpenCV); padding is black.
    """
    layout = _layout(window, out_size)
    if layout.cut == (window.width, window.height) and scale == (1.0, 1.0):
        cut = pixels[window.top : window.bottom, window.left : window.right]
    elif (cv2 := _opencv()) is not None:
        height, width = pixels.shape[:2]
        left, top, right, bottom = _source_rect(window, scale, (width, height))
        cut = _shrink(cv2, pixels[top:bottom, left:right], layout.cut)
    else:
        sx, sy = scale
        box = (window.left * sx, window.top * sy, window.right * sx, window.bottom * sy)
        source = pil_view(np.ascontiguousarray(pixels))
        cut = np.asarray(source.resize(layout.cut, _DOWNSCALE, box=box, reducing_gap=_REDUCING_GAP))
    if layout.cut == out_size:
        return cut
    out_w, out_h = out_size
    canvas = np.zeros((out_h, out_w, 4), dtype=np.uint8)
    (cut_w, cut_h), (offset_x, offset_y) = layout.cut, layout.offset
    canvas[offset_y : offset_y + cut_h, offset_x : offset_x + cut_w] = cut
    return canvas


def crop_decoded(decoded: DecodedImage, box: Box, rule: CropRule) -> np.ndarray:
    """The crop of ``box`` (``[x, y, w, h]`` pixels of the displayed full-resolution image) as ``RGBX``.

    ``decoded`` may be DCT-scaled (:func:`decode_scale` gives the scale the rule allows).

    Raises:
        ValueError: see :func:`crop_window`.
    """
    window = crop_window(box, decoded.full_size, rule.strategy)
    return render(decoded.pixels, window, output_size(window, rule.max_size), decoded.scale)


def decode_scale(full_size: tuple[int, int], boxes: Sequence[Box], rule: CropRule) -> int:
    """The JPEG DCT divisor at which every box of an image still gets its saved size under ``rule``.

    Only a ``max_size`` lets a crop be made from fewer pixels than the full image has; without one it is 1. Boxes that
    give no crop (smaller than a pixel) do not count.
    """
    if rule.max_size is None:
        return 1
    planned = []
    for box in boxes:
        try:
            window = crop_window(box, full_size, rule.strategy)
        except ValueError:
            continue
        planned.append((window, output_size(window, rule.max_size)))
    return draft_reduction(planned)


def render_cut(data: bytes, out_size: tuple[int, int]) -> np.ndarray:
    """The ``RGBX`` pixels of a losslessly cut crop (JPEG ``data``), laid out at ``out_size``.

    At full size this is the crop file's own decode (libjpeg-turbo's accurate IDCT and smooth upsampling, PIL's
    pixels), which is what training reads; a capped crop is decoded at the DCT scale that still reaches ``out_size``
    (so the cost follows the crop, not the photo), then shrunk as :func:`render` does.

    Raises:
        ImageLoadError: libjpeg-turbo wrote something it cannot read back (not expected).
    """

    def reduction(size: tuple[int, int]) -> int:
        whole = CropWindow(0, 0, size[0], size[1], size[0], size[1], 0, 0)
        return draft_reduction([(whole, out_size)])

    decoded = decode_image("lossless crop", reduction, data)
    width, height = decoded.full_size
    whole = CropWindow(0, 0, width, height, width, height, 0, 0)
    return render(decoded.pixels, whole, out_size, decoded.scale)


@dataclass(frozen=True)
class CropSource:
    """One image ready to give the crops of its boxes: the header, the lossless cuts made, and the decoded image
    for every other crop (None when all of them were cut).

    Attributes:
        header: the file and its header (:func:`~animl_lightning.core.imaging.read_header`).
        rule: the crop rule.
        cuts: JPEG bytes of each losslessly cut region, by :func:`cut_region`.
        decoded: the image decoded as before lossless crops, when a crop needs it.
    """

    header: ImageHeader
    rule: CropRule
    cuts: Mapping[tuple[int, int, int, int], bytes]
    decoded: DecodedImage | None

    @property
    def full_size(self) -> tuple[int, int]:
        """Displayed (width, height) at full resolution."""
        return self.header.full_size

    def crop(self, box: Box) -> np.ndarray:
        """The crop of ``box`` (pixels of the displayed full-resolution image) as ``RGBX``, as prepare made it.

        Raises:
            CropError: the box gives no crop.
        """
        window = plan_window(box, self.full_size, self.rule, self.header.mcu)
        out = output_size(window, self.rule.max_size)
        cut = self.cuts.get(cut_region(window))
        if cut is not None:
            return render_cut(cut, out)
        decoded = self.decoded
        if decoded is None:  # not expected: open_for_boxes decodes when a planned crop was not cut
            decoded = decode_image("image", None, self.header.data)
        return render(decoded.pixels, window, out, decoded.scale)


def open_for_boxes(
    path: Path | str,
    boxes: Sequence[Box | None],
    normalized: bool,
    rule: CropRule,
    data: bytes | None = None,
    max_pixels: int | None = None,
) -> CropSource:
    """An image ready for the crops of ``boxes``, made as the crops stage makes them: lossless cuts where the rule,
    the header and libturbojpeg allow, one decode (at the DCT scale the rest allow) for every other crop.

    Raises:
        ImageLoadError: see :func:`~animl_lightning.core.imaging.decode_image`.
    """
    header = read_header(path, data, max_pixels)
    width, height = header.full_size
    windows = []
    for box in boxes:
        try:
            windows.append(
                plan_window(box_in_pixels(box, normalized, width, height), header.full_size, rule, header.mcu)
            )
        except CropError:
            continue
    cuts: dict[tuple[int, int, int, int], bytes] = {}
    if rule.lossless and header.mcu is not None and turbojpeg() is not None:
        regions = list(dict.fromkeys(cut_region(w) for w in windows if not w.padded))
        made = cut_jpeg(header.data, regions)
        if made is not None:
            cuts = dict(zip(regions, made, strict=True))
    rest = [w for w in windows if cut_region(w) not in cuts]
    decoded = None
    if rest or not cuts:
        planned = [(w, output_size(w, rule.max_size)) for w in rest]
        reduction = (lambda _size: draft_reduction(planned)) if rule.max_size is not None else None
        decoded = decode_image(path, reduction, header.data, max_pixels)
    return CropSource(header, rule, cuts, decoded)


def box_in_pixels(box: Box | None, normalized: bool, width: int, height: int) -> Box:
    """A box in absolute pixels ``(x, y, w, h)`` of a ``width`` x ``height`` image, clamped to it.

    ``None`` is the whole image; a normalised box (MegaDetector's ``[x, y, w, h]`` in [0, 1]) is scaled first. Boxes
    smaller than a pixel are left to :func:`crop_window` to refuse, exactly as in the crops stage.
    """
    if box is None:
        return (0.0, 0.0, float(width), float(height))
    x, y, w, h = box
    if normalized:
        x, y, w, h = x * width, y * height, w * width, h * height
    x0, y0 = min(max(x, 0.0), float(width)), min(max(y, 0.0), float(height))
    x1, y1 = min(max(x + w, 0.0), float(width)), min(max(y + h, 0.0), float(height))
    return (x0, y0, x1 - x0, y1 - y0)


def decode_for_boxes(
    path: Path | str,
    boxes: Sequence[Box | None],
    normalized: bool,
    rule: CropRule,
    data: bytes | None = None,
    max_pixels: int | None = None,
) -> DecodedImage:
    """Decode an image once for all its ``boxes``, at the DCT scale the crop rule allows for them (see
    :func:`decode_scale`): what the crops stage does, so inference sees the training crops' pixels.

    Raises:
        ImageLoadError: see :func:`~animl_lightning.core.imaging.decode_image`.
    """

    def reduction(full_size: tuple[int, int]) -> int:
        width, height = full_size
        return decode_scale(full_size, [box_in_pixels(b, normalized, width, height) for b in boxes], rule)

    return decode_image(path, reduction if rule.max_size is not None else None, data, max_pixels)


def model_input(
    source: CropSource | DecodedImage, box: Box | None, normalized: bool, rule: CropRule, transform: EvalTransform
) -> np.ndarray:
    """The model input ``(3, H, W)`` float32 for one box of an image: crop rule, then the eval transform.

    The one path from an image and a box to a tensor, shared by ``classify``, the ONNX server and the TorchServe
    handler. ``source`` comes from :func:`open_for_boxes` (a bare decoded image gets the rule's crop without lossless
    cuts).

    Raises:
        CropError: the box gives no crop.
    """
    width, height = source.full_size
    pixel_box = box_in_pixels(box, normalized, width, height)
    if isinstance(source, CropSource):
        return transform(source.crop(pixel_box))
    return transform(crop_decoded(source, pixel_box, rule))


def crop_image(image: Image.Image, box: Box, strategy: str, max_size: int | None) -> Image.Image:
    """:func:`crop_decoded` for a PIL image already in displayed orientation; RGB."""
    decoded = DecodedImage(rgbx(image), image.size)
    return pil_view(np.ascontiguousarray(crop_decoded(decoded, box, CropRule(strategy, max_size)))).convert("RGB")
