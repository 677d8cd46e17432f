"""Crops classified per second by ``classify`` with EfficientNet-B3 (random weights), batched vs batch size 1.

Generates camera-trap-sized JPEGs and a MegaDetector file, saves a real CropClassifier checkpoint of
``efficientnet_b3`` (``pretrained=False``: throughput does not depend on the weights), and times
:func:`animl_lightning.deploy.classify.classify_detections` end to end (decode, crop, preprocess, forward, JSON)
with the old script's batch size 1 and with batching + DataLoader workers, in the same run. On a machine with CUDA
the GPU is measured too. Results go to ``benchmarks/results/classify.json``.

Run: ``python benchmarks/bench_classify.py [--images 48] [--detections-per-image 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L  # noqa: N812 (Lightning's documented alias)
import numpy as np
import torch
from PIL import Image

from animl_lightning.deploy.classify import ClassifySettings, classify_detections
from animl_lightning.deploy.inference import load_classifier
from animl_lightning.train.classifier import CropClassifier

RESULTS = Path(__file__).resolve().parent / "results" / "classify.json"
MODEL = "efficientnet_b3"
LABELS = [f"species_{i:02d}" for i in range(20)]


def make_images(root: Path, count: int, per_image: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        pixels = rng.integers(0, 255, size=(1536, 2048, 3), dtype=np.uint8)
        name = f"cam{i % 4}/img_{i:04d}.jpg"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / name, quality=85)
        detections = []
        for _ in range(per_image):
            w, h = rng.uniform(0.1, 0.4), rng.uniform(0.1, 0.4)
            x, y = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
            detections.append({"category": "1", "conf": 0.95, "bbox": [round(v, 4) for v in (x, y, w, h)]})
        images.append({"file": name, "detections": detections})
    return {
        "info": {"format_version": "1.3", "detector": "md_v5a.0.0.pt"},
        "detection_categories": {"1": "animal"},
        "images": images,
    }


def save_checkpoint(path: Path) -> None:
    model = CropClassifier(model_name=MODEL, class_names=LABELS, pretrained=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)


def measure(ckpt: Path, results: dict[str, Any], images: Path, device: str, batch: int, workers: int) -> dict[str, Any]:
    loaded = load_classifier(ckpt, device=device)
    settings = ClassifySettings(threshold=0.8, batch_size=batch, num_workers=workers, resume=False)
    with tempfile.TemporaryDirectory() as out:
        # Warm-up (allocator, cuDNN autotune, worker start) on a few images, then the timed run.
        warm = dict(results, images=results["images"][:2])
        classify_detections(loaded, warm, images, Path(out) / "warm.json", settings)
        started = time.perf_counter()
        summary = classify_detections(loaded, results, images, Path(out) / "out.json", settings)
        wall = time.perf_counter() - started
    row = {
        "device": device,
        "batch_size": batch,
        "num_workers": workers,
        "crops": summary.detections_classified,
        "seconds": round(wall, 3),
        "crops_per_second": round(summary.detections_classified / wall, 2),
    }
    print(json.dumps(row))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--detections-per-image", type=int, default=2)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results = make_images(root / "images", args.images, args.detections_per_image)
        ckpt = root / "b3.ckpt"
        save_checkpoint(ckpt)
        input_size = load_classifier(ckpt, device="cpu").transform.input_size
        runs = [
            measure(ckpt, results, root / "images", "cpu", 1, 0),  # the old run_classifier.py default
            measure(ckpt, results, root / "images", "cpu", 32, args.workers),
        ]
        if torch.cuda.is_available():
            runs += [
                measure(ckpt, results, root / "images", "cuda", 1, 0),
                measure(ckpt, results, root / "images", "cuda", 64, args.workers),
            ]
    cpu = {(r["device"], r["batch_size"]): r["crops_per_second"] for r in runs}
    report = {
        "benchmark": "classify crops per second, end to end (decode 2048x1536 JPEG, crop, preprocess, forward, JSON)",
        "model": MODEL,
        "weights": "random (pretrained=false)",
        "input_size": list(input_size),
        "images": args.images,
        "detections_per_image": args.detections_per_image,
        "machine": {
            "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        # Other jobs on the machine slow every run alike; compare runs within one file, not across machines.
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "runs": runs,
        "speedup_cpu_batched_vs_batch1": round(cpu[("cpu", 32)] / cpu[("cpu", 1)], 2),
    }
    if torch.cuda.is_available():
        report["speedup_gpu_batched_vs_batch1"] = round(cpu[("cuda", 64)] / cpu[("cuda", 1)], 2)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
