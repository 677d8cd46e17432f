"""Lossless crops against decode and re-encode: the crops stage on real camera-trap photos, in one run.

Takes the JPEGs under ``--photos`` (default ``/work/photos/lynx``: 2048x1536 baseline 4:2:2 trail-camera photos; any
other size is skipped), gives each 1-3 boxes as ``bench_crops.py`` does (box *area* a uniform 5-60% of the frame,
aspect ratio log-uniform in 1:2-2:1), and times :func:`~animl_lightning.prepare.crop_stage.make_crops` with
``strategy=square`` four ways, interleaved over ``--repeats`` rounds:

``full_lossless`` / ``full_reencode``
    full resolution with ``crops.lossless=true`` / ``false`` (the issue's target: at least 2.5x);
``capped_lossless`` / ``capped_reencode``
    ``max_size=600`` with ``crops.lossless=true`` / ``false`` (target: at least 2x).

Reports crops per second (best and median round), crops per CPU-second (this process and its reaped workers: on a
machine shared with other jobs the wall clock says as much about the neighbours), the ratios, and how many crops were
cut losslessly or fell back (padded squares of boxes taller than the photo, mostly), and writes
``benchmarks/results/crops_lossless.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from animl_lightning.core.issues import PrepareReport
from animl_lightning.core.machine import usable_cores
from animl_lightning.prepare.config import CropSettings
from animl_lightning.prepare.crop_stage import make_crops
from benchmarks.bench_crops import HEIGHT, WIDTH, make_boxes

RESULTS = Path(__file__).resolve().parent / "results" / "crops_lossless.json"
METHODS = {
    "full_lossless": (None, True),
    "full_reencode": (None, False),
    "capped_lossless": (600, True),
    "capped_reencode": (600, False),
}


def find_photos(root: Path, limit: int) -> list[Path]:
    """Up to ``limit`` JPEGs of the benchmark's frame size under ``root``, in a stable order."""
    found = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in {".jpg", ".jpeg"}:
            continue
        with Image.open(path) as image:
            if image.size == (WIDTH, HEIGHT):
                found.append(path)
        if len(found) == limit:
            break
    return found


def boxes_for(photos: list[Path], root: Path, seed: int) -> pd.DataFrame:
    frame = make_boxes(photos, seed)
    relative = {p.name: str(p.relative_to(root)) for p in photos}
    frame["file_name"] = frame["file_name"].map(relative)
    frame["crop_path"] = [f"{i:05d}.jpg" for i in range(len(frame))]
    return frame


def run(
    boxes: pd.DataFrame, root: Path, out: Path, workers: int, max_size: int | None, lossless: bool
) -> PrepareReport:
    report = PrepareReport()
    settings = CropSettings(strategy="square", max_size=max_size, workers=workers, lossless=lossless)
    result = make_crops(boxes, root, out, settings, report)
    if not result["crop_ok"].all():
        raise RuntimeError(f"crop stage failed: {report.issue_summary()}")
    return report


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(boxes: pd.DataFrame, root: Path, workdir: Path, workers: int, repeats: int) -> dict[str, object]:
    n = len(boxes)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    cpu: dict[str, list[float]] = {m: [] for m in METHODS}
    paths: dict[str, dict[str, int]] = {}
    for round_ in range(repeats):
        for name, (max_size, lossless) in METHODS.items():
            out = workdir / name
            shutil.rmtree(out, ignore_errors=True)
            c0, t0 = _cpu_seconds(), time.perf_counter()
            report = run(boxes, root, out, workers, max_size, lossless)
            elapsed = time.perf_counter() - t0
            times[name].append(elapsed)
            cpu[name].append(_cpu_seconds() - c0)
            counts = report.counts.get("crops", {})
            paths[name] = {k: v for k, v in counts.items() if k.startswith("lossless")}
            print(
                f"round {round_ + 1} {name:<16} {elapsed:6.2f} s {n / elapsed:7.1f} crops/s "
                f"(cpu {cpu[name][-1]:5.2f} s, load {os.getloadavg()[0]:.1f}) {paths[name]}",
                flush=True,
            )
    sizes = {name: sum(f.stat().st_size for f in (workdir / name).iterdir()) for name in METHODS}
    shutil.rmtree(workdir, ignore_errors=True)
    best = {m: n / min(t) for m, t in times.items()}
    median = {m: n / statistics.median(t) for m, t in times.items()}
    per_cpu = {m: n / min(c) for m, c in cpu.items()}

    def ratios(rate: dict[str, float]) -> dict[str, float]:
        return {
            "full_lossless_over_reencode": round(rate["full_lossless"] / rate["full_reencode"], 2),
            "capped_lossless_over_reencode": round(rate["capped_lossless"] / rate["capped_reencode"], 2),
        }

    return {
        "crops": n,
        "seconds": {m: [round(t, 3) for t in ts] for m, ts in times.items()},
        "cpu_seconds": {m: [round(t, 3) for t in ts] for m, ts in cpu.items()},
        "crops_per_second_best": {m: round(v, 1) for m, v in best.items()},
        "crops_per_second_median": {m: round(v, 1) for m, v in median.items()},
        "crops_per_cpu_second_best": {m: round(v, 1) for m, v in per_cpu.items()},
        "ratios_best": ratios(best),
        "ratios_median": ratios(median),
        "ratios_cpu": ratios(per_cpu),
        "crop_paths": paths,
        "crop_bytes_total": sizes,
    }


