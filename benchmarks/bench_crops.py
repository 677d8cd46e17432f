"""Crop-stage benchmark on camera-trap-sized JPEGs.

Generates ``--images`` 2048x1536 quality-90 JPEGs with photo-like texture (multi-octave noise, gradients and grain:
about 1 MB each; flat synthetic images decode several times faster than photos and would flatter every figure), with
1-3 boxes each "from 5% to 60% of the frame". That is read as box *area* (a uniform 5-60% of the frame's area,
aspect ratio log-uniform in 1:2-2:1, square sides about 400-1900 px) for the headline figures; the same run repeats
everything with the other reading, each *side* a uniform 5-60% of the frame's side (areas 0.25-36%, mostly small
boxes), under ``readings``. Then it times, interleaved over ``--repeats`` rounds:

(a) ``baseline``: what the old ``crop_detections.py`` did: a thread pool, full PIL decode, convert to RGB, the old
    square rule, ``ImageOps.pad``, save each crop at full resolution; ``baseline_q75`` the same at PIL's default
    quality 75, which the old script really used;
(b) ``floor``: decode each image once with the crop stage's own decoder (:func:`decode_image`) and nothing else, in
    as many worker processes as (c); ``floor_600``: the same at the DCT scale the ``max_size=600`` crops of each image
    allow; ``floor_pil`` / ``floor_pil_600``: the same with PIL's decoder (the previous floor), for comparison;
(c) ``stage_full`` / ``stage_600``: :func:`animl_lightning.core.crop_rule.make_crops` with ``strategy=square`` at full
    resolution and with ``max_size=600``.

Every method but ``baseline_q75`` writes JPEGs at the same quality (``--quality``, default 90 like
``crops.quality``) so that only the work differs. Reports crops per second (best round and median round), crops per
CPU-second (this process's threads plus its reaped worker processes: on a machine shared with other jobs, wall-clock
figures say as much about the neighbours as about the code) and the ratios the issue sets as targets, and writes them
to ``benchmarks/results/crops.json``. ``breakdown_one_process`` splits one in-process run of the stage into decode,
resample, encode and write time (cProfile), which shows how close the floor target can be got at all.

Run: ``python benchmarks/bench_crops.py [--images 80] [--workers N] [--repeats 3] [--readings area side]``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import os
import platform
import pstats
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
import simplejpeg
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from animl_lightning.core.crop_rule import crop_window, draft_reduction, output_size
from animl_lightning.core.imaging import decode_image
from animl_lightning.core.issues import PrepareReport
from animl_lightning.core.machine import usable_cores
from animl_lightning.prepare.config import CropSettings
from animl_lightning.prepare.crop_stage import make_crops

WIDTH, HEIGHT = 2048, 1536
RESULTS = Path(__file__).resolve().parent / "results" / "crops.json"
ASPECT_RANGE = (0.5, 2.0)
OLD_SCRIPT_QUALITY = 75  # crop_detections.py called crop.save(path) with PIL's default quality


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


def make_boxes(
    paths: list[Path], seed: int, low: float = 0.05, high: float = 0.6, reading: str = "area"
) -> pd.DataFrame:
    """1-3 boxes per image, "from ``low`` to ``high`` of the frame", absolute pixels.

    ``reading="area"`` (the default, how "5% to 60% of the frame" reads): the box *area* is a uniform
    ``low``-``high`` fraction of the frame's area and its aspect ratio (w/h in pixels) log-uniform in
    ``ASPECT_RANGE``, narrowed where needed so that the box fits the frame (the area is then exact).
    ``reading="side"``: each side is an independent uniform ``low``-``high`` fraction of the frame's side (areas
    0.25%-36%: mostly small boxes).
    """
    rng = np.random.default_rng(seed + 1)
    rows = []
    for path in paths:
        for k in range(int(rng.integers(1, 4))):
            if reading == "side":
                w, h = rng.uniform(low, high) * WIDTH, rng.uniform(low, high) * HEIGHT
            else:
                area = rng.uniform(low, high) * WIDTH * HEIGHT
                # w = sqrt(area * r) <= WIDTH and h = sqrt(area / r) <= HEIGHT bound the aspect ratio r.
                r_low = max(ASPECT_RANGE[0], area / HEIGHT**2)
                r_high = min(ASPECT_RANGE[1], WIDTH**2 / area)
                ratio = math.exp(rng.uniform(math.log(r_low), math.log(r_high)))
                w, h = math.sqrt(area * ratio), math.sqrt(area / ratio)
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
    """PIL decode (what the old script and the previous stage used), at a draft divisor."""
    for path, divisor in chunk:
        with Image.open(path) as image:
            if divisor > 1:
                image.draft(image.mode, (-(-image.size[0] // divisor), -(-image.size[1] // divisor)))
            image.load()
    return len(chunk)


def _decode_chunk_stage(chunk: list[tuple[str, int]]) -> int:
    """The crop stage's own decode (:func:`decode_image`: header, EXIF, libjpeg-turbo), at a DCT divisor."""
    for path, divisor in chunk:
        decode_image(Path(path), lambda _size, d=divisor: d)
    return len(chunk)


