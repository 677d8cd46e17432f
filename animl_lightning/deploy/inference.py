"""Run a trained checkpoint on new images: model and preprocessing from the checkpoint, crops made in memory.

The checkpoint is the single source of truth for inference: the labels, the preprocessing (input size, mean, std,
interpolation, crop_pct), the crop rule of the training crops and the temperature come from its model part, read by
:class:`animl_lightning.core.model_file.DeployableModel` (``weights_only=True``, so a checkpoint file cannot run
code). Images and boxes become model inputs through
:func:`animl_lightning.core.crop_rule.model_input`, the path the ONNX server and the TorchServe handler share.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from numpy.typing import NDArray

from animl_lightning.core.crop_rule import Box, CropRule, CropSource, model_input, open_for_boxes
from animl_lightning.core.errors import ConfigError, DataError, require
from animl_lightning.core.label_index import LabelIndex
from animl_lightning.core.model_file import DeployableModel
from animl_lightning.core.preprocessing import EvalTransform
from animl_lightning.core.taxonomy import Taxonomy

log = logging.getLogger(__name__)

# Error messages of DetectionCrops start with one of these, so callers can tell a bad image from a bad box.
IMAGE_ERROR_PREFIX = "image unreadable: "
CROP_ERROR_PREFIX = "crop failed: "


class Predictor(Protocol):
    """Calibrated class probabilities ``(N, C)`` of a batch of model inputs ``(N, 3, H, W)`` float32."""

    def __call__(self, images: NDArray[np.float32]) -> NDArray[np.float32]: ...


@dataclass
class LoadedClassifier:
    """An eval-mode classifier and everything needed to feed it exactly like at training time.

    Attributes:
        model: the timm network (eval mode) on ``device``.
        labels: the labels in output order (:attr:`class_names` as a list).
        model_name: the timm architecture.
        transform: the eval preprocessing (:class:`~animl_lightning.core.crop_rule.EvalTransform`).
        crop_rule: how the training crops were cut.
        temperature: the calibration temperature (1.0 when uncalibrated, or when calibration was not applied).
        device: where ``model`` runs.
        checkpoint_path: the checkpoint file.
        calibration: the checkpoint's calibration record, if any.
        thresholds: the checkpoint's per-label threshold record, if any.
        taxonomy: the labels' taxonomy, if the dataset had one.
        tta: the test-time augmentation built into ``model`` (``none`` or ``hflip``).
        data_dir: the prepared dataset the checkpoint was trained on, if it records one.
    """

    model: torch.nn.Module
    labels: LabelIndex
    model_name: str
    transform: EvalTransform
    crop_rule: CropRule
    temperature: float
    device: torch.device
    checkpoint_path: Path
    checkpoint_sha256: str = ""
    calibration: dict[str, Any] | None = None
    thresholds: dict[str, Any] | None = None
    taxonomy: Taxonomy | None = None
    tta: str = "none"
    data_dir: str | None = None

    @property
    def class_names(self) -> list[str]:
        """Labels in output order."""
        return list(self.labels)

    def probabilities(self, images: torch.Tensor | NDArray[np.float32]) -> torch.Tensor:
        """Calibrated class probabilities of a batch of preprocessed crops (N, 3, H, W), on the CPU."""
        batch = torch.as_tensor(images)
        with torch.inference_mode():
            logits = self.model(batch.to(self.device, non_blocking=True))
        return torch.softmax(logits.float() / self.temperature, dim=-1).cpu()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/``None`` -> the first CUDA device when there is one, else the CPU; anything else as given."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"device: {device!r} is not a device (auto, cpu, cuda, cuda:N)") from err
    require(
        resolved.type != "cuda" or torch.cuda.is_available(),
        "device",
        f"{device!r} was asked for, but CUDA is not available here",
    )
    return resolved


def load_classifier(
    checkpoint_path: str | Path, device: str | torch.device | None = "auto", apply_calibration: bool = True
) -> LoadedClassifier:
    """Rebuild the classifier of a ``train.py`` checkpoint for inference.

    Args:
        checkpoint_path: a ``.ckpt`` written by ``train.py``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        apply_calibration: use the stored temperature (1.0 when the checkpoint was not calibrated).

    Raises:
        CheckpointError: the file is unusable (see :meth:`~animl_lightning.core.model_file.DeployableModel.read`).
    """
    stored = DeployableModel.read(checkpoint_path)
    resolved = resolve_device(device)
    model = stored.network().to(resolved).eval()
    return LoadedClassifier(
        model=model,
        labels=stored.labels,
        model_name=stored.model_name,
        transform=stored.transform,
        crop_rule=stored.crop_rule,
        temperature=stored.temperature if apply_calibration else 1.0,
        device=resolved,
        checkpoint_path=Path(checkpoint_path),
        checkpoint_sha256=stored.sha256,
        calibration=None if stored.calibration is None else dict(stored.calibration),
        thresholds=None if stored.thresholds is None else dict(stored.thresholds),
        taxonomy=stored.taxonomy,
        tta=stored.tta,
        data_dir=stored.data_dir,
    )


class CropRequests:
    """Compact, fork-friendly list of crops to make: image path, optional box, and the box's unit.

    Stored as numpy arrays (not a list of Python objects) so DataLoader workers do not copy the whole list through
    reference-count writes on large jobs. The requests of one image must be consecutive: the image is read once
    for all its boxes (lossless cuts in one pass, or one decode at the DCT scale all its boxes allow).
    """

    def __init__(self, paths: Sequence[str], boxes: NDArray[np.float64], normalized: NDArray[np.bool_]) -> None:
        if boxes.shape != (len(paths), 4) or normalized.shape != (len(paths),):
            raise DataError(f"boxes must have shape ({len(paths)}, 4) and normalized ({len(paths)},)")
        self.paths = np.asarray(paths, dtype=np.str_)
        self.boxes = np.asarray(boxes, dtype=np.float64)
        self.normalized = np.asarray(normalized, dtype=np.bool_)
        # Each request's run of consecutive requests on the same image: [first, stop).
        starts = np.flatnonzero(np.r_[True, self.paths[1:] != self.paths[:-1]]) if len(self.paths) else np.zeros(0)
        stops = np.r_[starts[1:], len(self.paths)]
        run = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(self.paths)]).astype(np.int64))
        self._first = starts.astype(np.int64)[run] if len(run) else np.zeros(0, dtype=np.int64)
        self._stop = stops.astype(np.int64)[run] if len(run) else np.zeros(0, dtype=np.int64)

    @classmethod
    def build(cls, items: Sequence[tuple[str, Box | None, bool]]) -> CropRequests:
        """From ``(image path, box or None for the whole image, box is normalised)`` tuples."""
        boxes = np.full((len(items), 4), np.nan, dtype=np.float64)
        for i, (_, box, _) in enumerate(items):
            if box is not None:
                boxes[i] = box
        return cls([p for p, _, _ in items], boxes, np.array([n for _, _, n in items], dtype=np.bool_))

    def __len__(self) -> int:
        return len(self.paths)

    def box(self, index: int) -> tuple[Box | None, bool]:
        """The box of request ``index`` (None = the whole image) and whether it is normalised to [0, 1]."""
        row = self.boxes[index]
        if np.isnan(row).any():
            return None, False
        return (float(row[0]), float(row[1]), float(row[2]), float(row[3])), bool(self.normalized[index])

    def image_boxes(self, index: int) -> list[Box | None]:
        """Every box of the image of request ``index`` (the requests decoded together with it)."""
        return [self.box(i)[0] for i in range(int(self._first[index]), int(self._stop[index]))]


class DetectionCrops:
    """One item per requested crop: ``(model input, request index, error message)``.

    A crop that cannot be made (missing or corrupt image, empty box) is returned as zeros with a non-empty error
    message instead of raising, so one bad image never stops a job and is never silently dropped. Each thread keeps
    the image it decoded last, because the detections of one image are consecutive and land in the same batch.
    """

    def __init__(self, requests: CropRequests, transform: EvalTransform, crop_rule: CropRule) -> None:
        self.requests = requests
        self.transform = transform
        self.crop_rule = crop_rule
        self._local = threading.local()

    def __len__(self) -> int:
        return len(self.requests)

    def _image(self, index: int) -> CropSource:
        path = str(self.requests.paths[index])
        cached: tuple[str, CropSource] | None = getattr(self._local, "cached", None)
        if cached is not None and cached[0] == path:
            return cached[1]
        self._local.cached = None
        normalized = bool(self.requests.normalized[index])
        source = open_for_boxes(path, self.requests.image_boxes(index), normalized, self.crop_rule)
        self._local.cached = (path, source)
        return source

    def __getitem__(self, index: int) -> tuple[NDArray[np.float32], int, str]:
        zeros = np.zeros(self.transform.input_size, dtype=np.float32)
        # Broad excepts: one unreadable image must not stop a million-image job; it is reported instead.
        try:
            decoded = self._image(index)
        except Exception as error:
            return zeros, index, IMAGE_ERROR_PREFIX + _describe(error)
        try:
            box, normalized = self.requests.box(index)
            return model_input(decoded, box, normalized, self.crop_rule, self.transform), index, ""
        except Exception as error:
            return zeros, index, CROP_ERROR_PREFIX + _describe(error)

    def batch(self, start: int, stop: int) -> tuple[NDArray[np.float32], list[str]]:
        """Model inputs of requests ``[start, stop)`` stacked, and their error messages ("" = fine)."""
        inputs = np.empty((stop - start, *self.transform.input_size), dtype=np.float32)
        errors = []
        for row, index in enumerate(range(start, stop)):
            inputs[row], _, error = self[index]
            errors.append(error)
        return inputs, errors


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


@dataclass
class BatchResult:
    """Probabilities of one batch: ``probabilities[i]`` belongs to request ``indices[i]`` (NaN rows where failed)."""

    indices: NDArray[np.int64]
    probabilities: NDArray[np.float32]
    errors: list[str]


def classify_requests(
    predict: Predictor,
    requests: CropRequests,
    transform: EvalTransform,
    crop_rule: CropRule,
    batch_size: int = 64,
    num_workers: int = 2,
) -> Iterator[BatchResult]:
    """Crop, preprocess and classify ``requests`` in batches, yielding results in request order.

    Batches are made by ``num_workers`` threads, at most ``num_workers + 1`` batches ahead of the model. Threads,
    not processes: JPEG decoding, resizing and the model all release the GIL, and a batch made in another process
    has to be copied back (16 MB for 16 crops at 288 px), which on a 2-core machine cost a third of the throughput.

    Args:
        predict: model inputs -> calibrated probabilities (a torch or ONNX Runtime predictor).
        requests: what to crop.
        transform: the eval preprocessing.
        crop_rule: how boxes become crops.
        batch_size: crops per forward pass.
        num_workers: threads decoding and cropping images (0 = in the model's thread, between batches).
    """
    require(batch_size >= 1, "classify.batch_size", f"must be >= 1, got {batch_size}")
    require(num_workers >= 0, "classify.num_workers", f"must be >= 0, got {num_workers}")
    dataset = DetectionCrops(requests, transform, crop_rule)
    starts = range(0, len(requests), batch_size)
    spans = [(start, min(start + batch_size, len(requests))) for start in starts]
    if num_workers == 0:
        made: Iterator[tuple[NDArray[np.float32], list[str]]] = (dataset.batch(a, b) for a, b in spans)
        for (start, stop), (inputs, errors) in zip(spans, made, strict=True):
            yield _predict_batch(predict, start, stop, inputs, errors)
        return
    with ThreadPoolExecutor(num_workers, thread_name_prefix="crops") as pool:
        pending: deque[tuple[int, int, Future[tuple[NDArray[np.float32], list[str]]]]] = deque()
        upcoming = iter(spans)
        try:
            for start, stop in itertools.islice(upcoming, num_workers + 1):
                pending.append((start, stop, pool.submit(dataset.batch, start, stop)))
            while pending:
                start, stop, future = pending.popleft()
                inputs, errors = future.result()
                for a, b in itertools.islice(upcoming, 1):
                    pending.append((a, b, pool.submit(dataset.batch, a, b)))
                yield _predict_batch(predict, start, stop, inputs, errors)
        finally:
            # A consumer that stops early (an error, Ctrl-C) must not wait for batches nobody will read.
            for _, _, future in pending:
                future.cancel()


def _predict_batch(
    predict: Predictor, start: int, stop: int, inputs: NDArray[np.float32], errors: list[str]
) -> BatchResult:
    failed = np.array([bool(e) for e in errors], dtype=np.bool_)
    probabilities = np.asarray(predict(inputs), dtype=np.float32).copy()
    probabilities[failed] = np.nan
    return BatchResult(indices=np.arange(start, stop, dtype=np.int64), probabilities=probabilities, errors=errors)


def top_k(probabilities: NDArray[np.floating[Any]], k: int) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Indices and values of the ``k`` largest probabilities of each row, largest first (ties: lower index first)."""
    require(k >= 1, "classify.top_k", f"must be >= 1, got {k}")
    p = np.asarray(probabilities, dtype=np.float64)
    k = min(k, p.shape[1])
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return order.astype(np.int64), np.take_along_axis(p, order, axis=1)
