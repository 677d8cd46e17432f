"""Crops of a prepared dataset as train/val/test loaders.

:class:`CropDataset` keeps paths and labels in numpy buffers: with ``num_workers > 0`` each worker process shares
them copy-on-write, and unlike a Python list of strings or a DataFrame, reading an item never touches (and so never
copies) the memory pages holding the other paths.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from lightning import LightningDataModule
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from timm.data.transforms import str_to_interp_mode
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler
from torchvision import transforms
from typing_extensions import override

from animl_lightning.core.contract import SPLIT_NAMES, PreparedDataset, crop_groups, load_prepared_dataset
from animl_lightning.core.errors import ConfigError, DataError, require
from animl_lightning.core.machine import usable_cores
from animl_lightning.core.preprocessing import EvalTransform
from animl_lightning.train.sampling import (
    DistributedWeightedSampler,
    UnpaddedDistributedSampler,
    confidence_weights,
    label_balanced_weights,
)

log = logging.getLogger(__name__)

DATA_CONFIG_KEYS: tuple[str, ...] = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")

Transform = Callable[[Image.Image], torch.Tensor]
CropItem = tuple[torch.Tensor, int, int]


class CropDataset(Dataset[CropItem]):
    """Crop JPEGs with integer labels; items are ``(image tensor, label index, row index)``.

    The row index lets evaluation map predictions back to :meth:`path` without shipping strings through the loader.
    """

    def __init__(
        self, root: str | Path, paths: Sequence[str], labels: np.ndarray, transform: Transform, split: str = ""
    ) -> None:
        """Build the dataset.

        Args:
            root: folder the relative ``paths`` are joined to (the prepared dataset's ``crops/``).
            paths: crop paths relative to ``root`` (already validated by ``load_prepared_dataset``).
            labels: integer label index per crop.
            transform: PIL image -> tensor.
            split: split name, for messages and reports.
        """
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(paths),):
            raise DataError(f"got {len(paths)} paths but labels of shape {labels.shape}")
        encoded = [str(p).encode("utf-8") for p in paths]
        lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self._offsets[1:])
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._labels = labels
        self._root = str(root)
        self.transform = transform
        self.split = split

    def __len__(self) -> int:
        return int(self._labels.shape[0])

    @property
    def labels(self) -> np.ndarray:
        """Integer label index per crop (read-only view)."""
        view = self._labels.view()
        view.flags.writeable = False
        return view

    def path(self, index: int) -> str:
        """Crop path of row ``index``, relative to the crops folder."""
        start, end = self._offsets[index], self._offsets[index + 1]
        return self._buffer[start:end].tobytes().decode("utf-8")

    def paths(self, indices: np.ndarray | None = None) -> np.ndarray:
        """Relative crop paths (``object`` array) of ``indices`` (all rows when None)."""
        rows = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        return np.array([self.path(int(i)) for i in rows], dtype=object)

    @override
    def __getitem__(self, index: int) -> CropItem:
        full = f"{self._root}/{self.path(index)}"
        try:
            with Image.open(full) as image:
                rgb = image.convert("RGB")
        except (OSError, ValueError) as err:
            raise OSError(f"{self.split} crop {index} ({full}): cannot read image: {err}") from err
        return self.transform(rgb), int(self._labels[index]), index


def resolve_input_size(data_config: Mapping[str, Any], image_size: int | None) -> dict[str, Any]:
    """Return a copy of a timm data config restricted to :data:`DATA_CONFIG_KEYS`, with ``image_size`` applied.

    Values are plain Python types (lists, floats, str) so they can be stored in a checkpoint loaded with
    ``weights_only=True``.
    """
    missing = [k for k in ("input_size", "interpolation", "mean", "std", "crop_pct") if k not in data_config]
    if missing:
        raise DataError(f"data config lacks keys {missing}; got {sorted(data_config)}")
    channels, height, width = (int(v) for v in data_config["input_size"])
    if image_size is not None:
        height = width = int(image_size)
    return {
        "input_size": [channels, height, width],
        "interpolation": str(data_config["interpolation"]),
        "mean": [float(v) for v in data_config["mean"]],
        "std": [float(v) for v in data_config["std"]],
        "crop_pct": float(data_config["crop_pct"]),
        "crop_mode": str(data_config.get("crop_mode", "center")),
    }


class _EvalTensor:
    """The crop rule's eval transform, as a torch tensor (a class, not a closure, so loader workers can pickle it)."""

    def __init__(self, transform: EvalTransform) -> None:
        self.transform = transform

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(self.transform(image))


def eval_transform(data_config: Mapping[str, Any]) -> Transform:
    """Deterministic preprocessing: resize to ``size / crop_pct``, centre crop, normalise (timm's eval transform).

    The same :class:`~animl_lightning.core.crop_rule.EvalTransform` that classify, the ONNX server and the TorchServe
    handler run, so evaluation here sees exactly what deployment sees.
    """
    return _EvalTensor(EvalTransform.from_config(data_config))


TRIVIAL_AUGMENT = "trivialaugment"


def check_auto_augment(policy: str | None) -> None:
    """Refuse an ``auto_augment`` policy that neither timm nor torchvision would build, naming the key."""
    if policy is None or policy == TRIVIAL_AUGMENT:
        return
    try:
        rand_augment_transform(policy, {"translate_const": 100, "img_mean": (124, 116, 104)})
    except (AssertionError, ValueError, KeyError, IndexError) as err:
        raise ConfigError(
            f"data.auto_augment: {policy!r} is not a timm RandAugment policy (e.g. rand-m9-mstd0.5-inc1) or "
            f"{TRIVIAL_AUGMENT!r} ({err or type(err).__name__})"
        ) from err


def auto_augment_step(policy: str, data_config: Mapping[str, Any]) -> Callable[[Any], Any]:
    """timm's RandAugment for a ``rand-...`` policy string, torchvision's TrivialAugmentWide for ``trivialaugment``."""
    if policy == TRIVIAL_AUGMENT:
        trivial: Callable[[Any], Any] = transforms.TrivialAugmentWide(
            interpolation=str_to_interp_mode(data_config["interpolation"])
        )
        return trivial
    _, height, width = data_config["input_size"]
    # timm's own hyperparameters for its policies: translations up to 45% of the side, fill with the mean colour.
    hparams = {
        "translate_const": int(min(height, width) * 0.45),
        "img_mean": tuple(min(255, round(255 * x)) for x in data_config["mean"]),
    }
    transform: Callable[[Any], Any] = rand_augment_transform(policy, hparams)
    return transform


def train_transform(
    data_config: Mapping[str, Any],
    crop_scale_min: float,
    hflip_prob: float,
    vflip_prob: float,
    color_jitter: float,
    grayscale_prob: float,
    auto_augment: str | None = None,
) -> Transform:
    """Augmentation for camera-trap crops.

    Crops are already centred on one animal, so the random resized crop keeps at least ``crop_scale_min`` of the
    area (the old pipeline's 8% often cut the animal out). Night frames are grey, hence random grayscale; animals
    are rarely upside down, hence no vertical flips by default. ``auto_augment`` adds a RandAugment or
    TrivialAugment policy after the geometric steps, as timm's training transform does.
    """
    _, height, width = data_config["input_size"]
    steps: list[Callable[[Any], Any]] = [
        transforms.RandomResizedCrop(
            (height, width),
            scale=(crop_scale_min, 1.0),
            interpolation=str_to_interp_mode(data_config["interpolation"]),
        ),
        transforms.RandomHorizontalFlip(hflip_prob),
    ]
    if vflip_prob > 0:
        steps.append(transforms.RandomVerticalFlip(vflip_prob))
    if auto_augment is not None:
        steps.append(auto_augment_step(auto_augment, data_config))
    if color_jitter > 0:
        steps.append(transforms.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    if grayscale_prob > 0:
        steps.append(transforms.RandomGrayscale(grayscale_prob))
    steps += [transforms.ToTensor(), transforms.Normalize(mean=data_config["mean"], std=data_config["std"])]
    composed: Transform = transforms.Compose(steps)
    return composed


class CropDataModule(LightningDataModule):
    """Train/val/test loaders over a ``prepare.py`` output folder.

    The preprocessing (input size, mean, std, interpolation, crop_pct) comes from the model: call
    :meth:`set_data_config` with the model's timm data config before :meth:`setup`; ``image_size`` overrides the
    input size. The training loader draws with a ``WeightedRandomSampler`` when ``label_weighted`` or
    ``weight_by_confidence`` is set (Lightning wraps it for DDP), otherwise it shuffles.

    :attr:`test_split` is the split :meth:`test_dataloader` serves (eval transform); ``train.py`` sets it, together
    with the classifier's ``test_split``, to evaluate the train and val crops through the test loop.
    """

    def __init__(
        self,
        data_dir: str,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        label_weighted: bool = True,
        weight_by_confidence: bool = False,
        image_size: int | None = None,
        pin_memory: bool = True,
        persistent_workers: bool = False,
        drop_last: bool = True,
        crop_scale_min: float = 0.25,
        hflip_prob: float = 0.5,
        vflip_prob: float = 0.0,
        color_jitter: float = 0.2,
        grayscale_prob: float = 0.1,
        auto_augment: str | None = None,
    ) -> None:
        """Validate the settings; nothing is read until :meth:`setup`.

        Args:
            data_dir: ``prepare.py`` output folder.
            batch_size: training batch size (per device).
            eval_batch_size: batch size of the val/test/eval loaders; None = ``batch_size``.
            num_workers: loader worker processes; None = every core this process may use (at most 8).
            label_weighted: draw training crops so each label has equal total weight.
            weight_by_confidence: multiply each crop's sampling weight by its box confidence.
            image_size: square input size overriding the model's default; None = the model's.
            pin_memory: pin host memory (only used with CUDA).
            persistent_workers: keep workers alive between epochs (only with ``num_workers > 0``). Off by default: a
                resumed run is then exact (each epoch's workers are seeded from the restored generators); kept-alive
                workers carry random state across epochs that a checkpoint cannot hold.
            drop_last: drop the last incomplete training batch (a batch of 1 breaks BatchNorm).
            crop_scale_min: smallest area fraction kept by the random resized crop.
            hflip_prob: horizontal flip probability.
            vflip_prob: vertical flip probability.
            color_jitter: brightness/contrast/saturation jitter strength (0 = off).
            grayscale_prob: probability of converting a training crop to grayscale.
            auto_augment: a timm RandAugment policy (``rand-m9-mstd0.5-inc1``) or ``trivialaugment``
                (torchvision's TrivialAugmentWide); None = off.
        """
        super().__init__()
        require(bool(data_dir), "data.data_dir", "must be set to a prepare.py output folder")
        require(batch_size >= 1, "data.batch_size", f"must be >= 1, got {batch_size}")
        require(
            eval_batch_size is None or eval_batch_size >= 1,
            "data.eval_batch_size",
            f"must be null or >= 1, got {eval_batch_size}",
        )
        require(num_workers is None or num_workers >= 0, "data.num_workers", f"must be null or >= 0, got {num_workers}")
        require(image_size is None or image_size >= 8, "data.image_size", f"must be null or >= 8, got {image_size}")
        require(0.0 < crop_scale_min <= 1.0, "data.crop_scale_min", f"must be in (0, 1], got {crop_scale_min}")
        for key, prob in (("hflip_prob", hflip_prob), ("vflip_prob", vflip_prob), ("grayscale_prob", grayscale_prob)):
            require(0.0 <= prob <= 1.0, f"data.{key}", f"must be in [0, 1], got {prob}")
        require(0.0 <= color_jitter < 1.0, "data.color_jitter", f"must be in [0, 1), got {color_jitter}")
        auto_augment = None if auto_augment in (None, "", "none") else str(auto_augment)
        check_auto_augment(auto_augment)
        self.auto_augment = auto_augment
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size if eval_batch_size is not None else batch_size
        # Every usable core, at most 8: more workers than cores only adds contention (and PyTorch's warning).
        self.num_workers = min(8, usable_cores()) if num_workers is None else num_workers
        self.label_weighted = label_weighted
        self.weight_by_confidence = weight_by_confidence
        self.image_size = image_size
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.drop_last = drop_last
        self.crop_scale_min = crop_scale_min
        self.hflip_prob = hflip_prob
        self.vflip_prob = vflip_prob
        self.color_jitter = color_jitter
        self.grayscale_prob = grayscale_prob
        self._prepared: PreparedDataset | None = None
        self._data_config: dict[str, Any] | None = None
        self._datasets: dict[str, CropDataset] = {}
        self.test_split: str = "test"

    @property
    def prepared(self) -> PreparedDataset:
        """The validated prepared dataset (read on first access; raises ``DatasetError`` when inconsistent)."""
        if self._prepared is None:
            self._prepared = load_prepared_dataset(self.data_dir)
            counts = self._prepared.frame["split"].value_counts()
            log.info(
                "dataset %s: %d crops, %d labels, per split %s",
                self.data_dir,
                len(self._prepared.frame),
                len(self._prepared.labels),
                {s: int(counts.get(s, 0)) for s in SPLIT_NAMES},
            )
        return self._prepared

    @property
    def labels(self) -> list[str]:
        """Label names in index order (``label_index.json``)."""
        return list(self.prepared.labels)

    @property
    def data_config(self) -> dict[str, Any]:
        """The preprocessing config in use (see :meth:`set_data_config`)."""
        if self._data_config is None:
            raise RuntimeError("CropDataModule.set_data_config(model.data_config) must be called before setup()")
        return dict(self._data_config)

    def set_data_config(self, data_config: Mapping[str, Any]) -> dict[str, Any]:
        """Use the model's timm data config (with ``image_size`` applied); return the config in effect."""
        self._data_config = resolve_input_size(data_config, self.image_size)
        self._datasets.clear()
        return dict(self._data_config)

    def split_size(self, split: str) -> int:
        """Number of crops in ``split``."""
        _check_split(split)
        return int((self.prepared.frame["split"] == split).sum())

    def crop_groups(self, split: str) -> pd.DataFrame:
        """``path, image, sequence, location, confidence`` of the crops of ``split`` (:func:`crop_groups`)."""
        _check_split(split)
        return crop_groups(self.prepared.split_frame(split))

    @override
    def setup(self, stage: str | None = None) -> None:
        """Read and check the dataset; fitting needs crops in both the train and the val split."""
        frame = self.prepared.frame
        if stage in (None, "fit"):
            for split in ("train", "val"):
                if not (frame["split"] == split).any():
                    raise ConfigError(f"{self.data_dir}: the {split!r} split has no crops; cannot train or validate")

    def dataset(self, split: str, augment: bool = False) -> CropDataset:
        """The crops of ``split``; ``augment`` selects the training transform (else the eval transform)."""
        _check_split(split)
        if augment:
            if split != "train":
                raise DataError("only the train split is augmented")
            if "train" not in self._datasets:
                self._datasets["train"] = self._build("train", self.train_transform())
            return self._datasets["train"]
        key = f"{split}/eval"
        if key not in self._datasets:
            self._datasets[key] = self._build(split, eval_transform(self.data_config))
        return self._datasets[key]

    def train_transform(self) -> Transform:
        """The augmentation pipeline for the current data config."""
        return train_transform(
            self.data_config,
            crop_scale_min=self.crop_scale_min,
            hflip_prob=self.hflip_prob,
            vflip_prob=self.vflip_prob,
            color_jitter=self.color_jitter,
            grayscale_prob=self.grayscale_prob,
            auto_augment=self.auto_augment,
        )

    def train_label_counts(self) -> np.ndarray:
        """Crops per label (index order) in the train split: the prior of the logit-adjusted loss."""
        labels = self.prepared.split_frame("train")["label_idx"].to_numpy(dtype=np.int64)
        return np.bincount(labels, minlength=len(self.prepared.labels))

    def train_sample_weights(self) -> np.ndarray | None:
        """Per-crop sampling weights of the train split, or None when the loader simply shuffles."""
        if not (self.label_weighted or self.weight_by_confidence):
            return None
        train = self.prepared.split_frame("train")
        labels = train["label_idx"].to_numpy(dtype=np.int64)
        confidence = train["confidence"].to_numpy(dtype=np.float64) if self.weight_by_confidence else None
        if self.label_weighted:
            return label_balanced_weights(labels, len(self.prepared.labels), confidence)
        assert confidence is not None
        return confidence_weights(confidence)

    @override
    def train_dataloader(self) -> DataLoader[CropItem]:
        dataset = self.dataset("train", augment=True)
        weights = self.train_sample_weights()
        sampler: Sampler[int] | None = None
        if weights is not None and _world_size() > 1:
            # One weighted draw per epoch shared out disjointly over the ranks (see animl_lightning.train.sampling).
            sampler = DistributedWeightedSampler(weights, seed=torch.initial_seed())
        elif weights is not None:
            sampler = WeightedRandomSampler(
                torch.as_tensor(weights, dtype=torch.double),  # type: ignore[arg-type]  # torch accepts tensors
                num_samples=len(dataset),
                replacement=True,
            )
        return self._loader(
            dataset,
            self.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            # per rank: a shard shorter than one batch would otherwise yield no batch at all
            drop_last=self.drop_last and len(dataset) // _world_size() > self.batch_size,
        )

    @override
    def val_dataloader(self) -> DataLoader[CropItem]:
        return self.eval_dataloader("val")

    @override
    def test_dataloader(self) -> DataLoader[CropItem]:
        return self.eval_dataloader(self.test_split)

    def eval_dataloader(self, split: str) -> DataLoader[CropItem]:
        """Sequential loader over ``split`` with the eval transform (no augmentation), e.g. the train crops.

        Under DDP each rank reads its own unpadded share (:class:`UnpaddedDistributedSampler`), so that no crop is
        counted twice in the gathered metrics.
        """
        dataset = self.dataset(split)
        sampler = UnpaddedDistributedSampler(dataset) if _world_size() > 1 else None
        return self._loader(dataset, self.eval_batch_size, shuffle=False, sampler=sampler)

    def _build(self, split: str, transform: Transform) -> CropDataset:
        rows = self.prepared.split_frame(split)
        return CropDataset(
            root=self.prepared.crops_dir,
            paths=rows["path"].astype(str).tolist(),
            labels=rows["label_idx"].to_numpy(dtype=np.int64),
            transform=transform,
            split=split,
        )

    def _loader(
        self,
        dataset: CropDataset,
        batch_size: int,
        shuffle: bool,
        sampler: Sampler[int] | None = None,
        drop_last: bool = False,
    ) -> DataLoader[CropItem]:
        workers = self.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and workers > 0,
            drop_last=drop_last,
        )


def _world_size() -> int:
    """Number of processes of the initialised default process group (1 without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_world_size())
    return 1


def _check_split(split: str) -> None:
    if split not in SPLIT_NAMES:
        raise DataError(f"unknown split {split!r}; expected one of {list(SPLIT_NAMES)}")
