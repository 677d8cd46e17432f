"""ONNX Runtime on the CPU: an exported model as a predictor (preprocessed crops in, calibrated probabilities out).

Imports ONNX Runtime, numpy and ``animl_lightning.core`` only: the ONNX server's image ships it without torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from animl_lightning.core.errors import InputFileError, ResourceError
from animl_lightning.core.machine import usable_cores

# The input of every model this project exports (ONNX and TorchScript), whoever runs it.
INPUT_NAME = "images"


class OnnxClassifier:
    """An ONNX Runtime session of an exported classifier.

    Args:
        model: the ONNX file, or its bytes.
        input_name: the model's input (``images`` for this project's exports).
        threads: intra-op threads; None = every core this process may use.
    """

    def __init__(self, model: Path | bytes, input_name: str = "images", threads: int | None = None) -> None:
        try:
            import onnxruntime
        except ImportError as err:
            raise ResourceError(
                'ONNX Runtime is not installed: pip install "animl-lightning[export]" (or use backend=torch)'
            ) from err
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or usable_cores()
        options.inter_op_num_threads = 1
        source = model if isinstance(model, bytes) else str(model)
        try:
            self.session = onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as err:  # ONNX Runtime's own types (InvalidProtobuf, Fail, InvalidGraph, ...), not exported
            what = "the ONNX model" if isinstance(model, bytes) else str(model)
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputFileError(f"{what}: ONNX Runtime cannot load it ({first_line}); export it again") from err
        self.input_name = input_name

    def __call__(self, images: NDArray[np.float32]) -> NDArray[np.float32]:
        outputs = self.session.run(None, {self.input_name: np.ascontiguousarray(images, dtype=np.float32)})
        return np.asarray(outputs[0], dtype=np.float32)


def onnxruntime_available() -> bool:
    """Whether ONNX Runtime can be imported here."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True
