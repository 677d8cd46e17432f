"""What a deployed classifier needs: its bundle description, Animl's request and response, and one request's path
from bytes to probabilities.

Animl's contract (its public API and serving code): the request body is JSON, ``{"image": "<base64 of the full
image>", "bbox": [ymin, xmin, ymax, xmax]}`` with coordinates relative to the image in [0, 1]; ``bbox`` may arrive as
a JSON string and defaults to the whole image. The response is a flat JSON object ``{"<label id>": probability, ...}``
with one entry per category of the model's ``MLModel`` record (every label, not a top 5), whose ``_id`` is the label.

The TorchServe handler and the ONNX server both answer a request with :func:`request_probabilities`, which crops and
preprocesses through :mod:`animl_lightning.core.crop_rule`, the code the training crops and ``classify`` use. This
module imports nothing of this project beyond ``core``, so a deployment ships these files as they are.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from animl_lightning.core.crop_rule import CropRule, model_input, open_for_boxes
from animl_lightning.core.errors import AnimlError, InputFileError
from animl_lightning.core.preprocessing import EvalTransform

BUNDLE_FILENAME = "bundle.json"
# The numeric precisions a model is exported and served in: model.onnx, and with int8 model.int8.onnx too.
PRECISIONS = ("fp32", "int8")
BUNDLE_FORMAT = 1
WHOLE_IMAGE = (0.0, 0.0, 1.0, 1.0)  # Animl's default bbox, [ymin, xmin, ymax, xmax]
# Probabilities in a response are rounded to this many digits (Animl stores them as floats).
RESPONSE_DIGITS = 6

Predict = Callable[[NDArray[np.float32]], NDArray[np.float32]]
# The most pixels a request image may have. Animl sends a photo of up to 2.8 MB as it is (a 12000x9000 camera photo,
# 108 million pixels, of a plain scene can be that small) and resizes a larger one to 3,500 px wide: 150 million
# leaves headroom over the former and still refuses the decompression bombs PIL's limit (89 million) is there for.
MAX_REQUEST_PIXELS = 150_000_000


class RequestError(InputFileError):
    """A request that cannot be answered; the message is the one-line reason returned with a 4xx status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class BundleError(InputFileError):
    """An exported bundle folder is incomplete or malformed; the message names the file and field."""


@dataclass(frozen=True)
class ServingBundle:
    """``bundle.json`` of a ``format=animl`` export: the labels, preprocessing and crop rule of the model files.

    Attributes:
        root: the bundle folder.
        labels: labels in the model's output order (each label is also its category ``_id`` in Animl).
        transform: the eval preprocessing.
        crop_rule: how boxes become crops.
        onnx_file: the ONNX model (calibrated probabilities out), relative to ``root``.
        input_name: the ONNX model's input name.
        thresholds: per-label confidence thresholds chosen on val, when the checkpoint had them.
    """

    root: Path
    labels: tuple[str, ...]
    transform: EvalTransform
    crop_rule: CropRule
    onnx_file: str
    input_name: str
    thresholds: Mapping[str, float]

    @classmethod
    def load(cls, root: str | Path) -> ServingBundle:
        """Read ``<root>/bundle.json``.

        Raises:
            BundleError: missing, not JSON, another format, or a field missing or wrong.
        """
        folder = Path(root)
        path = folder / BUNDLE_FILENAME
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            message = f"{path} does not exist: bundle= must be a folder written by export format=animl"
            raise BundleError(message) from err
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BundleError(f"{path}: cannot be read as JSON: {err}") from err
        if not isinstance(raw, dict) or raw.get("bundle_format") != BUNDLE_FORMAT:
            raise BundleError(f"{path}: field 'bundle_format' must be {BUNDLE_FORMAT}")
        try:
            labels = tuple(str(label) for label in raw["labels"])
            bundle = cls(
                root=folder,
                labels=labels,
                transform=EvalTransform.from_config(raw["preprocessing"]),
                crop_rule=CropRule.from_dict(raw["crop_rule"], f"{path}, field 'crop_rule'"),
                onnx_file=str(raw["onnx_file"]),
                input_name=str(raw["input_name"]),
                thresholds={str(k): float(v) for k, v in (raw.get("thresholds") or {}).items()},
            )
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(f"{path}: field {err} is missing or wrong") from err
        if len(set(labels)) != len(labels) or len(labels) < 2:
            raise BundleError(f"{path}: field 'labels' must list 2 or more distinct labels")
        return bundle


