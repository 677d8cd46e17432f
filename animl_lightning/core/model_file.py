"""The deployable model: the part of a checkpoint that classify, export, serve and the reports run on.

A model file is a ``torch.save`` dict of plain values (it loads with ``weights_only=True``, so it cannot run code):

``animl_model``
    The record of :meth:`DeployableModel.record`: ``format``, the architecture (``model_name``, ``model_kwargs``),
    ``labels`` (the :class:`~animl_lightning.core.label_index.LabelIndex`), ``crop_rule``
    (:class:`~animl_lightning.core.crop_rule.CropRule`), ``preprocessing`` (timm data config keys), ``tta`` and
    ``provenance`` (the prepared dataset it was trained on, the package version that wrote it).
``state_dict``
    The network's weights, each key prefixed ``model.``.
``calibration``, ``thresholds``, ``taxonomy``
    The temperature record, the per-label thresholds and the labels' taxonomy, each only when training made one.

Training writes exactly these keys into every Lightning checkpoint (``CropClassifier.on_save_checkpoint``), so a
checkpoint is a superset of a model file and any checkpoint is read here. Checkpoints written before the
``animl_model`` record existed are read from their ``hyper_parameters`` (``crop_strategy``, ``crop_max_size`` and
``crop_lossless`` were then loose keys). Nothing here imports Lightning: deployment carries torch and timm only.
"""

from __future__ import annotations

import io
import math
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn
from typing_extensions import override

from animl_lightning import __version__
from animl_lightning.core.crop_rule import CropRule
from animl_lightning.core.errors import AnimlError, ConfigError, InputFileError, require
from animl_lightning.core.files import atomic_write_bytes, file_sha256
from animl_lightning.core.label_index import LabelIndex
from animl_lightning.core.preprocessing import EvalTransform
from animl_lightning.core.taxonomy import TAXONOMY_KEY, Taxonomy, TaxonomyError

# The checkpoint's top-level key of the model record; Lightning ignores keys it does not know.
MODEL_KEY = "animl_model"
MODEL_FORMAT = 1
# The checkpoint's top-level key of the temperature record (animl_lightning.train.calibration).
CALIBRATION_KEY = "calibration"
# The checkpoint's top-level key of the per-label confidence thresholds (animl_lightning.train.thresholds).
THRESHOLDS_KEY = "thresholds"
# The network's weights inside ``state_dict`` (the LightningModule's attribute name).
WEIGHTS_PREFIX = "model."
# What train.py stored in hyper_parameters before the model record; a checkpoint without them was not written by it.
LEGACY_REQUIRED_HPARAMS = ("model_name", "class_names", "data_config")
# Test-time augmentation modes (``eval.tta``): the logits of a crop and of its mirror image are averaged.
TTA_MODES = ("none", "hflip")


class CheckpointError(InputFileError):
    """A checkpoint file cannot be used; the message names the file and what is wrong with it."""


