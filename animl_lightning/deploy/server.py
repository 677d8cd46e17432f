"""A SageMaker-style HTTP server for Animl: ``GET /ping`` and ``POST /invocations``, ONNX Runtime on the CPU.

The app answers exactly Animl's request and response (:mod:`animl_lightning.core.serving`) for a bundle written by
``python -m animl_lightning.export format=animl``. A bad request (not JSON, no image, an image that cannot be
decoded, a bbox of the wrong length, outside [0, 1] or inverted) gets a 4xx with ``{"error": "<one line>"}``; anything
unexpected a 500 with one line (the traceback goes to the server's log), and the server keeps serving.

A bundle exported with ``precision=int8`` also holds an int8 model (``bundle.json`` field ``onnx_int8_file``); the
server serves it when asked: ``create_app(precision="int8")``, or ``ANIML_PRECISION=int8`` in the environment (what
that bundle's ``Dockerfile.onnx`` sets).

This module imports FastAPI, ONNX Runtime, numpy and ``animl_lightning.core`` only, so the serving image needs none of
the training stack (``Dockerfile.onnx`` of the bundle runs it with uvicorn).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from animl_lightning.core.serving import (
    PRECISIONS,
    BundleError,
    RequestError,
    ServingBundle,
    answer_request,
)
from animl_lightning.deploy.onnx_runtime import OnnxClassifier

log = logging.getLogger(__name__)

# The environment variable naming the bundle folder for app_from_environment (the container's entry point).
BUNDLE_VARIABLE = "ANIML_BUNDLE"
# The environment variable choosing the model when create_app is not told: fp32 (model.onnx) or int8.
PRECISION_VARIABLE = "ANIML_PRECISION"


def model_file(bundle: ServingBundle, precision: str) -> Path:
    """The ONNX file of ``bundle`` at ``precision``.

    Raises:
        BundleError: an unknown precision, int8 asked of a bundle exported without it, or the file is missing.
    """
    if precision not in PRECISIONS:
        raise BundleError(f"precision: must be one of {list(PRECISIONS)}, got {precision!r} ({PRECISION_VARIABLE})")
    name = bundle.onnx_file
    if precision == "int8":
        description = bundle.root / "bundle.json"
        try:
            name = json.loads(description.read_text(encoding="utf-8")).get("onnx_int8_file") or ""
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BundleError(f"{description}: cannot be read as JSON: {err}") from err
        if not name:
            raise BundleError(
                f"{description} has no int8 model (field 'onnx_int8_file'): export it with precision=int8, or serve "
                "precision fp32"
            )
    path = bundle.root / name
    if not path.is_file():
        field = "onnx_int8_file" if precision == "int8" else "onnx_file"
        raise BundleError(f"{path} does not exist (bundle.json field {field!r})")
    return path


def create_app(bundle_dir: str | Path, threads: int | None = None, precision: str | None = None) -> FastAPI:
    """The FastAPI app serving the bundle in ``bundle_dir``.

    Args:
        bundle_dir: a folder written by ``export format=animl``.
        threads: ONNX Runtime's intra-op threads; None = every usable core.
        precision: ``fp32`` or ``int8``; None = ``$ANIML_PRECISION``, else fp32.

    Raises:
        BundleError: the bundle is incomplete, or lacks the model of ``precision``.
    """
    bundle = ServingBundle.load(bundle_dir)
    chosen = precision or os.environ.get(PRECISION_VARIABLE) or "fp32"
    path = model_file(bundle, chosen)
    log.info("serving %s (%s)", path, chosen)
    predict = OnnxClassifier(path, bundle.input_name, threads)
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