@dataclass(frozen=True)
class AnimlRequest:
    """A parsed request: the encoded image and the box as MegaDetector's normalised ``(x, y, w, h)``."""

    image: bytes
    box: tuple[float, float, float, float]


def parse_request(body: bytes | bytearray | str | Mapping[str, Any]) -> AnimlRequest:
    """Check an Animl request body and turn its ``[ymin, xmin, ymax, xmax]`` bbox into ``(x, y, w, h)``.

    Raises:
        RequestError: not JSON, not an object, no ``image`` or not base64, a ``bbox`` that is not 4 numbers in
            [0, 1] with ``ymin < ymax`` and ``xmin < xmax``; the message says which, in one line.
    """
    if isinstance(body, Mapping):
        payload: Any = body
    else:
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RequestError(f"the request body is not JSON: {err}") from err
    if not isinstance(payload, dict):
        raise RequestError('the request body must be a JSON object {"image": ..., "bbox": ...}')
    encoded = payload.get("image")
    if encoded is None:
        raise RequestError("field 'image' is missing: it must hold the base64 of the full image")
    if not isinstance(encoded, str):
        raise RequestError(
            f"field 'image' must be a string (the base64 of the full image), got {type(encoded).__name__}"
        )
    if not encoded:
        raise RequestError("field 'image' is empty: it must hold the base64 of the full image")
    try:
        image = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(f"field 'image' is not valid base64: {err}") from err
    if not image:
        raise RequestError("field 'image' is empty")
    bbox: Any = payload.get("bbox", list(WHOLE_IMAGE))
    if bbox is None:
        bbox = list(WHOLE_IMAGE)
    if isinstance(bbox, str):
        try:
            bbox = json.loads(bbox)
        except json.JSONDecodeError as err:
            raise RequestError(f"field 'bbox' is a string that is not a JSON list: {err}") from err
    if not isinstance(bbox, list | tuple) or len(bbox) != 4:
        raise RequestError(f"field 'bbox' must be [ymin, xmin, ymax, xmax], got {bbox!r}")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        raise RequestError(f"field 'bbox' must hold 4 finite numbers, got {bbox!r}")
    ymin, xmin, ymax, xmax = (float(v) for v in bbox)
    if not all(0.0 <= v <= 1.0 for v in (ymin, xmin, ymax, xmax)):
        raise RequestError(f"field 'bbox' coordinates must be relative, in [0, 1], got {bbox!r}")
    if ymin >= ymax or xmin >= xmax:
        raise RequestError(f"field 'bbox' must have ymin < ymax and xmin < xmax, got {bbox!r}")
    return AnimlRequest(image=image, box=(xmin, ymin, xmax - xmin, ymax - ymin))


def request_probabilities(
    request: AnimlRequest, predict: Predict, transform: EvalTransform, crop_rule: CropRule
) -> NDArray[np.float32]:
    """The model's calibrated probabilities for one request: decode, crop, preprocess, predict.

    Raises:
        RequestError: the image cannot be decoded, or the box gives no crop (415 and 400).
    """
    try:
        source = open_for_boxes(
            "request image", [request.box], True, crop_rule, data=request.image, max_pixels=MAX_REQUEST_PIXELS
        )
    except AnimlError as err:
        raise RequestError(f"field 'image' is not a readable image: {err}", status=415) from err
    try:
        inputs = model_input(source, request.box, True, crop_rule, transform)
    except AnimlError as err:
        raise RequestError(f"field 'bbox' gives no crop of this image: {err}") from err
    probabilities: NDArray[np.float32] = np.asarray(predict(inputs[None]), dtype=np.float32)[0]
    return probabilities


def animl_response(labels: Sequence[str], probabilities: NDArray[np.floating[Any]]) -> dict[str, float]:
    """The flat ``{label: probability}`` object Animl expects: every label, rounded to 6 digits."""
    return {label: round(float(p), RESPONSE_DIGITS) for label, p in zip(labels, probabilities, strict=True)}


def answer_request(
    body: bytes | bytearray | str | Mapping[str, Any],
    predict: Predict,
    labels: Sequence[str],
    transform: EvalTransform,
    crop_rule: CropRule,
) -> dict[str, float]:
    """Animl's answer to one request body: the one path of the server, the TorchServe handler and the sample.

    Raises:
        RequestError: see :func:`parse_request` and :func:`request_probabilities`.
    """
    probabilities = request_probabilities(parse_request(body), predict, transform, crop_rule)
    return animl_response(labels, probabilities)
