"""The model's preprocessing after the crop rule: the eval transform every consumer of a trained model shares.

:class:`EvalTransform` is the model's deterministic preprocessing (resize the shorter side to ``size / crop_pct``,
centre crop, scale to [0, 1], normalise), written with PIL and numpy to give exactly the tensor of timm's eval
transform, so that a deployment needs neither torch's data stack nor timm to feed the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from animl_lightning.core.errors import ConfigError, DataError, require
from animl_lightning.core.imaging import pil_view

_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
CROP_MODES = ("center", "squash")


@dataclass(frozen=True)
class EvalTransform:
    """timm's eval transform (``create_transform(is_training=False)``) in PIL and numpy: the same float32 tensor.

    ``center``: resize the shorter side to ``floor(side / crop_pct)`` (aspect kept, PIL resampling as torchvision's
    ``Resize`` does it), take the centre ``input_size`` (offsets rounded as torchvision's ``CenterCrop``), scale to
    [0, 1] and normalise. ``squash``: resize both sides to ``floor(side / crop_pct)``, then the same.

    Attributes:
        input_size: ``(channels, height, width)`` of the model input.
        interpolation: PIL resampling name (``bicubic``, ``bilinear``, ...).
        mean, std: per-channel normalisation (RGB, on the [0, 1] scale).
        crop_pct: share of the resized image kept by the centre crop.
        crop_mode: ``center`` or ``squash``.
    """

    input_size: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        require(
            len(self.input_size) == 3 and self.input_size[0] == 3 and min(self.input_size) >= 1,
            "preprocessing.input_size",
            f"must be (3, height, width), got {self.input_size!r}",
        )
        require(
            self.interpolation in _INTERPOLATIONS,
            "preprocessing.interpolation",
            f"must be one of {sorted(_INTERPOLATIONS)}, got {self.interpolation!r}",
        )
        require(0.0 < self.crop_pct <= 1.0, "preprocessing.crop_pct", f"must be in (0, 1], got {self.crop_pct!r}")
        require(
            self.crop_mode in CROP_MODES,
            "preprocessing.crop_mode",
            f"must be one of {list(CROP_MODES)}, got {self.crop_mode!r}",
        )
        require(
            self.crop_mode != "center" or self.input_size[1] == self.input_size[2],
            "preprocessing.crop_mode",
            f"'center' needs a square input_size, got {self.input_size!r}",
        )
        require(
            len(self.mean) == 3 and len(self.std) == 3 and min(self.std) > 0,
            "preprocessing.mean/std",
            f"need 3 values each (std > 0), got {self.mean!r}, {self.std!r}",
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> EvalTransform:
        """From a timm data config (``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``).

        Raises:
            ConfigError: a key is missing or out of range.
        """
        try:
            size = tuple(int(v) for v in config["input_size"])
            mean = tuple(float(v) for v in config["mean"])
            std = tuple(float(v) for v in config["std"])
            return cls(
                input_size=(size[0], size[1], size[2]),
                mean=(mean[0], mean[1], mean[2]),
                std=(std[0], std[1], std[2]),
                interpolation=str(config.get("interpolation", "bicubic")),
                crop_pct=float(config.get("crop_pct", 1.0)),
                crop_mode=str(config.get("crop_mode", "center")),
            )
        except (KeyError, IndexError, TypeError, ValueError) as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(f"preprocessing: {dict(config)!r} is incomplete: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        """The timm data config keys, JSON-ready."""
        return {
            "input_size": list(self.input_size),
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
        }

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) an image of ``width`` x ``height`` is resized to before the centre crop."""
        _, out_h, out_w = self.input_size
        scale_h, scale_w = math.floor(out_h / self.crop_pct), math.floor(out_w / self.crop_pct)
        if self.crop_mode == "squash":
            return scale_w, scale_h
        # torchvision Resize(int): the shorter side becomes the size, the longer one int(size * long / short).
        if width <= height:
            return scale_w, int(scale_w * height / width)
        return int(scale_h * width / height), scale_h

    def __call__(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """``(3, height, width)`` float32 of an RGB PIL image or an ``(h, w, 3|4)`` uint8 RGB(X) array."""
        if isinstance(image, np.ndarray):
            image = pil_view(np.ascontiguousarray(image)) if image.shape[2] == 4 else Image.fromarray(image, "RGB")
        if image.mode != "RGB":
            image = image.convert("RGB")
        size = self.resized_size(*image.size)
        if size != image.size:
            image = image.resize(size, _INTERPOLATIONS[self.interpolation])
        _, out_h, out_w = self.input_size
        width, height = image.size
        if out_w > width or out_h > height:
            raise DataError(f"cannot centre-crop {out_w}x{out_h} from a {width}x{height} image")
        # Python's round (half to even), as torchvision's CenterCrop uses.
        top, left = round((height - out_h) / 2.0), round((width - out_w) / 2.0)
        pixels = np.asarray(image, dtype=np.uint8)[top : top + out_h, left : left + out_w]
        scaled = pixels.astype(np.float32) / np.float32(255.0)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        normalised: np.ndarray = ((scaled - mean) / std).transpose(2, 0, 1)
        return np.ascontiguousarray(normalised)
