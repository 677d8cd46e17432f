"""Group splits: whole groups of crops (camera locations by default) go to train, val or test.

Crops from one camera location look alike (same background, same light, often the same animal), so a location in
both train and test would flatter the test figures. ``split.group_by`` chooses the unit: ``location`` (the default,
``(dataset, location)`` pairs), ``sequence`` (bursts, see :mod:`animl_lightning.core.sequences`) or
``location_time`` (``split.time_block``-long blocks of time at each location). Anything but ``location`` lets a
background appear in two splits, and says so.

How a partition is searched for and scored: :mod:`animl_lightning.prepare.split_search`.

``split.test_frac=0`` gives no test split (every group is train or val; ``splits.json`` has ``"test": []``).

``split.reuse=PATH`` keeps the test groups of an earlier ``splits.json`` that still occur in the data fixed in test,
so models trained on a grown dataset are compared on the same test set. Every other group is split into train and
val only (val's share renormalised to ``val_frac / (1 - test_frac)`` of them).

After the split, :func:`diagnose` compares the achieved shares (overall and per label) with the targets; a share off
by more than the tolerance is a warning that names the cause (dominant groups, too few groups), and with
``split.strict=true`` an error.
"""

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from animl_lightning.core.contract import (
    SPLIT_NAMES,
    SPLIT_REPORT_FILENAME,
    SPLITS_FILENAME,
    LocationKey,
    read_splits,
    write_splits,
)
from animl_lightning.core.errors import ConfigError, DataError
from animl_lightning.core.files import atomic_write, file_sha256
from animl_lightning.core.issues import PrepareReport
from animl_lightning.prepare.config import SplitSettings
from animl_lightning.prepare.split_diagnosis import DominantGroup, LabelProblem, SplitDiagnosis
from animl_lightning.prepare.split_search import (
    admissible,
    group_label_counts,
    score_assignment,
    split_random,
    split_smallest_first,
    split_targets,
)
from animl_lightning.prepare.stage import SKIPPED, PrepareRun, Stage, StageOutcome, fingerprint_of, need

log = logging.getLogger(__name__)

STAGE = "splits"
# The label in split_report.csv of the rows that describe a split as a whole.
ALL_LABELS = "*"


class SplitTargetError(ConfigError):
    """``split.strict=true`` and an overall share is further than ``split.tolerance`` from its target."""


# --- diagnosis ---------------------------------------------------------------------------------------------------


