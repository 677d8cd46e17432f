"""``report.html``: one self-contained page per run, for the people who decide whether to use the model.

Built from what the run folder already holds (``metrics/*.csv``, ``history.csv``, the confusion PNGs,
``galleries/``, ``checkpoints/best.ckpt``, ``.hydra/``) and the prepared dataset it was trained on
(``classification_ds.csv``, ``splits.json``, ``split_report.csv``, ``prepare_report.json``). Sections: model card
(model, input size, data, intended use, known limits, command, config, package versions), dataset, training
curves, results at every level the run has (crop, image, sequence, taxonomy ranks), confusion matrices,
calibration (reliability diagram, ECE before and after), thresholds and coverage, per-location results, error
galleries.

The page is one file: images are embedded as base64 PNG, there is no script, and long tables fold into HTML's own
``<details>`` (readable without JavaScript, mailable, offline). With many labels it stays light: tables of more
than ``table_rows`` rows start folded, a confusion matrix of more than ``confusion_max_labels`` labels is shown as
its largest off-diagonal cells, and galleries are embedded for the ``gallery_labels`` labels with the most val
errors only. Plots are drawn with matplotlib, the page with a Jinja2 template (``templates/report.html.j2``).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import platform
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
import yaml

from animl_lightning.core.contract import SPLIT_NAMES, crop_groups, load_prepared_dataset
from animl_lightning.core.errors import AnimlError, ConfigError
from animl_lightning.core.files import atomic_write_text
from animl_lightning.core.taxonomy import RANKS
from animl_lightning.train.checkpointing import read_checkpoint
from animl_lightning.train.history import HISTORY_FILENAME
from animl_lightning.train.sweeps import read_run_results

log = logging.getLogger(__name__)

REPORT_FILENAME = "report.html"
TEMPLATE = "report.html.j2"
PACKAGES = ("animl-lightning", "torch", "timm", "lightning", "torchmetrics", "hydra-core", "pandas", "numpy")
# Labels with fewer train locations than this are named as a known limit (the model saw too few backgrounds).
FEW_LOCATIONS = 3


class ReportError(AnimlError, ValueError):
    """The run folder cannot be reported (not a train.py run folder, no tables)."""


@dataclass(frozen=True)
class ReportSettings:
    """``configs/report.yaml``: how much of a large run goes on the page."""

    table_rows: int = 40
    confusion_max_labels: int = 40
    gallery_labels: int = 12

    def __post_init__(self) -> None:
        for name in ("table_rows", "confusion_max_labels", "gallery_labels"):
            if getattr(self, name) < 0:
                raise ConfigError(f"report.{name}: must be >= 0, got {getattr(self, name)}")


def report_settings(values: Any) -> ReportSettings | None:
    """From the ``report`` config block (None when ``enabled: false``); an unknown key is named."""
    raw = dict(values or {})
    enabled = raw.pop("enabled", True)
    unknown = sorted(set(raw) - set(ReportSettings.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"report: unknown key(s) {unknown}; known: {sorted(ReportSettings.__dataclass_fields__)}")
    return ReportSettings(**{k: int(v) for k, v in raw.items()}) if enabled else None


@dataclass
class Table:
    """A table for the template: title, columns, formatted rows, and whether it starts folded."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    folded: bool = False
    note: str = ""
    css: list[str] = field(default_factory=list)


def _format(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float | np.floating):
        return f"{float(value):.3f}" if not float(value).is_integer() or abs(float(value)) < 1 else f"{value:.0f}"
    return str(value)


def frame_table(frame: pd.DataFrame, title: str, settings: ReportSettings, note: str = "") -> Table:
    """A DataFrame as a :class:`Table`, folded when longer than ``settings.table_rows``."""
    rows = [[_format(v) for v in row] for row in frame.itertuples(index=False)]
    numeric = ["num" if pd.api.types.is_numeric_dtype(frame[c]) else "" for c in frame.columns]
    return Table(title, [str(c) for c in frame.columns], rows, len(rows) > settings.table_rows, note, numeric)


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _file_png(path: Path) -> str | None:
    return base64.b64encode(path.read_bytes()).decode("ascii") if path.is_file() else None


