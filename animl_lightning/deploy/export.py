"""Export a checkpoint for deployment: ONNX or TorchScript, plus a JSON sidecar describing the input.

The exported model takes a batch of preprocessed crops, float32 ``(N, 3, H, W)`` normalised with the sidecar's
``mean``/``std``, and returns class probabilities ``(N, C)``: the softmax of the logits divided by the checkpoint's
calibration temperature. The batch axis is always dynamic; height and width are dynamic too unless the timm
architecture has a fixed input size (``dynamic_size`` in the sidecar says which).

With ``precision=int8`` (ONNX only) the model written is the int8 model of
:mod:`animl_lightning.deploy.quantize`, and the sidecar also holds its ``int8`` report (top-1 agreement with the
float32 model and each label's recall change on val); below ``int8.min_agreement`` nothing is written.

The sidecar ``<output>.json`` holds the label index (``{"0": label, ...}``, the ``label_index.json`` shape), the
preprocessing (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``), the crop rule
(``crop_strategy``, ``crop_max_size``), the temperature and the timm model name, so a deployment can reproduce
the training preprocessing without this package.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn
from torch.jit._trace import TracerWarning

from animl_lightning import __version__
from animl_lightning.core.errors import ConfigError, require
from animl_lightning.core.files import atomic_write_bytes, atomic_write_json
from animl_lightning.core.model_file import FlipAveraged
from animl_lightning.deploy.inference import LoadedClassifier
from animl_lightning.deploy.onnx_cache import CachedModel, OnnxCache, package_versions, source_digest
from animl_lightning.deploy.onnx_runtime import INPUT_NAME

if TYPE_CHECKING:
    from animl_lightning.deploy.int8_settings import Int8Settings

log = logging.getLogger(__name__)

OUTPUT_NAME = "probabilities"
ONNX_OPSET = 18
T = TypeVar("T")
_MIN_SIDE = 32
_MAX_SIDE = 4096


class ExportError(ConfigError):
    """The model cannot be exported in the requested format; the message names the format and the cause."""


@dataclass(frozen=True)
class SerialisedModel:
    """A model file's bytes, whether its height and width are dynamic, and the int8 report of an int8 model."""

    data: bytes
    dynamic_size: bool
    int8_report: dict[str, Any] | None = None