def diagnose(
    groups: Sequence[LocationKey],
    labels: Sequence[str],
    counts: np.ndarray,
    assignment: np.ndarray,
    settings: SplitSettings,
    has_test: bool,
) -> SplitDiagnosis:
    """Compare an assignment with the targets; name dominant groups, unevaluable labels and the cause of a miss."""
    counts = np.asarray(counts, dtype=np.int64)
    names = SPLIT_NAMES if has_test else SPLIT_NAMES[:2]
    test_frac = settings.test_frac if has_test else 0.0
    target_values = split_targets(settings.val_frac, test_frac)
    targets = {name: float(target_values[i]) for i, name in enumerate(names)}
    sizes = counts.sum(axis=1)
    n_crops = max(int(sizes.sum()), 1)
    shares = {name: float(sizes[assignment == i].sum() / n_crops) for i, name in enumerate(names)}
    n_groups = {name: int((assignment == i).sum()) for i, name in enumerate(names)}
    unit = "location" if settings.group_by == "location" else settings.group_by.replace("_", "+")

    allowed = admissible(counts, settings.val_frac, test_frac)
    dominant = [
        DominantGroup(
            group=groups[int(g)],
            crops=int(sizes[g]),
            share=float(sizes[g] / n_crops),
            excluded_from=tuple(names[s] for s in range(1, len(names)) if not allowed[g, s]),
        )
        for g in np.flatnonzero(~allowed[:, 1 : len(names)].all(axis=1))
    ]
    dominant.sort(key=lambda d: (-d.crops, d.group))
    eval_ok = allowed[:, 1 : len(names)].any(axis=1)
    only_dominant = [str(labels[j]) for j in range(len(labels)) if not (counts[eval_ok, j] > 0).any()]

    problems: list[LabelProblem] = []
    present = counts > 0
    for j, label in enumerate(labels):
        where = assignment[present[:, j]]
        missing = tuple(name for i, name in enumerate(names) if not (where == i).any())
        if not missing:
            continue
        n_label_groups = int(present[:, j].sum())
        if str(label) in only_dominant:
            holders = ", ".join("/".join(groups[int(g)]) for g in np.flatnonzero(present[:, j]))
            reason = (
                f"it is seen only at {unit}s too large for val and test ({holders}), so it cannot be evaluated on "
                "unseen locations"
            )
        elif n_label_groups < len(names):
            reason = f"it is seen at only {n_label_groups} {unit}(s), fewer than the {len(names)} splits"
        else:
            thin = [name for name in missing if n_groups[name] <= len(names)]
            if thin:
                reason = f"split(s) {thin} hold only {[n_groups[t] for t in thin]} {unit}(s) in all"
            else:
                reason = f"no partition close to the targets placed one of its {n_label_groups} {unit}s there"
        problems.append(LabelProblem(str(label), int(counts[:, j].sum()), n_label_groups, missing, reason))

    diagnosis = SplitDiagnosis(
        group_by=settings.group_by,
        split_names=tuple(names),
        targets=targets,
        tolerance=settings.tolerance,
        shares=shares,
        groups=n_groups,
        dominant=dominant,
        only_dominant_labels=only_dominant,
        label_problems=problems,
        score=score_assignment(counts, assignment, settings.val_frac, test_frac, settings.tolerance),
    )
    for split, deviation in diagnosis.off_target.items():
        cause = []
        if dominant:
            largest = ", ".join(f"{'/'.join(d.group)} ({d.share:.0%})" for d in dominant[:3])
            cause.append(
                f"{len(dominant)} {unit}(s) hold more crops than an evaluation split should and stay in train "
                f"({largest}{', ...' if len(dominant) > 3 else ''})"
            )
        cause.append(f"there are {len(groups)} {unit}s in all")
        diagnosis.warnings.append(
            f"split {split!r} holds {shares[split]:.1%} of the crops, target {targets[split]:.0%} "
            f"(off by {deviation:+.1%}, more than split.tolerance={settings.tolerance}): " + "; ".join(cause)
        )
    return diagnosis


def format_shares(diagnosis: SplitDiagnosis, frame: pd.DataFrame | None = None) -> str:
    """The achieved shares next to the targets, overall and (from a split report table) per label."""
    names = diagnosis.split_names
    header = f"{'':<24}" + "".join(f"{name:>8}" for name in names)
    lines = [
        f"crop shares per split (targets {' / '.join(f'{diagnosis.targets[n]:.2f}' for n in names)}, "
        f"tolerance {diagnosis.tolerance}, grouped by {diagnosis.group_by}):",
        header,
        f"{'target':<24}" + "".join(f"{diagnosis.targets[n]:>8.2f}" for n in names),
        f"{'all labels':<24}" + "".join(f"{diagnosis.shares[n]:>8.2f}" for n in names),
    ]
    if frame is not None and not frame.empty:
        per_label = frame[frame["label"] != ALL_LABELS].pivot_table(
            index="label", columns="split", values="crop_frac", aggfunc="sum", fill_value=0.0
        )
        for label, row in per_label.iterrows():
            name = str(label) if len(str(label)) <= 23 else str(label)[:22] + "…"
            lines.append(f"{name:<24}" + "".join(f"{float(row.get(n, 0.0)):>8.2f}" for n in names))
    return "\n".join(lines)


# --- the stage ---------------------------------------------------------------------------------------------------