class FlipAveraged(nn.Module):
    """A network whose logits are the mean of the crop's and its mirror image's (``eval.tta=hflip``).

    Exported as part of the graph (ONNX, TorchScript), so the deployed model is the evaluated one.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    @override
    def forward(self, images: Tensor) -> Tensor:
        logits: Tensor = (self.network(images) + self.network(torch.flip(images, dims=[-1]))) / 2
        return logits


def with_tta(network: nn.Module, mode: str) -> nn.Module:
    """``network`` as predicted with test-time augmentation ``mode`` (:data:`TTA_MODES`)."""
    if mode == "none":
        return network
    if mode == "hflip":
        return FlipAveraged(network)
    raise ConfigError(f"eval.tta: must be one of {list(TTA_MODES)}, got {mode!r}")


def create_network(
    model_name: str,
    num_classes: int,
    model_kwargs: Mapping[str, Any] | None = None,
    pretrained: bool = False,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """The timm network of a classifier: training builds it with these arguments, deployment with the defaults.

    Raises:
        ConfigError: an unknown architecture, or an argument it does not take.
        OSError: ``pretrained`` weights cannot be downloaded (the caller says what to do instead).
    """
    extra = dict(model_kwargs or {})
    if drop_path_rate > 0:
        # Only when asked for: architectures without stochastic depth refuse the argument.
        extra["drop_path_rate"] = drop_path_rate
    try:
        network: nn.Module = timm.create_model(
            model_name, pretrained=pretrained, num_classes=num_classes, drop_rate=drop_rate, **extra
        )
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ConfigError(f"model.model_name: {err}") from err
        raise
    except TypeError as err:  # a create_model argument the architecture does not take
        raise ConfigError(f"model: {model_name} does not take these settings: {err}") from err
    return network


def temperature_of(checkpoint: Mapping[str, Any], source: Path | str = "checkpoint") -> float:
    """The calibration temperature stored in a loaded checkpoint dict (1.0 when it was never calibrated).

    Raises:
        CheckpointError: a stored temperature that is not a positive finite number.
    """
    record = checkpoint.get(CALIBRATION_KEY)
    if isinstance(record, dict) and "temperature" in record:
        value = record["temperature"]
        temperature = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
        if not (math.isfinite(temperature) and temperature > 0):
            raise CheckpointError(f"{source}: field {CALIBRATION_KEY}.temperature must be > 0, got {value!r}")
        return temperature
    return 1.0


def load_checkpoint_dict(path: str | Path) -> tuple[dict[str, Any], str]:
    """A checkpoint file's dict, read with ``weights_only=True``, and the file's SHA-256.

    Raises:
        CheckpointError: missing, a folder, empty, truncated or not a PyTorch file, holding pickled objects (that
            could run code), or not a dict.
    """
    source = Path(path)
    if not source.exists():
        raise CheckpointError(f"checkpoint {source} does not exist")
    if not source.is_file():
        raise CheckpointError(f"checkpoint {source} is not a file")
    if source.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {source} is empty (0 bytes): a save that never finished?")
    try:
        raw = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = str(err)
        if "Unsupported global" in detail or "GLOBAL" in detail:
            raise CheckpointError(
                f"checkpoint {source}: refusing to load a file that holds more than plain weights (pickled Python "
                "objects, which could run code); weights_only=True"
            ) from err
        raise CheckpointError(f"checkpoint {source} cannot be read: not a PyTorch checkpoint") from err
    except Exception as err:  # truncated zips, foreign formats and I/O errors each raise their own type
        raise CheckpointError(
            f"checkpoint {source} cannot be read (truncated, or not a PyTorch checkpoint): {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    if not isinstance(raw, dict):
        raise CheckpointError(f"checkpoint {source}: expected a Lightning checkpoint dict, got {type(raw).__name__}")
    return raw, file_sha256(source)


@dataclass(frozen=True)
class DeployableModel:
    """A trained classifier as deployment needs it: architecture, weights, labels, crop rule and preprocessing.

    Attributes:
        model_name: the timm architecture.
        labels: the output positions' labels.
        crop_rule: how the training crops were cut (classify and the bundles cut the same way).
        preprocessing: timm data config keys (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``,
            ``crop_mode``).
        weights: the network's state dict (keys without the ``model.`` prefix).
        tta: the test-time augmentation built into :meth:`network` (:data:`TTA_MODES`).
        model_kwargs: further ``timm.create_model`` arguments the architecture was built with (a ViT's ``img_size``).
        calibration: the temperature record (``calibrate=true``), or None.
        thresholds: the per-label threshold record (``thresholds.target_precision``), or None.
        taxonomy: the labels' taxonomy (``labels.taxonomy_file`` at prepare time), or None.
        provenance: where it came from (``data_dir``: the prepared dataset; ``animl_lightning_version``).
        source: the file it was read from, if any.
        sha256: that file's SHA-256 ("" when not read from a file).

    Raises:
        ConfigError: a value out of range (fewer than 2 labels, an unknown ``tta``, bad preprocessing, a
            temperature that is not positive, a taxonomy of other labels).
    """

    model_name: str
    labels: LabelIndex
    crop_rule: CropRule
    preprocessing: Mapping[str, Any]
    weights: Mapping[str, Tensor]
    tta: str = "none"
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    calibration: Mapping[str, Any] | None = None
    thresholds: Mapping[str, Any] | None = None
    taxonomy: Taxonomy | None = None
    provenance: Mapping[str, Any] = field(default_factory=dict)
    source: Path | None = None
    sha256: str = ""

    def __post_init__(self) -> None:
        require(
            isinstance(self.model_name, str) and bool(self.model_name),
            "model_name",
            f"must name a timm model, got {self.model_name!r}",
        )
        require(len(self.labels) >= 2, "class_names", f"must list 2 or more labels, got {list(self.labels)}")
        require(self.tta in TTA_MODES, "tta", f"must be one of {list(TTA_MODES)}, got {self.tta!r}")
        self.transform  # noqa: B018 (validates the preprocessing)
        self.temperature  # noqa: B018 (validates the stored temperature)
        require(
            self.taxonomy is None or list(self.taxonomy.labels) == list(self.labels),
            TAXONOMY_KEY,
            "lists other labels than class_names",
        )

    @property
    def class_names(self) -> list[str]:
        """Labels in output order."""
        return list(self.labels)

    @property
    def transform(self) -> EvalTransform:
        """The eval preprocessing of :attr:`preprocessing`."""
        return EvalTransform.from_config(self.preprocessing)

    @property
    def temperature(self) -> float:
        """The calibration temperature (1.0 when the model was never calibrated)."""
        record = None if self.calibration is None else dict(self.calibration)
        return temperature_of({CALIBRATION_KEY: record}, self.source or "model")

    @property
    def data_dir(self) -> str | None:
        """The prepared dataset the model was trained on (``provenance.data_dir``), if recorded."""
        value = self.provenance.get("data_dir")
        return str(value) if isinstance(value, str) and value else None

    # --- reading ---------------------------------------------------------------------------------------------

    @classmethod
    def read(cls, path: str | Path) -> DeployableModel:
        """The model part of a checkpoint or model file, loaded with ``weights_only=True`` on the CPU.

        Raises:
            CheckpointError: the file is unusable (:func:`load_checkpoint_dict`), or holds no model part, or one
                with a missing or malformed field (named).
        """
        raw, sha256 = load_checkpoint_dict(path)
        return cls.from_checkpoint(raw, Path(path), sha256)

    @classmethod
    def from_checkpoint(cls, raw: Mapping[str, Any], source: Path, sha256: str = "") -> DeployableModel:
        """The model part of a loaded checkpoint dict (``source`` names the file in errors).

        Raises:
            CheckpointError: see :meth:`read`.
        """
        state = raw.get("state_dict")
        record = raw.get(MODEL_KEY)
        if record is None and not isinstance(raw.get("hyper_parameters"), dict):
            raise CheckpointError(f"checkpoint {source}: field 'hyper_parameters' is missing: not written by train.py")
        if not isinstance(state, dict):
            raise CheckpointError(f"checkpoint {source}: field 'state_dict' is missing")
        if record is not None:
            if not isinstance(record, dict):
                raise CheckpointError(f"checkpoint {source}: field '{MODEL_KEY}' must be a dict")
            fields = _fields_of_record(record, source)
        else:
            fields = _fields_of_hyper_parameters(raw["hyper_parameters"], source)
        weights = {k[len(WEIGHTS_PREFIX) :]: v for k, v in state.items() if k.startswith(WEIGHTS_PREFIX)}
        temperature_of(raw, source)  # a bad temperature is named with the file, before the model is built
        try:
            return cls(
                **fields,
                weights=weights,
                calibration=_optional_record(raw, CALIBRATION_KEY),
                thresholds=_optional_record(raw, THRESHOLDS_KEY),
                taxonomy=_taxonomy(raw, source),
                source=source,
                sha256=sha256,
            )
        except AnimlError as err:
            raise CheckpointError(f"checkpoint {source}: {err}") from err

    # --- writing ---------------------------------------------------------------------------------------------

    def record(self) -> dict[str, Any]:
        """The ``animl_model`` record: plain values only, so the file loads with ``weights_only=True``."""
        return {
            "format": MODEL_FORMAT,
            "model_name": self.model_name,
            "model_kwargs": dict(self.model_kwargs),
            "labels": self.labels.to_dict(),
            "crop_rule": self.crop_rule.to_dict(),
            "preprocessing": dict(self.preprocessing),
            "tta": self.tta,
            "provenance": dict(self.provenance),
        }

    def write_into(self, checkpoint: dict[str, Any]) -> None:
        """Store the model part in ``checkpoint`` (a Lightning checkpoint dict, or an empty one for a model file).

        The weights go under ``state_dict`` with the ``model.`` prefix, where Lightning keeps them too; the
        calibration, thresholds and taxonomy only when there are some, so records written into the file later
        (calibration, thresholds) are never replaced by an empty one.
        """
        checkpoint[MODEL_KEY] = self.record()
        state = checkpoint.setdefault("state_dict", {})
        for key, value in self.weights.items():
            state[WEIGHTS_PREFIX + key] = value
        if self.calibration is not None:
            checkpoint[CALIBRATION_KEY] = dict(self.calibration)
        if self.thresholds is not None:
            checkpoint[THRESHOLDS_KEY] = dict(self.thresholds)
        if self.taxonomy is not None:
            checkpoint[TAXONOMY_KEY] = self.taxonomy.to_dict()

    def save(self, path: str | Path) -> None:
        """Write a model file (just the model part, no optimizer or loop state) atomically."""
        checkpoint: dict[str, Any] = {}
        self.write_into(checkpoint)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    # --- running ---------------------------------------------------------------------------------------------

    def network(self) -> nn.Module:
        """The eval-mode network on the CPU, with :attr:`tta` built in: what deployment runs and exports.

        Never downloads weights.

        Raises:
            CheckpointError: the weights do not fit the architecture the model names.
        """
        try:
            network = create_network(self.model_name, len(self.labels), self.model_kwargs)
            network.load_state_dict(dict(self.weights))
        except (RuntimeError, TypeError, AnimlError) as err:
            raise CheckpointError(
                f"checkpoint {self.source or 'model'}: its weights do not fit {self.model_name} with "
                f"{len(self.labels)} labels: {str(err).splitlines()[0]}"
            ) from err
        return with_tta(network, self.tta).eval()


def provenance(data_dir: str | None) -> dict[str, Any]:
    """The ``provenance`` of a model trained now on ``data_dir``."""
    return {"data_dir": data_dir, "animl_lightning_version": __version__}


def _fields_of_record(record: Mapping[str, Any], source: Path) -> dict[str, Any]:
    where = f"checkpoint {source}: field '{MODEL_KEY}"
    if record.get("format") != MODEL_FORMAT:
        raise CheckpointError(
            f"{where}.format' must be {MODEL_FORMAT}, got {record.get('format')!r}: written by another version?"
        )
    missing = [key for key in ("model_name", "labels", "crop_rule", "preprocessing") if key not in record]
    if missing:
        raise CheckpointError(f"{where}' lacks {missing}")
    for key in ("crop_rule", "preprocessing", "model_kwargs", "provenance"):
        if not isinstance(record.get(key, {}), dict):
            raise CheckpointError(f"{where}.{key}' must be a dict, got {type(record[key]).__name__}")
    return {
        "model_name": record["model_name"],
        "labels": LabelIndex.from_dict(record["labels"], f"{where}.labels'", CheckpointError),
        "crop_rule": _crop_rule(record["crop_rule"], f"{where}.crop_rule'"),
        "preprocessing": dict(record["preprocessing"]),
        "tta": record.get("tta", "none"),
        "model_kwargs": dict(record.get("model_kwargs") or {}),
        "provenance": dict(record.get("provenance") or {}),
    }


def _fields_of_hyper_parameters(hparams: Mapping[str, Any], source: Path) -> dict[str, Any]:
    """A checkpoint written before the model record: everything is in the CropClassifier's hyper_parameters."""
    missing = [key for key in LEGACY_REQUIRED_HPARAMS if key not in hparams]
    if "crop_rule" not in hparams and "crop_strategy" not in hparams:
        missing.append("crop_strategy")
    if missing:
        raise CheckpointError(
            f"checkpoint {source}: hyper_parameters lacks {missing}: not a CropClassifier checkpoint of train.py"
        )
    names = hparams["class_names"]
    if not isinstance(names, list | tuple) or len(names) < 2:
        raise CheckpointError(f"checkpoint {source}: hyper_parameters.class_names must list 2 or more labels")
    try:
        labels = LabelIndex.of(names)
    except AnimlError as err:
        raise CheckpointError(f"checkpoint {source}: hyper_parameters.class_names: {err}") from err
    return {
        "model_name": str(hparams["model_name"]),
        "labels": labels,
        "crop_rule": crop_rule_of_hyper_parameters(hparams, f"checkpoint {source}: hyper_parameters crop rule"),
        "preprocessing": dict(hparams["data_config"]),
        "tta": str(hparams.get("tta", "none")),
        "model_kwargs": dict(hparams.get("model_kwargs") or {}),
        "provenance": {"data_dir": hparams.get("data_dir")},
    }


def crop_rule_of_hyper_parameters(hparams: Mapping[str, Any], source: str) -> CropRule:
    """A CropClassifier's crop rule: ``crop_rule`` since the model record, loose ``crop_strategy``,
    ``crop_max_size`` and ``crop_lossless`` before.

    Raises:
        CheckpointError: naming ``source``.
    """
    if "crop_rule" in hparams:
        return _crop_rule(hparams["crop_rule"], source)
    try:
        # Checkpoints from before lossless crops have no crop_lossless: their crops were decoded and encoded again.
        return CropRule(
            str(hparams["crop_strategy"]), hparams.get("crop_max_size"), bool(hparams.get("crop_lossless", False))
        )
    except AnimlError as err:
        raise CheckpointError(f"{source}: {err}") from err


def _crop_rule(raw: object, source: str) -> CropRule:
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{source}: must be a dict {{'strategy', 'max_size'}}, got {type(raw).__name__}")
    try:
        return CropRule.from_dict(raw, source)
    except AnimlError as err:
        raise CheckpointError(str(err)) from err


def _optional_record(raw: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    record = raw.get(key)
    return dict(record) if isinstance(record, dict) else None


def _taxonomy(raw: Mapping[str, Any], source: Path) -> Taxonomy | None:
    record = raw.get(TAXONOMY_KEY)
    if record is None:
        return None
    try:
        return Taxonomy.from_dict(record, f"{source}, key '{TAXONOMY_KEY}'")
    except TaxonomyError as err:
        raise CheckpointError(str(err)) from err
