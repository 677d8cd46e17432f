"""Run a trained checkpoint on new images: model and preprocessing from the checkpoint, crops made in memory.

The checkpoint is the single source of truth for inference: class names, the timm data config (input size, mean,
std, interpolation, crop_pct) and the crop rule used to make the training crops are read from its
``hyper_parameters``; the temperature fitted by :mod:`animl_lightning.calibration` from its ``calibration`` entry.
Checkpoints are loaded with ``weights_only=True``, so a checkpoint file cannot run code.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from numpy.typing import NDArray
from PIL import Image
from timm.data.config import resolve_model_data_config
from torch.utils.data import DataLoader, Dataset

from animl_lightning.calibration import CALIBRATION_KEY, softmax_with_temperature
from animl_lightning.crops import crop_image, load_image
from animl_lightning.datamodule import eval_transform

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]
Transform = Callable[[Image.Image], torch.Tensor]

_DATA_CONFIG_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct")
# Error messages of DetectionCrops start with one of these, so callers can tell a bad image from a bad box.
IMAGE_ERROR_PREFIX = "image unreadable: "
CROP_ERROR_PREFIX = "crop failed: "


class CheckpointError(ValueError):
    """A checkpoint file cannot be used for inference; the message names the file and the missing/bad field."""


@dataclass(frozen=True)
class CropRule:
    """How a box becomes a crop: the ``crops.strategy`` and ``crops.max_size`` the training crops were made with."""

    strategy: str = "square"
    max_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"strategy": self.strategy, "max_size": self.max_size}


@dataclass(frozen=True)
class PreprocessConfig:
    """The timm eval preprocessing of a checkpoint: resize, centre crop to ``input_size``, normalise."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    crop_mode: str = "center"

    def transform(self) -> Transform:
        """The training eval transform (PIL image -> normalised float tensor of shape ``input_size``)."""
        return eval_transform(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with the keys of timm's data config."""
        return {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
        }


@dataclass
class LoadedClassifier:
    """An eval-mode classifier and everything needed to feed it exactly like at training time."""

    model: torch.nn.Module
    class_names: list[str]
    model_name: str
    preprocess: PreprocessConfig
    crop_rule: CropRule
    temperature: float
    device: torch.device
    checkpoint_path: Path
    calibration: dict[str, Any] | None = None
    transform: Transform = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.transform = self.preprocess.transform()

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities of a batch of preprocessed crops (N, 3, H, W), on the CPU."""
        with torch.inference_mode():
            logits = self.model(images.to(self.device, non_blocking=True))
        return softmax_with_temperature(logits, self.temperature).cpu()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/``None`` -> the first CUDA device when there is one, else the CPU; anything else as given."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} was asked for, but CUDA is not available here")
    return resolved


def _hparam(hparams: dict[str, Any], key: str, path: Path) -> Any:
    if key not in hparams:
        raise CheckpointError(f"{path}: checkpoint field hyper_parameters.{key} is missing (not a CropClassifier?)")
    return hparams[key]


def _preprocess_from(hparams: dict[str, Any], model: torch.nn.Module, path: Path) -> PreprocessConfig:
    """Read the data config from the hparams (nested ``data_config`` dict, or flat keys)."""
    source: dict[str, Any] | None = None
    for key in ("data_config", "data_cfg", "eval_data_config"):
        if isinstance(hparams.get(key), dict):
            source = hparams[key]
            break
    if source is None and all(k in hparams for k in _DATA_CONFIG_KEYS):
        source = hparams
    if source is None:
        log.warning("%s: no data config in the checkpoint; using timm's default for the architecture", path)
        source = dict(resolve_model_data_config(model))
    try:
        input_size = tuple(int(v) for v in source["input_size"])
        if len(input_size) == 2:
            input_size = (3, *input_size)
        if len(input_size) != 3:
            raise ValueError(f"input_size must be (C, H, W), got {source['input_size']!r}")
        return PreprocessConfig(
            input_size=(input_size[0], input_size[1], input_size[2]),
            mean=tuple(float(v) for v in source["mean"]),
            std=tuple(float(v) for v in source["std"]),
            interpolation=str(source.get("interpolation", "bicubic")),
            crop_pct=float(source.get("crop_pct", 1.0)),
            crop_mode=str(source.get("crop_mode", "center")),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: bad data config in hyper_parameters: {error}") from error


def _crop_rule_from(hparams: dict[str, Any], path: Path) -> CropRule:
    strategy = hparams.get("crop_strategy")
    max_size = hparams.get("crop_max_size")
    crops = hparams.get("crops")
    if strategy is None and isinstance(crops, dict):
        strategy, max_size = crops.get("strategy"), crops.get("max_size")
    if strategy is None:
        log.warning("%s: no crop rule in the checkpoint (hyper_parameters.crop_strategy); assuming 'square'", path)
        strategy = "square"
    if max_size is not None and (not isinstance(max_size, int) or max_size < 1):
        raise CheckpointError(
            f"{path}: hyper_parameters.crop_max_size must be null or a positive int, got {max_size!r}"
        )
    return CropRule(strategy=str(strategy), max_size=max_size)


def _backbone_state(state: dict[str, torch.Tensor], model: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """Pick the timm model's weights out of a LightningModule state dict, whatever attribute holds the model."""
    wanted = list(model.state_dict().keys())
    anchor = wanted[0]
    prefixes = sorted({k[: len(k) - len(anchor)] for k in state if k == anchor or k.endswith("." + anchor)}, key=len)
    for prefix in prefixes:
        picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if all(k in picked for k in wanted):
            return {k: picked[k] for k in wanted}
    raise CheckpointError(f"{path}: state_dict holds no complete {type(model).__name__} (looked for '*{anchor}')")


def load_classifier(
    checkpoint_path: str | Path, device: str | torch.device | None = "auto", apply_calibration: bool = True
) -> LoadedClassifier:
    """Rebuild the classifier of a Lightning checkpoint for inference.

    Args:
        checkpoint_path: a ``.ckpt`` written by ``train.py``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        apply_calibration: use the stored temperature (1.0 when the checkpoint was not calibrated).

    Raises:
        CheckpointError: the file is missing or lacks a field, naming the file and field.
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint: {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types (pickle, zip, unpickling-policy errors) for a bad file
        raise CheckpointError(f"{path}: cannot be read as a checkpoint: {error}") from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: expected a Lightning checkpoint dict, got {type(checkpoint).__name__}")
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict):
        raise CheckpointError(f"{path}: checkpoint field hyper_parameters is missing")
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: checkpoint field state_dict is missing")
    class_names = [str(name) for name in _hparam(hparams, "class_names", path)]
    if not class_names:
        raise CheckpointError(f"{path}: hyper_parameters.class_names is empty")
    model_name = str(_hparam(hparams, "model_name", path))
    try:
        model = timm.create_model(model_name, pretrained=False, num_classes=len(class_names))
    except RuntimeError as error:
        raise CheckpointError(f"{path}: hyper_parameters.model_name {model_name!r} is not a timm model") from error
    try:
        model.load_state_dict(_backbone_state(state, model, path))
    except RuntimeError as error:
        raise CheckpointError(
            f"{path}: weights do not fit {model_name} with {len(class_names)} classes: {error}"
        ) from error
    resolved = resolve_device(device)
    model.to(resolved).eval()
    calibration = checkpoint.get(CALIBRATION_KEY)
    temperature = 1.0
    if apply_calibration and isinstance(calibration, dict):
        temperature = float(calibration.get("temperature", 1.0))
    elif apply_calibration and "temperature" in hparams:
        temperature = float(hparams["temperature"])
    if not (math.isfinite(temperature) and temperature > 0):
        raise CheckpointError(f"{path}: calibration.temperature must be a positive number, got {temperature!r}")
    return LoadedClassifier(
        model=model,
        class_names=class_names,
        model_name=model_name,
        preprocess=_preprocess_from(hparams, model, path),
        crop_rule=_crop_rule_from(hparams, path),
        temperature=temperature,
        device=resolved,
        checkpoint_path=path,
        calibration=calibration if isinstance(calibration, dict) else None,
    )


class CropRequests:
    """Compact, fork-friendly list of crops to make: image path, optional box, and the box's unit.

    Stored as numpy arrays (not a list of Python objects) so DataLoader workers do not copy the whole list through
    reference-count writes on large jobs.
    """

    def __init__(self, paths: Sequence[str], boxes: NDArray[np.float64], normalized: NDArray[np.bool_]) -> None:
        if boxes.shape != (len(paths), 4) or normalized.shape != (len(paths),):
            raise ValueError(f"boxes must have shape ({len(paths)}, 4) and normalized ({len(paths)},)")
        self.paths = np.asarray(paths, dtype=np.str_)
        self.boxes = np.asarray(boxes, dtype=np.float64)
        self.normalized = np.asarray(normalized, dtype=np.bool_)

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


def absolute_box(box: Box | None, normalized: bool, width: int, height: int) -> Box:
    """A box in absolute pixels (x, y, w, h), clamped to the image; ``None`` means the whole image.

    Boxes smaller than a pixel are left to :func:`animl_lightning.crops.crop_image` to refuse, exactly as in the
    crops stage.
    """
    if box is None:
        return (0.0, 0.0, float(width), float(height))
    x, y, w, h = box
    if normalized:
        x, y, w, h = x * width, y * height, w * width, h * height
    x0, y0 = min(max(x, 0.0), float(width)), min(max(y, 0.0), float(height))
    x1, y1 = min(max(x + w, 0.0), float(width)), min(max(y + h, 0.0), float(height))
    return (x0, y0, x1 - x0, y1 - y0)


class DetectionCrops(Dataset[tuple[torch.Tensor, int, str]]):
    """One item per requested crop: ``(preprocessed tensor, request index, error message)``.

    A crop that cannot be made (missing or corrupt image, empty box) is returned as a zero tensor with a non-empty
    error message instead of raising, so one bad image never stops a job and is never silently dropped. The last
    decoded image is kept, because the detections of one image are consecutive and land in the same batch.
    """

    def __init__(
        self, requests: CropRequests, transform: Transform, crop_rule: CropRule, input_size: tuple[int, int, int]
    ) -> None:
        self.requests = requests
        self.transform = transform
        self.crop_rule = crop_rule
        self.input_size = input_size
        self._cached: tuple[str, Image.Image] | None = None

    def __len__(self) -> int:
        return len(self.requests)

    def _image(self, path: str) -> Image.Image:
        if self._cached is not None and self._cached[0] == path:
            return self._cached[1]
        self._cached = None
        image: Image.Image = load_image(Path(path))
        self._cached = (path, image)
        return image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        path = str(self.requests.paths[index])
        # Broad excepts: one unreadable image must not stop a million-image job; it is reported instead.
        try:
            image = self._image(path)
        except Exception as error:
            return torch.zeros(self.input_size), index, IMAGE_ERROR_PREFIX + _describe(error)
        try:
            box, normalized = self.requests.box(index)
            pixels = absolute_box(box, normalized, image.width, image.height)
            crop = crop_image(image, pixels, self.crop_rule.strategy, self.crop_rule.max_size)
            return self.transform(crop), index, ""
        except Exception as error:
            return torch.zeros(self.input_size), index, CROP_ERROR_PREFIX + _describe(error)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


@dataclass
class BatchResult:
    """Probabilities of one batch: ``probabilities[i]`` belongs to request ``indices[i]`` (NaN rows where failed)."""

    indices: NDArray[np.int64]
    probabilities: NDArray[np.float32]
    errors: list[str]


def classify_requests(
    loaded: LoadedClassifier, requests: CropRequests, batch_size: int = 64, num_workers: int = 0
) -> Iterator[BatchResult]:
    """Crop, preprocess and classify ``requests`` in batches, yielding results in request order.

    Args:
        loaded: from :func:`load_classifier`.
        requests: what to crop.
        batch_size: crops per forward pass.
        num_workers: DataLoader worker processes decoding and cropping images (0 = in this process).
    """
    if batch_size < 1:
        raise ValueError(f"classify.batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"classify.num_workers must be >= 0, got {num_workers}")
    if len(requests) == 0:
        return
    dataset = DetectionCrops(requests, loaded.transform, loaded.crop_rule, loaded.preprocess.input_size)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=loaded.device.type == "cuda",
        prefetch_factor=4 if num_workers > 0 else None,
    )
    for images, indices, errors in loader:
        failed = np.array([bool(e) for e in errors], dtype=np.bool_)
        probabilities = loaded.probabilities(images).numpy().astype(np.float32, copy=False)
        probabilities[failed] = np.nan
        yield BatchResult(indices=indices.numpy().astype(np.int64), probabilities=probabilities, errors=list(errors))


def top_k(probabilities: NDArray[np.floating[Any]], k: int) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Indices and values of the ``k`` largest probabilities of each row, largest first (ties: lower index first)."""
    if k < 1:
        raise ValueError(f"classify.top_k must be >= 1, got {k}")
    p = np.asarray(probabilities, dtype=np.float64)
    k = min(k, p.shape[1])
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return order.astype(np.int64), np.take_along_axis(p, order, axis=1)