def training_curves(history: pd.DataFrame) -> str | None:
    """Loss, balanced accuracy and learning rate per epoch, as one embedded PNG (None without a history)."""
    if history.empty or "epoch" not in history.columns:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 3.4))
    FigureCanvasAgg(figure)
    panels = (
        ("loss", ["train/loss", "val/loss"]),
        ("balanced accuracy", ["train/balanced_accuracy", "val/balanced_accuracy"]),
        ("learning rate", ["lr"]),
    )
    for k, (title, columns) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, 3, k)
        for column in columns:
            if column in history.columns and history[column].notna().any():
                axes.plot(history["epoch"], history[column], marker="o", markersize=3, label=column)
        axes.set_title(title)
        axes.set_xlabel("epoch")
        if len(columns) > 1:
            axes.legend(fontsize=8)
    figure.tight_layout()
    return _png(figure)


def reliability_diagram(predictions: dict[str, pd.DataFrame], labels: list[str], bins: int = 15) -> str | None:
    """Accuracy against confidence in ``bins`` equal-width bins per split (the diagonal is perfect calibration)."""
    if not predictions:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect")
    edges = np.linspace(0.0, 1.0, bins + 1)
    for split, frame in predictions.items():
        if frame.empty:
            continue
        probs = frame[labels].to_numpy(dtype=float)
        confidence = probs.max(axis=1)
        correct = (frame["prediction"] == frame["label"]).to_numpy(dtype=float)
        which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
        xs, ys = [], []
        for b in range(bins):
            mask = which == b
            if mask.any():
                xs.append(confidence[mask].mean())
                ys.append(correct[mask].mean())
        axes.plot(xs, ys, marker="o", label=split)
    axes.set_xlabel("confidence (top probability)")
    axes.set_ylabel("accuracy")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.legend()
    axes.set_title("reliability")
    figure.tight_layout()
    return _png(figure)


def top_confusions(confusion: pd.DataFrame, count: int) -> pd.DataFrame:
    """The ``count`` largest off-diagonal cells: ``true, predicted, crops, share of true``."""
    matrix = confusion.to_numpy()
    support = matrix.sum(axis=1)
    rows = []
    for i, j in zip(*np.nonzero(matrix), strict=True):
        if i != j:
            rows.append((confusion.index[i], confusion.columns[j], int(matrix[i, j]), matrix[i, j] / support[i]))
    rows.sort(key=lambda r: -r[2])
    return pd.DataFrame(rows[:count], columns=["true", "predicted", "crops", "share of true"])


def _read_csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path, keep_default_na=True) if path.is_file() else None


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _dataset_section(data_dir: Path | None, settings: ReportSettings) -> dict[str, Any]:
    section: dict[str, Any] = {
        "tables": [],
        "warnings": [],
        "skipped": None,
        "path": str(data_dir or "unknown"),
        "totals": None,
        "few_locations": [],
    }
    if data_dir is None:
        section["warnings"].append("the run does not say which prepared dataset it used; its section is left out")
        return section
    if not data_dir.is_dir():
        section["warnings"].append(f"the prepared dataset {data_dir} is not here (moved?); its section is left out")
        return section
    try:
        prepared = load_prepared_dataset(data_dir, check_files=False)
    except AnimlError as err:
        section["warnings"].append(f"the prepared dataset could not be read: {err}")
        return section
    frame = prepared.frame.assign(image=crop_groups(prepared.frame)["image"].to_numpy())
    grouped = frame.groupby(["label", "split"]).agg(
        crops=("path", "size"), images=("image", "nunique"), locations=("location", "nunique")
    )
    counts = pd.DataFrame(grouped.unstack("split", fill_value=0))
    pairs: list[tuple[str, str]] = [(str(column[0]), str(column[1])) for column in counts.columns.to_list()]
    counts.columns = pd.Index([f"{split} {what}" for what, split in pairs])
    ordered = [f"{s} {w}" for s in SPLIT_NAMES for w in ("crops", "images", "locations") if f"{s} {w}" in counts]
    per_label = counts[ordered].reset_index()
    section["tables"].append(frame_table(per_label, "crops, images and locations per label and split", settings))
    section["totals"] = {
        "crops": len(frame),
        "images": int(frame["image"].nunique()),
        "locations": int(frame[["dataset", "location"]].drop_duplicates().shape[0]),
        "labels": len(prepared.labels),
    }
    split_report = _read_csv(data_dir / "split_report.csv")
    if split_report is not None:
        section["tables"].append(frame_table(split_report, "split report (split_report.csv)", settings))
    report_file = data_dir / "prepare_report.json"
    if report_file.is_file():
        report = json.loads(report_file.read_text(encoding="utf-8"))
        splits_info = (report.get("info") or {}).get("splits") or {}
        section["warnings"] += [str(w) for w in splits_info.get("warnings") or []]
        issues = pd.DataFrame(report.get("issues") or [])
        if not issues.empty:
            by_reason = issues.groupby(["stage", "kind"]).size().reset_index(name="records")
            section["skipped"] = frame_table(by_reason, "what prepare.py skipped or changed, by reason", settings)
    few = frame[frame["split"] == "train"].groupby("label")["location"].nunique()
    section["few_locations"] = sorted(str(label) for label, n in few.items() if n < FEW_LOCATIONS)
    return section


