"""TorchServe handler of a ``format=animl`` export (packed into the ``.mar`` as ``handler.py``).

TorchServe calls :func:`handle` with a batch of requests; each body is Animl's JSON request
(:mod:`animl_lightning.core.serving`), each answer Animl's flat ``{label: probability}`` object with every label
(TorchServe's stock image classifier returns a top 5, which fails on a model with fewer than 5 labels). The model is
the CPU TorchScript of the export, which returns calibrated probabilities; the crop and preprocessing are
:func:`animl_lightning.core.serving.answer_request`, shipped in the archive beside this file, so the handler
crops exactly like training and imports nothing of the training stack (no Lightning, no timm, no torchvision).

A bad request gets status 400 (415 for an image that cannot be decoded) and ``{"error": "<one line>"}``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from animl_lightning.core.serving import (
    RequestError,
    ServingBundle,
    answer_request,
)

log = logging.getLogger(__name__)
TORCHSCRIPT_FILE = "model.pt"


class AnimlHandler:
    """The loaded model and bundle of one TorchServe worker."""

    def __init__(self, model_dir: str) -> None:
        self.bundle = ServingBundle.load(model_dir)
        self.model = torch.jit.load(str(Path(model_dir) / TORCHSCRIPT_FILE), map_location="cpu").eval()

    def predict(self, images: NDArray[np.float32]) -> NDArray[np.float32]:
        with torch.inference_mode():
            probabilities = self.model(torch.from_numpy(np.ascontiguousarray(images)))
        return np.asarray(probabilities.numpy(), dtype=np.float32)

    def answer(self, row: Any) -> dict[str, Any]:
        body = row.get("body", row.get("data")) if isinstance(row, dict) else row
        if body is None:
            raise RequestError("the request has no body")
        return answer_request(body, self.predict, self.bundle.labels, self.bundle.transform, self.bundle.crop_rule)


_handler: AnimlHandler | None = None


def handle(data: list[Any] | None, context: Any) -> list[Any] | None:
    """TorchServe's entry point: load on the first call, then answer every request of the batch."""
    global _handler
    if _handler is None:
        _handler = AnimlHandler(context.system_properties["model_dir"])
    if data is None:
        return None
    answers: list[Any] = []
    for index, row in enumerate(data):
        try:
            answers.append(_handler.answer(row))
        except RequestError as err:
            context.set_response_status(err.status, str(err), index)
            answers.append({"error": str(err)})
        except Exception as err:  # one request's bug must not fail the batch
            log.exception("request %d failed", index)
            context.set_response_status(500, f"internal error: {type(err).__name__}", index)
            answers.append({"error": f"internal error: {type(err).__name__}: {err}"})
    return answers
