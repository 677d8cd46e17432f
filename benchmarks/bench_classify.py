"""Crops classified per second on the CPU: PyTorch eager, PyTorch channels-last and ONNX Runtime, in one run.

Generates camera-trap-sized JPEGs (2048x1536) with MegaDetector boxes, saves a real CropClassifier checkpoint of
``efficientnet_b3`` (``pretrained=False``: throughput does not depend on the weights) and measures, for each backend:

- **end to end**: ``classify``'s own path (decode at the DCT scale the crop needs in loader workers, crop,
  preprocess, forward, calibrated softmax), crops per second;
- **forward only**: the same predictor on ready-made batches, the floor the end-to-end figure can reach.

Eager PyTorch (contiguous tensors) is what ``classify`` ran before ``backend=``, fed by a DataLoader with worker
processes (``end_to_end_before_this_round``); ``classify`` now decodes in threads, ``backend=torch`` runs
channels-last and ``backend=auto`` ONNX Runtime on the CPU. A last run times the whole ``classify`` command path
(:func:`classify_detections`, JSON written) with ``backend=auto``. Results go to ``benchmarks/results/classify.json``.

Run: ``python benchmarks/bench_classify.py [--images 48] [--detections-per-image 2] [--batch 16]``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L  # noqa: N812 (Lightning's documented alias)
import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image
from torch.utils.data import DataLoader

from animl_lightning.core.machine import usable_cores
from animl_lightning.deploy.classify import ClassifySettings, classify_detections, make_predictor
from animl_lightning.deploy.inference import (
    CropRequests,
    DetectionCrops,
    LoadedClassifier,
    classify_requests,
    load_classifier,
)
from animl_lightning.train.classifier import CropClassifier

RESULTS = Path(__file__).resolve().parent / "results" / "classify.json"
MODEL = "efficientnet_b3"
LABELS = [f"species_{i:02d}" for i in range(20)]
Predict = Callable[[NDArray[np.float32]], NDArray[np.float32]]


def make_images(root: Path, count: int, per_image: int, seed: int = 0) -> dict[str, Any]:
    """Smooth random scenes (JPEG-compressible like photos, unlike white noise) with ``per_image`` boxes each."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        small = rng.integers(0, 255, size=(48, 64, 3), dtype=np.uint8)
        scene = Image.fromarray(small).resize((2048, 1536), Image.Resampling.BICUBIC)
        grain = rng.integers(-12, 12, size=(1536, 2048, 3))
        pixels = np.clip(np.asarray(scene, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
        name = f"cam{i % 4}/img_{i:04d}.jpg"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / name, quality=90)
        detections = []
        for _ in range(per_image):
            w, h = rng.uniform(0.08, 0.35), rng.uniform(0.08, 0.35)
            x, y = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
            detections.append({"category": "1", "conf": 0.95, "bbox": [round(v, 4) for v in (x, y, w, h)]})
        images.append({"file": name, "detections": detections})
    return {
        "info": {"format_version": "1.4", "detector": "md_v5a.0.0.pt"},
        "detection_categories": {"1": "animal"},
        "images": images,
    }


def save_checkpoint(path: Path) -> None:
    model = CropClassifier(model_name=MODEL, class_names=LABELS, pretrained=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)


def eager_predictor(loaded: LoadedClassifier) -> Predict:
    """What ``classify`` ran before ``backend=``: the model in PyTorch's default (contiguous) memory format."""
    network = loaded.model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]

    def predict(images: NDArray[np.float32]) -> NDArray[np.float32]:
        with torch.inference_mode():
            logits = network(torch.from_numpy(images))
        return torch.softmax(logits.float() / loaded.temperature, dim=-1).numpy()

    return predict


def forward_only(predict: Predict, batch: NDArray[np.float32], repeats: int) -> float:
    predict(batch)  # warm-up: first-call allocations, oneDNN primitive creation
    started = time.perf_counter()
    for _ in range(repeats):
        predict(batch)
    return repeats * len(batch) / (time.perf_counter() - started)


def _requests(results: dict[str, Any], images: Path) -> CropRequests:
    return CropRequests.build(
        [
            (str(images / image["file"]), tuple(detection["bbox"]), True)
            for image in results["images"]
            for detection in image["detections"]
        ]
    )


def end_to_end(
    predict: Predict, loaded: LoadedClassifier, results: dict[str, Any], images: Path, batch: int, workers: int
) -> tuple[float, int]:
    requests = _requests(results, images)
    started = time.perf_counter()
    done = 0
    for result in classify_requests(
        predict, requests, loaded.transform, loaded.crop_rule, batch_size=batch, num_workers=workers
    ):
        done += len(result.indices)
        assert not any(result.errors), result.errors
    return done / (time.perf_counter() - started), done


