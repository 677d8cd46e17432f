"""Crop files on disk: the check a crop must pass to be kept, and how a crop's pixels become JPEG bytes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image

_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"


def has_jpeg_markers(path: Path) -> bool:
    """Whether a file starts with a JPEG start-of-image and ends with an end-of-image marker (4 bytes read).

    Crops are written through a temporary file and a rename, so one that exists is complete unless it was damaged
    afterwards (emptied, truncated, overwritten); this catches that without decoding.
    """
    try:
        with path.open("rb") as handle:
            head = handle.read(2)
            handle.seek(-2, os.SEEK_END)
            tail = handle.read(2)
    except OSError:
        return False
    return head == _JPEG_SOI and tail == _JPEG_EOI


def crop_is_valid(path: Path, size: tuple[int, int] | None = None) -> bool:
    """:func:`has_jpeg_markers` and a readable JPEG header of ``size``: the check a crop must pass to be kept.

    The size catches a crop cut under another strategy or ``max_size``.
    """
    if not has_jpeg_markers(path):
        return False
    try:
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
