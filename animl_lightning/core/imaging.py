"""Image decoding for crops: displayed orientation, any mode to RGB, and libjpeg-turbo where it gives PIL's pixels.

Baseline RGB and grayscale JPEGs (most camera-trap images) are decoded by libjpeg-turbo through ``simplejpeg``
straight into a numpy array, with the same accurate IDCT and upsampling as PIL (the same pixels, about 15% less CPU,
and no repacking into a PIL image). Everything else (PNG, progressive or CMYK JPEGs, 16-bit, palette, odd files) and
any JPEG that libjpeg-turbo flags as damaged is decoded by PIL, which decides whether to accept it.

Images are decoded with their EXIF orientation applied (boxes from Animl are in displayed coordinates; on the fast
path the orientation is a numpy view) and converted to RGB: grayscale, CMYK, palette and 16-bit images are converted
(16-bit by keeping the high byte), transparent pixels are composited on black (the colour of the crop padding).
Truncated files, non-images, missing files and images over PIL's decompression-bomb limit are refused with
:class:`ImageLoadError`, never cropped half-grey.

Lossless crops (:func:`lossless_grid`, :func:`cut_jpeg`): a baseline JPEG in stored orientation can have regions cut
straight out of its compressed data with libjpeg-turbo's transform API (through PyTurboJPEG and the system's
``libturbojpeg``), keeping its DCT coefficients and quantization tables: no decode, no second generation loss. A
region's origin must sit on the photo's MCU grid, read from the header here.

This module and :mod:`animl_lightning.core.crop_rule` import nothing of this project beyond :mod:`.errors`, so a
deployment (the TorchServe handler, the ONNX server) ships these files as they are and crops exactly like training.
"""

from __future__ import annotations

import functools
import io
import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

from animl_lightning.core.errors import InputFileError

log = logging.getLogger(__name__)

_ORIENTATION_TAG = 0x0112
# PIL modes of the JPEGs libjpeg-turbo decodes straight to RGB here (YCbCr/RGB and grayscale).
_FAST_JPEG_MODES = frozenset({"RGB", "L"})
# Luma sampling factors (h, v) of the colour JPEGs libjpeg-turbo 2.x transforms (chroma always 1x1): 4:4:4, 4:2:2,
# 4:2:0, 4:4:0 and 4:1:1. The MCU is 8h x 8v pixels; a grayscale JPEG's is 8x8.
_TRANSFORMABLE_SAMPLING = frozenset({(1, 1), (2, 1), (2, 2), (1, 2), (4, 1)})


class ImageLoadError(InputFileError):
    """An image cannot be used; ``kind`` is the report kind (``missing_image``, ``truncated_image``, ...)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


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


def rgbx(image: Image.Image) -> np.ndarray:
    """Any PIL image as ``(h, w, 4)`` uint8 ``RGBX`` (see :func:`to_rgb`), the layout crops are rendered from."""
    return np.asarray(to_rgb(image).convert("RGBX"))


def _read_bytes(path: Path) -> bytes:
    """The file's bytes; a missing or unreadable file is an :class:`ImageLoadError` naming it."""
    try:
        return path.read_bytes()
    except FileNotFoundError as err:
        raise ImageLoadError("missing_image", f"{path}: file not found") from err
    except OSError as err:
        raise ImageLoadError("unreadable_image", f"{path}: {err}") from err


def _open(source: Path | io.BytesIO, path: Path, max_pixels: int | None = None) -> Image.Image:
    """Open (header only); refuse more than ``max_pixels`` pixels (default: PIL's ``Image.MAX_IMAGE_PIXELS``)."""
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            # The size is checked below against our limit; PIL still refuses twice its own on its own.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
    except FileNotFoundError as err:
        raise ImageLoadError("missing_image", f"{path}: file not found") from err
    except Image.DecompressionBombError as err:
        message = f"{path}: over the limit of {limit:,} pixels (refused as a possible decompression bomb): {err}"
        raise ImageLoadError("decompression_bomb", message) from err
    except UnidentifiedImageError as err:
        raise ImageLoadError("not_an_image", f"{path}: not a readable image file") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError("unreadable_image", f"{path}: {err}") from err
    width, height = image.size
    if limit is not None and width * height > limit:
        image.close()
        raise ImageLoadError(
            "decompression_bomb",
            f"{path}: {width}x{height} is {width * height:,} pixels, over the limit of {limit:,} "
            "(refused as a possible decompression bomb)",
        )
    return image


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
        return pil_view(np.ascontiguousarray(self.pixels)).convert("RGB")


def pil_view(pixels: np.ndarray) -> Image.Image:
    """A PIL ``RGBX`` image sharing the memory of a C-contiguous ``(h, w, 4)`` uint8 array (no copy)."""
    height, width = pixels.shape[:2]
    return Image.frombuffer("RGBX", (width, height), pixels, "raw", "RGBX", 0, 1)


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
    return rgbx(image)


def decode_image(
    path: Path | str,
    reduction: Callable[[tuple[int, int]], int] | None = None,
    data: bytes | None = None,
    max_pixels: int | None = None,
) -> DecodedImage:
    """Decode an image with its EXIF orientation applied.

    Baseline JPEGs are decoded by libjpeg-turbo through simplejpeg straight into a numpy array (the same pixels as
    PIL, without PIL's per-pixel repacking); everything else, and any JPEG libjpeg-turbo flags as damaged, by PIL.

    Args:
        path: the image file, or (with ``data``) the name used in messages.
        reduction: given the displayed full size, returns the JPEG DCT-scaling divisor to decode at (1, 2, 4 or 8);
            only JPEGs honour it. Scaling happens before the orientation is applied, which is fine because the
            divisor is the same on both axes.
        data: the encoded image, when it does not come from a file (a request body).
        max_pixels: the most pixels accepted; None: PIL's ``Image.MAX_IMAGE_PIXELS``.

    Raises:
        ImageLoadError: missing, not an image, truncated or corrupt, or over the decompression-bomb limit.
    """
    path = Path(path)
    data = _read_bytes(path) if data is None else data
    image = _open(io.BytesIO(data), path, max_pixels)
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