def needed_divisors(boxes: pd.DataFrame, max_size: int | None) -> dict[str, int]:
    """Per image, the draft divisor its crops allow (the same rule the crop stage uses)."""
    divisors = {}
    for file_name, group in boxes.groupby("file_name", sort=False):
        windows = [crop_window((r.x, r.y, r.w, r.h), (WIDTH, HEIGHT), "square") for r in group.itertuples()]
        divisors[str(file_name)] = draft_reduction([(w, output_size(w, max_size)) for w in windows])
    return divisors


def run_floor(boxes: pd.DataFrame, images: Path, workers: int, divisors: dict[str, int], decoder: str = "stage") -> int:
    task = _decode_chunk_stage if decoder == "stage" else _decode_chunk
    items = [(str(images / f), divisors[f]) for f in boxes["file_name"].unique()]
    size = max(1, min(16, math.ceil(len(items) / (workers * 4))))
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return sum(pool.map(task, chunks))


def run_stage(boxes: pd.DataFrame, images: Path, out: Path, workers: int, quality: int, max_size: int | None) -> int:
    report = PrepareReport()
    # Today's decode-and-encode stage, as these figures were first measured (bench_lossless_crops.py: lossless).
    settings = CropSettings(strategy="square", max_size=max_size, workers=workers, quality=quality, lossless=False)
    result = make_crops(boxes, images, out, settings, report)
    if not result["crop_ok"].all():
        raise RuntimeError(f"crop stage failed: {report.issue_summary()}")
    return int(report.counts["crops"]["written"])


# Stage functions whose cumulative time makes up the breakdown; each runs once per image or once per crop.
BREAKDOWN_STEPS = {
    "decode": "decode_image",  # read, header and EXIF, libjpeg-turbo decode at the needed DCT scale
    "resample": "render",  # cut the window, shrink to max_size (OpenCV), pad
    "encode": "encode_crop",  # libjpeg-turbo encode
    "write": "_save_crop",  # temporary file and rename
}


def stage_breakdown(
    boxes: pd.DataFrame, images: Path, out: Path, quality: int, max_size: int | None
) -> dict[str, float]:
    """Where the crop stage's time goes: one in-process run (``workers=1``) of :func:`make_crops` under cProfile.

    ``bound_over_decode`` is (decode + resample + encode) / decode: the stage-to-floor ratio that any stage decoding
    each image once with this decoder and resampling and encoding every crop would have, even with free file writes
    and bookkeeping; the floor target (1.25x) can only be met if it is under 1.25.
    """
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    done = run_stage(boxes, images, out, 1, quality, max_size)
    profile.disable()
    total = time.perf_counter() - start
    if done != len(boxes):
        raise RuntimeError(f"breakdown run produced {done} crops, expected {len(boxes)}")
    cumulative: dict[str, float] = {}
    for (_file, _line, name), row in pstats.Stats(profile).stats.items():  # type: ignore[attr-defined]
        cumulative[name] = cumulative.get(name, 0.0) + row[3]
    steps = {step: cumulative[name] for step, name in BREAKDOWN_STEPS.items()}
    result = {f"{step}_s": round(seconds, 3) for step, seconds in steps.items()}
    result["other_s"] = round(total - sum(steps.values()), 3)
    result["total_s"] = round(total, 3)
    result["bound_over_decode"] = round((steps["decode"] + steps["resample"] + steps["encode"]) / steps["decode"], 3)
    result["actual_over_decode"] = round(total / steps["decode"], 3)
    return result


def dct_scale_costs(paths: list[Path], repeats: int = 2) -> dict[str, float]:
    """Seconds to decode every image once (one process, best of ``repeats``) at each DCT scale 1/1, 1/2, 1/4, 1/8.

    Shows how much draft-mode decoding saves on these files: only the inverse DCT, upsampling and colour conversion
    shrink with the scale; the entropy decoding of the whole file does not.
    """
    costs = {}
    for divisor in (1, 2, 4, 8):
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            for path in paths:
                decode_image(path, lambda _size, d=divisor: d)
            best = min(best, time.perf_counter() - start)
        costs[f"1/{divisor}"] = round(best, 3)
    return costs