@dataclass
class SplitResult:
    """The groups of each split and the diagnosis."""

    splits: dict[str, list[LocationKey]]
    diagnosis: SplitDiagnosis


def group_column(settings: SplitSettings) -> str:
    """The dataset frame column holding the grouping unit's key."""
    return "location" if settings.group_by == "location" else "split_group"


def make_splits(
    frame: pd.DataFrame,
    settings: SplitSettings,
    report: PrepareReport,
    priority_datasets: Sequence[str] = (),
) -> SplitResult:
    """Assign every group of the dataset frame to train, val or test, and diagnose the result.

    Args:
        frame: the dataset frame (``dataset``, ``label`` and the group column: ``location``, or ``split_group`` for
            the other units).
        settings: ``split.*``.
        report: receives per-split counts, the diagnosis (``info.splits``), one issue per label that misses a
            split, per dominant group and per off-target split.
        priority_datasets: datasets whose groups ``smallest_first`` visits first (the label spec's ``prioritize``
            lists, flattened in order).

    Raises:
        DataError: too few groups to split.
        DatasetError: ``split.reuse`` names an unreadable ``splits.json``.
        PrepareError: ``split.strict=true`` and an overall share is off by more than the tolerance.
    """
    groups, _, counts = group_label_counts(frame, group_column(settings))
    if not groups:
        raise DataError("make_splits: the dataset frame has no rows")
    if settings.group_by != "location":
        message = (
            f"splitting by {settings.group_by}, not by location: crops of one camera can land in two splits, so "
            "val and test see backgrounds that train saw and their figures flatter the model"
        )
        log.warning("%s", message)
        report.add(STAGE, "split_unit_leaks_backgrounds", message, field="split.group_by", action="reported")

    fixed: np.ndarray | None = None
    if settings.reuse:
        fixed = _reused_test_mask(groups, settings.reuse, report)

    if settings.method == "random":
        assignment = split_random(
            counts,
            settings.val_frac,
            settings.test_frac,
            trials=settings.trials,
            seed=settings.seed,
            jitter=settings.jitter,
            fixed=fixed,
            tolerance=settings.tolerance,
        )
    elif settings.method == "smallest_first":
        rank_of = {d: i for i, d in enumerate(dict.fromkeys(priority_datasets))}
        priority = np.array([rank_of.get(d, len(rank_of)) for d, _ in groups], dtype=np.int64)
        assignment = split_smallest_first(
            counts,
            settings.val_frac,
            settings.test_frac,
            priority=priority,
            fixed=fixed,
            tolerance=settings.tolerance,
        )
    else:
        raise ConfigError(f"split.method: unknown method {settings.method!r}")

    splits: dict[str, list[LocationKey]] = {
        name: [g for g, a in zip(groups, assignment.tolist(), strict=True) if a == index]
        for index, name in enumerate(SPLIT_NAMES)
    }
    return SplitResult(splits=splits, diagnosis=review_splits(frame, splits, settings, report))


def review_splits(
    frame: pd.DataFrame, splits: Mapping[str, Sequence[LocationKey]], settings: SplitSettings, report: PrepareReport
) -> SplitDiagnosis:
    """Diagnose a split of the dataset frame (made now, or read back from ``splits.json``) and report it.

    Logs and reports every dominant group, unevaluable label, label missing a split and off-target split, and
    records the diagnosis in ``report.info["splits"]``.

    Raises:
        SplitTargetError: ``split.strict=true`` and an overall share is off by more than the tolerance.
    """
    groups, labels, counts = group_label_counts(frame, group_column(settings))
    split_of = {tuple(pair): name for name, pairs in splits.items() for pair in pairs}
    assignment = np.array([SPLIT_NAMES.index(split_of.get(g, "train")) for g in groups], dtype=np.int8)
    has_test = bool(splits.get("test")) or (settings.test_frac > 0 and not settings.reuse)
    diagnosis = diagnose(groups, labels, counts, assignment, settings, has_test)
    for index, name in enumerate(SPLIT_NAMES):
        in_split = assignment == index
        report.set_count(STAGE, f"{name}_groups", int(in_split.sum()))
        report.set_count(STAGE, f"{name}_crops", int(counts[in_split].sum()))
    report.info["splits"] = {
        "method": settings.method,
        "seed": settings.seed,
        "trials": settings.trials if settings.method == "random" else None,
        "reused_test_from": settings.reuse,
        **diagnosis.to_dict(),
    }
    _report_diagnosis(diagnosis, settings, report)
    return diagnosis


