"""Crop-stage benchmark on camera-trap-sized JPEGs.

Generates ``--images`` 2048x1536 quality-90 JPEGs with photo-like texture (multi-octave noise, gradients and grain:
about 1 MB each; flat synthetic images decode several times faster than photos and would flatter every figure), with
1-3 boxes each whose sides are 5-60% of the frame, then times, interleaved over ``--repeats`` rounds:

(a) ``baseline``: what the old ``crop_detections.py`` did: a thread pool, full PIL decode, convert to RGB, the old
    square rule, ``ImageOps.pad``, save each crop at full resolution;
(b) ``floor``: decode each image once and nothing else, with as many worker processes as (c); and
    ``floor_600``: the same at the JPEG draft scale the ``max_size=600`` crops of each image allow;
(c) ``stage_full`` / ``stage_600``: :func:`animl_lightning.crops.make_crops` with ``strategy=square`` at full
    resolution and with ``max_size=600``.

Every method writes JPEGs at the same quality (``--quality``, default 90 like ``crops.quality``; the old script used
PIL's default 75) so that only the work differs. Reports crops per second (best round and median round), crops per
CPU-second (this process's threads plus its reaped worker processes: on a machine shared with other jobs, wall-clock
parallel speed-ups say more about the neighbours than about the code) and the ratios the issue sets as targets, and
writes them to ``benchmarks/results/crops.json``. ``--box-range 0.4 0.6`` shows the draft-decoding case (every crop
of an image larger than ``max_size``), which the default mix of small and large boxes rarely allows.

Run: ``python benchmarks/bench_crops.py [--images 80] [--workers N] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from animl_lightning.crops import crop_window, draft_reduction, make_crops, output_size
from animl_lightning.prepare_config import CropSettings, default_workers
from animl_lightning.report import PrepareReport

WIDTH, HEIGHT = 2048, 1536
RESULTS = Path(__file__).resolve().parent / "results" / "crops.json"


# --- data ------------------------------------------------------------------------------------------------------


def _texture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Multi-octave value noise, float32 HxWx3, roughly zero-mean."""
    total = np.zeros((height, width, 3), np.float32)
    for octave in range(1, 9):
        cell = max(2, 1024 >> octave)
        gh, gw = height // cell + 2, width // cell + 2
        grid = rng.normal(0.0, 1.0, (gh, gw, 3)).astype(np.float32)
        layers = [
            np.asarray(Image.fromarray(grid[..., c]).resize((gw * cell, gh * cell), Image.Resampling.BICUBIC))
            for c in range(3)
        ]
        total += np.stack(layers, axis=-1)[:height, :width] * (55.0 / octave**0.6)
    return total


def generate_images(folder: Path, n: int, seed: int) -> list[Path]:
    """Write ``n`` photo-like JPEGs (reused when already there)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img_{i:04d}.jpg" for i in range(n)]
    if all(p.exists() for p in paths):
        return paths
    rng = np.random.default_rng(seed)
    # One large texture, cut differently for each image, keeps generation fast while every image differs.
    base = _texture(rng, WIDTH * 2, HEIGHT * 2)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    for path in paths:
        if path.exists():
            continue
        x0, y0 = int(rng.integers(0, WIDTH)), int(rng.integers(0, HEIGHT))
        patch = base[y0 : y0 + HEIGHT, x0 : x0 + WIDTH]
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        tint = rng.uniform(70, 150, 3).astype(np.float32)
        gradient = (xx / WIDTH)[..., None] * rng.uniform(-50, 50, 3) + (yy / HEIGHT)[..., None] * rng.uniform(
            -50, 50, 3
        )
        grain = rng.normal(0.0, 7.0, (HEIGHT, WIDTH, 3)).astype(np.float32)
        pixels = np.clip(tint + patch + gradient + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
    return paths


def make_boxes(paths: list[Path], seed: int, low: float = 0.05, high: float = 0.6) -> pd.DataFrame:
    """1-3 boxes per image, each side a uniform ``low``-``high`` fraction of the frame's, absolute pixels."""
    rng = np.random.default_rng(seed + 1)
    rows = []
    for path in paths:
        for k in range(int(rng.integers(1, 4))):
            w, h = rng.uniform(low, high) * WIDTH, rng.uniform(low, high) * HEIGHT
            x, y = rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h)
            rows.append(
                {
                    "image_id": path.stem,
                    "file_name": path.name,
                    "crop_path": f"{path.name}___crop_{k}.jpg",
                    "x": x,
                    "y": y,
                    "w": w,
                    "h": h,
                    "width": WIDTH,
                    "height": HEIGHT,
                }
            )
    frame = pd.DataFrame(rows)
    frame[["width", "height"]] = frame[["width", "height"]].astype("Int64")
    return frame


