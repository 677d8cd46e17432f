"""Label mapping: which CCT categories become which output labels.

Three ways to say it, in ``labels.*`` (:class:`~animl_lightning.prepare.config.LabelSettings`):

``labels.spec_file``
    A ``label_spec.json`` in the old CameraTraps format (pipeline.md 2.5)::

        {"fox":   {"dataset_labels": {"island": ["gray fox", "island fox"]}, "max_count": 5000},
         "bird":  {"dataset_labels": {"island": ["bird", "raven"]},
                   "exclude": {"dataset_labels": {"island": ["raven"]}}}}

    Keys per output label: ``dataset_labels`` ({dataset: [CCT category names]}), ``exclude`` (same shape, subtracted
    from the inclusion set), ``max_count`` (a limit on *images*, not crops) and ``prioritize`` (a list of lists of
    dataset names, only together with ``max_count``). ``taxa`` needs the private taxonomy CSV and is refused with an
    error naming the label.
``labels.map``
    ``{CCT category name: output label}`` for every dataset. Categories not named are dropped and counted.
neither
    Every CCT category becomes its own label, except those named in ``labels.exclude`` (default ``["empty"]``,
    compared case-insensitively).

Category names are matched exactly first. A category with no exact match falls back to a case-insensitive match
(``str.casefold``), because the old pipeline lowercased every dataset label and old spec files are written in lower
case while Animl exports keep the project's capitalisation (``"Fox"``). A fallback that would be ambiguous (the spec
names ``"Fox"`` and ``"fox"`` with different labels, and the data has ``"FOX"``) is an error.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from animl_lightning.core.errors import DataError, InputFileError
from animl_lightning.core.files import read_json_file
from animl_lightning.core.issues import PrepareReport
from animl_lightning.prepare.config import LabelSettings
from animl_lightning.prepare.stage import PrepareRun, Stage, StageOutcome, need

log = logging.getLogger(__name__)

STAGE = "labels"
SPEC_KEYS = ("dataset_labels", "taxa", "exclude", "max_count", "prioritize")
EXCLUDE_KEYS = ("dataset_labels", "taxa")


class LabelSpecError(InputFileError):
    """A label specification is malformed or contradictory; the message names the file, the label and the key."""


@dataclass(frozen=True)
class LabelRule:
    """One output label of a label specification.

    Attributes:
        label: the output label.
        categories: ``{dataset: CCT category names}`` that map to this label, after ``exclude`` was subtracted.
        max_count: at most this many images (not crops) keep this label; ``None`` for no limit.
        prioritize: datasets to sample from first under ``max_count``, one list per priority level.
    """

    label: str
    categories: Mapping[str, frozenset[str]]
    max_count: int | None = None
    prioritize: tuple[tuple[str, ...], ...] = ()


@dataclass(frozen=True)
class LabelSpec:
    """A validated label specification: rules in spec order, or a map that applies to every dataset.

    Build it with :func:`load_label_spec`, :meth:`from_dict`, :meth:`from_map` or :meth:`from_settings`.

    Attributes:
        rules: one rule per output label, in the order of the spec (the order ``max_count`` sampling uses).
        any_dataset: ``{CCT category name: label}`` that applies to every dataset (the ``labels.map`` form).
        source: where the spec came from, for messages.
    """

    rules: tuple[LabelRule, ...] = ()
    any_dataset: Mapping[str, str] = field(default_factory=dict)
    source: str = "labels.map"

    @classmethod
    def from_dict(cls, raw: object, source: str = "label spec") -> LabelSpec:
        """Validate a parsed ``label_spec.json``.

        Raises:
            LabelSpecError: naming ``source``, the output label and the key that is wrong.
        """
        if not isinstance(raw, dict) or not raw:
            raise LabelSpecError(f"{source}: expected a non-empty JSON object {{output label: spec}}")
        rules: list[LabelRule] = []
        owner: dict[tuple[str, str], str] = {}
        for label, spec in raw.items():
            rule = _parse_rule(label, spec, source)
            for dataset, names in rule.categories.items():
                for name in sorted(names):
                    previous = owner.setdefault((dataset, name), rule.label)
                    if previous != rule.label:
                        raise LabelSpecError(
                            f"{source}: dataset {dataset!r} category {name!r} is mapped to two labels, "
                            f"{previous!r} and {rule.label!r}; a category may belong to one label only"
                        )
            rules.append(rule)
        return cls(rules=tuple(rules), source=source)

    @classmethod
    def from_map(cls, mapping: Mapping[str, str], source: str = "labels.map") -> LabelSpec:
        """Validate the inline ``labels.map`` form ``{CCT category name: output label}``."""
        if not mapping:
            raise LabelSpecError(f"{source}: must map at least one CCT category to a label")
        clean: dict[str, str] = {}
        for name, label in mapping.items():
            if not isinstance(name, str) or not name:
                raise LabelSpecError(f"{source}: category names must be non-empty strings, got {name!r}")
            if not isinstance(label, str) or not label.strip():
                raise LabelSpecError(f"{source}.{name}: label must be a non-empty string, got {label!r}")
            clean[name] = label
        return cls(any_dataset=clean, source=source)

    @classmethod
    def from_settings(cls, settings: LabelSettings) -> LabelSpec | None:
        """The spec that ``labels.*`` describes, or ``None`` for the default (every category is a label)."""
        if settings.spec_file:
            return load_label_spec(settings.spec_file)
        if settings.map:
            return cls.from_map(dict(settings.map))
        return None

    def category_map(self, dataset: str) -> dict[str, str]:
        """``{CCT category name: label}`` for one dataset."""
        mapping = dict(self.any_dataset)
        for rule in self.rules:
            for name in rule.categories.get(dataset, frozenset()):
                mapping[name] = rule.label
        return mapping

    def datasets(self) -> list[str]:
        """Datasets the spec names (empty for the ``labels.map`` form, which covers every dataset)."""
        return sorted({d for rule in self.rules for d in rule.categories})

    def priority_datasets(self) -> list[str]:
        """Datasets named in any rule's ``prioritize``, first mention first (for ``split.method=smallest_first``)."""
        ordered = [d for rule in self.rules for level in rule.prioritize for d in level]
        return list(dict.fromkeys(ordered))

    def rule(self, label: str) -> LabelRule | None:
        """The rule of one output label, if the spec has one."""
        for rule in self.rules:
            if rule.label == label:
                return rule
        return None