def before_end_to_end(
    predict: Predict, loaded: LoadedClassifier, results: dict[str, Any], images: Path, batch: int, workers: int
) -> tuple[float, int]:
    """``classify`` before this round: eager PyTorch fed by a DataLoader with worker processes."""
    requests = _requests(results, images)
    dataset = DetectionCrops(requests, loaded.transform, loaded.crop_rule)
    loader: DataLoader[Any] = DataLoader(dataset, batch_size=batch, num_workers=workers, prefetch_factor=4)  # type: ignore[arg-type]
    started = time.perf_counter()
    done = 0
    for inputs, _, _ in loader:
        predict(inputs.numpy())
        done += len(inputs)
    return done / (time.perf_counter() - started), done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--detections-per-image", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--forward-repeats", type=int, default=4)
    args = parser.parse_args()
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results = make_images(root / "images", args.images, args.detections_per_image)
        ckpt = root / "b3.ckpt"
        save_checkpoint(ckpt)
        loaded = load_classifier(ckpt, device="cpu")
        channels, height, width = loaded.transform.input_size
        batch = np.random.default_rng(1).standard_normal((args.batch, channels, height, width)).astype(np.float32)
        warm = dict(results, images=results["images"][:2])
        for name, build in (
            ("torch_eager", lambda: eager_predictor(load_classifier(ckpt, device="cpu"))),
            ("torch_channels_last", lambda: make_predictor(load_classifier(ckpt, device="cpu"), "torch")),
            ("onnxruntime", lambda: make_predictor(loaded, "onnxruntime")),
        ):
            predict = build()
            floor = forward_only(predict, batch, args.forward_repeats)
            if name == "torch_eager":
                before_end_to_end(predict, loaded, warm, root / "images", args.batch, args.workers)
                before, _ = before_end_to_end(predict, loaded, results, root / "images", args.batch, args.workers)
                print("before", before)
            end_to_end(predict, loaded, warm, root / "images", args.batch, args.workers)
            e2e, crops = end_to_end(predict, loaded, results, root / "images", args.batch, args.workers)
            rows[name] = {
                "forward_only_crops_per_second": round(floor, 2),
                "end_to_end_crops_per_second": round(e2e, 2),
                "crops": crops,
                "forward_over_end_to_end": round(floor / e2e, 3),
            }
            print(name, json.dumps(rows[name]))
            # An idle ONNX Runtime session left alive slows the next one by a third on 2 cores: drop it first.
            del predict
            gc.collect()
        with tempfile.TemporaryDirectory() as out:
            settings = ClassifySettings(batch_size=args.batch, num_workers=args.workers, resume=False)
            summary = classify_detections(loaded, results, root / "images", Path(out) / "out.json", settings)
            command = {
                "backend": "auto",
                "crops_per_second": round(summary.crops_per_second, 2),
                "crops": summary.detections_classified,
            }
            print("classify_detections", json.dumps(command))
    eager = rows["torch_eager"]["end_to_end_crops_per_second"]
    rows["torch_eager"]["end_to_end_before_this_round_crops_per_second"] = round(before, 2)
    ort = rows["onnxruntime"]
    report = {
        "benchmark": "classify crops per second on the CPU: end to end (decode 2048x1536 JPEG at the crop's DCT "
        "scale, crop, preprocess, forward, softmax) and forward only, per backend",
        "model": MODEL,
        "weights": "random (pretrained=false)",
        "input_size": [channels, height, width],
        "batch_size": args.batch,
        "loader_workers": args.workers,
        "images": args.images,
        "detections_per_image": args.detections_per_image,
        "machine": {
            "cpu_cores": usable_cores(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        # Other jobs on the machine slow every run alike; compare runs within one file, not across machines.
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "backends": rows,
        "classify_command_backend_auto": command,
        "onnxruntime_end_to_end_over_eager_end_to_end": round(ort["end_to_end_crops_per_second"] / eager, 2),
        "onnxruntime_end_to_end_over_classify_before_this_round": round(ort["end_to_end_crops_per_second"] / before, 2),
        "target_onnxruntime_over_eager": 4.0,
        "onnxruntime_forward_only_over_end_to_end": ort["forward_over_end_to_end"],
        "target_forward_only_over_end_to_end_at_most": 1.3,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