# --- methods ---------------------------------------------------------------------------------------------------


def _old_save_crop(img: Image.Image, bbox_norm: list[float], out: str, quality: int) -> None:
    """CT ``crop_detections.save_crop`` with ``--square-crops`` (pipeline.md 2.6), quality aligned."""
    img_w, img_h = img.size
    xmin, ymin = int(bbox_norm[0] * img_w), int(bbox_norm[1] * img_h)
    box_w, box_h = int(bbox_norm[2] * img_w), int(bbox_norm[3] * img_h)
    box_size = max(box_w, box_h)
    xmin = max(0, min(xmin - int((box_size - box_w) / 2), img_w - box_w))
    ymin = max(0, min(ymin - int((box_size - box_h) / 2), img_h - box_h))
    box_w, box_h = min(img_w, box_size), min(img_h, box_size)
    crop = img.crop(box=(xmin, ymin, xmin + box_w, ymin + box_h))
    if box_w != box_h:
        crop = ImageOps.pad(crop, size=(box_size, box_size), color=0)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    crop.save(out, quality=quality)


def _old_load_and_crop(args: tuple[str, list[tuple[list[float], str]], int]) -> int:
    path, crops, quality = args
    with Image.open(path) as img:
        img.load()
    img = img.convert("RGB")
    for bbox, out in crops:
        if not os.path.exists(out):
            _old_save_crop(img, bbox, out, quality)
    return len(crops)


def run_baseline(boxes: pd.DataFrame, images: Path, out: Path, workers: int, quality: int) -> int:
    tasks = []
    for file_name, group in boxes.groupby("file_name", sort=False):
        crops = [
            ([r.x / WIDTH, r.y / HEIGHT, r.w / WIDTH, r.h / HEIGHT], str(out / r.crop_path)) for r in group.itertuples()
        ]
        tasks.append((str(images / str(file_name)), crops, quality))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return sum(pool.map(_old_load_and_crop, tasks))


