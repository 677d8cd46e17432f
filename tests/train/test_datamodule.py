"""CropDataset storage, CropDataModule loaders, transforms and sampler weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import RandomSampler, SequentialSampler, WeightedRandomSampler

from animl_lightning.core.contract import DatasetError, read_classification_csv, write_classification_csv
from animl_lightning.train.datamodule import CropDataModule, CropDataset, eval_transform, resolve_input_size
from animl_lightning.train.sampling import label_balanced_weights
from tests.fixtures.datasets import make_prepared_dataset

TIMM_CONFIG = {
    "input_size": (3, 160, 160),
    "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.95,
    "crop_mode": "center",
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_prepared_dataset(tmp_path_factory.mktemp("prepared"), per_label=4)


def make_module(data_dir: Path, **kwargs: object) -> CropDataModule:
    settings: dict[str, object] = {"batch_size": 4, "num_workers": 0, "image_size": 64, **kwargs}
    module = CropDataModule(str(data_dir), **settings)  # type: ignore[arg-type]
    module.set_data_config(TIMM_CONFIG)
    return module


def test_dataset_keeps_paths_in_numpy_buffers(tmp_path: Path) -> None:
    paths = ["a/ünïcode crop.jpg", "b/x.jpg", "c/" + "long" * 50 + ".jpg"]
    for rel in paths:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 30), (200, 10, 10)).save(tmp_path / rel)
    dataset = CropDataset(tmp_path, paths, np.array([2, 0, 1]), eval_transform(resolve_input_size(TIMM_CONFIG, 32)))
    # only numpy arrays (plus the root string and the transform): no per-row Python objects to copy in workers
    for name, value in vars(dataset).items():
        assert not isinstance(value, list | dict | pd.DataFrame | pd.Series), name
    assert isinstance(dataset._buffer, np.ndarray) and dataset._buffer.dtype == np.uint8
    assert [dataset.path(i) for i in range(3)] == paths
    assert list(dataset.paths(np.array([2, 0]))) == [paths[2], paths[0]]
    image, label, index = dataset[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert (label, index) == (2, 0)
    with pytest.raises(ValueError, match="labels of shape"):
        CropDataset(tmp_path, paths, np.array([0, 1]), eval_transform(resolve_input_size(TIMM_CONFIG, 32)))


def test_unreadable_crop_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    dataset = CropDataset(tmp_path, ["bad.jpg"], np.array([0]), eval_transform(TIMM_CONFIG), split="val")
    with pytest.raises(OSError, match=r"val crop 0 .*bad\.jpg"):
        dataset[0]


def test_loaders_shapes_and_samplers(data_dir: Path) -> None:
    module = make_module(data_dir)
    module.setup("fit")
    assert module.labels == ["bird", "fox", "skunk"]
    train = module.train_dataloader()
    assert isinstance(train.sampler, WeightedRandomSampler)
    images, labels, index = next(iter(train))
    assert images.shape == (4, 3, 64, 64)
    assert labels.dtype == torch.int64 and index.dtype == torch.int64
    assert len(train) == 24 // 4  # 2 train locations x 3 labels x 4 crops, drop_last
    val = module.val_dataloader()
    assert isinstance(val.sampler, SequentialSampler)
    assert sum(batch[0].shape[0] for batch in val) == module.split_size("val") == 12
    train_eval = module.eval_dataloader("train")
    assert isinstance(train_eval.sampler, SequentialSampler)
    first = next(iter(train_eval))[0]
    again = next(iter(module.eval_dataloader("train")))[0]
    assert torch.equal(first, again)  # eval transform: no augmentation


def test_sampler_weights_balance_labels_and_use_confidence(data_dir: Path) -> None:
    module = make_module(data_dir, weight_by_confidence=True)
    train = module.prepared.split_frame("train")
    weights = module.train_sample_weights()
    assert weights is not None
    expected = label_balanced_weights(
        train["label_idx"].to_numpy(), 3, confidence=train["confidence"].to_numpy(dtype=float)
    )
    np.testing.assert_allclose(weights, expected)
    sampler = module.train_dataloader().sampler
    assert isinstance(sampler, WeightedRandomSampler)
    np.testing.assert_allclose(sampler.weights.numpy(), expected)

    unweighted = make_module(data_dir, label_weighted=False)
    assert unweighted.train_sample_weights() is None
    assert isinstance(unweighted.train_dataloader().sampler, RandomSampler)
    conf_only = make_module(data_dir, label_weighted=False, weight_by_confidence=True).train_sample_weights()
    assert conf_only is not None
    np.testing.assert_allclose(conf_only / conf_only.sum(), train["confidence"] / train["confidence"].sum())


def test_weighted_sampler_draws_labels_evenly(tmp_path: Path) -> None:
    root = make_prepared_dataset(tmp_path, per_label=6, size=16)
    frame = read_classification_csv(root / "classification_ds.csv")
    rare = frame.index[(frame["label"] == "fox") & frame["location"].isin(["loc0", "loc1"])][:10]
    write_classification_csv(frame.drop(index=rare), root / "classification_ds.csv")
    module = make_module(root)
    labels = module.prepared.split_frame("train")["label_idx"].to_numpy()
    assert np.bincount(labels).tolist() == [12, 2, 12]
    torch.manual_seed(0)
    drawn = np.concatenate([labels[list(module.train_dataloader().sampler)] for _ in range(20)])
    np.testing.assert_allclose(np.bincount(drawn) / len(drawn), [1 / 3] * 3, atol=0.05)


def test_transform_sizes_follow_data_config(data_dir: Path) -> None:
    module = CropDataModule(str(data_dir), num_workers=0)
    effective = module.set_data_config(TIMM_CONFIG)
    assert effective["input_size"] == [3, 160, 160]
    assert module.dataset("val")[0][0].shape == (3, 160, 160)
    assert module.dataset("train", augment=True)[0][0].shape == (3, 160, 160)
    module = CropDataModule(str(data_dir), num_workers=0, image_size=48)
    assert module.set_data_config(TIMM_CONFIG)["input_size"] == [3, 48, 48]
    assert module.dataset("train", augment=True)[0][0].shape == (3, 48, 48)


def test_data_config_required_before_loading(data_dir: Path) -> None:
    module = CropDataModule(str(data_dir), num_workers=0)
    with pytest.raises(RuntimeError, match="set_data_config"):
        module.val_dataloader()


def test_empty_test_split_and_labels_missing_from_a_split(tmp_path: Path) -> None:
    root = make_prepared_dataset(tmp_path, split_locations=(3, 1, 0), missing=[("val", "fox")], per_label=2, size=16)
    module = make_module(root)
    module.setup("fit")
    assert module.split_size("test") == 0
    assert len(module.test_dataloader()) == 0
    assert list(module.test_dataloader()) == []
    assert module.split_size("val") == 4


def test_workers_load_batches(data_dir: Path) -> None:
    module = make_module(data_dir, num_workers=2, persistent_workers=False)
    batches = list(module.val_dataloader())
    assert sum(b[0].shape[0] for b in batches) == 12
    indices = torch.cat([b[2] for b in batches]).tolist()
    assert indices == list(range(12))


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"batch_size": 0}, "data.batch_size"),
        ({"num_workers": -1}, "data.num_workers"),
        ({"image_size": 4}, "data.image_size"),
        ({"crop_scale_min": 0.0}, "data.crop_scale_min"),
        ({"hflip_prob": 1.5}, "data.hflip_prob"),
        ({"color_jitter": 1.0}, "data.color_jitter"),
        ({"eval_batch_size": 0}, "data.eval_batch_size"),
    ],
)
def test_bad_settings_name_the_key(data_dir: Path, kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        CropDataModule(str(data_dir), **kwargs)  # type: ignore[arg-type]


def test_inconsistent_dataset_is_reported_before_loading(tmp_path: Path) -> None:
    root = make_prepared_dataset(tmp_path, per_label=1, size=16)
    next((root / "crops").rglob("*.jpg")).unlink()
    module = make_module(root)
    with pytest.raises(DatasetError, match="missing"):
        module.setup("fit")


def test_test_dataloader_serves_the_chosen_split(data_dir: Path) -> None:
    module = make_module(data_dir)
    assert module.test_dataloader().dataset.split == "test"  # type: ignore[attr-defined]
    module.test_split = "train"
    loader = module.test_dataloader()
    assert loader.dataset.split == "train" and len(loader.dataset) == 24  # type: ignore[attr-defined]
    assert isinstance(loader.sampler, SequentialSampler)