def load_label_spec(path: str | Path) -> LabelSpec:
    """Read and validate a ``label_spec.json`` file.

    Raises:
        LabelSpecError: the file is missing, is not JSON, or a label's spec is wrong (the message names the file,
            the label and the key).
    """
    raw = read_json_file(path, LabelSpecError)
    return LabelSpec.from_dict(raw, source=str(path))


def resolve_categories(
    categories: Sequence[str], mapping: Mapping[str, str], source: str = "label spec"
) -> dict[str, str]:
    """Map observed category names to labels: exact match first, then a case-insensitive one.

    Returns:
        ``{observed category: label}`` for the categories that have a label; the others are absent.

    Raises:
        LabelSpecError: the case-insensitive fallback for an observed name hits two spec names with different labels.
    """
    folded: dict[str, dict[str, str]] = {}
    for name, label in mapping.items():
        folded.setdefault(name.casefold(), {})[name] = label
    resolved: dict[str, str] = {}
    for category in categories:
        if category in mapping:
            resolved[category] = mapping[category]
            continue
        candidates = folded.get(category.casefold(), {})
        labels = sorted(set(candidates.values()))
        if len(labels) > 1:
            raise LabelSpecError(
                f"{source}: category {category!r} matches {sorted(candidates)} case-insensitively, which map to "
                f"different labels {labels}; name it exactly"
            )
        if labels:
            resolved[category] = labels[0]
    return resolved