def _report_diagnosis(diagnosis: SplitDiagnosis, settings: SplitSettings, report: PrepareReport) -> None:
    for dominant in diagnosis.dominant:
        message = (
            f"{'/'.join(dominant.group)} holds {dominant.crops} crops ({dominant.share:.1%} of all), more than the "
            f"target of {', '.join(dominant.excluded_from)}: it never goes there"
        )
        record = "/".join(dominant.group)
        report.add(STAGE, "dominant_group", message, record=record, field=settings.group_by, action="reported")
    for label in diagnosis.only_dominant_labels:
        message = (
            f"label {label!r} is seen only at groups too large for val and test: it cannot be evaluated on unseen "
            "locations"
        )
        log.warning("%s", message)
        report.add(STAGE, "label_not_evaluable", message, record=label, field="label", action="reported")
    for problem in diagnosis.label_problems:
        log.warning("%s", problem.message())
        report.add(
            STAGE, "label_missing_from_split", problem.message(), record=problem.label, field="label", action="reported"
        )
    report.set_count(STAGE, "labels_missing_a_split", len(diagnosis.label_problems))
    for warning in diagnosis.warnings:
        log.warning("%s", warning)
        report.add(STAGE, "split_off_target", warning, field="split.val_frac", action="reported")
    if diagnosis.warnings and settings.strict:
        raise SplitTargetError(f"split.strict=true: {' | '.join(diagnosis.warnings)}")


def split_report(
    frame: pd.DataFrame,
    splits: Mapping[str, Sequence[LocationKey]],
    group_by: str = "location",
    targets: Mapping[str, float] | None = None,
) -> pd.DataFrame:
    """Per split and label: crops, groups and the label's share of its crops and groups in that split.

    Args:
        frame: the dataset frame (``dataset``, ``label`` and the group column).
        splits: ``{split: [(dataset, group), ...]}`` as :func:`make_splits` returns it.
        group_by: the grouping unit (``location`` reads the ``location`` column, the others ``split_group``).
        targets: the target share of each split (the ``target_frac`` column); NaN when not given.

    Returns:
        Columns ``split, label, crops, locations, crop_frac, location_frac, target_frac``; rows for train and val,
        and for test when it has groups; every label in every split (zeros where a label is absent), then one row per
        split with label :data:`ALL_LABELS` for all labels together. ``locations`` counts groups of the split's unit.
        Fractions are rounded to 6 decimals so the CSV is byte-stable.
    """
    column = "location" if group_by == "location" else "split_group"
    groups, labels, counts = group_label_counts(frame, column)
    split_of = {(str(d), str(g)): name for name, pairs in splits.items() for d, g in pairs}
    names = [n for n in SPLIT_NAMES if n != "test" or splits.get("test")]
    assignment = np.array([names.index(split_of[p]) if split_of.get(p) in names else -1 for p in groups])
    crop_totals = np.maximum(counts.sum(axis=0), 1)
    group_totals = np.maximum((counts > 0).sum(axis=0), 1)
    n_crops, n_groups = max(int(counts.sum()), 1), max(len(groups), 1)
    parts = []
    for s, name in enumerate(names):
        in_split = assignment == s
        crops = counts[in_split].sum(axis=0)
        n_present = (counts[in_split] > 0).sum(axis=0)
        target = float("nan") if targets is None else float(targets.get(name, float("nan")))
        parts.append(
            pd.DataFrame(
                {
                    "split": name,
                    "label": [*labels, ALL_LABELS],
                    "crops": np.r_[crops, crops.sum()].astype(np.int64),
                    "locations": np.r_[n_present, in_split.sum()].astype(np.int64),
                    "crop_frac": np.round(np.r_[crops / crop_totals, crops.sum() / n_crops], 6),
                    "location_frac": np.round(np.r_[n_present / group_totals, in_split.sum() / n_groups], 6),
                    "target_frac": target,
                }
            )
        )
    columns = ["split", "label", "crops", "locations", "crop_frac", "location_frac", "target_frac"]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)