def _results_tables(metrics: Path, settings: ReportSettings) -> list[Table]:
    tables = []
    levels = [("crop", "per_label.csv"), ("image", "per_label_image.csv"), ("sequence", "per_label_sequence.csv")]
    levels += [(rank, f"per_label_{rank}.csv") for rank in RANKS]
    for level, name in levels:
        frame = _read_csv(metrics / name)
        if frame is None:
            continue
        title = f"per label, {level} level" if level in ("crop", "image", "sequence") else f"per {level}"
        note = "type_I_error = 1 - precision (false alarms); type_II_error = 1 - recall (missed animals)"
        tables.append(frame_table(frame, title, settings, note))
    return tables


def _galleries(run_dir: Path, metrics: Path, settings: ReportSettings) -> list[dict[str, Any]]:
    per_label = _read_csv(metrics / "per_label.csv")
    root = run_dir / "galleries"
    if per_label is None or not root.is_dir():
        return []
    val = per_label[per_label["split"] == "val"].assign(errors=lambda f: f["fp"] + f["fn"])
    chosen = val.sort_values("errors", ascending=False, kind="stable")
    chosen = chosen[chosen["errors"] > 0].head(settings.gallery_labels)
    out = []
    for label in chosen["label"]:
        for split in ("val", "test"):
            image = _file_png(root / split / f"{label}.png")
            if image is not None:
                out.append({"label": str(label), "split": split, "png": image})
    return out


