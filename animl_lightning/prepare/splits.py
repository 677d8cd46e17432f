"""Location splits: whole ``(dataset, location)`` pairs go to train, val or test.

Crops from one camera location look alike (same background, same light, often the same animal), so a location in
both train and test would flatter the test figures. Every function here works on the location x label count matrix
that :func:`location_label_counts` builds; an *assignment* is an ``int8`` array with one entry per location:
``0`` = train, ``1`` = val, ``2`` = test.

Two methods (``split.method``):

``random`` (:func:`split_random`)
    The old CameraTraps search (pipeline.md 3.4), seeded and vectorised: ``split.trials`` random shuffles of the
    locations, each cut into train | val | test at sizes ``int(L * (frac + U(-jitter, jitter)))``; the trial with
    the lowest score wins. Score (lower is better), summed over the splits in use::

        2 * sum_labels (crops of label in split / crops of label - target_frac) ** 2
          + sum_labels (locations with label in split / locations with label - target_frac) ** 2

    plus, for val and test, the AML24 distribution term
    ``2 * sum_labels (label share of the split's crops - label share of all crops) ** 2``.

    **Coverage comes first.** Training and the per-label tables need every label in every split, so trials are
    ranked by the number of (label, split) pairs without a crop first and by the score second: a trial that leaves
    fewer labels out of a split always wins, whatever its score. Labels with fewer locations than splits cannot be
    everywhere; :func:`coverage_problems` names them.
``smallest_first`` (:func:`split_smallest_first`)
    What the old, crashing method meant to do: labels from fewest crops to most; for each, its locations (those of
    prioritised datasets first, then by the label's crop count ascending); every location not yet assigned goes to
    test until test holds ``test_frac`` of the label's crops, then to val until val holds ``val_frac``, then train.

``split.test_frac=0`` gives no test split (every location is train or val; ``splits.json`` has ``"test": []``).

``split.reuse=PATH`` keeps the test locations of an earlier ``splits.json`` that still occur in the data fixed in
test, so models trained on a grown dataset are compared on the same test set. Every other location, old or new, is
split into train and val only (fractions renormalised to ``val_frac / (1 - test_frac)``); the test set is never
enlarged, and test locations are excluded from the train/val search (the fix of pipeline.md bug 5). Earlier test
locations that no longer occur are reported.

Everything is deterministic: locations and labels are sorted as strings, randomness comes from
generators spawned from ``numpy.random.SeedSequence(split.seed)`` only, and the draws do not depend on the batch
size.
"""

from __future__ import annotations

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
from animl_lightning.core.errors import DataError
from animl_lightning.core.files import atomic_write
from animl_lightning.core.issues import PrepareReport
from animl_lightning.prepare.config import SplitSettings

log = logging.getLogger(__name__)

STAGE = "splits"
TRAIN, VAL, TEST = 0, 1, 2
# Elements (trials x locations) per batch: bounds the search's memory at ~60 MB whatever the dataset size.
_BATCH_ELEMENTS = 2_000_000


# --- the count matrix --------------------------------------------------------------------------------------------


