"""int8 for CPU serving: ONNX Runtime static quantization of an exported model, calibrated and checked on val crops.

Animl's endpoints are CPU-only; on CPUs with VNNI (AVX512-VNNI, AVX-VNNI) int8 convolutions run several times
faster than float32 ones. The int8 model is made from the float32 export by ONNX Runtime's ``quantize_static``
(QDQ format, int8 weights per output channel, uint8 activations), with activation ranges measured on
crops of the checkpoint's val split: the prepared dataset ``hyper_parameters.data_dir`` names (or ``int8.data_dir``),
read with :func:`~animl_lightning.core.contract.load_prepared_dataset`, each crop preprocessed with the checkpoint's
:class:`~animl_lightning.core.crop_rule.EvalTransform` exactly as validation did. ``int8.calibration_method`` picks
how a range is set from those activations: ``minmax`` (their extremes, the default), ``entropy`` (the range that keeps
the KL divergence of the histogram smallest) or ``percentile`` (the 99.999th percentile of absolute values), ONNX
Runtime's three calibrators.

The int8 model is then compared with the float32 one on the val crops (every one by default, the calibration crops
included): the share of crops whose top-1 label is the same (``top1_agreement``) and, per label, the recall of each
model against the true labels and its change. Below ``int8.min_agreement`` the model is refused
(:class:`QuantizationError`) and nothing is written.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from animl_lightning.core.contract import load_prepared_dataset
from animl_lightning.core.errors import AnimlError, ConfigError
from animl_lightning.core.preprocessing import EvalTransform
from animl_lightning.deploy.inference import LoadedClassifier
from animl_lightning.deploy.int8_settings import CALIBRATION_METHODS, Int8Settings
from animl_lightning.deploy.onnx_cache import OnnxCache, package_versions, source_digest
from animl_lightning.deploy.onnx_runtime import INPUT_NAME, OnnxClassifier

log = logging.getLogger(__name__)

SPLIT = "val"
QUANTIZATION = "onnxruntime quantize_static: QDQ, int8 per-channel weights, uint8 activations"
# Crops per calibration batch (the MinMax calibrator keeps only each tensor's min and max of a batch; the histogram
# calibrators get one crop per batch, see quantize).
CALIBRATION_BATCH = 16
CHECK_BATCH = 16
_SAMPLE_SEED = 0


class QuantizationError(ConfigError):
    """The int8 model cannot be made or falls below the agreement floor; the message says which, in one line."""


@dataclass(frozen=True)
class ValCrops:
    """The val crops an int8 model is calibrated and checked on.

    Attributes:
        data_dir: the prepared dataset.
        paths: every val crop file, in dataset order.
        labels: each crop's label as an index into the checkpoint's labels (-1: a label the checkpoint lacks).
        calibration: indices into ``paths`` of the calibration sample.
        check: indices into ``paths`` the agreement is measured on.
    """

    data_dir: Path
    paths: list[Path]
    labels: NDArray[np.int64]
    calibration: NDArray[np.int64]
    check: NDArray[np.int64]

    def digest(self) -> str:
        """SHA-256 of the crops used (path, label, size): a changed dataset makes another int8 model."""
        digest = hashlib.sha256()
        for index in sorted({*self.calibration.tolist(), *self.check.tolist()}):
            path = self.paths[index]
            size = path.stat().st_size if path.is_file() else -1
            digest.update(f"{path}\0{int(self.labels[index])}\0{size}\n".encode())
        return digest.hexdigest()


def val_crops(loaded: LoadedClassifier, settings: Int8Settings) -> ValCrops:
    """The val crops of the checkpoint's prepared dataset (or ``int8.data_dir``) and the samples drawn from them.

    Raises:
        QuantizationError: no dataset is known, it is not there, or its val split has no crops.
    """
    data_dir = settings.data_dir or loaded.data_dir
    if not data_dir:
        raise QuantizationError(
            f"precision=int8: {loaded.checkpoint_path} names no prepared dataset (hyper_parameters.data_dir); set "
            "int8.data_dir=PATH to the prepare.py folder it was trained on (its val crops calibrate the int8 model)"
        )
    root = Path(data_dir)
    if not root.is_dir():
        raise QuantizationError(
            f"precision=int8: the prepared dataset {root} is not there; set int8.data_dir=PATH to where it is now "
            "(its val crops calibrate the int8 model)"
        )
    try:
        prepared = load_prepared_dataset(root, check_files=False)
    except AnimlError as error:
        raise QuantizationError(f"precision=int8: int8.data_dir: {error}") from error
    frame = prepared.split_frame(SPLIT)
    if frame.empty:
        raise QuantizationError(f"precision=int8: the {SPLIT!r} split of {root} has no crops to calibrate on")
    positions = {name: index for index, name in enumerate(loaded.class_names)}
    labels = np.array([positions.get(prepared.labels[int(i)], -1) for i in frame["label_idx"]], dtype=np.int64)
    paths = [prepared.crops_dir / str(rel) for rel in frame["path"]]
    order = np.random.default_rng(_SAMPLE_SEED).permutation(len(paths)).astype(np.int64)
    calibration = np.sort(order[: settings.calibration_crops])
    check = np.arange(len(paths), dtype=np.int64) if settings.check_crops is None else order[: settings.check_crops]
    return ValCrops(data_dir=root, paths=paths, labels=labels, calibration=calibration, check=np.sort(check))


def crop_batches(
    paths: list[Path], indices: NDArray[np.int64], transform: EvalTransform, batch_size: int
) -> Iterator[tuple[NDArray[np.int64], NDArray[np.float32]]]:
    """``(indices, model inputs)`` of the crops at ``indices``, preprocessed as validation does, in batches.

    Raises:
        QuantizationError: a crop cannot be read (naming it).
    """
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        inputs = np.empty((len(chunk), *transform.input_size), dtype=np.float32)
        for row, index in enumerate(chunk):
            path = paths[int(index)]
            try:
                with Image.open(path) as image:
                    inputs[row] = transform(image.convert("RGB"))
            except (OSError, ValueError) as error:
                raise QuantizationError(f"precision=int8: cannot read val crop {path}: {error}") from error
        yield chunk, inputs


def quantize(fp32_model: bytes, crops: ValCrops, transform: EvalTransform, method: str = "minmax") -> bytes:
    """The int8 model of ``fp32_model``, its activation ranges set by ``method`` from the calibration crops."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class CropReader(CalibrationDataReader):
        def __init__(self) -> None:
            # ONNX Runtime's histogram calibrators stack every batch of a tensor into one array, which fails when
            # the last batch is smaller: one crop per batch for them (they keep every crop's activations either way).
            size = CALIBRATION_BATCH if method == "minmax" else 1
            self.batches = crop_batches(crops.paths, crops.calibration, transform, size)

        def get_next(self) -> dict[str, NDArray[np.float32]] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch[1]}

    with tempfile.TemporaryDirectory(prefix="animl-int8-") as tmp:
        folder = Path(tmp)
        source, prepared = folder / "fp32.onnx", folder / "prepared.onnx"
        source.write_bytes(fp32_model)
        try:
            # Shape inference and graph fusions (Conv+BatchNorm) first, as ONNX Runtime's documentation asks.
            quant_pre_process(source, prepared)
        except Exception as error:  # the symbolic shape inference gives up on some graphs; quantizing still works
            log.info("int8: quantization pre-processing skipped (%s: %s)", type(error).__name__, error)
            prepared = source
        target = folder / "int8.onnx"
        try:
            quantize_static(
                prepared,
                target,
                CropReader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod[CALIBRATION_METHODS[method]],
            )
        except QuantizationError:
            raise
        except Exception as error:  # onnxruntime.quantization raises plain exceptions of many types
            raise QuantizationError(f"precision=int8: quantization failed: {type(error).__name__}: {error}") from error
        return target.read_bytes()


