"""``export format=animl``: one folder with everything Animl's classifier endpoints need.

Written into a sibling temporary folder and renamed into place at the end, so ``output`` holds either the whole
bundle or what it held before. An existing ``output`` is replaced only when it is empty or holds nothing but an
earlier bundle's files (as listed by its ``bundle_files.json``); anything else there is refused with one line and
left untouched, as are the current folder and the folders above it:

- ``<model id>.mar``: the TorchServe archive (CPU TorchScript ``model.pt``, ``handler.py`` =
  :mod:`animl_lightning.deploy.torchserve_handler`, ``index_to_name.json``, ``bundle.json`` and the crop and
  preprocessing sources of :mod:`animl_lightning.core` it imports), built by ``torch-model-archiver``;
- ``config.properties`` (TorchServe on port 8080, ``disable_token_authorization=true``) and ``Dockerfile`` (the
  TorchServe image, pinning the torch version the export was made with);
- ``model.onnx``, ``bundle.json`` and ``serving/`` with ``Dockerfile.onnx``: the FastAPI + ONNX Runtime server
  (:mod:`animl_lightning.deploy.server`), ``/ping`` and ``/invocations`` on port 8080 as SageMaker expects;
- with ``precision=int8``: ``model.int8.onnx`` too (:mod:`animl_lightning.deploy.quantize`, made and checked
  before anything is written), named in ``bundle.json`` (``onnx_int8_file``, and its ``int8`` report), which the
  ONNX server serves when asked (``ANIML_PRECISION=int8``, the default of that bundle's ``Dockerfile.onnx``);
- ``mlmodel.json``: the ``MLModel`` record (``_id``, ``version``, ``description``, ``defaultConfThreshold``,
  ``categories`` with ``_id`` = ``name`` = label, a colour each, per-label thresholds when the checkpoint has them
  (1.0 for a label training found none for, which classify reports as unknown), ``expectsCrops: true``; with int8
  also ``int8``: top-1 agreement with fp32 and each label's recall change on val);
- ``sample_request.json`` and the ``sample_response.json`` this export's ONNX model gives for it (with int8 also
  ``sample_response_int8.json``, the int8 model's);
- ``README.md``: how to register the model in Animl;
- ``bundle_files.json``: every other file above, written last; it is how a later export recognises its own bundle.
"""

from __future__ import annotations

import base64
import colorsys
import io
import logging
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from animl_lightning import __version__
from animl_lightning.core.errors import ConfigError, ResourceError, require
from animl_lightning.core.files import (
    TMP_MARKER,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_writable,
)
from animl_lightning.core.serving import BUNDLE_FILENAME, BUNDLE_FORMAT, PRECISIONS, answer_request
from animl_lightning.deploy.bundle_folder import (
    MANIFEST_FILENAME,
    bundle_manifest,
    output_folder,
    refuse_unless_replaceable,
)
from animl_lightning.deploy.export import ExportError, cached_onnx, loadable_onnx, onnx_identity, torchscript_bytes
from animl_lightning.deploy.inference import LoadedClassifier
from animl_lightning.deploy.int8_settings import Int8Settings
from animl_lightning.deploy.onnx_cache import OnnxCache
from animl_lightning.deploy.onnx_runtime import INPUT_NAME, OnnxClassifier
from animl_lightning.deploy.quantize import build_int8

log = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
# The modules a deployment imports: the crop rule, decoding, Animl's request and response. Nothing else of the
# package (no torch in them, no training stack).
CORE_SOURCES = (
    "__init__.py",
    "core/__init__.py",
    "core/errors.py",
    "core/imaging.py",
    "core/crop_rule.py",
    "core/preprocessing.py",
    "core/machine.py",
    "core/serving.py",
)
SERVER_SOURCES = (*CORE_SOURCES, "deploy/__init__.py", "deploy/onnx_runtime.py", "deploy/server.py")
DEFAULT_THRESHOLD = 0.5
# confThreshold of a label for which training found no threshold reaching the target precision: classify reports
# such a label as unknown (or a taxon) whatever its probability, so Animl must not apply it on its own either.
NO_THRESHOLD = 1.0
TORCHSERVE_VERSION = "0.12.0"
SAMPLE_BBOX = [0.2, 0.25, 0.7, 0.8]  # [ymin, xmin, ymax, xmax], as Animl sends it
INT8_FILENAME = "model.int8.onnx"
# The environment variable that makes the ONNX server serve the int8 model (server.PRECISION_VARIABLE).
PRECISION_VARIABLE = "ANIML_PRECISION"


@dataclass(frozen=True)
class AnimlBundle:
    """Where the bundle went and its archive."""

    folder: Path
    mar_file: Path
    model_id: str
    # precision=int8: the agreement report of model.int8.onnx.
    int8_report: dict[str, Any] | None = None


def model_id_of(loaded: LoadedClassifier) -> str:
    """A default ``MLModel._id``: the architecture and the checkpoint file, in Animl's id characters."""
    raw = f"{loaded.model_name}-{loaded.checkpoint_path.stem}"
    return re.sub(r"[^A-Za-z0-9_-]+", "-", raw).strip("-") or "classifier"


def category_colours(labels: list[str]) -> list[str]:
    """One distinct, stable colour per label (golden-angle hues), as ``#rrggbb``."""
    colours = []
    for index in range(len(labels)):
        red, green, blue = colorsys.hls_to_rgb((index * 0.381966) % 1.0, 0.5, 0.65)
        colours.append(f"#{round(red * 255):02x}{round(green * 255):02x}{round(blue * 255):02x}")
    return colours


def mlmodel_record(
    loaded: LoadedClassifier, model_id: str, version: str, description: str, threshold: float
) -> dict[str, Any]:
    """The ``MLModel`` document Animl registers the classifier with."""
    thresholds = _thresholds(loaded)
    # With thresholds from training every label gets one (NO_THRESHOLD where none was found), as classify decides;
    # without them every label falls to defaultConfThreshold.
    has_thresholds = bool((loaded.thresholds or {}).get("per_label"))
    categories = []
    for label, colour in zip(loaded.class_names, category_colours(loaded.class_names), strict=True):
        category: dict[str, Any] = {"_id": label, "name": label, "color": colour}
        if has_thresholds:
            category["confThreshold"] = thresholds.get(label, NO_THRESHOLD)
        if loaded.taxonomy is not None:
            category["taxonomy"] = loaded.taxonomy.description(label)
        categories.append(category)
    return {
        "_id": model_id,
        "version": version,
        "description": description,
        "defaultConfThreshold": threshold,
        "categories": categories,
        "expectsCrops": True,
    }


def _thresholds(loaded: LoadedClassifier) -> dict[str, float]:
    record = loaded.thresholds or {}
    per_label = record.get("per_label") or {}
    return {str(k): float(v) for k, v in per_label.items() if v is not None}


def bundle_description(loaded: LoadedClassifier, int8_report: dict[str, Any] | None = None) -> dict[str, Any]:
    """``bundle.json``: what the server and the handler read (labels, preprocessing, crop rule, files)."""
    int8 = {} if int8_report is None else {"onnx_int8_file": INT8_FILENAME, "int8": int8_report}
    return {
        "bundle_format": BUNDLE_FORMAT,
        "model_name": loaded.model_name,
        "labels": list(loaded.class_names),
        "preprocessing": loaded.transform.to_dict(),
        "crop_rule": loaded.crop_rule.to_dict(),
        "temperature": loaded.temperature,
        "thresholds": _thresholds(loaded),
        "onnx_file": "model.onnx",
        "torchscript_file": "model.pt",
        "input_name": INPUT_NAME,
        "checkpoint": loaded.checkpoint_path.name,
        "checkpoint_sha256": loaded.checkpoint_sha256,
        "animl_lightning_version": __version__,
    } | int8


