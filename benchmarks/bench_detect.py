"""Detect-stage benchmark: prepare's detect stage (MegaDetector's own batch runner in its child process).

Models, built with random weights (no weights can be downloaded here) in MegaDetector v5's layout, YOLOv5's P6
definition with three classes saved half precision as ``{'model': <Model>}``, run at MegaDetector's input size for
MDv5 (1280 px on the long side):

* ``test``: depth/width 0.33/0.25 (3.1 M parameters), the model of ``tests/prepare/test_detect.py``;
* ``mdv5``: depth/width 1.33/1.25 (YOLOv5x6, about 140 M parameters), MegaDetector v5's own size, so its speed is
  MDv5a's (random weights change the boxes, not the work, apart from non-maximum suppression of the few boxes).

Images: ``--images`` camera-trap-sized JPEGs (``--size``, default 2048x1536, noise texture) in one label folder,
read through the folders source. For each model the stage runs twice on fresh output folders, on 1 image and on all
of them, so that the fixed cost (child process start, imports, model load) and the per-image rate separate:
``per_image_s = (T_all - T_1) / (N - 1)``. Also reported: the child's CPU seconds (``RUSAGE_CHILDREN``) per image,
which on a machine shared with other jobs says more than wall-clock time, and the load average before and after.

Run: ``python benchmarks/bench_detect.py [--images 12] [--models test mdv5] [--device cpu]``; writes
``benchmarks/results/detect.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from animl_lightning.core.cct import load_cct
from animl_lightning.core.files import atomic_write_json
from animl_lightning.core.issues import PrepareReport
from animl_lightning.prepare.config import DetectorSettings, FolderSettings
from animl_lightning.prepare.detect import run_detect_stage
from animl_lightning.prepare.folders import build_folder_source
from animl_lightning.prepare.images import ensure_images
from tests.fixtures.detector import build_random_megadetector

MODELS = {"test": (0.33, 0.25), "mdv5": (1.33, 1.25)}


def write_images(root: Path, count: int, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    width, height = size
    for i in range(count):
        # Low-frequency shapes plus grain: a JPEG of camera-trap size and roughly photo-like cost to decode.
        base = rng.integers(0, 255, size=(height // 64 + 1, width // 64 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((width, height), Image.Resampling.BICUBIC)
        grain = rng.integers(-12, 12, size=(height, width, 3))
        pixels = np.clip(np.asarray(image, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
        path = root / "Red Fox" / f"img {i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, format="JPEG", quality=90)


def time_stage(model: Path, root: Path, out: Path, device: str) -> dict[str, float]:
    """One detect stage on every image under ``root``, from a fresh output folder."""
    report = PrepareReport()
    out.mkdir(parents=True)
    source = build_folder_source(FolderSettings(root=str(root)), out, report, whole_image_boxes=False, reuse_scan=False)
    project = load_cct(source.cct_file, report)
    images = ensure_images(project.images, root, None, report)
    settings = DetectorSettings(model_file=str(model), device=device)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    outcome = run_detect_stage(project, images, root, out, settings, None, report)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert outcome.detected == len(images), outcome
    return {
        "images": float(outcome.detected),
        "seconds": seconds,
        "child_cpu_seconds": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--size", type=int, nargs=2, default=(2048, 1536))
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["test", "mdv5"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "detect.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_detect_"))
    try:
        all_images, one_image = work / "all", work / "one"
        write_images(all_images, args.images, tuple(args.size))
        write_images(one_image, 1, tuple(args.size))
        runs: dict[str, Any] = {}
        for name in args.models:
            depth, width = MODELS[name]
            model = build_random_megadetector(work / f"md_random_{name}.pt", depth, width)
            load_before = os.getloadavg()
            one = time_stage(model, one_image, work / f"out_{name}_1", args.device)
            many = time_stage(model, all_images, work / f"out_{name}_n", args.device)
            per_image = (many["seconds"] - one["seconds"]) / (many["images"] - 1)
            cpu_per_image = (many["child_cpu_seconds"] - one["child_cpu_seconds"]) / (many["images"] - 1)
            runs[name] = {
                "depth_width": [depth, width],
                "model_mb": round(model.stat().st_size / 1e6, 1),
                "one_image": one,
                "all_images": many,
                "stage_images_per_s": many["images"] / many["seconds"],
                "fixed_cost_s": one["seconds"] - per_image,
                "per_image_s": per_image,
                "steady_images_per_s": 1.0 / per_image,
                "child_cpu_s_per_image": cpu_per_image,
                "load_average_before_after": [load_before[0], os.getloadavg()[0]],
            }
            print(name, json.dumps(runs[name], indent=1), flush=True)
        payload = {
            "machine": {
                "processor": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                "python": platform.python_version(),
                "torch": torch.__version__,
            },
            "device": args.device,
            "images": args.images,
            "image_size": list(args.size),
            "input_size": 1280,
            "models": runs,
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.output, payload)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