def agreement(
    fp32: Callable[[NDArray[np.float32]], NDArray[np.float32]],
    int8: Callable[[NDArray[np.float32]], NDArray[np.float32]],
    crops: ValCrops,
    loaded: LoadedClassifier,
) -> dict[str, Any]:
    """Top-1 agreement of the two models on the check crops and each label's recall with each (see module doc)."""
    fp32_top = np.empty(len(crops.check), dtype=np.int64)
    int8_top = np.empty(len(crops.check), dtype=np.int64)
    done = 0
    for chunk, inputs in crop_batches(crops.paths, crops.check, loaded.transform, CHECK_BATCH):
        fp32_top[done : done + len(chunk)] = np.argmax(fp32(inputs), axis=1)
        int8_top[done : done + len(chunk)] = np.argmax(int8(inputs), axis=1)
        done += len(chunk)
    truth = crops.labels[crops.check]
    recall: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(loaded.class_names):
        mask = truth == index
        support = int(mask.sum())
        if support == 0:
            recall[name] = {"support": 0, "fp32": None, "int8": None, "change": None}
            continue
        before = float((fp32_top[mask] == index).mean())
        after = float((int8_top[mask] == index).mean())
        recall[name] = {
            "support": support,
            "fp32": round(before, 4),
            "int8": round(after, 4),
            "change": round(after - before, 4),
        }
    return {
        "split": SPLIT,
        "data_dir": str(crops.data_dir),
        "calibration_crops": len(crops.calibration),
        "check_crops": len(crops.check),
        "top1_agreement": round(float((fp32_top == int8_top).mean()), 4),
        "recall": recall,
    }