def markdown(result: dict[str, object]) -> str:
    figures: dict[str, dict[str, float]] = {
        k: result[k]  # type: ignore[misc]
        for k in ("crops_per_second_best", "crops_per_second_median", "crops_per_cpu_second_best")
    }
    lines = [
        "# Crop stage: lossless cuts against decode and re-encode",
        "",
        f"{result['setup']['photos']} real photos ({WIDTH}x{HEIGHT}), {result['crops']} square crops, "  # type: ignore[index]
        f"{result['setup']['workers']} workers, {result['setup']['repeats']} interleaved rounds; "  # type: ignore[index]
        f"machine: {result['machine']['cpus']} CPUs, load {result['machine']['load_average_at_start'][0]:.1f} "  # type: ignore[index]
        "at start. Command: `python benchmarks/bench_lossless_crops.py`.",
        "",
        "| method | crops/s best | crops/s median | crops per CPU-second |",
        "|---|---|---|---|",
    ]
    for name in METHODS:
        lines.append(
            f"| {name} | {figures['crops_per_second_best'][name]} | {figures['crops_per_second_median'][name]} | "
            f"{figures['crops_per_cpu_second_best'][name]} |"
        )
    lines += ["", "| ratio | best | median | per CPU-second | target |", "|---|---|---|---|---|"]
    targets = {"full_lossless_over_reencode": 2.5, "capped_lossless_over_reencode": 2.0}
    for key, target in targets.items():
        row = [result[r][key] for r in ("ratios_best", "ratios_median", "ratios_cpu")]  # type: ignore[index]
        lines.append(f"| {key} | {row[0]} | {row[1]} | {row[2]} | >= {target} |")
    lines += ["", f"Crop paths (lossless runs): `{json.dumps(result['crop_paths'])}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, default=Path("/work/photos/lynx"))
    parser.add_argument("--limit", type=int, default=120, help="most photos used (default 120)")
    parser.add_argument("--workers", type=int, default=usable_cores())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "animl_bench_lossless")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    load_at_start = list(os.getloadavg())
    photos = find_photos(args.photos, args.limit)
    if not photos:
        raise SystemExit(f"no {WIDTH}x{HEIGHT} JPEGs under {args.photos}")
    boxes = boxes_for(photos, args.photos, args.seed)
    print(f"{len(photos)} photos, {len(boxes)} boxes, {args.workers} workers", flush=True)
    figures = measure(boxes, args.photos, args.workdir, args.workers, args.repeats)
    result: dict[str, object] = {
        "machine": {
            "cpus": os.cpu_count(),
            "usable_cpus": usable_cores(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_start": load_at_start,
            "load_average_at_end": list(os.getloadavg()),
        },
        "setup": {
            "photos": len(photos),
            "photos_root": str(args.photos),
            "workers": args.workers,
            "repeats": args.repeats,
            "strategy": "square",
            "quality": CropSettings().quality,
            "methods": {name: {"max_size": m, "lossless": lossless} for name, (m, lossless) in METHODS.items()},
        },
        **figures,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    args.output.with_suffix(".md").write_text(markdown(result))
    print(json.dumps({k: result[k] for k in ("ratios_best", "ratios_median", "ratios_cpu", "crop_paths")}, indent=1))
    return result


if __name__ == "__main__":
    main()
