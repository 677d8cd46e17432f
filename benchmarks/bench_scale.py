"""Scale benchmark of the prepare stages that do not touch pixels.

Generates an Animl-style CCT export, metadata only (default: 1,000,000 annotations over 5,000 locations and 50
labels), writes it as a JSON file as a user would have it, then times in a fresh subprocess (so the generator's
memory does not count):

    ingest (cct.load_cct) -> boxes (boxes.collect_boxes when present, else a vectorised stand-in)
    -> labels (labels.apply_labels) -> dataset (classification_dataset.build_dataset_frame, min_locs=3)
    -> splits (splits.make_splits, random, 10,000 trials) -> split report

Crops are skipped (there are no images): every box is marked ``crop_ok=True``. Peak memory is the subprocess's
``ru_maxrss``. Targets (issue 3): under 60 s in total and under 4 GB peak.

Usage: ``python benchmarks/bench_scale.py [--annotations N] [--locations N] [--labels N] [--trials N]``; the result
goes to ``benchmarks/results/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
TARGET_SECONDS = 60.0
TARGET_PEAK_MB = 4096.0
WIDTH, HEIGHT = 1920, 1080


# --- generation ----------------------------------------------------------------------------------------------------


def generate_cct(path: Path, n_annotations: int, n_locations: int, n_labels: int, seed: int = 0) -> dict[str, Any]:
    """Write a metadata-only Animl-style CCT file; return a summary of what was generated."""
    rng = np.random.default_rng(seed)
    n_images = int(n_annotations * 0.8)
    # Skewed location sizes (a few busy cameras, many quiet ones); every location gets at least 5 images.
    weights = rng.lognormal(0.0, 1.0, n_locations)
    per_location = np.maximum(5, np.floor(weights / weights.sum() * (n_images - 5 * n_locations)).astype(np.int64))
    per_location[0] += n_images - per_location.sum()
    image_location = np.repeat(np.arange(n_locations), per_location)
    # Every location sees a handful of labels with long-tailed frequencies (label 0 common ... label 49 rare).
    label_weights = 1.0 / np.arange(1, n_labels + 1) ** 1.1
    seen = rng.random((n_locations, n_labels)) < np.clip(label_weights * 4, 0.05, 0.9)
    seen[np.arange(n_locations), rng.integers(0, n_labels, n_locations)] = True
    location_mix = seen * label_weights
    location_mix /= location_mix.sum(axis=1, keepdims=True)
    cumulative = np.cumsum(location_mix, axis=1)
    image_label = (rng.random(n_images)[:, None] > cumulative[image_location]).sum(axis=1)
    image_label = np.minimum(image_label, n_labels - 1)
    # The first n_images annotations cover every image once; the rest are second animals of the same label.
    extra = rng.integers(0, n_images, n_annotations - n_images)
    ann_image = np.concatenate([np.arange(n_images), extra])
    ann_label = image_label[ann_image] + 1  # category 0 is "empty"
    w = rng.integers(40, 600, n_annotations)
    h = rng.integers(40, 500, n_annotations)
    x = (rng.random(n_annotations) * (WIDTH - w)).astype(np.int64)
    y = (rng.random(n_annotations) * (HEIGHT - h)).astype(np.int64)

    # A tenth of the locations are integers, as in older exports.
    location_names = [str(3000 + i) if i % 10 == 0 else f"site {i:05d}" for i in range(n_locations)]
    location_json = [str(3000 + i) if i % 10 == 0 else json.dumps(name) for i, name in enumerate(location_names)]
    deployment = [name.replace(" ", "_") for name in location_names]
    categories = [{"id": 0, "name": "empty"}] + [{"id": j + 1, "name": f"species {j:02d}"} for j in range(n_labels)]

    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as out:
        out.write('{"info": {"version": "1.0", "description": "bench_scale"},\n"categories": ')
        out.write(json.dumps(categories))
        out.write(',\n"images": [\n')
        chunk = 100_000
        for start in range(0, n_images, chunk):
            rows = []
            for i in range(start, min(n_images, start + chunk)):
                loc = int(image_location[i])
                rows.append(
                    f'{{"id": "bench:{i:08x}", "file_name": "bench/cam{loc:05d}/{deployment[loc]}/bench-{i:08x}.jpg", '
                    f'"serving_bucket_key": "original/bench:{i:08x}-original.jpg", "location": {location_json[loc]}, '
                    f'"datetime": "2024-01-01T00:00:00-07:00", "width": {WIDTH}, "height": {HEIGHT}}}'
                )
            out.write(("" if start == 0 else ",\n") + ",\n".join(rows))
        out.write('\n],\n"annotations": [\n')
        for start in range(0, n_annotations, chunk):
            rows = [
                f'{{"id": "a{k:08x}", "image_id": "bench:{int(ann_image[k]):08x}", "category_id": {int(ann_label[k])}, '
                f'"sequence_level_annotation": false, "bbox": [{x[k]}, {y[k]}, {w[k]}, {h[k]}]}}'
                for k in range(start, min(n_annotations, start + chunk))
            ]
            out.write(("" if start == 0 else ",\n") + ",\n".join(rows))
        out.write("\n]}\n")
    tmp.replace(path)
    return {"images": n_images, "annotations": n_annotations, "locations": n_locations, "labels": n_labels}


# --- the timed run (in a subprocess) -------------------------------------------------------------------------------


def boxes_stand_in(images: Any, annotations: Any) -> Any:
    """The boxes table built directly from the CCT tables (used when ``boxes.collect_boxes`` is not available)."""
    import pandas as pd

    with_box = annotations[annotations["w"].notna()]
    merged = with_box.merge(
        images[["image_id", "file_name", "location", "datetime", "seq_id", "width", "height"]],
        on="image_id",
        how="inner",
    )
    return pd.DataFrame(
        {
            "image_id": merged["image_id"],
            "file_name": merged["file_name"],
            "location": merged["location"],
            "datetime": merged["datetime"],
            "seq_id": merged["seq_id"],
            "annotation_id": merged["annotation_id"],
            "dataset_class": merged["category"],
            "confidence": 1.0,
            "source": "gt",
            "x": merged["x"],
            "y": merged["y"],
            "w": merged["w"],
            "h": merged["h"],
            "width": merged["width"],
            "height": merged["height"],
            "crop_path": merged["file_name"] + "___crop_" + merged["annotation_id"] + ".jpg",
        }
    )


def run_stages(cct_path: Path, trials: int) -> dict[str, Any]:
    """Time each stage on ``cct_path``; return timings, counts and peak RSS of this process."""
    import logging

    from animl_lightning.core.cct import load_cct
    from animl_lightning.core.issues import PrepareReport
    from animl_lightning.prepare.boxes import collect_boxes
    from animl_lightning.prepare.config import DetectionSettings, LabelSettings, SplitSettings
    from animl_lightning.prepare.dataset import build_dataset_frame
    from animl_lightning.prepare.labels import apply_labels
    from animl_lightning.prepare.splits import make_splits, split_report

    logging.basicConfig(level=logging.ERROR)
    report = PrepareReport()
    times: dict[str, float] = {}
    dataset = "bench"

    start = time.perf_counter()
    project = load_cct(cct_path, report)
    images, annotations = project.images, project.annotations
    times["ingest"] = time.perf_counter() - start

    start = time.perf_counter()
    boxes = collect_boxes(project, images.assign(available=True), [], DetectionSettings(), report)
    boxes = boxes.assign(crop_ok=True)  # no images: the crop stage is skipped
    times["boxes"] = time.perf_counter() - start

    start = time.perf_counter()
    labelled = apply_labels(boxes, dataset, LabelSettings(), report)
    times["labels"] = time.perf_counter() - start

    start = time.perf_counter()
    frame = build_dataset_frame(labelled, dataset, 3, report)
    times["dataset"] = time.perf_counter() - start

    start = time.perf_counter()
    result = make_splits(frame, SplitSettings(trials=trials), report)
    splits = result.splits
    times["splits"] = time.perf_counter() - start

    start = time.perf_counter()
    table = split_report(frame, splits, targets=result.diagnosis.targets)
    times["split_report"] = time.perf_counter() - start

    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "seconds": {k: round(v, 3) for k, v in times.items()},
        "total_seconds": round(sum(times.values()), 3),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "counts": {
            "images": len(images),
            "annotations": len(annotations),
            "boxes": len(boxes),
            "rows": len(frame),
            "labels": int(frame["label"].nunique()),
            "locations": {name: len(pairs) for name, pairs in splits.items()},
            "split_report_rows": len(table),
            "crop_shares": result.diagnosis.shares,
            "split_warnings": result.diagnosis.warnings,
            "split_score": report.info["splits"]["score"],
        },
    }


# --- main ----------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", type=int, default=1_000_000)
    parser.add_argument("--locations", type=int, default=5_000)
    parser.add_argument("--labels", type=int, default=50)
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/animl_bench_scale"))
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)  # internal: time the stages on this file
    args = parser.parse_args()

    if args.run is not None:
        print(json.dumps(run_stages(args.run, args.trials)))
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    cct_path = args.workdir / f"cct_{args.annotations}_{args.locations}_{args.labels}.json"
    sidecar = cct_path.with_suffix(".generated.json")
    if cct_path.is_file() and sidecar.is_file():
        generated = {**json.loads(sidecar.read_text(encoding="utf-8")), "reused_file": True}
    else:
        start = time.perf_counter()
        generated = generate_cct(cct_path, args.annotations, args.locations, args.labels)
        generated["generate_seconds"] = round(time.perf_counter() - start, 2)
        sidecar.write_text(json.dumps(generated), encoding="utf-8")

    proc = subprocess.run(
        [sys.executable, __file__, "--run", str(cct_path), "--trials", str(args.trials)],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    import numpy
    import pandas

    result = {
        "benchmark": "bench_scale",
        "parameters": {
            "annotations": args.annotations,
            "locations": args.locations,
            "labels": args.labels,
            "trials": args.trials,
            "cct_file_mb": round(cct_path.stat().st_size / 2**20, 1),
        },
        "generated": generated,
        **measured,
        "targets": {"total_seconds": TARGET_SECONDS, "peak_rss_mb": TARGET_PEAK_MB},
        "meets_targets": measured["total_seconds"] < TARGET_SECONDS and measured["peak_rss_mb"] < TARGET_PEAK_MB,
        "machine": {
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "python": platform.python_version(),
            "numpy": numpy.__version__,
            "pandas": pandas.__version__,
            "platform": platform.platform(),
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    tmp.replace(args.output)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
