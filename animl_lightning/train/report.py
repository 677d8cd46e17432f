"""``report.html``: one self-contained page per run, for the people who decide whether to use the model.

Built from what the run folder already holds (``metrics/*.csv``, ``history.csv``, the confusion PNGs,
``galleries/``, ``checkpoints/best.ckpt``, ``.hydra/``) and the prepared dataset it was trained on
(``classification_ds.csv``, ``splits.json``, ``split_report.csv``, ``prepare_report.json``). Sections: model card
(model, input size, data, intended use, known limits, command, config, package versions), dataset, training
curves, results at every level the run has (crop, image, sequence, taxonomy ranks), confusion matrices,
calibration (reliability diagram, ECE before and after), thresholds and coverage, per-location results, error
galleries, and the label review (``review/label_issues.csv`` of ``python -m animl_lightning.review``, when run).

Written for a reader who did not train the model, at a laptop's 1280 px: one sentence at the top says which labels
the model may apply on its own and the share of crops that covers (:func:`automation_sentence`); column headers are
words (:data:`COLUMN_TITLES`), the crop rule is a sentence, the header names the run folder, not a path of the
machine that trained it; the 18 columns of ``thresholds.csv`` are two tables; galleries are shown at their own size
so their captions stay readable; a reliability point averages equally many crops, at least
:data:`~animl_lightning.train.report_figures.RELIABILITY_CROPS_PER_BIN` where the split has enough
(:mod:`animl_lightning.train.report_figures`), and the page says how many it had.

The page is one file: images are embedded as base64 PNG, there is no script, and long tables fold into HTML's own
``<details>`` (readable without JavaScript, mailable, offline). With many labels it stays light: tables of more
than ``table_rows`` rows start folded, a confusion matrix of more than ``confusion_max_labels`` labels is shown as
its largest off-diagonal cells, and galleries are embedded for the ``gallery_labels`` labels with the most val
errors only. Plots are drawn with matplotlib, the page with a Jinja2 template (``templates/report.html.j2``).
"""

from __future__ import annotations

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
from animl_lightning.core.errors import AnimlError, InputFileError, require, require_known_keys
from animl_lightning.core.files import atomic_write_text
from animl_lightning.core.taxonomy import RANKS
from animl_lightning.train.checkpointing import read_checkpoint
from animl_lightning.train.history import HISTORY_FILENAME
from animl_lightning.train.report_figures import (
    RELIABILITY_CROPS_PER_BIN,
    file_png,
    reliability_diagram,
    training_curves,
)
from animl_lightning.train.scores import confusion_of, per_label_table
from animl_lightning.train.sweeps import read_run_results

log = logging.getLogger(__name__)

REPORT_FILENAME = "report.html"
# Written by python -m animl_lightning.review (animl_lightning.train.label_review); read here, never written.
ISSUES_FILE = "review/label_issues.csv"
ISSUE_COLUMNS_USED: tuple[str, ...] = ("split", "file", "given_label", "suggested_label")
# The splits the run's own model never trained on: the review always covers them.
OUT_OF_SAMPLE: tuple[str, ...] = ("val", "test")
TEMPLATE = "report.html.j2"
PACKAGES = ("animl-lightning", "torch", "timm", "lightning", "torchmetrics", "hydra-core", "pandas", "numpy")
# Labels with fewer train locations than this are named as a known limit (the model saw too few backgrounds).
FEW_LOCATIONS = 3
# The headers a reader sees instead of the CSV column names (scores.py and thresholds.py define the figures).
COLUMN_TITLES: dict[str, str] = {
    "n": "count",
    "loss": "loss",
    "top1": "top-1 accuracy",
    "top3": "top-3 accuracy",
    "balanced_accuracy": "balanced accuracy",
    "precision_macro": "mean precision",
    "recall_macro": "mean recall",
    "ece": "calibration error (ECE)",
    "type_I_error": "false-alarm rate (1 - precision)",
    "type_II_error": "miss rate (1 - recall)",
    "support": "true count",
    "tp": "correct",
    "fp": "false alarms",
    "fn": "missed",
    "rank": "taxonomic rank",
    "reason": "why no threshold",
    "precision_at_0.5": "precision",
    "recall_at_0.5": "recall",
    "coverage_at_0.5": "coverage",
}


