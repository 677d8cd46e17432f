"""Training throughput: (a) the training DataLoader per worker at EfficientNet-B3's input size, and (b) one training
step of EfficientNet-B3 at batch 64, on CPU and (when available) on a CUDA GPU with bf16, channels_last and
optionally torch.compile.

    python benchmarks/bench_train.py                  # writes benchmarks/results/train.json
    python benchmarks/bench_train.py --cpu-steps 1    # quicker CPU measurement
    python benchmarks/bench_train.py --recipes-only   # (c) only: seconds per training step of each recipe

(c) compares the recipes (``configs/recipe/``): the same real training steps of ``CropClassifier`` built from the
composed config of each recipe (EfficientNet-B0 at 224 px, batch 16, loader in the main process so augmentation
counts), interleaved so that a machine's slow moments hit every recipe alike; the steps are measured after the
head-only epochs (``model.finetune_epochs=0``), where every recipe trains the whole network.

The loader runs the real ``CropDataModule.train_dataloader()`` (label-weighted sampler, PIL decode, random resized
crop, flips, colour jitter, grayscale, normalise) over synthetic photo-like crop JPEGs of 300-600 px. With
``num_workers=0`` the main process does all the loading, which is the throughput of one worker.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import timm
import torch
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from animl_lightning.core.contract import (
    write_classification_csv,
    write_label_index,
    write_splits,
)
from animl_lightning.core.files import atomic_write_json
from animl_lightning.train.datamodule import CropDataModule

RESULTS = Path(__file__).resolve().parent / "results" / "train.json"
MODEL = "efficientnet_b3"


def photo_like_crop(rng: np.random.Generator) -> Image.Image:
    """A crop with smooth structure at several scales plus sensor noise, so JPEG sizes resemble real crops."""
    width, height = (int(v) for v in rng.integers(300, 601, size=2))
    image = np.zeros((height, width, 3), dtype=np.float32)
    for cells, amplitude in ((4, 90.0), (16, 45.0), (64, 20.0)):
        coarse = rng.normal(0, 1, size=(cells, cells, 3)).astype(np.float32)
        layer = Image.fromarray(((coarse - coarse.min()) / np.ptp(coarse) * 255).astype(np.uint8), mode="RGB")
        image += (np.asarray(layer.resize((width, height), Image.BICUBIC), dtype=np.float32) - 128) * amplitude / 128
    image += 110 + rng.normal(0, 6, size=image.shape)
    pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode="RGB")
    return pil.filter(ImageFilter.GaussianBlur(0.6))


def write_dataset(root: Path, images: int, seed: int = 0) -> tuple[Path, float]:
    """A prepared dataset of ``images`` crops (5 labels, all in train except one val location)."""
    rng = np.random.default_rng(seed)
    labels = ["bird", "fox", "lizard", "rodent", "skunk"]
    rows = []
    sizes = []
    for i in range(images):
        label = labels[i % len(labels)]
        location = "val_loc" if i % 10 == 0 else f"loc{i % 7}"
        rel = f"bench/{location}/{i:05d}.jpg"
        target = root / "crops" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        photo_like_crop(rng).save(target, quality=90)
        sizes.append(target.stat().st_size)
        rows.append(
            {
                "path": rel,
                "dataset": "bench",
                "location": location,
                "dataset_class": label,
                "confidence": 1.0,
                "label": label,
            }
        )
    frame = pd.DataFrame(rows)
    write_classification_csv(frame, root / "classification_ds.csv")
    write_label_index(labels, root / "label_index.json")
    train_locations = sorted({r["location"] for r in rows} - {"val_loc"})
    write_splits(
        {"train": [["bench", loc] for loc in train_locations], "val": [["bench", "val_loc"]], "test": []},
        root / "splits.json",
    )
    return root, float(np.mean(sizes)) / 1024


def b3_data_config() -> dict[str, Any]:
    """EfficientNet-B3's data config from timm's registry, without building the model or downloading anything."""
    cfg = timm.get_pretrained_cfg(MODEL)
    assert cfg is not None
    return {
        "input_size": cfg.input_size,
        "interpolation": cfg.interpolation,
        "mean": cfg.mean,
        "std": cfg.std,
        "crop_pct": cfg.crop_pct,
        "crop_mode": cfg.crop_mode,
    }


def bench_loader(data_dir: Path, workers: int, batch_size: int, batches: int) -> dict[str, Any]:
    module = CropDataModule(str(data_dir), batch_size=batch_size, num_workers=workers, persistent_workers=True)
    module.set_data_config(b3_data_config())
    loader = module.train_dataloader()
    iterator = iter(loader)
    # Worker start-up is not throughput; workers prefetch 2 batches each while we wait, so measure many batches.
    next(iterator)
    count = 0
    start = time.perf_counter()
    for _ in range(batches):
        try:
            images, _, _ = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            images, _, _ = next(iterator)
        count += images.shape[0]
    elapsed = time.perf_counter() - start
    per_second = count / elapsed
    return {
        "num_workers": workers,
        "batch_size": batch_size,
        "images": count,
        "seconds": round(elapsed, 3),
        "images_per_second": round(per_second, 1),
        "images_per_second_per_worker": round(per_second / max(workers, 1), 1),
        "input_size": list(module.data_config["input_size"]),
    }


def bench_step(
    device: str,
    batch_size: int,
    steps: int,
    warmup: int,
    warmup_batch: int,
    bf16: bool,
    channels_last: bool,
    compile: bool,
) -> dict[str, Any]:
    """Seconds per forward+backward+AdamW step of EfficientNet-B3 (random init) on random images."""
    torch.manual_seed(0)
    size = b3_data_config()["input_size"][1]
    model = timm.create_model(MODEL, pretrained=False, num_classes=5).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if compile:
        model.compile()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(n: int) -> None:
        images = torch.randn(n, 3, size, size, device=device).contiguous(memory_format=memory_format)
        target = torch.randint(0, 5, (n,), device=device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(images), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step(warmup_batch)
    step(batch_size)  # first step at full size allocates / compiles for that shape
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step(batch_size)
    sync()
    elapsed = (time.perf_counter() - start) / steps
    return {
        "device": device,
        "batch_size": batch_size,
        "input_size": size,
        "bf16": bf16,
        "channels_last": channels_last,
        "compile": compile,
        "steps_measured": steps,
        "seconds_per_step": round(elapsed, 3),
        "images_per_second": round(batch_size / elapsed, 1),
    }


RECIPES = ("seed", "transfer", "modern")


def recipe_parts(recipe: str, data_dir: Path) -> tuple[Any, Any]:
    """The classifier (with its optimizer) and the data module that ``train.py recipe=<recipe>`` would build."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from animl_lightning.cli import CONFIG_DIR, checked_partial
    from animl_lightning.config_schemas import register_schemas

    overrides = [
        f"recipe={recipe}",
        "model=effnet_b0",
        "model.pretrained=false",
        "model.finetune_epochs=0",
        f"data_dir={data_dir}",
        "data.num_workers=0",
        "data.batch_size=16",
    ]
    register_schemas("train")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    datamodule = instantiate(cfg.data)
    model = instantiate(
        cfg.model,
        class_names=datamodule.labels,
        optimizer=checked_partial(instantiate(cfg.optimizer), "optimizer", "params"),
        tta=str(cfg.eval.tta),
        _convert_="all",
    )
    model.data_config = datamodule.set_data_config(model.data_config)
    return model, datamodule