class ProbabilityModel(nn.Module):
    """Wrap a classifier so it returns calibrated probabilities: ``softmax(model(x) / temperature)``."""

    def __init__(self, model: nn.Module, temperature: float) -> None:
        super().__init__()
        require(temperature > 0, "temperature", f"must be > 0, got {temperature}")
        self.model = model
        self.register_buffer("inverse_temperature", torch.tensor(1.0 / temperature, dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Probabilities (N, C) of preprocessed crops (N, 3, H, W)."""
        logits = self.model(images)
        return torch.softmax(logits.float() * self.inverse_temperature, dim=-1)


@dataclass(frozen=True)
class ExportResult:
    """Where an export went and what it supports."""

    model_file: Path
    sidecar_file: Path
    format: str
    dynamic_size: bool
    precision: str = "fp32"
    # precision=int8: the agreement report (deploy.quantize.agreement), also in the sidecar.
    int8_report: dict[str, Any] | None = None


def sidecar_path(output: str | Path) -> Path:
    """``<output>.json``, e.g. ``model.onnx`` -> ``model.onnx.json``."""
    path = Path(output)
    return path.with_name(path.name + ".json")


def probability_model(loaded: LoadedClassifier) -> ProbabilityModel:
    """A CPU, eval-mode :class:`ProbabilityModel` of a loaded classifier (the loaded model is not moved)."""
    model = copy.deepcopy(loaded.model).to("cpu").float().eval()
    return ProbabilityModel(model, loaded.temperature).eval()


def supports_dynamic_size(loaded: LoadedClassifier) -> bool:
    """Whether the architecture accepts inputs of other sizes than its configured one (timm's ``fixed_input_size``)."""
    # eval.tta=hflip wraps the timm network, whose own config answers (the wrapper has none, which read as "any size").
    network = loaded.model.network if isinstance(loaded.model, FlipAveraged) else loaded.model
    cfg = getattr(network, "pretrained_cfg", None) or {}
    return not bool(cfg.get("fixed_input_size", False))


def _example_input(loaded: LoadedClassifier, batch: int = 2) -> torch.Tensor:
    channels, height, width = loaded.transform.input_size
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, channels, height, width, generator=generator)


# Loggers of the ONNX exporter's graph passes, which report each pass's bookkeeping at INFO.
_EXPORTER_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """Silence the exporters' chatter (deprecations, graph-pass bookkeeping), which says nothing about this model."""
    loggers = [logging.getLogger(name) for name in _EXPORTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=TracerWarning)
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def onnx_bytes(loaded: LoadedClassifier, dynamic_size: bool | None = None) -> tuple[bytes, bool]:
    """Serialise the probability model as ONNX; returns (model bytes, whether H and W are dynamic).

    Uses the ``torch.export``-based exporter (the maintained one since torch 2.9) with a dynamic batch axis, and
    dynamic height/width when the architecture allows; if the graph cannot be exported with dynamic H/W it
    retries with a dynamic batch only, and if that fails too it falls back to the legacy TorchScript exporter.
    """
    wrapper = probability_model(loaded)
    example = _example_input(loaded)
    want_size = supports_dynamic_size(loaded) if dynamic_size is None else dynamic_size
    attempts = [True, False] if want_size else [False]
    errors: list[str] = []
    with _quiet_exporters():
        for dynamic_hw in attempts:
            batch = torch.export.Dim("batch", min=1, max=65536)
            axes: dict[int, Any] = {0: batch}
            if dynamic_hw:
                axes[2] = torch.export.Dim("height", min=_MIN_SIDE, max=_MAX_SIDE)
                axes[3] = torch.export.Dim("width", min=_MIN_SIDE, max=_MAX_SIDE)
            try:
                program = torch.onnx.export(
                    wrapper,
                    (example,),
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_shapes={"images": axes},
                    opset_version=ONNX_OPSET,
                    dynamo=True,
                    verbose=False,
                )
                if program is None:
                    raise ExportError("onnx: the exporter returned no program")
                return program.model_proto.SerializeToString(), dynamic_hw
            except Exception as error:  # the exporter raises many types (export, ONNX translation, constraints)
                errors.append(f"torch.export exporter (dynamic size {dynamic_hw}): {type(error).__name__}: {error}")
                log.info("ONNX export with dynamic size %s failed; retrying: %s", dynamic_hw, error)
        buffer = io.BytesIO()
        dynamic_axes: dict[str, dict[int, str]] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
        if want_size:
            dynamic_axes[INPUT_NAME].update({2: "height", 3: "width"})
        try:
            torch.onnx.export(
                wrapper,
                (example,),
                buffer,  # type: ignore[arg-type]
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes=dynamic_axes,
                opset_version=17,
                dynamo=False,
            )
        except Exception as error:
            errors.append(f"legacy exporter: {type(error).__name__}: {error}")
            raise ExportError(f"format=onnx: the model could not be exported ({' | '.join(errors)})") from error
        return buffer.getvalue(), want_size


def onnx_identity(loaded: LoadedClassifier, dynamic_size: bool | None = None) -> dict[str, Any]:
    """Everything the float32 ONNX model of :func:`onnx_bytes` depends on: its key in the ONNX model cache.

    The checkpoint (by SHA-256: weights, labels, preprocessing), what the wrapper bakes into the graph
    (temperature, test-time augmentation, example input size, dynamic size), the opset, the sources that build the
    graph (an editable checkout changes them without changing the version) and the versions of the packages that
    write or read it.
    """
    return {
        "checkpoint_sha256": loaded.checkpoint_sha256,
        "precision": "fp32",
        "model_name": loaded.model_name,
        "temperature": loaded.temperature,
        "tta": loaded.tta,
        "input_size": list(loaded.transform.input_size),
        "dynamic_size": "architecture" if dynamic_size is None else dynamic_size,
        "opset": ONNX_OPSET,
        "graph_source_sha256": source_digest("deploy/export.py", "core/model_file.py"),
        "versions": package_versions(),
    }


def cached_onnx(
    loaded: LoadedClassifier, cache: OnnxCache | None, open_model: Callable[[bytes], T]
) -> tuple[T, CachedModel]:
    """The float32 ONNX model of :func:`onnx_bytes`, opened with ``open_model``: from ``cache`` when it holds it
    (else exported and stored there); without a cache, exported.

    ``record["dynamic_size"]`` of the returned entry says whether H and W are dynamic.
    """

    def export() -> tuple[bytes, dict[str, Any]]:
        data, dynamic_size = onnx_bytes(loaded)
        return data, {"dynamic_size": dynamic_size}

    if cache is not None:
        return cache.get_or_build(onnx_identity(loaded), export, open_model, "ONNX model")
    data, record = export()
    return open_model(data), CachedModel(data=data, record=record, from_cache=False, path=None)


def loadable_onnx(data: bytes) -> bytes:
    """``data`` once ONNX Runtime (when installed) has opened it: a cached model it cannot load is built again."""
    try:
        import onnxruntime
    except ImportError:
        return data
    onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return data


def onnx_model(
    loaded: LoadedClassifier, precision: str, int8: Int8Settings | None, cache: OnnxCache | None
) -> SerialisedModel:
    """The ONNX model file of ``format=onnx``: float32 from ``cache`` when it holds it (else exported and stored),
    or the int8 model made and checked from it (:func:`animl_lightning.deploy.quantize.build_int8`)."""
    data, entry = cached_onnx(loaded, cache, loadable_onnx)
    dynamic_size = bool(entry.record.get("dynamic_size", supports_dynamic_size(loaded)))
    if precision != "int8":
        return SerialisedModel(data, dynamic_size)
    from animl_lightning.deploy.int8_settings import Int8Settings
    from animl_lightning.deploy.quantize import build_int8

    _, int8_data, report = build_int8(loaded, int8 or Int8Settings(), lambda: data, onnx_identity(loaded), cache)
    return SerialisedModel(int8_data, dynamic_size, report)


def torchscript_model(
    loaded: LoadedClassifier, precision: str, int8: Int8Settings | None, cache: OnnxCache | None
) -> SerialisedModel:
    """The TorchScript model file of ``format=torchscript`` (float32 only; no cache, it is quick to make)."""
    return SerialisedModel(*torchscript_bytes(loaded))


def torchscript_bytes(loaded: LoadedClassifier) -> tuple[bytes, bool]:
    """Serialise the probability model as TorchScript; returns (model bytes, whether H and W are dynamic).

    ``torch.jit.script`` keeps shape logic as code, so other batch and input sizes work; models that cannot be
    scripted are traced instead, and the trace is checked at a second input size before dynamic size is claimed.
    """
    wrapper = probability_model(loaded)
    example = _example_input(loaded)
    with _quiet_exporters():
        try:
            module: torch.jit.ScriptModule = torch.jit.script(wrapper)
            dynamic_hw = supports_dynamic_size(loaded)
        except Exception as error:  # scripting fails on many Python constructs; tracing is the fallback
            log.info("torch.jit.script failed (%s); tracing instead", error)
            with torch.no_grad():
                module = torch.jit.trace(wrapper, example)
            dynamic_hw = supports_dynamic_size(loaded) and _trace_handles_other_size(module, wrapper, example)
        buffer = io.BytesIO()
        torch.jit.save(module, buffer)
        return buffer.getvalue(), dynamic_hw


def _trace_handles_other_size(module: torch.jit.ScriptModule, wrapper: nn.Module, example: torch.Tensor) -> bool:
    other = torch.randn(1, example.shape[1], example.shape[2] + 32, example.shape[3] + 32)
    try:
        with torch.no_grad():
            return bool(torch.allclose(module(other), wrapper(other), atol=1e-4))
    except RuntimeError:
        return False


def sidecar(
    loaded: LoadedClassifier,
    export_format: str,
    dynamic_size: bool,
    precision: str = "fp32",
    int8_report: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON description written next to an exported model."""
    pre = loaded.transform
    quantization = {} if int8_report is None else {"int8": int8_report}
    return {
        "format": export_format,
        "precision": precision,
        "model_name": loaded.model_name,
        "label_index": loaded.labels.to_dict(),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "output": "probabilities = softmax(logits / temperature)",
        # hflip: the graph averages the logits of each crop and its mirror image (the evaluated model)
        "tta": loaded.tta,
        "input_size": list(pre.input_size),
        "mean": list(pre.mean),
        "std": list(pre.std),
        "interpolation": pre.interpolation,
        "crop_pct": pre.crop_pct,
        "crop_mode": pre.crop_mode,
        # The crop rule as loose keys: the sidecar's layout since its first version, which deployments read.
        "crop_strategy": loaded.crop_rule.strategy,
        "crop_max_size": loaded.crop_rule.max_size,
        "crop_lossless": loaded.crop_rule.lossless,
        "temperature": loaded.temperature,
        "dynamic_batch": True,
        "dynamic_size": dynamic_size,
        "checkpoint": loaded.checkpoint_path.name,
        "animl_lightning_version": __version__,
    } | quantization


def write_model(
    loaded: LoadedClassifier, export_format: str, model: SerialisedModel, output: str | Path, precision: str
) -> ExportResult:
    """Write ``model`` to ``output`` and its JSON sidecar next to it.

    Both files are written atomically; the sidecar last, so a sidecar always describes a complete model file.
    """
    target = Path(output)
    atomic_write_bytes(target, model.data)
    side = sidecar_path(target)
    atomic_write_json(side, sidecar(loaded, export_format, model.dynamic_size, precision, model.int8_report))
    log.debug("wrote %s (%s %s, %.1f MB) and %s", target, export_format, precision, len(model.data) / 1e6, side)
    return ExportResult(
        model_file=target,
        sidecar_file=side,
        format=export_format,
        dynamic_size=model.dynamic_size,
        precision=precision,
        int8_report=model.int8_report,
    )
