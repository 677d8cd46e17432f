"""Fixtures for the classify/export/calibration/gallery tests: a real CropClassifier checkpoint and camera-trap files.

The checkpoint is a real Lightning checkpoint of timm ``test_efficientnet`` (``pretrained=False``) written by a
``Trainer`` after a one-epoch CPU fit on a few generated crops, so it has exactly the keys train.py writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L  # noqa: N812 (Lightning's documented alias)
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from animl_lightning.classifier import CropClassifier
from animl_lightning.datamodule import resolve_input_size

CLASS_NAMES = ["bird", "deer", "fox", "rabbit"]
IMAGE_SIZE = 64


def tiny_classifier(
    class_names: list[str] | None = None, image_size: int = IMAGE_SIZE, **kwargs: Any
) -> CropClassifier:
    """A randomly initialised ``test_efficientnet`` CropClassifier with a small input size."""
    import timm
    from timm.data import resolve_model_data_config

    torch.manual_seed(0)
    names = class_names or CLASS_NAMES
    reference = timm.create_model("test_efficientnet", pretrained=False, num_classes=len(names))
    data_config = resolve_input_size(resolve_model_data_config(reference), image_size)
    return CropClassifier(
        model_name="test_efficientnet",
        class_names=names,
        pretrained=False,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.01),
        data_config=data_config,
        crop_strategy=kwargs.pop("crop_strategy", "square"),
        crop_max_size=kwargs.pop("crop_max_size", None),
        channels_last=False,
        **kwargs,
    )


def write_checkpoint(path: Path, class_names: list[str] | None = None, **kwargs: Any) -> Path:
    """Fit a tiny classifier for one epoch on random tensors and save a real Lightning checkpoint at ``path``."""
    model = tiny_classifier(class_names, **kwargs)
    n = len(model.class_names)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    labels = torch.arange(16) % n
    loader = DataLoader(TensorDataset(images, labels, torch.arange(16)), batch_size=8)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, train_dataloaders=loader)
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(path)
    return path


def write_jpeg(path: Path, width: int, height: int, seed: int) -> Path:
    """A noisy RGB JPEG with a bright rectangle (something to crop)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 120, size=(height, width, 3), dtype=np.uint8)
    pixels[height // 4 : height // 2, width // 4 : width // 2] = rng.integers(150, 255, size=3, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    return path


def write_megadetector_file(root: Path) -> tuple[Path, Path, dict[str, Any]]:
    """Images and a MegaDetector results file (format 1.3) covering every case classify must handle.

    Returns (detections file, images dir, the results dict as written).
    """
    images_dir = root / "images"
    write_jpeg(images_dir / "cam1" / "a.jpg", 320, 240, 1)
    write_jpeg(images_dir / "cam1" / "b.jpg", 200, 300, 2)
    write_jpeg(images_dir / "cam2" / "c.jpg", 256, 256, 3)
    write_jpeg(images_dir / "cam2" / "e.jpg", 256, 256, 5)
    corrupt = images_dir / "cam2" / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    results = {
        "info": {"format_version": "1.3", "detector": "md_v5a.0.0.pt", "detection_completion_time": "2024-01-01"},
        "detection_categories": {"1": "animal", "2": "person", "3": "vehicle"},
        "images": [
            {
                "file": "cam1/a.jpg",
                "detections": [
                    {"category": "1", "conf": 0.95, "bbox": [0.1, 0.2, 0.3, 0.25]},
                    {"category": "1", "conf": 0.5, "bbox": [0.5, 0.5, 0.2, 0.2]},
                    {"category": "2", "conf": 0.99, "bbox": [0.0, 0.0, 0.5, 0.9]},
                    {"category": "1", "conf": 0.8, "bbox": [0.6, 0.1, 0.39, 0.3]},
                ],
            },
            {"file": "cam1/b.jpg", "detections": [{"category": "1", "conf": 0.91, "bbox": [0.0, 0.0, 1.0, 1.0]}]},
            {"file": "cam2/c.jpg", "detections": []},
            {
                "file": "cam2/d_missing.jpg",
                "detections": [{"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.2, 0.2]}],
            },
            {"file": "cam2/corrupt.jpg", "detections": [{"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.2, 0.2]}]},
            {"file": "cam2/failed_by_md.jpg", "failure": "Failure image access", "detections": None},
            {
                "file": "cam2/e.jpg",
                "detections": [
                    {"category": "1", "conf": 0.85, "bbox": [0.3, 0.3, 0.4, 0.4]},
                    {"category": "1", "conf": 0.82, "bbox": [0.05, 0.6, 0.3, 0.35]},
                ],
            },
        ],
    }
    detections_file = root / "md.json"
    detections_file.write_text(json.dumps(results), encoding="utf-8")
    return detections_file, images_dir, results