def apply_labels(
    boxes: pd.DataFrame,
    dataset: str,
    settings: LabelSettings,
    report: PrepareReport,
    spec: LabelSpec | None = None,
) -> pd.DataFrame:
    """Give every box an output ``label``; drop (and count) boxes whose category has none; apply ``max_count``.

    Args:
        boxes: the boxes frame (needs ``dataset_class`` and ``image_id``).
        dataset: the dataset name the spec's ``dataset_labels`` keys refer to.
        settings: ``labels.*``; ``settings.seed`` seeds ``max_count`` sampling.
        report: receives per-category drop counts and one issue per dropped category.
        spec: an already loaded spec; by default it is built from ``settings``.

    Returns:
        The kept rows with a new ``label`` column, in their input order, with a fresh RangeIndex.

    Raises:
        LabelSpecError: the spec is invalid or ambiguous.
        ValueError: ``boxes`` lacks a required column.
    """
    missing = [c for c in ("dataset_class", "image_id") if c not in boxes.columns]
    if missing:
        raise DataError(f"apply_labels: boxes frame lacks columns {missing}")
    if spec is None:
        spec = LabelSpec.from_settings(settings)

    classes = boxes["dataset_class"].astype(str)
    observed = sorted(classes.unique().tolist())
    if spec is None:
        excluded = {name.casefold() for name in settings.exclude}
        resolved = {name: name for name in observed if name.casefold() not in excluded}
        source = "labels.exclude"
    else:
        if spec.rules and dataset not in spec.datasets():
            report.add(
                STAGE,
                "dataset_not_in_spec",
                f"dataset {dataset!r} is not named in {spec.source} (it names {spec.datasets()}); "
                "no category gets a label",
                file=spec.source,
                record=dataset,
                field="dataset_labels",
                action="dropped",
            )
        resolved = resolve_categories(observed, spec.category_map(dataset), spec.source)
        source = spec.source
        folded_observed = {name.casefold() for name in observed}
        for key in sorted(spec.any_dataset):
            if key.casefold() not in folded_observed:
                report.add(
                    STAGE,
                    "map_key_unmatched",
                    f"{spec.source} names category {key!r}, which no box of the export has (its categories with "
                    f"boxes: {observed[:20]})",
                    file=spec.source,
                    record=key,
                    field="labels.map",
                    action="ignored",
                )

    labels = classes.map(resolved)
    keep = labels.notna().to_numpy()
    report.set_count(STAGE, "boxes_in", len(boxes))
    dropped_counts = classes[~keep].value_counts()
    for category in sorted(dropped_counts.index.tolist()):
        n = int(dropped_counts[category])
        report.count(STAGE, f"dropped_category:{category}", n)
        reason = "is excluded" if spec is None else "has no label"
        report.add(
            STAGE,
            "category_without_label",
            f"category {category!r} {reason} in {source}: {n} boxes dropped",
            file=None if spec is None else spec.source,
            record=category,
            field="dataset_class",
            action="dropped",
        )
    labelled = boxes.loc[keep].assign(label=labels[keep].astype(str))
    if not settings.case_sensitive:
        labelled = labelled.assign(label=fold_spellings(labelled["label"], report))

    if spec is not None:
        labelled = _apply_max_count(labelled, dataset, spec, settings.seed, report)
    labelled = labelled.reset_index(drop=True)
    report.set_count(STAGE, "boxes_out", len(labelled))
    report.set_count(STAGE, "labels", labelled["label"].nunique())
    for label, n in sorted(labelled["label"].value_counts().items()):
        report.set_count(STAGE, f"label:{label}", int(n))
    return labelled


