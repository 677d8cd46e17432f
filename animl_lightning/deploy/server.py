"""A SageMaker-style HTTP server for Animl: ``GET /ping`` and ``POST /invocations``, ONNX Runtime on the CPU.

The app answers exactly Animl's request and response (:mod:`animl_lightning.core.serving`) for a bundle written by
``python -m animl_lightning.export format=animl``. A bad request (not JSON, no image, an image that cannot be
decoded, a bbox of the wrong length, outside [0, 1] or inverted) gets a 4xx with ``{"error": "<one line>"}``; anything
unexpected a 500 with one line (the traceback goes to the server's log), and the server keeps serving.

This module imports FastAPI, ONNX Runtime, numpy and ``animl_lightning.core`` only, so the serving image needs none of
the training stack (``Dockerfile.onnx`` of the bundle runs it with uvicorn).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from animl_lightning.core.serving import (
    BundleError,
    RequestError,
    ServingBundle,
    answer_request,
)
from animl_lightning.deploy.onnx_runtime import OnnxClassifier

log = logging.getLogger(__name__)

# The environment variable naming the bundle folder for app_from_environment (the container's entry point).
BUNDLE_VARIABLE = "ANIML_BUNDLE"


def create_app(bundle_dir: str | Path, threads: int | None = None) -> FastAPI:
    """The FastAPI app serving the bundle in ``bundle_dir``.

    Raises:
        BundleError: the bundle is incomplete.
    """
    bundle = ServingBundle.load(bundle_dir)
    model_file = bundle.root / bundle.onnx_file
    if not model_file.is_file():
        raise BundleError(f"{model_file} does not exist (bundle.json field 'onnx_file')")
    predict = OnnxClassifier(model_file, bundle.input_name, threads)
    app = FastAPI(title="animl-lightning classifier", docs_url=None, redoc_url=None)

    def answer(body: bytes) -> dict[str, float]:
        return answer_request(body, predict, bundle.labels, bundle.transform, bundle.crop_rule)

    @app.get("/ping")
    def ping() -> dict[str, str]:
        return {"status": "Healthy"}

    @app.post("/invocations")
    async def invocations(request: Request) -> Any:
        body = await request.body()
        try:
            # Decoding and inference hold the GIL for part of the time only; a worker thread keeps the loop free.
            return await run_in_threadpool(answer, body)
        except RequestError as err:
            return JSONResponse({"error": str(err)}, status_code=err.status)
        except Exception as err:  # a bug must cost one request, not the server
            log.exception("request failed")
            return JSONResponse({"error": f"internal error: {type(err).__name__}: {err}"}, status_code=500)

    return app


def app_from_environment() -> FastAPI:
    """The app for ``uvicorn --factory``: the bundle folder from ``$ANIML_BUNDLE`` (default ``/opt/ml/model``)."""
    return create_app(os.environ.get(BUNDLE_VARIABLE, "/opt/ml/model"))