def build_report(run_dir: str | Path, settings: ReportSettings | None = None) -> Path:
    """Write ``<run_dir>/report.html`` (atomically) and return its path.

    Raises:
        ReportError: ``run_dir`` has no ``metrics/per_label.csv`` (not a finished ``train.py`` run).
    """
    settings = settings or ReportSettings()
    run = Path(run_dir)
    metrics = run / "metrics"
    if not (metrics / "per_label.csv").is_file():
        raise ReportError(f"run_dir: {run} has no metrics/per_label.csv; give the folder of a finished train.py run")
    results = read_run_results(run) or {}
    # The run's own best.ckpt, else the checkpoint it evaluated (train=false; null when it had no best checkpoint).
    checkpoint_file = run / "checkpoints" / "best.ckpt"
    if not checkpoint_file.is_file() and results.get("checkpoint"):
        checkpoint_file = Path(str(results["checkpoint"]))
    card: dict[str, Any] = {"versions": _versions(), "limits": []}
    labels: list[str] = []
    data_dir: Path | None = Path(str(results["data_dir"])) if results.get("data_dir") else None
    if checkpoint_file.is_file():
        contents = read_checkpoint(checkpoint_file)
        labels = contents.class_names
        if data_dir is None and contents.hparams.get("data_dir"):
            data_dir = Path(str(contents.hparams["data_dir"]))
        calibration = contents.calibration or {}
        card.update(
            model=contents.model_name,
            input_size=contents.data_config.get("input_size"),
            crop_rule=contents.crop_rule.to_dict(),
            temperature=contents.temperature,
            calibration=calibration,
            thresholds=contents.thresholds,
            taxonomy=contents.taxonomy is not None,
        )
    predictions = {
        split: frame for split in SPLIT_NAMES if (frame := _read_csv(metrics / f"predictions_{split}.csv")) is not None
    }
    if not labels and predictions:
        labels = [c for c in next(iter(predictions.values())).columns if c not in ("path", "label", "prediction")]
    config_file = run / ".hydra" / "config.yaml"
    overrides_file = run / ".hydra" / "overrides.yaml"
    if config_file.is_file():
        card["config"] = config_file.read_text(encoding="utf-8")
        if data_dir is None:
            for line in card["config"].splitlines():
                value = line.split(":", 1)[1].strip() if line.startswith("data_dir:") else ""
                # The config is saved unresolved: ${paths.data_dir} is no folder name.
                if value and "${" not in value:
                    data_dir = Path(value)
    if overrides_file.is_file():
        overrides = yaml.safe_load(overrides_file.read_text(encoding="utf-8")) or []
        card["command"] = "python train.py " + " ".join(str(o) for o in overrides)

    dataset = _dataset_section(data_dir, settings)
    if dataset.get("few_locations"):
        card["limits"].append(
            f"labels seen at fewer than {FEW_LOCATIONS} train locations (may not generalise to new cameras): "
            + ", ".join(dataset["few_locations"])
        )
    thresholds = _read_csv(metrics / "thresholds.csv")
    if thresholds is not None:
        none = thresholds[(thresholds["rank"] == "label") & thresholds["threshold"].isna()]["label"].tolist()
        if none:
            card["limits"].append("labels without a threshold (classify reports them as unknown): " + ", ".join(none))
    per_label = pd.read_csv(metrics / "per_label.csv")
    small = per_label[(per_label["split"] == "val") & (per_label["support"] < 10)]["label"].tolist()
    if small:
        card["limits"].append("labels with fewer than 10 val crops (their figures are uncertain): " + ", ".join(small))
    card["limits"] += [f"dataset: {w}" for w in dataset["warnings"]]

    confusions: list[dict[str, Any]] = []
    for split in SPLIT_NAMES:
        matrix = _read_csv(metrics / f"confusion_{split}.csv")
        if matrix is None:
            continue
        matrix = matrix.set_index(matrix.columns[0])
        if len(matrix) <= settings.confusion_max_labels:
            confusions.append({"split": split, "png": _file_png(metrics / f"confusion_{split}.png"), "table": None})
        else:
            table = frame_table(top_confusions(matrix, 30), f"{split}: the 30 largest confusions", settings)
            confusions.append({"split": split, "png": None, "table": table})

    overall = _read_csv(metrics / "overall.csv")
    per_location = _read_csv(metrics / "per_location.csv")
    history = _read_csv(run / HISTORY_FILENAME)
    if history is None:
        history = pd.DataFrame()
    context = {
        "title": f"animl-lightning run {run.name}",
        "run_dir": str(run.resolve()),
        "generated": datetime.now().strftime("%Y-%m-%d %H:%M"),
        "results": results,
        "card": card,
        "labels": labels,
        "dataset": dataset,
        "curves": training_curves(history),
        "overall": frame_table(overall, "overall", settings) if overall is not None else None,
        "results_tables": _results_tables(metrics, settings),
        "confusions": confusions,
        "reliability": reliability_diagram({s: f for s, f in predictions.items() if s != "train"}, labels),
        "ece": _ece_rows(overall, card.get("calibration") or {}),
        "thresholds": frame_table(thresholds, "thresholds and coverage (thresholds.csv)", settings)
        if thresholds is not None
        else None,
        "per_location": frame_table(per_location, "per location", settings) if per_location is not None else None,
        "galleries": _galleries(run, metrics, settings),
        "gallery_limit": settings.gallery_labels,
    }
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("animl_lightning.train", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    html = environment.get_template(TEMPLATE).render(**context)
    path = run / REPORT_FILENAME
    atomic_write_text(path, html)
    return path


def _ece_rows(overall: pd.DataFrame | None, calibration: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    if calibration:
        rows.append(("temperature", _format(calibration.get("temperature"))))
        rows.append(("val ECE before calibration", _format(calibration.get("ece_before"))))
        rows.append(("val ECE after calibration", _format(calibration.get("ece_after"))))
    else:
        rows.append(("calibration", "not calibrated (calibrate=false): probabilities are the model's softmax"))
    if overall is not None and "level" in overall.columns:
        for row in overall[overall["level"] == "crop"].itertuples(index=False):
            rows.append((f"{row.split} ECE (as evaluated)", _format(row.ece)))
    return rows
