"""The ``int8.*`` settings of ``export`` and ``classify``: their keys and defaults, in one place.

A module of its own, without torch or ONNX Runtime, so the commands can register it as the schema of their ``int8``
block at start-up (:data:`animl_lightning.config_schemas.SCHEMAS`).
"""

from __future__ import annotations

from dataclasses import dataclass

from animl_lightning.core.errors import require

# int8.calibration_method -> onnxruntime.quantization.CalibrationMethod member name.
CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


@dataclass(frozen=True)
class Int8Settings:
    """The ``int8.*`` settings of ``configs/export.yaml`` and ``configs/classify.yaml``.

    Attributes:
        min_agreement: the least top-1 agreement with float32 on val an int8 model may have.
        calibration_crops: val crops (a fixed random sample) whose activation ranges set the quantization.
        check_crops: val crops the agreement is measured on; None = every one.
        data_dir: the prepared dataset; None = the checkpoint's ``data_dir``.
        calibration_method: how activation ranges are set, one of :data:`CALIBRATION_METHODS`.
    """

    min_agreement: float = 0.99
    calibration_crops: int = 256
    check_crops: int | None = None
    data_dir: str | None = None
    calibration_method: str = "minmax"

    def __post_init__(self) -> None:
        require(0.0 <= self.min_agreement <= 1.0, "int8.min_agreement", f"must be in [0, 1], got {self.min_agreement}")
        require(self.calibration_crops >= 1, "int8.calibration_crops", f"must be >= 1, got {self.calibration_crops}")
        require(
            self.check_crops is None or self.check_crops >= 1,
            "int8.check_crops",
            f"must be >= 1 or null (every val crop), got {self.check_crops}",
        )
        require(
            self.calibration_method in CALIBRATION_METHODS,
            "int8.calibration_method",
            f"must be one of {', '.join(CALIBRATION_METHODS)}, got {self.calibration_method!r}",
        )
