"""The formats ``python -m animl_lightning.export`` writes (``format=``), one entry each in :data:`FORMATS`.

An entry names the format, says whether it writes a file (plus its JSON sidecar) or a folder, which precisions it
makes, which pyproject extra brings the modules it imports, and the function that writes it. A new format is one
entry: the command, :func:`check_format` and the error listing the formats all read the table. The writers import
their exporters when called, so the table is read (and a missing extra named) before anything heavy is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from animl_lightning.core.errors import AnimlError

if TYPE_CHECKING:
    from animl_lightning.deploy.inference import LoadedClassifier
    from animl_lightning.deploy.onnx_cache import OnnxCache
    from animl_lightning.deploy.quantize import Int8Settings

# Each precision, and what makes it (for the error when a format cannot).
PRECISIONS: dict[str, str] = {"fp32": "is the model as trained", "int8": "is made with ONNX Runtime"}


class ExportError(AnimlError, ValueError):
    """The model cannot be exported in the requested format; the message names the format and the cause."""


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


@dataclass(frozen=True)
class SerialisedModel:
    """A model file's bytes, whether its height and width are dynamic, and the int8 report of an int8 model."""

    data: bytes
    dynamic_size: bool
    int8_report: dict[str, Any] | None = None


# A loaded checkpoint, the precision, the int8 settings and the ONNX model cache -> the model file's content.
Serialiser = Callable[["LoadedClassifier", str, "Int8Settings | None", "OnnxCache | None"], SerialisedModel]


@dataclass(frozen=True)
class ExportFormat:
    """One ``format=``.

    Args:
        name: the ``format=`` value.
        output: ``file`` (a model file and ``<file>.json``) or ``folder``.
        precisions: the ``precision=`` values it makes (keys of :data:`PRECISIONS`).
        extra: the pyproject extra that brings ``modules``; empty: none needed.
        modules: what it imports, checked before any work so a missing one is named with its install command.
        write: loads the checkpoint and writes the output.
        serialise: a file format's model bytes (:func:`animl_lightning.deploy.export.export_classifier` writes them
            with the sidecar); None for a folder.
    """

    name: str
    output: Literal["file", "folder"]
    precisions: tuple[str, ...]
    extra: str
    modules: tuple[str, ...]
    write: Callable[[ExportJob], Exported]
    serialise: Serialiser | None = None


def write_model_file(job: ExportJob) -> Exported:
    """A model file and its sidecar (:func:`animl_lightning.deploy.export.export_checkpoint`)."""
    from animl_lightning.deploy.export import export_checkpoint

    result = export_checkpoint(job.checkpoint, job.format, job.output, job.precision, job.int8, job.cache)
    size = "dynamic batch and input size" if result.dynamic_size else "dynamic batch, fixed input size"
    summary = f"wrote {result.model_file} ({result.format} {result.precision}, {size}) and {result.sidecar_file}"
    return Exported(summary, result.int8_report)


def write_animl_folder(job: ExportJob) -> Exported:
    """The folder Animl's endpoints need (:func:`animl_lightning.deploy.animl_bundle.export_animl`)."""
    from animl_lightning.deploy.animl_bundle import export_animl

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


def _onnx_model(
    loaded: LoadedClassifier, precision: str, int8: Int8Settings | None, cache: OnnxCache | None
) -> SerialisedModel:
    from animl_lightning.deploy.export import onnx_model

    return onnx_model(loaded, precision, int8, cache)


def _torchscript_model(
    loaded: LoadedClassifier, precision: str, int8: Int8Settings | None, cache: OnnxCache | None
) -> SerialisedModel:
    from animl_lightning.deploy.export import torchscript_model

    return torchscript_model(loaded, precision, int8, cache)


_ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")
FORMATS: dict[str, ExportFormat] = {
    entry.name: entry
    for entry in (
        ExportFormat("onnx", "file", ("fp32", "int8"), "export", _ONNX_MODULES, write_model_file, _onnx_model),
        ExportFormat("torchscript", "file", ("fp32",), "", (), write_model_file, _torchscript_model),
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
        raise ExportError(f"precision={precision} {PRECISIONS[precision]}: use {others}, not {export_format}")
    return entry