def int8_identity(fp32_identity: dict[str, Any], crops: ValCrops, settings: Int8Settings) -> dict[str, Any]:
    """The cache identity of the int8 model made from the float32 model of ``fp32_identity`` on ``crops``."""
    return {
        **fp32_identity,
        "precision": "int8",
        "quantization": QUANTIZATION,
        "calibration_method": settings.calibration_method,
        "calibration_batch": CALIBRATION_BATCH,
        "crops_sha256": crops.digest(),
        "quantizer_source_sha256": source_digest("deploy/quantize.py"),
        "versions": package_versions(),
    }


def build_int8(
    loaded: LoadedClassifier,
    settings: Int8Settings,
    fp32_model: Callable[[], bytes],
    fp32_identity: dict[str, Any],
    cache: OnnxCache | None = None,
) -> tuple[OnnxClassifier, bytes, dict[str, Any]]:
    """The int8 model of ``loaded`` (from ``cache`` when it holds it), checked against the agreement floor.

    Args:
        loaded: the classifier.
        settings: the ``int8.*`` settings.
        fp32_model: gives the float32 ONNX model (called only when the int8 model is built).
        fp32_identity: the float32 model's cache identity (the int8 one extends it).
        cache: where int8 models are kept; None = always build.

    Returns:
        (an ONNX Runtime session of it, its bytes, the agreement report with ``min_agreement``).

    Raises:
        QuantizationError: no val crops, a crop cannot be read, quantization fails, or the agreement is below
            ``settings.min_agreement`` (checked on a cached model too, so a lower floor can reuse it).
    """
    crops = val_crops(loaded, settings)

    def build() -> tuple[bytes, dict[str, Any]]:
        started = time.perf_counter()
        source = fp32_model()
        log.info(
            "int8: calibrating on %d val crops of %s, then checking on %d",
            len(crops.calibration),
            crops.data_dir,
            len(crops.check),
        )
        data = quantize(source, crops, loaded.transform, settings.calibration_method)
        reference = OnnxClassifier(source, INPUT_NAME)
        quantized = OnnxClassifier(data, INPUT_NAME)
        report = {**agreement(reference, quantized, crops, loaded), "calibration_method": settings.calibration_method}
        report["seconds"] = round(time.perf_counter() - started, 1)
        return data, report

    def open_model(data: bytes) -> OnnxClassifier:
        return OnnxClassifier(data, INPUT_NAME)

    if cache is None:
        data, report = build()
        session = open_model(data)
    else:
        session, entry = cache.get_or_build(
            int8_identity(fp32_identity, crops, settings), build, open_model, "int8 ONNX model"
        )
        data, report = entry.data, dict(entry.record)
    report = {**report, "min_agreement": settings.min_agreement}
    check_agreement(report)
    log.info("int8: %s", describe(report))
    return session, data, report


def describe(report: dict[str, Any]) -> str:
    """One line: the agreement and the largest recall drop."""
    changes = [(v["change"], k) for k, v in report["recall"].items() if v.get("change") is not None]
    worst = min(changes) if changes else None
    drop = f"; largest recall change {worst[0]:+.4f} ({worst[1]})" if worst is not None else ""
    return (
        f"top-1 agreement with fp32 {report['top1_agreement']:.4f} on {report['check_crops']} {report['split']} "
        f"crops (min_agreement {report['min_agreement']}){drop}"
    )


def check_agreement(report: dict[str, Any]) -> None:
    """Refuse an int8 model whose top-1 agreement is below its ``min_agreement``.

    Raises:
        QuantizationError: one line with the agreement, the floor and what to do.
    """
    if report["top1_agreement"] < report["min_agreement"]:
        raise QuantizationError(
            f"precision=int8: {describe(report)}: below int8.min_agreement, so nothing was written; use "
            "precision=fp32, or set int8.min_agreement lower if this agreement is acceptable"
        )