def bench_recipes(data_dir: Path, steps: int, rounds: int) -> dict[str, Any]:
    """Seconds per training step (loading, augmentation, forward, backward, optimizer, EMA) of each recipe."""
    parts = {recipe: recipe_parts(recipe, data_dir) for recipe in RECIPES}
    states = {}
    for recipe, (model, datamodule) in parts.items():
        optimizer = model.configure_optimizers()
        optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
        model.train()
        model.on_fit_start()  # builds the EMA when the recipe has one
        states[recipe] = (model, iter(datamodule.train_dataloader()), datamodule, optimizer)

    def run(recipe: str, count: int) -> float:
        model, batches, datamodule, optimizer = states[recipe]
        started = time.perf_counter()
        for step in range(count):
            try:
                images, target, _ = next(batches)
            except StopIteration:
                batches = iter(datamodule.train_dataloader())
                images, target, _ = next(batches)
            _, loss = model._training_loss(images, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if model._ema is not None:
                model._ema.update(model.model, step=step)
        states[recipe] = (model, batches, datamodule, optimizer)
        return time.perf_counter() - started

    for recipe in RECIPES:
        run(recipe, 1)  # warm-up: allocator, first batch
    seconds: dict[str, list[float]] = {recipe: [] for recipe in RECIPES}
    for _ in range(rounds):
        for recipe in RECIPES:
            seconds[recipe].append(run(recipe, steps) / steps)
    per_step = {recipe: float(np.median(values)) for recipe, values in seconds.items()}
    return {
        "model": "efficientnet_b0",
        "input_size": 224,
        "batch_size": 16,
        "steps_per_round": steps,
        "rounds": rounds,
        "seconds_per_step_median": {k: round(v, 3) for k, v in per_step.items()},
        "ratio_to_seed": {k: round(v / per_step["seed"], 3) for k, v in per_step.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes-only", action="store_true", help="only (c): the recipes' training steps")
    parser.add_argument("--recipe-steps", type=int, default=3)
    parser.add_argument("--recipe-rounds", type=int, default=4)
    parser.add_argument("--images", type=int, default=240, help="synthetic crops to generate")
    parser.add_argument("--loader-batches", type=int, default=12)
    parser.add_argument("--loader-batch-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cpu-steps", type=int, default=2)
    parser.add_argument("--gpu-steps", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile GPU measurement")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    results: dict[str, Any] = {
        "benchmark": "train",
        "model": MODEL,
        "data_config": b3_data_config(),
        "machine": {
            "cpu_cores": cores,
            "platform": platform.platform(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if args.recipes_only:
        torch.set_num_threads(cores)
        with tempfile.TemporaryDirectory() as tmp:
            data_dir, _ = write_dataset(Path(tmp), 96)
            recipes = bench_recipes(data_dir, args.recipe_steps, args.recipe_rounds)
        print(json.dumps(recipes, indent=1))
        previous = json.loads(args.output.read_text()) if args.output.is_file() else {}
        previous["recipe_step"] = {**recipes, "measured_at": results["measured_at"], "machine": results["machine"]}
        atomic_write_json(args.output, previous)
        print(f"wrote {args.output}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        data_dir, mean_kib = write_dataset(Path(tmp), args.images)
        results["crops"] = {"count": args.images, "side_px": [300, 600], "mean_jpeg_kib": round(mean_kib, 1)}
        loaders = [
            bench_loader(data_dir, 0, args.loader_batch_size, args.loader_batches),
            bench_loader(data_dir, 1, args.loader_batch_size, args.loader_batches * 2),
        ]
        if cores > 1:
            loaders.append(bench_loader(data_dir, cores, args.loader_batch_size, args.loader_batches * 2 * cores))
        results["loader"] = loaders
        print(json.dumps(loaders, indent=1))

    torch.set_num_threads(cores)
    cpu = bench_step("cpu", args.batch_size, args.cpu_steps, warmup=1, warmup_batch=8, bf16=False,
                     channels_last=False, compile=False)  # fmt: skip
    results["train_step"] = [cpu]
    print(json.dumps(cpu, indent=1))
    if torch.cuda.is_available():
        variants = [(True, True, False)] + ([] if args.no_compile else [(True, True, True)])
        for bf16, channels_last, compile in variants:
            gpu = bench_step("cuda", args.batch_size, args.gpu_steps, warmup=3, warmup_batch=args.batch_size,
                             bf16=bf16, channels_last=channels_last, compile=compile)  # fmt: skip
            results["train_step"].append(gpu)
            print(json.dumps(gpu, indent=1))
        best_gpu = max(r["images_per_second"] for r in results["train_step"] if r["device"] == "cuda")
        all_cores = loaders[-1]["images_per_second"]
        results["gpu_loader_check"] = {
            "loader_images_per_second_all_cores": all_cores,
            "gpu_step_images_per_second": best_gpu,
            "loader_is_bottleneck": all_cores < best_gpu,
        }
    atomic_write_json(args.output, results)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