def rows_below_last_crop(boxes: pd.DataFrame) -> float:
    """Mean fraction of an image's rows below its lowest crop: what a decoder that stops early could skip."""
    fractions = [
        1
        - max(crop_window((r.x, r.y, r.w, r.h), (WIDTH, HEIGHT), "square").bottom for r in group.itertuples()) / HEIGHT
        for _, group in boxes.groupby("file_name", sort=False)
    ]
    return round(float(np.mean(fractions)), 3)


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children (pool workers are reaped on shutdown)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# --- driver ----------------------------------------------------------------------------------------------------


METHODS = ("baseline", "baseline_q75", "floor", "floor_600", "floor_pil", "floor_pil_600", "stage_full", "stage_600")


def measure(
    boxes: pd.DataFrame, images_dir: Path, workdir: Path, workers: int, quality: int, repeats: int, label: str
) -> dict[str, object]:
    """Time every method on ``boxes``, interleaved over ``repeats`` rounds."""
    n_crops = len(boxes)
    divisors_600 = needed_divisors(boxes, 600)
    ones = dict.fromkeys(divisors_600, 1)
    sides = np.array(
        [crop_window((r.x, r.y, r.w, r.h), (WIDTH, HEIGHT), "square").canvas_width for r in boxes.itertuples()]
    )
    print(
        f"[{label}] {n_crops} crops on {len(divisors_600)} images, {workers} workers; square side median "
        f"{np.median(sides):.0f} px, {np.mean(sides > 600):.0%} over 600; DCT divisors for max_size=600: "
        f"{dict(sorted(pd.Series(divisors_600).value_counts().items()))}",
        flush=True,
    )
    methods: dict[str, Callable[[Path], int]] = {
        "baseline": lambda out: run_baseline(boxes, images_dir, out, workers, quality),
        "baseline_q75": lambda out: run_baseline(boxes, images_dir, out, workers, OLD_SCRIPT_QUALITY),
        "floor": lambda out: run_floor(boxes, images_dir, workers, ones) and n_crops,
        "floor_600": lambda out: run_floor(boxes, images_dir, workers, divisors_600) and n_crops,
        "floor_pil": lambda out: run_floor(boxes, images_dir, workers, ones, "pil") and n_crops,
        "floor_pil_600": lambda out: run_floor(boxes, images_dir, workers, divisors_600, "pil") and n_crops,
        "stage_full": lambda out: run_stage(boxes, images_dir, out, workers, quality, None),
        "stage_600": lambda out: run_stage(boxes, images_dir, out, workers, quality, 600),
    }
    out_root = workdir / "out"
    times: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    for round_ in range(repeats):
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
                f"[{label}] round {round_ + 1} {name:<13} {elapsed:6.2f} s  {n_crops / elapsed:7.1f} crops/s  "
                f"(cpu {cpu[name][-1]:5.2f} s, load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
    breakdown = {}
    for name, max_size in (("stage_full", None), ("stage_600", 600)):
        out = out_root / f"breakdown_{name}"
        shutil.rmtree(out, ignore_errors=True)
        breakdown[name] = stage_breakdown(boxes, images_dir, out, quality, max_size)
        print(f"[{label}] breakdown {name}: {breakdown[name]}", flush=True)
    shutil.rmtree(out_root, ignore_errors=True)

    best = {name: n_crops / min(t) for name, t in times.items()}
    median = {name: n_crops / statistics.median(t) for name, t in times.items()}
    per_cpu = {name: n_crops / min(c) for name, c in cpu.items()}

    def ratios(rate: dict[str, float]) -> dict[str, float]:
        return {
            "stage_full_over_baseline": round(rate["stage_full"] / rate["baseline"], 3),
            "stage_600_over_baseline": round(rate["stage_600"] / rate["baseline"], 3),
            "floor_600_over_stage_600": round(rate["floor_600"] / rate["stage_600"], 3),
            "floor_pil_600_over_stage_600": round(rate["floor_pil_600"] / rate["stage_600"], 3),
        }

    ratio_best, ratio_median, ratio_cpu = ratios(best), ratios(median), ratios(per_cpu)

    def met(r: dict[str, float]) -> dict[str, bool]:
        return {
            "stage_full >= 1.3x baseline": r["stage_full_over_baseline"] >= 1.3,
            "stage_600 >= 2x baseline": r["stage_600_over_baseline"] >= 2.0,
            "stage_600 within 1.25x of floor_600": r["floor_600_over_stage_600"] <= 1.25,
        }

    return {
        "crops": n_crops,
        "square_side_px": {
            "min": int(sides.min()),
            "median": float(np.median(sides)),
            "max": int(sides.max()),
            "fraction_over_600": round(float(np.mean(sides > 600)), 3),
        },
        "dct_divisors_600": {str(k): int(v) for k, v in pd.Series(divisors_600).value_counts().items()},
        "seconds": {name: [round(t, 3) for t in ts] for name, ts in times.items()},
        "crops_per_second_best": {k: round(v, 1) for k, v in best.items()},
        "crops_per_second_median": {k: round(v, 1) for k, v in median.items()},
        "cpu_seconds": {name: [round(t, 3) for t in ts] for name, ts in cpu.items()},
        "crops_per_cpu_second_best": {k: round(v, 1) for k, v in per_cpu.items()},
        "ratios_best": ratio_best,
        "ratios_median": ratio_median,
        "ratios_cpu": ratio_cpu,
        "targets_met_best": met(ratio_best),
        "targets_met_median": met(ratio_median),
        "targets_met_cpu": met(ratio_cpu),
        "breakdown_one_process": breakdown,
        "rows_below_last_crop_mean": rows_below_last_crop(boxes),
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=80, help="number of generated images (default 80)")
    parser.add_argument("--workers", type=int, default=usable_cores(), help="workers for every method")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; best and median are reported")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of every saved crop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--box-range",
        type=float,
        nargs=2,
        default=(0.05, 0.6),
        metavar=("LOW", "HIGH"),
        help="box size as a fraction of the frame (default 0.05 0.6)",
    )
    parser.add_argument(
        "--readings",
        nargs="+",
        choices=("area", "side"),
        default=["area", "side"],
        help="what the box fraction measures; the first is the headline (default: area, then side)",
    )
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "animl_bench_crops")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    load_at_start = list(os.getloadavg())
    images_dir = args.workdir / f"images_{args.images}_{args.seed}"
    start = time.perf_counter()
    paths = generate_images(images_dir, args.images, args.seed)
    generation_s = time.perf_counter() - start
    mean_bytes = statistics.mean(p.stat().st_size for p in paths)
    print(f"{len(paths)} images, {mean_bytes / 1e6:.2f} MB mean", flush=True)
    readings = {
        reading: measure(
            make_boxes(paths, args.seed, *args.box_range, reading=reading),
            images_dir,
            args.workdir,
            args.workers,
            args.quality,
            args.repeats,
            reading,
        )
        for reading in args.readings
    }
    decode_seconds_by_dct_scale = dct_scale_costs(paths)
    print(f"decode seconds by DCT scale: {decode_seconds_by_dct_scale}", flush=True)
    headline = args.readings[0]
    low, high = args.box_range
    result: dict[str, object] = {
        "machine": {
            "cpus": os.cpu_count(),
            "usable_cpus": usable_cores(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "pillow": Image.__version__,
            "simplejpeg": simplejpeg.__version__,
            "load_average_at_start": load_at_start,
            "load_average_at_end": list(os.getloadavg()),
        },
        "setup": {
            "images": len(paths),
            "image_size": [WIDTH, HEIGHT],
            "mean_image_bytes": round(mean_bytes),
            "workers": args.workers,
            "quality": args.quality,
            "old_script_quality": OLD_SCRIPT_QUALITY,
            "repeats": args.repeats,
            "strategy": "square",
            "boxes_per_image": [1, 3],
            "headline_reading": headline,
            "box_area_fraction": [low, high] if "area" in readings else None,
            "box_aspect_ratio": list(ASPECT_RANGE) if "area" in readings else None,
            "box_side_fraction": [low, high] if "side" in readings else None,
            "generation_s": round(generation_s, 1),
            "methods": {
                "baseline": "old crop_detections.py: thread pool, PIL decode, convert RGB, old square rule, "
                "save at full resolution, same quality as the stage",
                "baseline_q75": "the same at PIL's default quality 75, which the old script used",
                "floor": "the stage's own decoder (decode_image: header, EXIF, libjpeg-turbo) and nothing else, "
                "one decode per image, worker processes",
                "floor_600": "floor at the DCT scale the max_size=600 crops of each image allow",
                "floor_pil": "PIL decode only (the previous floor)",
                "floor_pil_600": "PIL draft decode only, same divisors as floor_600",
                "stage_full": "make_crops, strategy=square, max_size=null",
                "stage_600": "make_crops, strategy=square, max_size=600",
            },
        },
        "decode_seconds_by_dct_scale_one_process": decode_seconds_by_dct_scale,
        **readings[headline],
        "readings": {k: v for k, v in readings.items() if k != headline},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    for reading, figures in readings.items():
        summary = ("crops_per_second_best", "crops_per_cpu_second_best", "ratios_best", "ratios_median", "ratios_cpu")
        print(reading, json.dumps({k: figures[k] for k in summary}, indent=1))
    return result


if __name__ == "__main__":
    main()
