"""The runtimes classify runs a model on (``classify.backend``), one entry each in :data:`RUNTIMES`.

An entry says which precisions the runtime runs, on which devices, which extra brings the modules it imports, how
it turns a loaded checkpoint into a :data:`~animl_lightning.deploy.inference.Predictor`, and when ``backend=auto``
picks it. A new runtime is one entry; the settings check, the ``auto`` rule and the errors read the table.

``backend=auto``: a precision only one runtime runs decides the runtime (int8: ONNX Runtime). Otherwise each
runtime with an ``auto`` rule that can run here (device, installed) is asked in table order; when none takes the
job, :data:`FALLBACK` (PyTorch, which runs everywhere without an extra) runs it.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from numpy.typing import NDArray

from animl_lightning.core.errors import ConfigError, require
from animl_lightning.deploy.inference import LoadedClassifier, Predictor
from animl_lightning.deploy.int8_settings import Int8Settings
from animl_lightning.deploy.onnx_cache import OnnxCache, resolve_cache_dir
from animl_lightning.deploy.onnx_runtime import INPUT_NAME, OnnxClassifier

log = logging.getLogger(__name__)

# backend=auto exports to ONNX (no cached model yet) only for jobs of at least this many crops, where the export
# pays for itself. Measured on the 2-core CPU of benchmarks/bench_classify.py (efficientnet_b3, 288 px): the export
# costs about as much as 450 crops' worth of ONNX Runtime's savings over PyTorch, so 1000 leaves a 2x margin.
AUTO_EXPORT_MIN_CROPS = 1000


class RuntimeSettings(Protocol):
    """The settings a runtime reads (``ClassifySettings`` has them)."""

    @property
    def backend(self) -> str: ...

    @property
    def precision(self) -> str: ...

    @property
    def cache_dir(self) -> str | None: ...

    @property
    def auto_export_min_crops(self) -> int: ...

    @property
    def int8(self) -> Int8Settings: ...


@dataclass(frozen=True)
class AutoVerdict:
    """Whether ``backend=auto`` runs a job on a runtime, and why (logged)."""

    picked: bool
    reason: str


@dataclass(frozen=True)
class Runtime:
    """One ``classify.backend``.

    Args:
        name: the ``backend=`` value, also written as ``classifier_metadata.backend``.
        title: its name in messages.
        precisions: the ``precision=`` values it runs.
        devices: the torch device types it runs on; empty: any.
        extra: the pyproject extra that brings ``modules``.
        modules: what it imports; it is available when every one imports.
        predictor: a predictor of a loaded checkpoint; settings None: float32, no model cache.
        auto: whether ``backend=auto`` gives it a job of so many crops; None: only when asked for by name or by
            precision (or as :data:`FALLBACK`).
    """

    name: str
    title: str
    precisions: tuple[str, ...]
    devices: tuple[str, ...]
    extra: str
    modules: tuple[str, ...]
    predictor: Callable[[LoadedClassifier, RuntimeSettings | None], Predictor]
    auto: Callable[[LoadedClassifier, RuntimeSettings, int], AutoVerdict] | None = None

    def available(self) -> bool:
        """Whether every module it needs imports here."""
        try:
            for module in self.modules:
                importlib.import_module(module)
        except ImportError:
            return False
        return True

    def runs_on(self, device: torch.device) -> bool:
        """Whether it runs models on ``device``."""
        return not self.devices or device.type in self.devices


def onnx_cache(settings: RuntimeSettings) -> OnnxCache | None:
    """The ONNX model cache of ``classify.cache_dir`` (None when it is off)."""
    folder = resolve_cache_dir(settings.cache_dir)
    return None if folder is None else OnnxCache(folder)


def torch_predictor(loaded: LoadedClassifier, settings: RuntimeSettings | None = None) -> Predictor:
    """PyTorch, in channels-last memory format (several times faster for convolutions on the CPU)."""
    network = loaded.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def predict(images: NDArray[np.float32]) -> NDArray[np.float32]:
        batch = torch.from_numpy(images).to(loaded.device, non_blocking=True)
        batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            logits = network(batch)
        return torch.softmax(logits.float() / loaded.temperature, dim=-1).cpu().numpy()

    return predict


def onnx_predictor(loaded: LoadedClassifier, settings: RuntimeSettings | None = None) -> OnnxClassifier:
    """An ONNX Runtime session of ``loaded`` at ``settings.precision``, from the ONNX model cache when it is there.

    Without settings: float32, exported in memory, no cache.

    Raises:
        QuantizationError: int8 asked for and it cannot be made, or is below ``int8.min_agreement``.
    """
    from animl_lightning.deploy.export import cached_onnx, onnx_identity

    cache = None if settings is None else onnx_cache(settings)
    if settings is not None and settings.precision == "int8":
        from animl_lightning.deploy.quantize import build_int8

        def fp32_model() -> bytes:
            return cached_onnx(loaded, cache, lambda data: data)[1].data

        session, _, _ = build_int8(loaded, settings.int8, fp32_model, onnx_identity(loaded), cache)
        return session
    started = time.perf_counter()
    session, _ = cached_onnx(loaded, cache, lambda data: OnnxClassifier(data, INPUT_NAME))
    if cache is None:
        log.info("exported the model to ONNX for ONNX Runtime in %.1f s (no cache)", time.perf_counter() - started)
    return session


def onnx_pays_off(loaded: LoadedClassifier, settings: RuntimeSettings, crops: int) -> AutoVerdict:
    """ONNX Runtime when the exported model is in the cache (faster from the first crop), or when the job has at
    least ``classify.auto_export_min_crops`` crops (the export, paid once, is won back), so ``auto`` never makes a
    job slower than PyTorch."""
    from animl_lightning.deploy.export import onnx_identity

    cache = onnx_cache(settings)
    if cache is not None and cache.has(onnx_identity(loaded)):
        return AutoVerdict(True, f"the exported model is in the cache {cache.folder}")
    minimum = settings.auto_export_min_crops
    if crops >= minimum:
        return AutoVerdict(True, f"{crops} crops >= classify.auto_export_min_crops={minimum} pay for the export")
    return AutoVerdict(
        False,
        f"no exported model in the cache and {crops} crops < classify.auto_export_min_crops={minimum}; "
        "backend=onnxruntime exports once and caches it",
    )


RUNTIMES: dict[str, Runtime] = {
    runtime.name: runtime
    for runtime in (
        Runtime("torch", "PyTorch", ("fp32",), (), "", (), torch_predictor),
        Runtime(
            "onnxruntime",
            "ONNX Runtime",
            ("fp32", "int8"),
            ("cpu",),
            "deploy",
            ("onnxruntime",),
            onnx_predictor,
            auto=onnx_pays_off,
        ),
    )
}
FALLBACK = "torch"


def backends() -> list[str]:
    """Every ``classify.backend``: ``auto`` and each runtime (read from the table, so a new entry is one)."""
    return ["auto", *RUNTIMES]


def precisions() -> list[str]:
    """Every ``classify.precision`` some runtime runs."""
    return list(dict.fromkeys(p for runtime in RUNTIMES.values() for p in runtime.precisions))


def _runtimes_for(precision: str) -> list[Runtime]:
    return [runtime for runtime in RUNTIMES.values() if precision in runtime.precisions]


def check_runtime(backend: str, precision: str) -> None:
    """Refuse an unknown backend or precision, and a backend that does not run the precision.

    Raises:
        ConfigError: naming the setting.
    """
    require(backend in backends(), "backend", f"must be one of {backends()}, got {backend!r}")
    require(precision in precisions(), "precision", f"must be one of {precisions()}, got {precision!r}")
    able = _runtimes_for(precision)
    titles = " or ".join(runtime.title for runtime in able)
    names = " or ".join(f"backend={runtime.name}" for runtime in able)
    require(
        backend == "auto" or RUNTIMES[backend] in able,
        "precision",
        f"{precision} runs on {titles}: use backend=auto or {names} with precision={precision}",
    )


def resolve_backend(loaded: LoadedClassifier, settings: RuntimeSettings, crops: int) -> str:
    """The runtime a job of ``crops`` crops runs on (a :data:`RUNTIMES` name); ``auto``: the module docstring.

    Raises:
        ConfigError: a runtime asked for (by name, or by a precision only it runs) that cannot run on the device
            or is not installed.
    """
    able = _runtimes_for(settings.precision)
    if len(able) == 1:
        # The precision names the runtime; a fallback that does not run it is no way out.
        return _usable(able[0], loaded, f"precision={settings.precision}", None)
    if settings.backend != "auto":
        return _usable(RUNTIMES[settings.backend], loaded, f"backend={settings.backend}", FALLBACK)
    declined = []
    for runtime in able:
        if runtime.auto is None or not (runtime.runs_on(loaded.device) and runtime.available()):
            continue
        verdict = runtime.auto(loaded, settings, crops)
        if verdict.picked:
            log.info("backend=auto: %s (%s)", runtime.title, verdict.reason)
            return runtime.name
        declined.append(verdict.reason)
    if declined:
        log.info("backend=auto: %s (%s)", RUNTIMES[FALLBACK].title, "; ".join(declined))
    return FALLBACK


def _usable(runtime: Runtime, loaded: LoadedClassifier, what: str, other: str | None) -> str:
    """``runtime.name``, once it can run here; ``other``: a backend to suggest instead."""
    if not runtime.runs_on(loaded.device):
        devices = " or ".join(device.upper() for device in runtime.devices)
        instead = f" or backend={other}" if other is not None and other != runtime.name else ""
        raise ConfigError(
            f"{what}: runs on {devices} only; use device={runtime.devices[0]}{instead} (not {loaded.device})"
        )
    if not runtime.available():
        raise ConfigError(f"{what}: {runtime.title} is not installed (pip install -e '.[{runtime.extra}]')")
    return runtime.name


def make_predictor(loaded: LoadedClassifier, backend: str, settings: RuntimeSettings | None = None) -> Predictor:
    """Model inputs -> calibrated probabilities, on ``backend`` (a :data:`RUNTIMES` name, resolved).

    Without ``settings``: float32, no model cache.
    """
    return RUNTIMES[backend].predictor(loaded, settings)