class ReportError(InputFileError):
    """The run folder cannot be reported (not a train.py run folder, no tables)."""


@dataclass(frozen=True)
class ReportSettings:
    """The ``report.*`` keys of ``train.py`` and of the report command: whether a run writes ``report.html``, and how
    much of a large run goes on the page."""

    # false: train.py writes no report.html (the report command builds one anyway)
    enabled: bool = True
    # tables longer than this start folded (HTML <details>, no JavaScript)
    table_rows: int = 40
    # above this many labels a confusion matrix is shown as its 30 largest confusions instead of an image
    confusion_max_labels: int = 40
    # error galleries are embedded for this many labels (those with the most val errors)
    gallery_labels: int = 12

    def __post_init__(self) -> None:
        for name in ("table_rows", "confusion_max_labels", "gallery_labels"):
            require(getattr(self, name) >= 0, f"report.{name}", f"must be >= 0, got {getattr(self, name)}")


def report_settings(values: Any) -> ReportSettings | None:
    """From the ``report`` config block (None when ``enabled: false``); an unknown key is named."""
    raw = dict(values or {})
    require_known_keys(raw, ReportSettings.__dataclass_fields__, "report")
    sizes = {key: int(value) for key, value in raw.items() if key != "enabled"}
    settings = ReportSettings(enabled=bool(raw.get("enabled", True)), **sizes)
    return settings if settings.enabled else None


def run_report_settings(run_dir: str | Path) -> ReportSettings | None:
    """The ``report`` block the run was trained with (``.hydra/config.yaml``; defaults without one), None when the
    run turned its report off (``report.enabled=false``)."""
    config_file = Path(run_dir) / ".hydra" / "config.yaml"
    if not config_file.is_file():
        return ReportSettings()
    try:
        config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ReportError(f"{config_file}: not YAML: {err}") from err
    return report_settings(config.get("report") if isinstance(config, dict) else None)


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


def column_title(name: str) -> str:
    """The words a reader sees for a table column: :data:`COLUMN_TITLES`, ``recall_<label>`` as ``recall: <label>``,
    ``val_<metric>`` as ``val <metric>``, else the name with spaces for underscores."""
    if name in COLUMN_TITLES:
        return COLUMN_TITLES[name]
    if name.startswith("recall_"):
        return f"recall: {name.removeprefix('recall_')}"
    for split in SPLIT_NAMES:
        if name.startswith(f"{split}_"):
            return f"{split} {column_title(name.removeprefix(f'{split}_'))}"
    return name.replace("_", " ")


def frame_table(frame: pd.DataFrame, title: str, settings: ReportSettings, note: str = "") -> Table:
    """A DataFrame as a :class:`Table` with :func:`column_title` headers, folded when longer than
    ``settings.table_rows``."""
    rows = [[_format(v) for v in row] for row in frame.itertuples(index=False)]
    numeric = ["num" if pd.api.types.is_numeric_dtype(frame[c]) else "" for c in frame.columns]
    columns = [column_title(str(c)) for c in frame.columns]
    return Table(title, columns, rows, len(rows) > settings.table_rows, note, numeric)


def crop_rule_text(rule: dict[str, Any]) -> str:
    """The crop rule (:meth:`CropRule.to_dict`) in words."""
    shapes = {
        "square": "a square around each box (side = the box's longer side, shifted inside the image)",
        "pad": "the box, padded with black to a square",
        "exact": "the box as drawn",
    }
    strategy = str(rule.get("strategy"))
    text = shapes.get(strategy, strategy)
    size = rule.get("max_size")
    return text + (f", saved at most {size} px on its longer side" if size else ", saved at full resolution")