def location_label_counts(frame: pd.DataFrame) -> tuple[list[LocationKey], list[str], np.ndarray]:
    """Crops per ``(dataset, location)`` and label.

    Args:
        frame: rows with ``dataset``, ``location`` and ``label`` (one row per crop). Values are compared as strings,
            so integer and string locations give the same result.

    Returns:
        ``(locations, labels, counts)``: the sorted location pairs, the sorted labels, and an ``int64`` matrix of
        shape ``(len(locations), len(labels))``.
    """
    missing = [c for c in ("dataset", "location", "label") if c not in frame.columns]
    if missing:
        raise DataError(f"location_label_counts: frame lacks columns {missing}")
    if frame.empty:
        return [], [], np.zeros((0, 0), dtype=np.int64)
    ds_codes, ds_values = pd.factorize(frame["dataset"].astype(str))
    loc_codes, loc_values = pd.factorize(frame["location"].astype(str))
    n_loc_values = len(loc_values)
    combined = ds_codes.astype(np.int64) * n_loc_values + loc_codes
    unique_combined, pair_of_row = np.unique(combined, return_inverse=True)
    pairs = [(str(ds_values[u // n_loc_values]), str(loc_values[u % n_loc_values])) for u in unique_combined]
    location_rank = _rank_of_sorted(pairs)
    row_location = location_rank[pair_of_row]

    label_codes, label_values = pd.factorize(frame["label"].astype(str))
    label_list = [str(v) for v in label_values]
    label_rank = _rank_of_sorted(label_list)
    row_label = label_rank[label_codes]

    n_locations, n_labels = len(pairs), len(label_list)
    flat = np.bincount(row_location * n_labels + row_label, minlength=n_locations * n_labels)
    return sorted(pairs), sorted(label_list), flat.reshape(n_locations, n_labels).astype(np.int64)


def _rank_of_sorted(values: Sequence[object]) -> np.ndarray:
    order = sorted(range(len(values)), key=values.__getitem__)  # type: ignore[arg-type]
    rank = np.empty(len(values), dtype=np.int64)
    rank[order] = np.arange(len(values), dtype=np.int64)
    return rank


# --- scoring -----------------------------------------------------------------------------------------------------


def split_targets(val_frac: float, test_frac: float) -> np.ndarray:
    """Target fractions ``[train, val, test]``."""
    return np.array([1.0 - val_frac - test_frac, val_frac, test_frac], dtype=np.float64)


def _score_sums(
    sums: Sequence[np.ndarray],
    crop_totals: np.ndarray,
    location_totals: np.ndarray,
    targets: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Score trials from their per-split sums.

    Args:
        sums: one ``(trials, 2 * labels)`` array per split in use, in split order: crops per label, then locations
            with the label.
        crop_totals: crops per label.
        location_totals: locations per label.
        targets: target fraction of each split in use.

    Returns:
        ``(missing, score)`` per trial: the number of (label, split) pairs without a crop, and the old score.
    """
    n_labels = len(crop_totals)
    crop_totals = np.maximum(crop_totals.astype(np.float64), 1.0)
    location_totals = np.maximum(location_totals.astype(np.float64), 1.0)
    overall = crop_totals / crop_totals.sum()
    score = np.zeros(sums[0].shape[0], dtype=np.float64)
    missing = np.zeros(sums[0].shape[0], dtype=np.int64)
    for split, split_sums in enumerate(sums):
        crops = split_sums[:, :n_labels].astype(np.float64)
        locations = split_sums[:, n_labels:].astype(np.float64)
        target = float(targets[split])
        score += 2.0 * ((crops / crop_totals - target) ** 2).sum(axis=1)
        score += ((locations / location_totals - target) ** 2).sum(axis=1)
        if split != TRAIN:
            split_total = np.maximum(crops.sum(axis=1, keepdims=True), 1.0)
            score += 2.0 * ((crops / split_total - overall) ** 2).sum(axis=1)
        missing += (crops == 0).sum(axis=1)
    return missing, score


def score_assignment(
    counts: np.ndarray, assignment: np.ndarray, val_frac: float, test_frac: float
) -> tuple[int, float]:
    """``(missing (label, split) pairs, score)`` of one assignment, as :func:`split_random` ranks it.

    With ``test_frac == 0`` only train and val are scored.
    """
    counts = np.asarray(counts, dtype=np.int64)
    assignment = np.asarray(assignment)
    n_splits = 3 if test_frac > 0 else 2
    features = np.concatenate([counts, counts > 0], axis=1).astype(np.float64)
    sums = [(assignment == s).astype(np.float64)[None, :] @ features for s in range(n_splits)]
    missing, score = _score_sums(
        sums, counts.sum(axis=0), (counts > 0).sum(axis=0), split_targets(val_frac, test_frac)[:n_splits]
    )
    return int(missing[0]), float(score[0])


# --- methods -----------------------------------------------------------------------------------------------------


def split_random(
    counts: np.ndarray,
    val_frac: float,
    test_frac: float,
    trials: int = 10000,
    seed: int = 0,
    jitter: float = 0.03,
    fixed: np.ndarray | None = None,
    batch_size: int | None = None,
) -> np.ndarray:
    """The best of ``trials`` random location assignments (see the module docstring for the ranking).

    Trials are processed in batches: random keys per location, sorted to find each trial's cut points, boolean
    split masks, and one ``float32`` matrix product per split with ``[counts | counts > 0]`` (exact: the sums are
    integers far below 2**24). Trial ``i`` draws its two size offsets from the ``i``-th pair of one stream and its
    location keys from the ``i``-th row of another (both spawned from ``seed``), so the result depends on ``seed``
    but not on ``batch_size``, and raising ``trials`` never gives a worse split.

    Args:
        counts: ``(locations, labels)`` crop counts.
        val_frac: target fraction of val.
        test_frac: target fraction of test; 0 for no test split.
        trials: number of random assignments tried.
        seed: seed of the :class:`numpy.random.SeedSequence` the two generators are spawned from.
        jitter: split sizes are drawn as ``int(L * (frac + U(-jitter, jitter)))``.
        fixed: boolean mask of locations fixed in test (``split.reuse``). The others are split into train and val
            only, with ``val_frac / (1 - test_frac)`` as val's share of them.
        batch_size: trials per batch; by default as many as fit :data:`_BATCH_ELEMENTS`.

    Returns:
        ``int8`` assignment per location: 0 train, 1 val, 2 test.

    Raises:
        ValueError: fewer locations than splits to fill.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 2:
        raise DataError(f"counts must be a (locations, labels) matrix, got shape {counts.shape}")
    if trials < 1:
        raise DataError(f"split.trials must be >= 1, got {trials}")
    if fixed is not None:
        fixed = np.asarray(fixed, dtype=bool)
        free = ~fixed
        assignment = np.full(len(counts), TEST, dtype=np.int8)
        assignment[free] = split_random(
            counts[free], val_frac / (1.0 - test_frac), 0.0, trials, seed, jitter, None, batch_size
        )
        return assignment

    n_locations = counts.shape[0]
    n_splits = 3 if test_frac > 0 else 2
    if n_locations < n_splits:
        raise DataError(
            f"cannot split {n_locations} location(s) into {n_splits} splits by location; "
            f"add locations or set split.test_frac=0"
        )
    targets = split_targets(val_frac, test_frac)
    # Separate streams for sizes and shuffles: trial i is the same whatever ``trials`` and ``batch_size`` are, so
    # more trials with the same seed can only find an equal or better split.
    size_rng, key_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    offsets = size_rng.uniform(-jitter, jitter, size=(trials, 2))
    n_train = np.floor(n_locations * (targets[TRAIN] + offsets[:, 0])).astype(np.int64)
    n_train = np.clip(n_train, 1, n_locations - (n_splits - 1))
    if n_splits == 3:
        n_val = np.floor(n_locations * (targets[VAL] + offsets[:, 1])).astype(np.int64)
        n_val = np.clip(n_val, 1, n_locations - n_train - 1)
    else:
        n_val = n_locations - n_train

    # float32 sums of integers are exact below 2**24; beyond that (never seen in practice) use float64.
    dtype = np.float32 if counts.sum() < 2**24 else np.float64
    features = np.concatenate([counts, counts > 0], axis=1).astype(dtype)
    totals = features.sum(axis=0)
    crop_totals, location_totals = counts.sum(axis=0), (counts > 0).sum(axis=0)
    if batch_size is None:
        batch_size = max(1, min(trials, _BATCH_ELEMENTS // max(n_locations, 1)))

    best_key: tuple[int, float] | None = None
    best_assignment = np.zeros(n_locations, dtype=np.int8)
    for start in range(0, trials, batch_size):
        stop = min(trials, start + batch_size)
        rows = np.arange(stop - start)
        keys = key_rng.random((stop - start, n_locations))
        ordered = np.sort(keys, axis=1)
        # A location goes to train when its key is among the n_train smallest of its trial, and so on.
        cut_train = ordered[rows, n_train[start:stop] - 1][:, None]
        in_train = keys <= cut_train
        sums = [in_train.astype(dtype) @ features]
        if n_splits == 3:
            cut_val = ordered[rows, n_train[start:stop] + n_val[start:stop] - 1][:, None]
            in_val = ~in_train & (keys <= cut_val)
            sums.append(in_val.astype(dtype) @ features)
            sums.append(totals - sums[0] - sums[1])
        else:
            sums.append(totals - sums[0])
        missing, score = _score_sums(sums, crop_totals, location_totals, targets[:n_splits])
        best = int(np.lexsort((score, missing))[0])
        key = (int(missing[best]), float(score[best]))
        if best_key is None or key < best_key:
            best_key = key
            assignment = (~in_train[best]).astype(np.int8)
            if n_splits == 3:
                assignment += (keys[best] > cut_val[best, 0]).astype(np.int8)
            best_assignment = assignment
    log.debug("random split: best of %d trials has %s (missing pairs, score)", trials, best_key)
    return best_assignment


def split_smallest_first(
    counts: np.ndarray,
    val_frac: float,
    test_frac: float,
    priority: np.ndarray | None = None,
    fixed: np.ndarray | None = None,
) -> np.ndarray:
    """Greedy split, rarest labels first (pipeline.md 3.4, as the old code meant it).

    Labels are visited from fewest crops to most (ties by label order). For each label, its locations are visited
    by ``priority`` (lower first), then by the label's crop count there (ascending), then by location order. Each
    location not assigned yet goes to test while test holds less than ``test_frac`` of the label's crops, else to
    val while val holds less than ``val_frac``, else to train. Crops of locations assigned while visiting earlier
    labels count towards these totals.

    Args:
        counts: ``(locations, labels)`` crop counts.
        val_frac: target fraction of val.
        test_frac: target fraction of test; 0 for no test split.
        priority: per-location rank (e.g. the position of its dataset in the label spec's ``prioritize`` lists);
            lower ranks are visited first. Default: all equal.
        fixed: boolean mask of locations fixed in test (``split.reuse``); no other location goes to test then.

    Returns:
        ``int8`` assignment per location: 0 train, 1 val, 2 test.
    """
    counts = np.asarray(counts, dtype=np.int64)
    n_locations, n_labels = counts.shape
    rank = np.zeros(n_locations, dtype=np.int64) if priority is None else np.asarray(priority, dtype=np.int64)
    assignment = np.full(n_locations, -1, dtype=np.int8)
    split_crops = np.zeros((3, n_labels), dtype=np.int64)
    test_open = test_frac > 0
    if fixed is not None:
        fixed = np.asarray(fixed, dtype=bool)
        assignment[fixed] = TEST
        split_crops[TEST] = counts[fixed].sum(axis=0)
        test_open = False
    label_totals = counts.sum(axis=0)
    for label in np.lexsort((np.arange(n_labels), label_totals)):
        size = label_totals[label]
        where = np.flatnonzero(counts[:, label] > 0)
        for location in where[np.lexsort((where, counts[where, label], rank[where]))]:
            if assignment[location] >= 0:
                continue
            if test_open and split_crops[TEST, label] < test_frac * size:
                split = TEST
            elif split_crops[VAL, label] < val_frac * size:
                split = VAL
            else:
                split = TRAIN
            assignment[location] = split
            split_crops[split] += counts[location]
    assignment[assignment < 0] = TRAIN  # locations without crops; none when counts come from a dataset frame
    return assignment


# --- checks and reports ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CoverageProblem:
    """A label that is absent from some split.

    Attributes:
        label: the label.
        locations: number of locations that have it.
        crops: number of crops of it.
        missing_splits: the splits (names) without a crop of it.
        too_few_locations: ``True`` when the label has fewer locations than there are splits, so no assignment
            could place it everywhere.
    """

    label: str
    locations: int
    crops: int
    missing_splits: tuple[str, ...]
    too_few_locations: bool

    def message(self) -> str:
        """One sentence naming the label, the splits it misses and why."""
        why = (
            f"it is seen at only {self.locations} location(s)"
            if self.too_few_locations
            else f"no assignment of its {self.locations} locations reached them among the trials"
        )
        return f"label {self.label!r} ({self.crops} crops) has no crop in split(s) {list(self.missing_splits)}: {why}"


def coverage_problems(
    counts: np.ndarray,
    labels: Sequence[str],
    assignment: np.ndarray | None = None,
    split_names: Sequence[str] = SPLIT_NAMES,
) -> list[CoverageProblem]:
    """Labels that do not (or, without ``assignment``, cannot) reach every split.

    Args:
        counts: ``(locations, labels)`` crop counts.
        labels: label names, one per column.
        assignment: per-location split ids; without it, labels with fewer locations than ``split_names`` are
            returned (all splits listed as missing).
        split_names: the splits in use, in id order (``("train", "val")`` when there is no test split).

    Returns:
        One problem per affected label, in label order.
    """
    counts = np.asarray(counts, dtype=np.int64)
    n_splits = len(split_names)
    location_totals = (counts > 0).sum(axis=0)
    crop_totals = counts.sum(axis=0)
    problems: list[CoverageProblem] = []
    for j, label in enumerate(labels):
        too_few = bool(location_totals[j] < n_splits)
        if assignment is None:
            missing = tuple(split_names) if too_few else ()
        else:
            present = np.asarray(assignment)[counts[:, j] > 0]
            missing = tuple(name for s, name in enumerate(split_names) if not (present == s).any())
        if missing:
            problems.append(
                CoverageProblem(
                    label=str(label),
                    locations=int(location_totals[j]),
                    crops=int(crop_totals[j]),
                    missing_splits=missing,
                    too_few_locations=too_few,
                )
            )
    return problems


def split_report(frame: pd.DataFrame, splits: Mapping[str, Sequence[LocationKey]]) -> pd.DataFrame:
    """Per split and label: crops, locations and the label's share of crops and locations in that split.

    Args:
        frame: the dataset frame (``dataset``, ``location``, ``label``).
        splits: ``{split: [(dataset, location), ...]}`` as :func:`make_splits` returns it.

    Returns:
        Columns ``split, label, crops, locations, crop_frac, location_frac``; rows for train and val, and for test
        when it has locations; every label in every split (zeros where a label is absent); fractions rounded to 6
        decimals so the CSV is byte-stable.
    """
    locations, labels, counts = location_label_counts(frame)
    split_of = {(str(d), str(loc)): name for name, pairs in splits.items() for d, loc in pairs}
    names = [n for n in SPLIT_NAMES if n != "test" or splits.get("test")]
    assignment = np.array([names.index(split_of[p]) if split_of.get(p) in names else -1 for p in locations])
    crop_totals = np.maximum(counts.sum(axis=0), 1)
    location_totals = np.maximum((counts > 0).sum(axis=0), 1)
    parts = []
    for s, name in enumerate(names):
        in_split = assignment == s
        crops = counts[in_split].sum(axis=0)
        n_locations = (counts[in_split] > 0).sum(axis=0)
        parts.append(
            pd.DataFrame(
                {
                    "split": name,
                    "label": labels,
                    "crops": crops.astype(np.int64),
                    "locations": n_locations.astype(np.int64),
                    "crop_frac": np.round(crops / crop_totals, 6),
                    "location_frac": np.round(n_locations / location_totals, 6),
                }
            )
        )
    columns = ["split", "label", "crops", "locations", "crop_frac", "location_frac"]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)


def make_splits(
    frame: pd.DataFrame,
    settings: SplitSettings,
    report: PrepareReport,
    priority_datasets: Sequence[str] = (),
) -> dict[str, list[LocationKey]]:
    """Assign every ``(dataset, location)`` of the dataset frame to train, val or test.

    Args:
        frame: the dataset frame (``dataset``, ``location``, ``label``).
        settings: ``split.*``.
        report: receives per-split counts, the labels that miss a split and, with ``split.reuse``, the earlier test
            locations that no longer occur.
        priority_datasets: datasets whose locations ``smallest_first`` visits first (the label spec's
            ``prioritize`` lists, flattened in order).

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` with sorted ``(dataset, location)`` lists; ``test`` is
        empty when ``split.test_frac=0`` and no earlier test split is reused.

    Raises:
        ValueError: too few locations to split.
        DatasetError: ``split.reuse`` names an unreadable ``splits.json``.
    """
    locations, labels, counts = location_label_counts(frame)
    if not locations:
        raise DataError("make_splits: the dataset frame has no rows")

    fixed: np.ndarray | None = None
    if settings.reuse:
        fixed = _reused_test_mask(locations, settings.reuse, report)

    if settings.method == "random":
        assignment = split_random(
            counts,
            settings.val_frac,
            settings.test_frac,
            trials=settings.trials,
            seed=settings.seed,
            jitter=settings.jitter,
            fixed=fixed,
        )
    elif settings.method == "smallest_first":
        rank_of = {d: i for i, d in enumerate(dict.fromkeys(priority_datasets))}
        priority = np.array([rank_of.get(d, len(rank_of)) for d, _ in locations], dtype=np.int64)
        assignment = split_smallest_first(counts, settings.val_frac, settings.test_frac, priority=priority, fixed=fixed)
    else:
        raise DataError(f"split.method: unknown method {settings.method!r}")

    splits: dict[str, list[LocationKey]] = {
        name: [loc for loc, a in zip(locations, assignment.tolist(), strict=True) if a == s]
        for s, name in enumerate(SPLIT_NAMES)
    }

    has_test = bool(splits["test"]) or (settings.test_frac > 0 and fixed is None)
    names = SPLIT_NAMES if has_test else SPLIT_NAMES[:2]
    problems = coverage_problems(counts, labels, assignment, names)
    for problem in problems:
        report.add(
            STAGE,
            "label_missing_from_split",
            problem.message(),
            record=problem.label,
            field="label",
            action="reported",
        )
        log.warning("%s", problem.message())

    missing, score = score_assignment(counts, assignment, settings.val_frac, settings.test_frac if has_test else 0.0)
    for name in SPLIT_NAMES:
        in_split = assignment == SPLIT_NAMES.index(name)
        report.set_count(STAGE, f"{name}_locations", int(in_split.sum()))
        report.set_count(STAGE, f"{name}_crops", int(counts[in_split].sum()))
    report.set_count(STAGE, "labels_missing_a_split", len(problems))
    report.info["splits"] = {
        "method": settings.method,
        "seed": settings.seed,
        "trials": settings.trials if settings.method == "random" else None,
        "score": round(score, 9),
        "missing_label_split_pairs": missing,
        "reused_test_from": settings.reuse,
    }
    return splits


def write_split_files(
    frame: pd.DataFrame, splits: Mapping[str, Sequence[LocationKey]], output_dir: str | Path
) -> pd.DataFrame:
    """Write ``splits.json`` and ``split_report.csv`` into ``output_dir``; return the report table."""
    output_dir = Path(output_dir)
    write_splits(splits, output_dir / SPLITS_FILENAME)
    table = split_report(frame, splits)
    with atomic_write(output_dir / SPLIT_REPORT_FILENAME, "w") as handle:
        table.to_csv(handle, index=False, lineterminator="\n")
    return table


def _reused_test_mask(locations: Sequence[LocationKey], reuse: str, report: PrepareReport) -> np.ndarray:
    earlier = read_splits(reuse)
    test = set(earlier.get("test", []))
    mask = np.array([loc in test for loc in locations], dtype=bool)
    absent = sorted(test - set(locations))
    if absent:
        report.add(
            STAGE,
            "reused_test_location_absent",
            f"{len(absent)} test location(s) of {reuse} do not occur in this dataset, e.g. "
            f"{[list(p) for p in absent[:10]]}",
            file=reuse,
            field="test",
            action="skipped",
        )
    if not mask.any():
        report.add(
            STAGE,
            "reused_test_empty",
            f"{reuse}: none of its test locations occur in this dataset; the test split is empty",
            file=reuse,
            field="test",
            action="reported",
        )
    report.set_count(STAGE, "reused_test_locations", int(mask.sum()))
    return mask
