"""A tiny prepared dataset (real JPEG crops + the three dataset files) for the training tests.

Each label has its own colour and texture so that a tiny network can learn it in a couple of epochs:
label 0 is red with horizontal stripes, label 1 green with vertical stripes, label 2 blue with a disc, and
further labels get other hues. Locations are ``loc0..locN`` of dataset ``synthetic``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from animl_lightning.dataset_files import write_classification_csv, write_label_index, write_splits

DATASET = "synthetic"
DEFAULT_LABELS: tuple[str, ...] = ("bird", "fox", "skunk")


def crop_image(label_idx: int, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """A noisy synthetic crop whose colour and pattern identify ``label_idx``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    hue = np.zeros(3, dtype=np.float32)
    hue[label_idx % 3] = 1.0
    if label_idx >= 3:
        hue[(label_idx + 1) % 3] = 0.6
    pattern = label_idx % 3
    if pattern == 0:
        mask = (np.sin(yy / 3.0 + rng.uniform(0, 6)) > 0).astype(np.float32)
    elif pattern == 1:
        mask = (np.sin(xx / 3.0 + rng.uniform(0, 6)) > 0).astype(np.float32)
    else:
        cy, cx = rng.uniform(size * 0.35, size * 0.65, size=2)
        mask = (((yy - cy) ** 2 + (xx - cx) ** 2) < (size * 0.3) ** 2).astype(np.float32)
    base = 40 + 170 * mask[..., None] * hue[None, None, :] + 30 * mask[..., None]
    noisy = base + rng.normal(0, 12, size=(size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), mode="RGB")


def make_prepared_dataset(
    root: str | Path,
    labels: Sequence[str] = DEFAULT_LABELS,
    locations: int = 4,
    per_label: int = 8,
    size: int = 64,
    split_locations: tuple[int, int, int] = (2, 1, 1),
    missing: Sequence[tuple[str, str]] = (),
    seed: int = 0,
    prepare_info: bool = True,
) -> Path:
    """Write a prepared dataset folder (``crops/``, ``classification_ds.csv``, ``label_index.json``, ``splits.json``).

    Args:
        root: output folder.
        labels: label names (written sorted to ``label_index.json``).
        locations: number of locations; every location has ``per_label`` crops of every label.
        per_label: crops per (location, label).
        size: crop side in pixels.
        split_locations: how many locations go to (train, val, test), in location order; test may be 0.
        missing: ``(split, label)`` pairs whose crops are left out, to test labels absent from a split.
        seed: random seed of the pixel noise and confidences.
        prepare_info: also write ``prepare_info.json`` with a crop rule.

    Returns:
        ``root`` as a Path.
    """
    root = Path(root)
    if sum(split_locations) != locations:
        raise ValueError(f"split_locations {split_locations} must add up to {locations}")
    rng = np.random.default_rng(seed)
    ordered = sorted(labels)
    names = ("train", "val", "test")
    split_of = {}
    start = 0
    for name, count in zip(names, split_locations, strict=True):
        for loc in range(start, start + count):
            split_of[f"loc{loc}"] = name
        start += count
    rows = []
    for loc in range(locations):
        location = f"loc{loc}"
        for label in ordered:
            if (split_of[location], label) in set(missing):
                continue
            for k in range(per_label):
                rel = f"{DATASET}/{location}/{label}_{k:03d}.jpg"
                target = root / "crops" / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                crop_image(ordered.index(label), rng, size).save(target, quality=90)
                rows.append(
                    {
                        "path": rel,
                        "dataset": DATASET,
                        "location": location,
                        "dataset_class": label,
                        "confidence": float(np.round(rng.uniform(0.5, 1.0), 3)),
                        "label": label,
                    }
                )
    write_classification_csv(pd.DataFrame(rows), root / "classification_ds.csv")
    write_label_index(ordered, root / "label_index.json")
    write_splits(
        {name: [[DATASET, loc] for loc, s in split_of.items() if s == name] for name in names},
        root / "splits.json",
    )
    if prepare_info:
        info = {"dataset": DATASET, "crops": {"strategy": "square", "max_size": size}}
        (root / "prepare_info.json").write_text(json.dumps(info), encoding="utf-8")
    return root


REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"

# model=tiny at 64 px on CPU, no workers, no progress bar: a 2-epoch fit takes about a second.
FAST_OVERRIDES: tuple[str, ...] = (
    "model=tiny",
    "trainer=cpu",
    "data.image_size=64",
    "data.num_workers=0",
    "data.batch_size=8",
    "trainer.max_epochs=2",
    "callbacks.rich_progress_bar=null",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
)


def compose_train(data_dir: str | Path, output_dir: str | Path, overrides: Sequence[str] = ()) -> Any:
    """Compose ``configs/train.yaml`` for a fast CPU run writing to ``output_dir``, ready for ``train(cfg)``.

    Sets Hydra's global config so that ``${hydra:...}`` interpolations resolve as under ``@hydra.main``.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(
            "train",
            overrides=[
                f"data_dir={data_dir}",
                f"paths.output_dir={output_dir}",
                f"hydra.run.dir={output_dir}",
                *FAST_OVERRIDES,
                *overrides,
            ],
            return_hydra_config=True,
        )
    HydraConfig().set_config(cfg)
    return cfg