def threshold_tables(thresholds: pd.DataFrame, settings: ReportSettings) -> list[Table]:
    """``thresholds.csv`` as two tables a page can hold: the figures at each label's threshold, and at 0.5."""
    at_threshold = [c for c in thresholds.columns if not c.endswith("_at_0.5")]
    at_half = ["rank", "label", *[c for c in thresholds.columns if c.endswith("_at_0.5")]]
    return [
        frame_table(thresholds[at_threshold], "at each label's threshold", settings),
        frame_table(thresholds[[c for c in at_half if c in thresholds]], "at 0.5, for comparison", settings),
    ]


def _precision_words(target: float | None) -> str:
    return f"a val precision of {target:g}" if target is not None else "the run's target val precision"


def automation_sentence(thresholds: pd.DataFrame | None, target: float | None) -> str:
    """One sentence on what the model can do alone: labels with a threshold and the share of val (test) crops it
    labels without a person, from ``thresholds.csv``'s label rows."""
    if thresholds is None:
        return (
            "No per-label thresholds were chosen (thresholds.target_precision=null, or no val split), so this run "
            "does not say which labels the model may apply on its own: have people check every crop."
        )
    rows = thresholds[thresholds["rank"] == "label"]
    accepted = rows[rows["threshold"].notna()]
    if accepted.empty:
        return (
            f"At {_precision_words(target)}, none of the {len(rows)} labels can be accepted automatically: "
            "every crop still needs a person."
        )
    covered = []
    for split in ("val", "test"):
        support = rows.get(f"{split}_support")
        coverage = rows.get(f"{split}_coverage")
        if support is None or coverage is None or not support.sum():
            continue
        share = float((coverage.fillna(0.0) * support).sum() / support.sum())
        covered.append(f"{share:.0%} of {split} crops")
    names = ", ".join(str(label) for label in accepted["label"])
    return (
        f"At {_precision_words(target)}, {len(accepted)} of {len(rows)} labels can be accepted automatically "
        f"({names}), covering {' and '.join(covered) or 'an unknown share of crops'}; the rest go to people."
    )


def _label_index(values: pd.Series, labels: list[str], source: str) -> np.ndarray:
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted(set(values.astype(str)) - set(index))
    if unknown:
        raise ReportError(f"{source}: labels {unknown[:5]} are not among the run's labels")
    return values.astype(str).map(index).to_numpy(dtype=np.int64)