# --- lossless crops ------------------------------------------------------------------------------------------------

# Why a file is not cut losslessly (the crops stage counts these): the fallback is decode and re-encode.
NOT_JPEG, PROGRESSIVE, COLOUR_MODE, ROTATED, SAMPLING = "not_jpeg", "progressive", "colour_mode", "rotated", "sampling"


def lossless_grid(image: Image.Image) -> tuple[tuple[int, int] | None, str]:
    """The MCU (width, height) of an opened image whose regions can be cut losslessly, or None and the reason why not.

    Baseline (or extended) YCbCr/RGB and grayscale JPEGs with a sampling libjpeg-turbo transforms, stored upright
    (EXIF orientation 1: boxes are in displayed pixels, and a rotated photo's grid is elsewhere). Read from the header
    alone, so prepare and every deployment choose the same geometry whether or not libturbojpeg is installed.
    """
    if image.format != "JPEG":
        return None, NOT_JPEG
    if image.info.get("progressive") or image.info.get("progression"):
        return None, PROGRESSIVE
    if image.mode not in _FAST_JPEG_MODES:
        return None, COLOUR_MODE  # CMYK, YCCK
    if _orientation(image) != 1:
        return None, ROTATED
    layer = getattr(image, "layer", None)
    if image.mode == "L":
        return ((8, 8), "") if layer is not None and len(layer) == 1 else (None, SAMPLING)
    if layer is None or len(layer) != 3 or any((h, v) != (1, 1) for _, h, v, _ in layer[1:]):
        return None, SAMPLING
    luma = (layer[0][1], layer[0][2])
    if luma not in _TRANSFORMABLE_SAMPLING:
        return None, SAMPLING
    return (8 * luma[0], 8 * luma[1]), ""


@dataclass(frozen=True)
class ImageHeader:
    """An image's bytes and what its header says about cropping it.

    Attributes:
        data: the encoded file.
        full_size: displayed (width, height).
        mcu: the MCU (width, height) when regions can be cut losslessly (:func:`lossless_grid`), else None.
        fallback: why not ("" when ``mcu`` is set).
    """

    data: bytes
    full_size: tuple[int, int]
    mcu: tuple[int, int] | None
    fallback: str


def read_header(path: Path | str, data: bytes | None = None, max_pixels: int | None = None) -> ImageHeader:
    """Read an image file (or take ``data``) and parse its header only.

    Raises:
        ImageLoadError: missing, not an image, or over the decompression-bomb limit (``max_pixels``, default PIL's).
    """
    path = Path(path)
    data = _read_bytes(path) if data is None else data
    image = _open(io.BytesIO(data), path, max_pixels)
    try:
        mcu, fallback = lossless_grid(image)
        return ImageHeader(data, _displayed(image.size, _orientation(image)), mcu, fallback)
    finally:
        image.close()


def _strict_turbojpeg(library: type) -> type:
    class StrictTurboJPEG(library):  # type: ignore[misc,valid-type]
        """PyTurboJPEG that raises on libjpeg's warnings (premature end of data, corrupt entropy data).

        1.8 turns them into ``warnings.warn`` and returns the damaged result; catching that through the warnings
        filters is not thread-safe (classify crops in threads), so the name-mangled reporter is overridden instead.
        """

        def _TurboJPEG__report_error(self, handle: object) -> None:  # noqa: N802 (PyTurboJPEG's private name)
            raise OSError(self._TurboJPEG__get_error_string(handle))

    return StrictTurboJPEG


@functools.cache
def turbojpeg() -> object | None:
    """PyTurboJPEG bound to the system's libturbojpeg, or None (said once in the log) when either is missing."""
    try:
        # Optional: without it crops are decoded and encoded again, as before lossless crops.
        from turbojpeg import TurboJPEG
    except ImportError:
        log.warning("PyTurboJPEG is not installed: crops are decoded and encoded again instead of cut losslessly")
        return None
    try:
        library: object = _strict_turbojpeg(TurboJPEG)()
    except (OSError, RuntimeError) as err:
        log.warning(
            "libturbojpeg cannot be loaded (%s): crops are decoded and encoded again instead of cut losslessly", err
        )
        return None
    return library


def cut_jpeg(data: bytes, regions: list[tuple[int, int, int, int]]) -> list[bytes] | None:
    """JPEGs of ``regions`` (``x, y, width, height`` in stored pixels, origins on the MCU grid) cut losslessly from
    ``data`` in one pass over the file; their DCT coefficients and quantization tables are the source's, and no
    metadata is copied (the crops carry no EXIF orientation).

    Returns None when libturbojpeg is missing or rejects the file, even for a warning: the caller then decodes it,
    which decides whether it is damaged (see :func:`decode_image`).
    """
    library = turbojpeg()
    if library is None or not regions:
        return None if library is None else []
    try:
        cuts: list[bytes] = library.crop_multiple(data, regions, copynone=True)  # type: ignore[attr-defined]
    except (OSError, ValueError):
        return None
    return cuts


def load_image(path: Path) -> Image.Image:
    """Decode ``path`` at full resolution, EXIF orientation applied, as RGB.

    Raises:
        ImageLoadError: see :func:`decode_image`.
    """
    return decode_image(path).image
