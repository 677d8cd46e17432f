"""The formats ``python -m animl_lightning.export`` writes (``format=``), one entry each in :data:`FORMATS`.

An entry names the format, says whether it writes a file (plus its JSON sidecar) or a folder, which precisions it
makes, which pyproject extra brings the modules it imports, and the function that writes it. A new format is one
entry: the command, :func:`check_format`, :func:`export_checkpoint` and the error listing the formats all read the
table. Nothing here imports a module of an extra, so the command names a missing one before any work.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from animl_lightning.core.files import check_writable
from animl_lightning.core.serving import PRECISIONS
from animl_lightning.deploy.animl_bundle import export_animl
from animl_lightning.deploy.export import (
    ExportError,
    ExportResult,
    SerialisedModel,
    onnx_model,
    torchscript_model,
    write_model,
)
from animl_lightning.deploy.inference import LoadedClassifier, load_classifier
from animl_lightning.deploy.int8_settings import Int8Settings
from animl_lightning.deploy.onnx_cache import OnnxCache

# What each of core.serving.PRECISIONS is, for the error when a format cannot make it.
PRECISION_NOTES: dict[str, str] = dict(
    zip(PRECISIONS, ("is the model as trained", "is made with ONNX Runtime"), strict=True)
)


@dataclass(frozen=True)
class ExportJob:
    """What one export writes, from the command's settings (``configs/export.yaml``)."""

    checkpoint: Path
    output: Path
    format: str
    precision: str
    int8: Int8Settings
    cache: OnnxCache | None
    # The block of export.yaml named after the format (``animl:``); empty when it has none.
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Exported:
    """What an export wrote: one line to print, and the int8 agreement report when it made an int8 model."""

    summary: str
    int8_report: dict[str, Any] | None = None


# A loaded checkpoint, the precision, the int8 settings and the ONNX model cache -> the model file's content.
Serialiser = Callable[[LoadedClassifier, str, Int8Settings | None, OnnxCache | None], SerialisedModel]


@dataclass(frozen=True)
class ExportFormat:
    """One ``format=``.

    Args:
        name: the ``format=`` value.
        output: ``file`` (a model file and ``<file>.json``) or ``folder``.
        precisions: the ``precision=`` values it makes (of :data:`animl_lightning.core.serving.PRECISIONS`).
        extra: the pyproject extra that brings ``modules``; empty: none needed.
        modules: what it imports, checked before any work so a missing one is named with its install command.
        write: loads the checkpoint and writes the output.
        serialise: a file format's model bytes (:func:`export_classifier` writes them with the sidecar); None
            for a folder.
    """

    name: str
    output: Literal["file", "folder"]
    precisions: tuple[str, ...]
    extra: str
    modules: tuple[str, ...]
    write: Callable[[ExportJob], Exported]
    serialise: Serialiser | None = None


def write_model_file(job: ExportJob) -> Exported:
    """A model file and its sidecar (:func:`export_checkpoint`)."""
    result = export_checkpoint(job.checkpoint, job.format, job.output, job.precision, job.int8, job.cache)
    size = "dynamic batch and input size" if result.dynamic_size else "dynamic batch, fixed input size"
    summary = f"wrote {result.model_file} ({result.format} {result.precision}, {size}) and {result.sidecar_file}"
    return Exported(summary, result.int8_report)


def write_animl_folder(job: ExportJob) -> Exported:
    """The folder Animl's endpoints need (:func:`animl_lightning.deploy.animl_bundle.export_animl`)."""
    # Absent settings keep export_animl's defaults; Hydra may read a version like 2 as a number.
    given = {
        "model_id": job.options.get("model_id"),
        "version": job.options.get("version"),
        "description": job.options.get("description"),
        "threshold": job.options.get("default_threshold"),
    }
    settings: dict[str, Any] = {key: value for key, value in given.items() if value is not None}
    settings |= {key: str(settings[key]) for key in ("version", "description") if key in settings}
    if "threshold" in settings:
        settings["threshold"] = float(settings["threshold"])
    bundle = export_animl(
        job.checkpoint, job.output, precision=job.precision, int8=job.int8, cache=job.cache, **settings
    )
    models = "ONNX server with fp32 and int8 models" if bundle.int8_report is not None else "ONNX server"
    summary = f"wrote {bundle.folder} (TorchServe archive {bundle.mar_file.name}, {models}, mlmodel.json)"
    return Exported(summary, bundle.int8_report)


_ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")
FORMATS: dict[str, ExportFormat] = {
    entry.name: entry
    for entry in (
        ExportFormat("onnx", "file", ("fp32", "int8"), "export", _ONNX_MODULES, write_model_file, onnx_model),
        ExportFormat("torchscript", "file", ("fp32",), "", (), write_model_file, torchscript_model),
        ExportFormat(
            "animl", "folder", ("fp32", "int8"), "deploy", (*_ONNX_MODULES, "model_archiver"), write_animl_folder
        ),
    )
}


def check_format(export_format: str, precision: str) -> ExportFormat:
    """The entry of ``export_format``, once it makes ``precision``.

    Raises:
        ExportError: an unknown format (listing every one) or precision, or a precision the format does not make
            (naming those that do).
    """
    entry = FORMATS.get(export_format)
    if entry is None:
        raise ExportError(f"format: must be one of {list(FORMATS)}, got {export_format!r}")
    if precision not in PRECISIONS:
        raise ExportError(f"precision: must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision not in entry.precisions:
        others = " or ".join(f"format={other.name}" for other in FORMATS.values() if precision in other.precisions)
        raise ExportError(
            f"precision={precision}: {precision} {PRECISION_NOTES[precision]}: use {others}, not {export_format}"
        )
    return entry


def export_classifier(
    loaded: LoadedClassifier,
    export_format: str,
    output: str | Path,
    precision: str = "fp32",
    int8: Int8Settings | None = None,
    cache: OnnxCache | None = None,
) -> ExportResult:
    """Write ``loaded`` as the file format ``export_format`` to ``output`` plus its JSON sidecar.

    With ``precision=int8`` the int8 model is made and checked first
    (:func:`animl_lightning.deploy.quantize.build_int8`), so an int8 model below the agreement floor writes nothing.
    ONNX models come from ``cache`` when it holds them (:mod:`animl_lightning.deploy.onnx_cache`, shared with
    ``classify``) and are stored there when made.

    Raises:
        ExportError: a format or precision this cannot export, a folder format, or the export fails.
        QuantizationError: the int8 model cannot be made or is below ``int8.min_agreement``.
    """
    serialise = check_format(export_format, precision).serialise
    if serialise is None:
        raise ExportError(f"format={export_format}: writes a folder, not one model file")
    return write_model(loaded, export_format, serialise(loaded, precision, int8, cache), output, precision)


def export_checkpoint(
    checkpoint: str | Path,
    export_format: str,
    output: str | Path,
    precision: str = "fp32",
    int8: Int8Settings | None = None,
    cache: OnnxCache | None = None,
) -> ExportResult:
    """Load a checkpoint on the CPU and export it; see :func:`export_classifier`."""
    check_format(export_format, precision)
    check_writable(output, "output")
    loaded = load_classifier(checkpoint, device="cpu")
    return export_classifier(loaded, export_format, output, precision, int8, cache)