def sample_image() -> bytes:
    """A deterministic 640x480 JPEG with something in the sample box, for the sample request."""
    rng = np.random.default_rng(0)
    height, width = 480, 640
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([xx * 255 // width, yy * 255 // height, np.full_like(xx, 90)], axis=-1).astype(np.uint8)
    pixels = np.clip(pixels.astype(np.int16) + rng.integers(-12, 12, pixels.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    ImageDraw.Draw(image).ellipse((220, 130, 470, 320), fill=(120, 80, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _versions(*names: str) -> dict[str, str]:
    return {name: metadata.version(name) for name in names}


def _requirements(*names: str) -> str:
    return "".join(f"{name}=={version}\n" for name, version in _versions(*names).items())


def _copy_sources(sources: tuple[str, ...], target: Path) -> None:
    for relative in sources:
        destination = target / "animl_lightning" / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PACKAGE_ROOT / relative, destination)


def build_mar(staging: Path, model_id: str, version: str) -> Path:
    """Run ``torch-model-archiver`` over the TorchScript, the handler and its sources; return the ``.mar``.

    Raises:
        ResourceError: the archiver is not installed.
        ExportError: the archiver fails.
    """
    try:
        metadata.version("torch-model-archiver")
    except metadata.PackageNotFoundError as err:
        raise ResourceError(
            'torch-model-archiver is not installed; install the deploy extra: pip install "animl-lightning[deploy]"'
        ) from err
    extra = staging / "mar_extra"
    _copy_sources(CORE_SOURCES, extra)
    shutil.copy2(staging / BUNDLE_FILENAME, extra / BUNDLE_FILENAME)
    shutil.copy2(staging / "index_to_name.json", extra / "index_to_name.json")
    handler = staging / "handler.py"
    shutil.copy2(PACKAGE_ROOT / "deploy" / "torchserve_handler.py", handler)
    command = [
        sys.executable,
        "-m",
        "model_archiver.model_packaging",
        "--model-name",
        model_id,
        "--version",
        version,
        "--serialized-file",
        str(staging / "model.pt"),
        "--handler",
        str(handler),
        "--extra-files",
        str(extra),
        "--export-path",
        str(staging),
        "--force",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    shutil.rmtree(extra)
    handler.unlink()
    mar = staging / f"{model_id}.mar"
    if result.returncode != 0 or not mar.is_file():
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ExportError(f"format=animl: torch-model-archiver failed: {last[0]}")
    return mar


def write_animl_bundle(
    loaded: LoadedClassifier,
    output: str | Path,
    model_id: str | None = None,
    version: str = "v1",
    description: str = "",
    threshold: float = DEFAULT_THRESHOLD,
    precision: str = "fp32",
    int8: Int8Settings | None = None,
    cache: OnnxCache | None = None,
) -> AnimlBundle:
    """Write the bundle of the module docstring into ``output`` (a folder; see :func:`output_folder`).

    ONNX models come from ``cache`` when it holds them (:mod:`animl_lightning.deploy.onnx_cache`). With
    ``precision=int8`` the int8 model is made and checked before anything is written.

    Raises:
        ExportError: the model cannot be exported or archived.
        ConfigError: ``output`` cannot be replaced without losing files (:func:`output_folder`), or a setting is out
            of range.
        QuantizationError: the int8 model cannot be made or is below ``int8.min_agreement``.
    """
    target = output_folder(output)
    require(0.0 <= threshold <= 1.0, "threshold", f"must be in [0, 1], got {threshold}")
    require(precision in PRECISIONS, "precision", f"must be one of {list(PRECISIONS)}, got {precision!r}")
    model_id = model_id or model_id_of(loaded)
    require(
        re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", model_id) is not None,
        "model_id",
        f"must be letters, digits, '-' and '_', got {model_id!r}",
    )
    onnx_model, _ = cached_onnx(loaded, cache, loadable_onnx)
    quantized: tuple[bytes, dict[str, Any]] | None = None
    if precision == "int8":
        settings = int8 or Int8Settings()
        _, int8_model, int8_report = build_int8(loaded, settings, lambda: onnx_model, onnx_identity(loaded), cache)
        quantized = (int8_model, int8_report)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}{TMP_MARKER}"))
    try:
        _write_into(
            staging,
            loaded,
            model_id,
            version,
            description or _default_description(loaded),
            threshold,
            onnx_model,
            quantized,
        )
        staging.chmod(0o755)
        if target.exists():
            # A unique name (staging's own is), so no earlier leftover is ever removed by mistake.
            old = staging.with_name(f"{staging.name}-old")
            target.rename(old)
            try:
                # Checked again under its temporary name, where nothing can be added any more: the export took a while.
                refuse_unless_replaceable(old, shown=target)
            except ConfigError:
                old.rename(target)
                raise
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return AnimlBundle(
        folder=target,
        mar_file=target / f"{model_id}.mar",
        model_id=model_id,
        int8_report=None if quantized is None else quantized[1],
    )


def _default_description(loaded: LoadedClassifier) -> str:
    return (
        f"{loaded.model_name} species classifier for MegaDetector crops ({len(loaded.class_names)} labels), "
        f"trained with animl-lightning {__version__} ({loaded.checkpoint_path.name})"
    )


def _write_into(
    staging: Path,
    loaded: LoadedClassifier,
    model_id: str,
    version: str,
    description: str,
    threshold: float,
    onnx_model: bytes,
    quantized: tuple[bytes, dict[str, Any]] | None,
) -> None:
    report = None if quantized is None else quantized[1]
    scripted, _ = torchscript_bytes(loaded)
    atomic_write_bytes(staging / "model.onnx", onnx_model)
    if quantized is not None:
        atomic_write_bytes(staging / INT8_FILENAME, quantized[0])
    atomic_write_bytes(staging / "model.pt", scripted)
    atomic_write_json(staging / BUNDLE_FILENAME, bundle_description(loaded, report))
    atomic_write_json(staging / "index_to_name.json", loaded.labels.to_dict())
    build_mar(staging, model_id, version)
    record = mlmodel_record(loaded, model_id, version, description, threshold)
    if report is not None:
        record["int8"] = report
    atomic_write_json(staging / "mlmodel.json", record)

    serving = staging / "serving"
    _copy_sources(SERVER_SOURCES, serving)
    packages = ("numpy", "pillow", "simplejpeg", "opencv-python-headless", "PyTurboJPEG")
    atomic_write_text(serving / "requirements.txt", _requirements(*packages, "onnxruntime", "fastapi", "uvicorn"))
    atomic_write_text(staging / "requirements-torchserve.txt", _requirements(*packages))
    torch_version = torch.__version__.split("+")[0]
    atomic_write_text(staging / "Dockerfile", _torchserve_dockerfile(model_id, torch_version))
    atomic_write_text(staging / "Dockerfile.onnx", _onnx_dockerfile(int8=quantized is not None))
    atomic_write_text(staging / "config.properties", torchserve_config(model_id))

    image = sample_image()
    request = {"image": base64.b64encode(image).decode("ascii"), "bbox": SAMPLE_BBOX}
    predict = OnnxClassifier(onnx_model, INPUT_NAME)
    response = answer_request(request, predict, loaded.class_names, loaded.transform, loaded.crop_rule)
    atomic_write_json(staging / "sample_request.json", request, indent=None)
    atomic_write_json(staging / "sample_response.json", response)
    if quantized is not None:
        predict_int8 = OnnxClassifier(quantized[0], INPUT_NAME)
        response_int8 = answer_request(request, predict_int8, loaded.class_names, loaded.transform, loaded.crop_rule)
        atomic_write_json(staging / "sample_response_int8.json", response_int8)
    atomic_write_text(staging / "README.md", _readme(model_id, loaded, torch_version, report))
    atomic_write_json(staging / MANIFEST_FILENAME, bundle_manifest(staging))


def torchserve_config(
    model_id: str,
    inference: str = "0.0.0.0:8080",
    management: str = "127.0.0.1:8081",
    metrics: str = "127.0.0.1:8082",
    model_store: str = "/home/model-server/model-store",
) -> str:
    """TorchServe's ``config.properties`` for this bundle (SageMaker expects port 8080)."""
    return "\n".join(
        [
            f"inference_address=http://{inference}",
            f"management_address=http://{management}",
            f"metrics_address=http://{metrics}",
            # TorchServe 0.11+ asks for a token on every call unless told otherwise; SageMaker sends none.
            "disable_token_authorization=true",
            "default_workers_per_model=1",
            f"model_store={model_store}",
            f"load_models={model_id}.mar",
            "",
        ]
    )


def _torchserve_dockerfile(model_id: str, torch_version: str) -> str:
    return f"""# TorchServe image for {model_id}: the .mar of this folder, CPU only (SageMaker Serverless).
# torch must be the version the TorchScript was exported with ({torch_version}).
FROM pytorch/torchserve:{TORCHSERVE_VERSION}-cpu
USER root
# libturbojpeg: lossless crops (crop_rule.lossless) cut the training crops' exact bytes (Ubuntu names it libturbojpeg).
RUN apt-get update && (apt-get install -y --no-install-recommends libturbojpeg0 \
    || apt-get install -y --no-install-recommends libturbojpeg) && rm -rf /var/lib/apt/lists/*
COPY requirements-torchserve.txt /tmp/requirements.txt
RUN pip install --no-cache-dir "torch=={torch_version}" --index-url https://download.pytorch.org/whl/cpu \\
 && pip install --no-cache-dir -r /tmp/requirements.txt
COPY {model_id}.mar /home/model-server/model-store/
COPY config.properties /home/model-server/config.properties
USER model-server
EXPOSE 8080
CMD ["torchserve", "--start", "--foreground", "--ts-config", "/home/model-server/config.properties", \\
     "--model-store", "/home/model-server/model-store", "--models", "{model_id}.mar", "--disable-token-auth"]
"""


def _onnx_dockerfile(int8: bool = False) -> str:
    models = f"model.onnx {INT8_FILENAME}" if int8 else "model.onnx"
    # An int8 export was asked for to be served: its image serves it unless run with -e ANIML_PRECISION=fp32.
    precision = (
        f"# int8 by default (exported with precision=int8); docker run -e {PRECISION_VARIABLE}=fp32 serves model.onnx\n"
        f"ENV {PRECISION_VARIABLE}=int8\n"
        if int8
        else ""
    )
    return f"""# The FastAPI + ONNX Runtime server of this folder (no torch in the image): /ping, /invocations on 8080.
FROM python:3.11-slim
# libturbojpeg: lossless crops (crop_rule.lossless) cut the training crops' exact bytes.
RUN apt-get update && apt-get install -y --no-install-recommends libturbojpeg0 && rm -rf /var/lib/apt/lists/*
COPY serving/requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt
COPY serving/ /app/
COPY {models} bundle.json /opt/ml/model/
WORKDIR /app
ENV ANIML_BUNDLE=/opt/ml/model
{precision}EXPOSE 8080
CMD ["python", "-m", "uvicorn", "animl_lightning.deploy.server:app_from_environment", "--factory", \\
     "--host", "0.0.0.0", "--port", "8080"]
"""


def _int8_section(report: dict[str, Any] | None) -> str:
    if report is None:
        return ""
    rows = "\n".join(
        f"| {label} | {row['support']} | {row['fp32']} | {row['int8']} | {row['change']} |"
        for label, row in report["recall"].items()
    )
    return f"""
## int8

`{INT8_FILENAME}` is the int8 model (ONNX Runtime static quantization, calibrated on
{report["calibration_crops"]} crops of the val split). On {report["check_crops"]} val crops its top-1 label is the
float32 model's for {report["top1_agreement"]:.2%} of them (floor {report["min_agreement"]}); recall per label:

| label | val crops | fp32 | int8 | change |
|---|---|---|---|---|
{rows}

`Dockerfile.onnx` serves it ({PRECISION_VARIABLE}=int8); `docker run -e {PRECISION_VARIABLE}=fp32 ...` or
`ANIML_PRECISION=fp32 python -m animl_lightning.serve bundle=.` serves `model.onnx` instead. It answers
`sample_request.json` with `sample_response_int8.json`.
"""


def _readme(model_id: str, loaded: LoadedClassifier, torch_version: str, report: dict[str, Any] | None = None) -> str:
    labels = ", ".join(loaded.class_names)
    return f"""# {model_id}: a species classifier for Animl

{loaded.model_name}, {len(loaded.class_names)} labels ({labels}); crops cut with
`{loaded.crop_rule.to_dict()}` and preprocessed with `{loaded.transform.to_dict()}`, exactly as in training;
calibration temperature {loaded.temperature:.4f}. Exported from `{loaded.checkpoint_path.name}` with torch
{torch_version}.

Every endpoint here takes Animl's request, `{{"image": "<base64 of the full image>", "bbox": [ymin, xmin, ymax,
xmax]}}` (relative coordinates; `bbox` may be a JSON string and defaults to the whole image), and answers
`{{"<label>": probability, ...}}` for every label. `sample_request.json` gives `sample_response.json`.

## Serve it

- TorchServe, as Animl's endpoints run today: `docker build -t {model_id} .` (the `Dockerfile` pins torch
  {torch_version}, the version the TorchScript was made with), or without Docker
  `torchserve --start --ts-config config.properties --model-store . --models {model_id}.mar`.
- The ONNX Runtime server (FastAPI, no torch, faster on CPU): `docker build -f Dockerfile.onnx -t {model_id}-onnx .`,
  or `python -m animl_lightning.serve bundle=. port=8080`.

Both answer `GET /ping` and `POST /invocations` on port 8080, the SageMaker container contract. Check with
`curl -s -X POST localhost:8080/invocations -H 'Content-Type: application/json' -d @sample_request.json`.

## Register it in Animl

1. Push the image to the AWS account's ECR and create a SageMaker **serverless** endpoint from it (CPU; 6 GB of
   memory is plenty), then call it once with `sample_request.json` and compare with `sample_response.json`.
2. Add the `MLModel` document of `mlmodel.json` to Animl's database: `_id`, `version`, `description`,
   `defaultConfThreshold`, `categories` (each `_id` is the label the endpoint returns; the `confThreshold` values,
   where present, were chosen on the validation split for the target precision, and 1.0 marks a label for which
   none reached it: it is never applied on its own, as `classify` reports it unknown) and `expectsCrops: true`.
3. Point Animl's configuration for this model at the endpoint's name, add the call to its inference code and an
   automation rule (e.g. "run on MegaDetector's animal labels"), as for Animl's other classifiers.
{_int8_section(report)}"""


def export_animl(
    checkpoint: str | Path,
    output: str | Path,
    model_id: str | None = None,
    version: str = "v1",
    description: str = "",
    threshold: float = DEFAULT_THRESHOLD,
    precision: str = "fp32",
    int8: Int8Settings | None = None,
    cache: OnnxCache | None = None,
) -> AnimlBundle:
    """Load a checkpoint on the CPU and write its Animl bundle; see :func:`write_animl_bundle`."""
    from animl_lightning.deploy.inference import load_classifier

    folder = output_folder(output)  # checked before the checkpoint is loaded, and again when it is replaced
    check_writable(folder.parent / f".{folder.name}.probe", "output")
    loaded = load_classifier(checkpoint, device="cpu")
    return write_animl_bundle(loaded, folder, model_id, version, description, threshold, precision, int8, cache)