def write_split_files(
    frame: pd.DataFrame,
    splits: Mapping[str, Sequence[LocationKey]],
    output_dir: str | Path,
    group_by: str = "location",
    targets: Mapping[str, float] | None = None,
) -> pd.DataFrame:
    """Write ``splits.json`` and ``split_report.csv`` into ``output_dir``; return the report table."""
    output_dir = Path(output_dir)
    write_splits(splits, output_dir / SPLITS_FILENAME)
    table = split_report(frame, splits, group_by, targets)
    with atomic_write(output_dir / SPLIT_REPORT_FILENAME, "w") as handle:
        table.to_csv(handle, index=False, lineterminator="\n")
    return table


def _reused_test_mask(groups: Sequence[LocationKey], reuse: str, report: PrepareReport) -> np.ndarray:
    earlier = read_splits(reuse)
    test = set(earlier.get("test", []))
    mask = np.array([g in test for g in groups], dtype=bool)
    absent = sorted(test - set(groups))
    if absent:
        report.add(
            STAGE,
            "reused_test_location_absent",
            f"{len(absent)} test group(s) of {reuse} do not occur in this dataset, e.g. "
            f"{[list(p) for p in absent[:10]]}",
            file=reuse,
            field="test",
            action="skipped",
        )
    if not mask.any():
        report.add(
            STAGE,
            "reused_test_empty",
            f"{reuse}: none of its test groups occur in this dataset; the test split is empty",
            file=reuse,
            field="test",
            action="reported",
        )
    report.set_count(STAGE, "reused_test_locations", int(mask.sum()))
    return mask


class SplitsStage(Stage):
    """Assign whole groups to splits; current when the table, the split settings and ``split.reuse`` are unchanged."""

    name = STAGE

    def fingerprint(self, run: PrepareRun) -> str | None:
        """The dataset stage's fingerprint of this run, the split settings and the digest of ``split.reuse``."""
        split = run.split
        reuse_digest = file_sha256(Path(split.reuse)) if split.reuse else None
        return fingerprint_of(run.info["stages"]["dataset"], dataclasses.asdict(split), reuse_digest)

    def run(self, run: PrepareRun) -> StageOutcome:
        """Write (or, when current, read back and review) the splits; leave the table and diagnosis on ``run``."""
        frame, split = need(run.frame, "the dataset table"), run.split
        splits_path = run.output_dir / SPLITS_FILENAME
        report_path = run.output_dir / SPLIT_REPORT_FILENAME
        outcome = StageOutcome()
        if run.is_current(self.name, self.fingerprint(run)) and splits_path.is_file() and report_path.is_file():
            table = pd.read_csv(report_path, dtype={"label": "string", "split": "string"})
            diagnosis = review_splits(frame, read_splits(splits_path), split, run.report)
            outcome.status = SKIPPED
        else:
            made = make_splits(frame, split, run.report)
            diagnosis = made.diagnosis
            table = write_split_files(frame, made.splits, run.output_dir, split.group_by, diagnosis.targets)
        run.split_table, run.split_diagnosis = table, diagnosis
        splits = table["split"].nunique() if not table.empty else 0
        outcome.detail, outcome.counts = f"{splits} splits", {"splits": int(splits)}
        return outcome