def fold_spellings(labels: pd.Series, report: PrepareReport) -> pd.Series:
    """Labels that differ only in case or surrounding spaces become one: their most frequent spelling.

    Ties go to the spelling that sorts first. Every fold is reported (stage ``labels``, kind ``label_folded``) with
    the spellings and their box counts; ``labels.case_sensitive=true`` skips this.
    """
    counts = labels.value_counts()
    keys = pd.Series(counts.index.astype(str), index=counts.index).str.strip().str.casefold()
    chosen: dict[str, str] = {}
    for key, spellings in keys.groupby(keys.to_numpy()).groups.items():
        variants = sorted((str(s) for s in spellings), key=lambda s: (-int(counts[s]), s))
        winner = variants[0].strip()
        for variant in variants:
            chosen[variant] = winner
        if len(variants) > 1 or variants[0] != winner:
            described = ", ".join(f"{v!r} ({int(counts[v])} boxes)" for v in variants)
            what = "differ only in case or surrounding spaces" if len(variants) > 1 else "has surrounding spaces"
            report.add(
                STAGE,
                "label_folded",
                f"label{'s' if len(variants) > 1 else ''} {described} {what}: all become {winner!r} "
                "(labels.case_sensitive=true keeps them apart)",
                record=str(key),
                field="label",
                action="merged",
            )
    return labels.map(chosen).astype(str)


def sample_with_priority(
    image_ids: Sequence[str] | np.ndarray,
    image_datasets: Sequence[str] | np.ndarray,
    max_count: int,
    prioritize: Sequence[Sequence[str]],
    rng: np.random.Generator,
) -> np.ndarray:
    """Choose at most ``max_count`` images, datasets of earlier priority levels first (pipeline.md 2.5).

    For each priority level, then for "every dataset": draw uniformly, without replacement, as many not yet chosen
    images from that level's datasets as the remaining quota allows.

    Args:
        image_ids: unique candidate image ids.
        image_datasets: the dataset of each candidate.
        max_count: the quota of images.
        prioritize: lists of dataset names in priority order.
        rng: the generator to draw with; the candidates are sorted first, so the result depends only on the set of
            candidates and the generator's state.

    Returns:
        The chosen image ids, sorted.
    """
    ids = np.asarray(image_ids, dtype=object)
    datasets = np.asarray(image_datasets, dtype=object)
    order = np.argsort(ids.astype(str), kind="stable")
    ids, datasets = ids[order], datasets[order]
    chosen = np.zeros(len(ids), dtype=bool)
    quota = max_count
    levels: list[np.ndarray] = [np.isin(datasets, list(level)) for level in prioritize]
    levels.append(np.ones(len(ids), dtype=bool))
    for in_level in levels:
        if quota <= 0:
            break
        candidates = np.flatnonzero(in_level & ~chosen)
        take = min(quota, len(candidates))
        if take:
            chosen[rng.choice(candidates, size=take, replace=False)] = True
            quota -= take
    return np.asarray(ids[chosen])


def _apply_max_count(
    frame: pd.DataFrame, dataset: str, spec: LabelSpec, seed: int, report: PrepareReport
) -> pd.DataFrame:
    keep = np.ones(len(frame), dtype=bool)
    labels = frame["label"].to_numpy()
    image_ids = frame["image_id"].astype(str).to_numpy()
    frame_datasets = (
        frame["dataset"].astype(str).to_numpy() if "dataset" in frame.columns else np.full(len(frame), dataset)
    )
    for rule in spec.rules:
        if rule.max_count is None:
            continue
        rows = labels == rule.label
        unique_ids, first = np.unique(image_ids[rows], return_index=True)
        if len(unique_ids) <= rule.max_count:
            continue
        # One generator per label: changing one label's max_count does not reshuffle another's sample.
        rng = np.random.default_rng([seed, zlib.crc32(rule.label.encode("utf-8"))])
        chosen = sample_with_priority(unique_ids, frame_datasets[rows][first], rule.max_count, rule.prioritize, rng)
        drop = rows & ~np.isin(image_ids, chosen)
        keep &= ~drop
        report.count(STAGE, f"max_count_dropped:{rule.label}", int(drop.sum()))
        report.add(
            STAGE,
            "max_count",
            f"label {rule.label!r}: kept {len(chosen)} of {len(unique_ids)} images (max_count={rule.max_count}), "
            f"dropped {int(drop.sum())} boxes",
            file=spec.source,
            record=rule.label,
            field="max_count",
            action="dropped",
        )
    return frame.loc[keep]