def _decode_chunk(chunk: list[tuple[str, int]]) -> int:
    for path, divisor in chunk:
        with Image.open(path) as image:
            if divisor > 1:
                image.draft(image.mode, (-(-image.size[0] // divisor), -(-image.size[1] // divisor)))
            image.load()
    return len(chunk)


def needed_divisors(boxes: pd.DataFrame, max_size: int | None) -> dict[str, int]:
    """Per image, the draft divisor its crops allow (the same rule the crop stage uses)."""
    divisors = {}
    for file_name, group in boxes.groupby("file_name", sort=False):
        windows = [crop_window((r.x, r.y, r.w, r.h), (WIDTH, HEIGHT), "square") for r in group.itertuples()]
        divisors[str(file_name)] = draft_reduction([(w, output_size(w, max_size)) for w in windows])
    return divisors


def run_floor(boxes: pd.DataFrame, images: Path, workers: int, divisors: dict[str, int]) -> int:
    items = [(str(images / f), divisors[f]) for f in boxes["file_name"].unique()]
    size = max(1, min(16, math.ceil(len(items) / (workers * 4))))
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return sum(pool.map(_decode_chunk, chunks))


def run_stage(boxes: pd.DataFrame, images: Path, out: Path, workers: int, quality: int, max_size: int | None) -> int:
    report = PrepareReport()
    settings = CropSettings(strategy="square", max_size=max_size, workers=workers, quality=quality)
    result = make_crops(boxes, images, out, settings, report)
    if not result["crop_ok"].all():
        raise RuntimeError(f"crop stage failed: {report.issue_summary()}")
    return int(report.counts["crops"]["written"])


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children (pool workers are reaped on shutdown)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# --- driver ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=80, help="number of generated images (default 80)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="workers for every method")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; best and median are reported")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of every saved crop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--box-range",
        type=float,
        nargs=2,
        default=(0.05, 0.6),
        metavar=("LOW", "HIGH"),
        help="box sides as fractions of the frame's (default 0.05 0.6)",
    )
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "animl_bench_crops")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    load_at_start = list(os.getloadavg())
    images_dir = args.workdir / f"images_{args.images}_{args.seed}"
    start = time.perf_counter()
    paths = generate_images(images_dir, args.images, args.seed)
    generation_s = time.perf_counter() - start
    boxes = make_boxes(paths, args.seed, *args.box_range)
    n_crops = len(boxes)
    mean_bytes = statistics.mean(p.stat().st_size for p in paths)
    divisors_600 = needed_divisors(boxes, 600)
    ones = dict.fromkeys(divisors_600, 1)
    print(
        f"{len(paths)} images ({mean_bytes / 1e6:.2f} MB mean), {n_crops} crops, {args.workers} workers; "
        f"draft divisors for max_size=600: {dict(sorted(pd.Series(divisors_600).value_counts().items()))}",
        flush=True,
    )

    out_root = args.workdir / "out"
    methods: dict[str, Callable[[Path], int]] = {
        "baseline": lambda out: run_baseline(boxes, images_dir, out, args.workers, args.quality),
        "floor": lambda out: run_floor(boxes, images_dir, args.workers, ones) and n_crops,
        "floor_600": lambda out: run_floor(boxes, images_dir, args.workers, divisors_600) and n_crops,
        "stage_full": lambda out: run_stage(boxes, images_dir, out, args.workers, args.quality, None),
        "stage_600": lambda out: run_stage(boxes, images_dir, out, args.workers, args.quality, 600),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    for round_ in range(args.repeats):
        for name, method in methods.items():
            out = out_root / name
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            c0 = _cpu_seconds()
            t0 = time.perf_counter()
            done = method(out)
            elapsed = time.perf_counter() - t0
            cpu[name].append(_cpu_seconds() - c0)
            if done != n_crops:
                raise RuntimeError(f"{name} produced {done} crops, expected {n_crops}")
            times[name].append(elapsed)
            print(
                f"round {round_ + 1} {name:<10} {elapsed:6.2f} s  {n_crops / elapsed:7.1f} crops/s  "
                f"(cpu {cpu[name][-1]:5.2f} s, load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
    shutil.rmtree(out_root, ignore_errors=True)

    best = {name: n_crops / min(t) for name, t in times.items()}
    median = {name: n_crops / statistics.median(t) for name, t in times.items()}
    per_cpu = {name: n_crops / min(c) for name, c in cpu.items()}
    ratios = {
        "stage_full_over_baseline": best["stage_full"] / best["baseline"],
        "stage_600_over_baseline": best["stage_600"] / best["baseline"],
        "floor_600_over_stage_600": best["floor_600"] / best["stage_600"],
    }
    cpu_ratios = {
        "stage_full_over_baseline": per_cpu["stage_full"] / per_cpu["baseline"],
        "stage_600_over_baseline": per_cpu["stage_600"] / per_cpu["baseline"],
        "floor_600_over_stage_600": per_cpu["floor_600"] / per_cpu["stage_600"],
    }
    targets = {
        "stage_full >= 1.3x baseline": ratios["stage_full_over_baseline"] >= 1.3,
        "stage_600 >= 2x baseline": ratios["stage_600_over_baseline"] >= 2.0,
        "stage_600 within 1.25x of floor_600": ratios["floor_600_over_stage_600"] <= 1.25,
    }
    result: dict[str, object] = {
        "machine": {
            "cpus": os.cpu_count(),
            "usable_cpus": default_workers(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "pillow": Image.__version__,
            "load_average_at_start": load_at_start,
            "load_average_at_end": list(os.getloadavg()),
        },
        "setup": {
            "images": len(paths),
            "image_size": [WIDTH, HEIGHT],
            "mean_image_bytes": round(mean_bytes),
            "crops": n_crops,
            "workers": args.workers,
            "quality": args.quality,
            "repeats": args.repeats,
            "strategy": "square",
            "box_side_fraction": list(args.box_range),
            "draft_divisors_600": {str(k): int(v) for k, v in pd.Series(divisors_600).value_counts().items()},
            "generation_s": round(generation_s, 1),
        },
        "seconds": {name: [round(t, 3) for t in ts] for name, ts in times.items()},
        "crops_per_second_best": {k: round(v, 1) for k, v in best.items()},
        "crops_per_second_median": {k: round(v, 1) for k, v in median.items()},
        "cpu_seconds": {name: [round(t, 3) for t in ts] for name, ts in cpu.items()},
        "crops_per_cpu_second_best": {k: round(v, 1) for k, v in per_cpu.items()},
        "ratios_best": {k: round(v, 3) for k, v in ratios.items()},
        "ratios_cpu": {k: round(v, 3) for k, v in cpu_ratios.items()},
        "targets_met": targets,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    summary = ("crops_per_second_best", "crops_per_cpu_second_best", "ratios_best", "ratios_cpu", "targets_met")
    print(json.dumps({k: result[k] for k in summary}, indent=1))
    return result


if __name__ == "__main__":
    main()