def relabelled_tables(
    predictions: pd.DataFrame, issues: pd.DataFrame, labels: list[str], split: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-label tables of one split (:func:`~animl_lightning.train.scores.per_label_table`) as evaluated and with
    every crop of ``issues`` given its ``suggested_label`` instead (``predictions``: ``path, label, prediction``;
    ``issues``: ``file, given_label, suggested_label`` of that split)."""
    suggested = issues.set_index("file")["suggested_label"].astype(str)
    missing = sorted(set(suggested.index) - set(predictions["path"].astype(str)))
    if missing:
        raise ReportError(
            f"{ISSUES_FILE}: {len(missing)} {split} crops are not in this run's predictions (e.g. {missing[0]}); "
            "the review is older than the run's evaluation: review the run again"
        )
    source = f"{ISSUES_FILE} / predictions_{split}.csv"
    given = predictions["label"].astype(str)
    corrected = predictions["path"].astype(str).map(suggested).fillna(given)
    predicted = _label_index(predictions["prediction"], labels, source)
    tables = (
        per_label_table(confusion_of(_label_index(truth, labels, source), predicted, len(labels)), labels, split)
        for truth in (given, corrected)
    )
    before, after = tables
    return before, after


def _change(before: float, after: float) -> str:
    return _format(before) if _format(before) == _format(after) else f"{_format(before)} → {_format(after)}"


def label_review_section(
    run: Path, predictions: dict[str, pd.DataFrame], labels: list[str], settings: ReportSettings
) -> dict[str, Any]:
    """What ``RUN/review/label_issues.csv`` says, when the review has been run: likely label errors per split, and
    the val/test per-label table before and after giving every flagged crop its suggested label."""
    issues_file = run / ISSUES_FILE
    section: dict[str, Any] = {"present": issues_file.is_file(), "counts": None, "changes": [], "warnings": []}
    if not section["present"]:
        return section
    try:
        issues = pd.read_csv(issues_file, dtype=str, keep_default_na=False)
        missing = [c for c in ISSUE_COLUMNS_USED if c not in issues.columns]
        if missing:
            raise ReportError(f"{ISSUES_FILE}: columns {missing} are missing")
        rows = []
        reviewed = [s for s in SPLIT_NAMES if s in OUT_OF_SAMPLE or (issues["split"] == s).any()]
        reviewed += [s for s in SPLIT_NAMES if s == "train" and any((run / "review").glob("folds_*"))]
        for split in [s for s in SPLIT_NAMES if s in reviewed and s in predictions]:
            flagged = int((issues["split"] == split).sum())
            crops = len(predictions[split])
            rows.append((split, crops, flagged, flagged / crops if crops else float("nan")))
        counts = pd.DataFrame(rows, columns=["split", "crops reviewed", "likely label errors", "share"])
        section["counts"] = frame_table(counts, "likely label errors per split", settings)
        for split in OUT_OF_SAMPLE:
            if split not in predictions:
                continue
            mine = issues[issues["split"] == split]
            before, after = relabelled_tables(predictions[split], mine, labels, split)
            away, to = mine["given_label"].value_counts(), mine["suggested_label"].value_counts()
            table = pd.DataFrame(
                {
                    "label": before["label"],
                    "crops relabelled away": [int(away.get(label, 0)) for label in before["label"]],
                    "crops relabelled to it": [int(to.get(label, 0)) for label in before["label"]],
                    "true count": [_change(b, a) for b, a in zip(before["support"], after["support"], strict=True)],
                    "precision": [_change(b, a) for b, a in zip(before["precision"], after["precision"], strict=True)],
                    "recall": [_change(b, a) for b, a in zip(before["recall"], after["recall"], strict=True)],
                }
            )
            title = f"{split}: per label, as evaluated → if the flagged labels were wrong"
            section["changes"].append(frame_table(table, title, settings))
    except (ReportError, ValueError, KeyError, pd.errors.ParserError) as err:
        section["counts"], section["changes"] = None, []
        section["warnings"].append(f"the label review could not be shown: {err}")
    return section


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
        # The folder's name only: the page is read on other machines (the full path is in the config below).
        "path": data_dir.name if data_dir is not None else "unknown",
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
        note = (
            "precision: of the crops the model calls this label, the share that are; recall: of this label's crops, "
            "the share the model finds; true count: crops (images, sequences) of this label"
        )
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
            image = file_png(root / split / f"{label}.png")
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
            crop_rule=crop_rule_text(contents.crop_rule.to_dict()),
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
            confusions.append({"split": split, "png": file_png(metrics / f"confusion_{split}.png"), "table": None})
        else:
            table = frame_table(top_confusions(matrix, 30), f"{split}: the 30 largest confusions", settings)
            confusions.append({"split": split, "png": None, "table": table})

    overall = _read_csv(metrics / "overall.csv")
    per_location = _read_csv(metrics / "per_location.csv")
    reliability, reliability_notes = reliability_diagram({s: f for s, f in predictions.items() if s != "train"}, labels)
    history = _read_csv(run / HISTORY_FILENAME)
    if history is None:
        history = pd.DataFrame()
    context = {
        "title": f"animl-lightning run {run.name}",
        # The folder's name, not the machine's path: the page is mailed and read elsewhere.
        "run_name": run.resolve().name,
        "generated": datetime.now().strftime("%Y-%m-%d %H:%M"),
        "results": results,
        "card": card,
        "labels": labels,
        "dataset": dataset,
        "curves": training_curves(history),
        "overall": frame_table(overall, "overall", settings) if overall is not None else None,
        "results_tables": _results_tables(metrics, settings),
        "confusions": confusions,
        "reliability": reliability,
        "reliability_notes": reliability_notes,
        "crops_per_bin": RELIABILITY_CROPS_PER_BIN,
        "ece": _ece_rows(overall, card.get("calibration") or {}),
        "thresholds": threshold_tables(thresholds, settings) if thresholds is not None else [],
        "verdict": automation_sentence(thresholds, (card.get("thresholds") or {}).get("target_precision")),
        "review": label_review_section(run, predictions, labels, settings),
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