def _parse_rule(label: object, spec: object, source: str) -> LabelRule:
    if not isinstance(label, str) or not label.strip():
        raise LabelSpecError(f"{source}: output labels must be non-empty strings, got {label!r}")
    where = f"{source}: label {label!r}"
    if not isinstance(spec, dict):
        raise LabelSpecError(f"{where}: expected an object with keys {list(SPEC_KEYS)}, got {spec!r}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise LabelSpecError(f"{where}: unknown keys {unknown}; allowed keys are {list(SPEC_KEYS)}")
    if "taxa" in spec:
        raise LabelSpecError(
            f"{where}, key 'taxa': taxonomy selections need the CameraTraps taxonomy CSV, which this pipeline "
            "does not support; list the categories under 'dataset_labels' instead"
        )
    included = _parse_dataset_labels(spec.get("dataset_labels"), f"{where}, key 'dataset_labels'")
    excluded: dict[str, set[str]] = {}
    if "exclude" in spec:
        exclude = spec["exclude"]
        if not isinstance(exclude, dict):
            raise LabelSpecError(f"{where}, key 'exclude': expected an object with 'dataset_labels'")
        unknown = sorted(set(exclude) - set(EXCLUDE_KEYS))
        if unknown:
            raise LabelSpecError(f"{where}, key 'exclude': unknown keys {unknown}; allowed {list(EXCLUDE_KEYS)}")
        if "taxa" in exclude:
            raise LabelSpecError(
                f"{where}, key 'exclude.taxa': taxonomy selections are not supported; use 'exclude.dataset_labels'"
            )
        excluded = _parse_dataset_labels(exclude.get("dataset_labels"), f"{where}, key 'exclude.dataset_labels'")
    categories = {
        dataset: frozenset(names - excluded.get(dataset, set()))
        for dataset, names in sorted(included.items())
        if names - excluded.get(dataset, set())
    }
    if not categories:
        raise LabelSpecError(f"{where}, key 'dataset_labels': selects no category (after 'exclude')")

    max_count = spec.get("max_count")
    if max_count is not None and (isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 1):
        raise LabelSpecError(f"{where}, key 'max_count': must be a positive integer, got {max_count!r}")
    prioritize_raw = spec.get("prioritize")
    prioritize: tuple[tuple[str, ...], ...] = ()
    if prioritize_raw is not None:
        if max_count is None:
            raise LabelSpecError(f"{where}, key 'prioritize': only valid together with 'max_count'")
        if not isinstance(prioritize_raw, list) or not all(
            isinstance(level, list) and all(isinstance(d, str) for d in level) for level in prioritize_raw
        ):
            raise LabelSpecError(
                f"{where}, key 'prioritize': expected a list of lists of dataset names, got {prioritize_raw!r}"
            )
        prioritize = tuple(tuple(level) for level in prioritize_raw)
    return LabelRule(label=label, categories=categories, max_count=max_count, prioritize=prioritize)


def _parse_dataset_labels(raw: Any, where: str) -> dict[str, set[str]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise LabelSpecError(f"{where}: expected an object {{dataset: [category names]}}, got {raw!r}")
    parsed: dict[str, set[str]] = {}
    for dataset, names in raw.items():
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise LabelSpecError(f"{where}, dataset {dataset!r}: expected a list of category names, got {names!r}")
        parsed[str(dataset)] = set(names)
    return parsed


class LabelsStage(Stage):
    """Always runs: map every cropped box's category to its output label."""

    name = STAGE

    def run(self, run: PrepareRun) -> StageOutcome:
        """Leave the labelled boxes on ``run.labelled``."""
        labelled = apply_labels(need(run.boxes, "the cropped boxes"), run.dataset, run.settings.labels, run.report)
        run.labelled = labelled
        labels = int(labelled["label"].nunique())
        return StageOutcome(detail=f"{labels} labels", counts={"labels": labels})
