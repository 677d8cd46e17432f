"""The search for a group split: the count matrix, targets, the score and the two methods.

Every function here works on the group x label count matrix of :func:`group_label_counts`; an *assignment* is an
``int8`` array with one entry per group: ``0`` = train, ``1`` = val, ``2`` = test.

Targets are shares of **crops**. ``split.val_frac`` and ``split.test_frac`` are the shares of all crops that val and
test should hold, and of each label's crops (the old CameraTraps score's meaning); train holds the rest.

**Dominant groups.** A group holding more crops than the val target (``val_frac`` of all crops) never goes to val,
and one holding more than the test target never goes to test: it could only overshoot. A group too large for every
evaluation split goes to train. Real camera-trap data always has such groups (one camera with most of the images);
the report names each with its share, and a label found only at such groups is named as one that cannot be
evaluated on unseen locations.

**The score** (lower is better) of an assignment, one sum with no lexicographic order::

    overall   sum over splits s of (d_s / tol)^2, plus 10 + 10 (excess_s / tol)^2 for a split whose |d_s| > tol
              (d_s = the split's share of all crops - its target; tol = split.tolerance; excess = |d_s| - tol)
  + labels    mean over labels of sum over splits of (the label's share of its crops in s - target_s)^2
  + coverage  0.25 per (label, split) pair without a crop that could have one, at most 5
  + places    0.1 * mean over labels of sum over splits of (share of the label's groups in s - target_s)^2

Inside the tolerance the overall term is at most 1 per split; outside it adds at least 10, more than the other three
terms together can ever add (at most 1.1 + 5 + 0.1). So label coverage decides between partitions of similar
overall shares (one more label in every split is worth moving a split by half the tolerance) but can never make the
search accept a partition whose overall shares are off by more than the tolerance when one within it exists. When
none can exist, because the groups that may go to val or test hold too few crops (a dominant camera), the overall
term measures against the reachable targets instead (:func:`scoring_targets`: val and test shrunk in proportion), so
that the search still keeps each label in train rather than piling every small group into val and test.

Two methods (``split.method``):

``random`` (:func:`split_random`)
    ``split.trials`` random partitions proposed by cumulative crop counts: the groups that may go to val or test are
    shuffled, and the shortest prefix whose crops reach val's target (``val_frac`` +/- ``split.jitter``) goes to
    val (or the one just short of it, whichever combination with the test cut lands closer to all targets), the
    following ones to test likewise, the rest to train. A quarter of the trials use the exact targets. When the
    groups that may go to val or test hold fewer crops than val and test should, both targets shrink in proportion,
    and half the trials leave a random share of those crops in train too. The best-scoring trial wins.
``smallest_first`` (:func:`split_smallest_first`)
    Labels from fewest crops to most; a label with crops at several groups and none in train yet first gives its
    largest unassigned group to train; each other unassigned group of the label goes to test while the label's test
    share is below target and test stays within its target plus the tolerance, then to val likewise, else to train.
    Dominant groups go to train first.

Everything is deterministic: groups and labels are sorted as strings, and randomness comes from generators spawned
from ``numpy.random.SeedSequence(split.seed)`` only, drawn per trial, so the result does not depend on the batch
size. The stage that runs the search, diagnoses its result and writes the files is
:mod:`animl_lightning.prepare.splits`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from animl_lightning.core.contract import LocationKey
from animl_lightning.core.errors import DataError, require

log = logging.getLogger(__name__)

TRAIN, VAL, TEST = 0, 1, 2
# The score's weights (module docstring).
OUT_OF_TOLERANCE = 10.0
COVERAGE_PER_PAIR = 0.25
COVERAGE_CAP = 5.0
PLACES_WEIGHT = 0.1
# Elements (trials x groups) per batch: bounds the search's memory at ~100 MB whatever the dataset size.
_BATCH_ELEMENTS = 2_000_000


# --- the count matrix --------------------------------------------------------------------------------------------


def group_label_counts(
    frame: pd.DataFrame, group_column: str = "location"
) -> tuple[list[LocationKey], list[str], np.ndarray]:
    """Crops per ``(dataset, group)`` and label.

    Args:
        frame: rows with ``dataset``, ``group_column`` and ``label`` (one row per crop). Values are compared as
            strings, so integer and string locations give the same result.
        group_column: the column holding the group key (``location``, or the key of another grouping unit).

    Returns:
        ``(groups, labels, counts)``: the sorted ``(dataset, group)`` pairs, the sorted labels, and an ``int64``
        matrix of shape ``(len(groups), len(labels))``.
    """
    missing = [c for c in ("dataset", group_column, "label") if c not in frame.columns]
    if missing:
        raise DataError(f"group_label_counts: frame lacks columns {missing}")
    if frame.empty:
        return [], [], np.zeros((0, 0), dtype=np.int64)
    ds_codes, ds_values = pd.factorize(frame["dataset"].astype(str))
    group_codes, group_values = pd.factorize(frame[group_column].astype(str))
    n_group_values = len(group_values)
    combined = ds_codes.astype(np.int64) * n_group_values + group_codes
    unique_combined, pair_of_row = np.unique(combined, return_inverse=True)
    pairs = [(str(ds_values[u // n_group_values]), str(group_values[u % n_group_values])) for u in unique_combined]
    group_rank = _rank_of_sorted(pairs)
    row_group = group_rank[pair_of_row]

    label_codes, label_values = pd.factorize(frame["label"].astype(str))
    label_list = [str(v) for v in label_values]
    row_label = _rank_of_sorted(label_list)[label_codes]

    n_groups, n_labels = len(pairs), len(label_list)
    flat = np.bincount(row_group * n_labels + row_label, minlength=n_groups * n_labels)
    return sorted(pairs), sorted(label_list), flat.reshape(n_groups, n_labels).astype(np.int64)


def location_label_counts(frame: pd.DataFrame) -> tuple[list[LocationKey], list[str], np.ndarray]:
    """:func:`group_label_counts` by location."""
    return group_label_counts(frame, "location")


def _rank_of_sorted(values: Sequence[object]) -> np.ndarray:
    order = sorted(range(len(values)), key=values.__getitem__)  # type: ignore[arg-type]
    rank = np.empty(len(values), dtype=np.int64)
    rank[order] = np.arange(len(values), dtype=np.int64)
    return rank


# --- targets and admissibility -----------------------------------------------------------------------------------


def split_targets(val_frac: float, test_frac: float) -> np.ndarray:
    """Target crop shares ``[train, val, test]``."""
    return np.array([1.0 - val_frac - test_frac, val_frac, test_frac], dtype=np.float64)


def admissible(counts: np.ndarray, val_frac: float, test_frac: float) -> np.ndarray:
    """``(groups, 3)`` bool: may the group go to train, val, test? A group larger than a split's target may not.

    Train takes every group. With ``test_frac == 0`` no group may go to test.
    """
    sizes = np.asarray(counts, dtype=np.int64).sum(axis=1).astype(np.float64)
    total = max(float(sizes.sum()), 1.0)
    return np.stack(
        [np.ones(len(sizes), dtype=bool), sizes <= val_frac * total, (sizes <= test_frac * total) & (test_frac > 0)],
        axis=1,
    )


def scoring_targets(counts: np.ndarray, val_frac: float, test_frac: float, tolerance: float) -> np.ndarray:
    """The targets the score measures shares against: the split targets, or reachable ones when none are.

    When the groups that may go to val or test hold less than ``val_frac + test_frac - tolerance`` of the crops, no
    partition can bring all three shares within the tolerance; val's and test's targets then shrink in proportion to
    what those groups hold (train's grows), so that the search still weighs the shares against label coverage
    instead of piling every small group into val and test.
    """
    targets = split_targets(val_frac, test_frac)
    allowed = admissible(counts, val_frac, test_frac)
    sizes = np.asarray(counts, dtype=np.int64).sum(axis=1)
    total = max(int(sizes.sum()), 1)
    reachable = float(sizes[allowed[:, VAL] | allowed[:, TEST]].sum()) / total
    wanted = val_frac + test_frac
    if wanted <= 0 or reachable >= wanted - tolerance:
        return targets
    scale = reachable / wanted
    return np.array([1.0 - scale * wanted, scale * val_frac, scale * test_frac], dtype=np.float64)


def coverable(counts: np.ndarray, allowed: np.ndarray, n_splits: int) -> np.ndarray:
    """``(labels, n_splits)`` bool: could a label have a crop in the split at all?

    It could when it is seen at as many groups as there are splits and at a group admissible for the split.
    """
    present = np.asarray(counts) > 0
    enough = present.sum(axis=0) >= n_splits
    reachable = (present[:, :, None] & allowed[:, None, :n_splits]).any(axis=0)
    return np.asarray(reachable & enough[:, None])


# --- scoring -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    """The terms of the score of one assignment (module docstring) and their sum."""

    overall: float
    labels: float
    coverage: float
    places: float
    missing_pairs: int

    @property
    def total(self) -> float:
        """The score; lower is better."""
        return self.overall + self.labels + self.coverage + self.places


def _score_sums(
    crops: Sequence[np.ndarray],
    places: Sequence[np.ndarray],
    label_totals: np.ndarray,
    place_totals: np.ndarray,
    targets: np.ndarray,
    tolerance: float,
    can_cover: np.ndarray,
) -> tuple[np.ndarray, ...]:
    """Score terms per trial from each split's crops and groups per label (``(trials, labels)`` arrays)."""
    totals = np.maximum(label_totals.astype(np.float64), 1.0)
    place_totals = np.maximum(place_totals.astype(np.float64), 1.0)
    n_crops = max(float(label_totals.sum()), 1.0)
    trials = crops[0].shape[0]
    overall = np.zeros(trials)
    labels = np.zeros(trials)
    spread = np.zeros(trials)
    missing = np.zeros(trials, dtype=np.int64)
    for split, (split_crops, split_places) in enumerate(zip(crops, places, strict=True)):
        target = float(targets[split])
        deviation = np.abs(split_crops.sum(axis=1) / n_crops - target) / tolerance
        overall += deviation**2 + np.where(deviation > 1.0, OUT_OF_TOLERANCE * (1.0 + (deviation - 1.0) ** 2), 0.0)
        labels += ((split_crops / totals - target) ** 2).mean(axis=1)
        spread += ((split_places / place_totals - target) ** 2).mean(axis=1)
        missing += ((split_crops == 0) & can_cover[None, :, split]).sum(axis=1)
    coverage = np.minimum(COVERAGE_PER_PAIR * missing, COVERAGE_CAP)
    return overall, labels, coverage, PLACES_WEIGHT * spread, missing


def score_assignment(
    counts: np.ndarray, assignment: np.ndarray, val_frac: float, test_frac: float, tolerance: float = 0.05
) -> Score:
    """The score of one assignment, as :func:`split_random` ranks it (``test_frac == 0``: train and val only)."""
    counts = np.asarray(counts, dtype=np.int64)
    assignment = np.asarray(assignment)
    n_splits = 3 if test_frac > 0 else 2
    targets = scoring_targets(counts, val_frac, test_frac, tolerance)[:n_splits]
    allowed = admissible(counts, val_frac, test_frac)
    crops = [((assignment == s).astype(np.float64)[None, :] @ counts) for s in range(n_splits)]
    places = [((assignment == s).astype(np.float64)[None, :] @ (counts > 0)) for s in range(n_splits)]
    terms = _score_sums(
        crops,
        places,
        counts.sum(axis=0),
        (counts > 0).sum(axis=0),
        targets,
        tolerance,
        coverable(counts, allowed, n_splits),
    )
    values = [float(term[0]) for term in terms]
    return Score(values[0], values[1], values[2], values[3], missing_pairs=int(values[4]))


# --- methods -----------------------------------------------------------------------------------------------------


def _closest_cut(cumulative: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the two prefix lengths around ``target``: the longest below it and the shortest reaching it."""
    below = (cumulative < target[:, None]).sum(axis=1)
    width = cumulative.shape[1]
    return below, np.minimum(below + 1, width)


def _prefix_mass(cumulative: np.ndarray, length: np.ndarray) -> np.ndarray:
    rows = np.arange(cumulative.shape[0])
    padded = np.concatenate([np.zeros((cumulative.shape[0], 1)), cumulative], axis=1)
    return np.asarray(padded[rows, length])


def split_random(
    counts: np.ndarray,
    val_frac: float,
    test_frac: float,
    trials: int = 10000,
    seed: int = 0,
    jitter: float = 0.03,
    fixed: np.ndarray | None = None,
    batch_size: int | None = None,
    tolerance: float = 0.05,
) -> np.ndarray:
    """The best of ``trials`` partitions proposed by cumulative crop counts (see the module docstring).

    Trial ``i`` draws its target offsets, its share parameter and its shuffle keys from the ``i``-th entries of three
    streams spawned from ``seed``, so the result depends on ``seed`` but not on ``batch_size``, and raising
    ``trials`` never gives a worse split.

    Args:
        counts: ``(groups, labels)`` crop counts.
        val_frac: target share of val.
        test_frac: target share of test; 0 for no test split.
        trials: number of partitions tried.
        seed: seed of the :class:`numpy.random.SeedSequence` the generators are spawned from.
        jitter: targets are drawn in ``frac +/- jitter`` (a quarter of the trials use the exact targets).
        fixed: boolean mask of groups fixed in test (``split.reuse``). The others are split into train and val
            only, with ``val_frac / (1 - test_frac)`` as val's share of them.
        batch_size: trials per batch; by default as many as fit :data:`_BATCH_ELEMENTS`.
        tolerance: the score's tolerance on the overall shares.

    Returns:
        ``int8`` assignment per group: 0 train, 1 val, 2 test.

    Raises:
        DataError: fewer groups than splits to fill.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 2:
        raise DataError(f"counts must be a (groups, labels) matrix, got shape {counts.shape}")
    require(trials >= 1, "split.trials", f"must be >= 1, got {trials}")
    if fixed is not None:
        fixed = np.asarray(fixed, dtype=bool)
        assignment = np.full(len(counts), TEST, dtype=np.int8)
        free = ~fixed
        assignment[free] = split_random(
            counts[free], val_frac / (1.0 - test_frac), 0.0, trials, seed, jitter, None, batch_size, tolerance
        )
        return assignment

    n_groups = counts.shape[0]
    n_splits = 3 if test_frac > 0 else 2
    if n_groups < n_splits:
        raise DataError(
            f"cannot split {n_groups} group(s) into {n_splits} splits; add locations or set split.test_frac=0"
        )
    targets = split_targets(val_frac, test_frac)
    allowed = admissible(counts, val_frac, test_frac)
    sizes = counts.sum(axis=1).astype(np.float64)
    n_crops = float(sizes.sum())
    eligible = np.flatnonzero(allowed[:, VAL] | allowed[:, TEST])
    forced = np.setdiff1d(np.arange(n_groups), eligible)
    eligible_mass = float(sizes[eligible].sum())
    wanted = (targets[VAL] + (targets[TEST] if n_splits == 3 else 0.0)) * n_crops
    scale_max = min(1.0, eligible_mass / wanted) if wanted > 0 else 1.0

    offset_rng, share_rng, key_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    offsets = offset_rng.uniform(-jitter, jitter, size=(trials, 2))
    offsets[::4] = 0.0  # every fourth trial aims at the exact targets
    scale = np.full(trials, scale_max)
    if scale_max < 1.0:
        # Short of crops for val and test: half the trials also keep a random share of them in train.
        scale[1::2] *= share_rng.uniform(0.5, 1.0, size=len(scale[1::2]))
    val_target = np.maximum(targets[VAL] + offsets[:, 0], 0.0) * n_crops * scale
    test_target = np.maximum(targets[TEST] + offsets[:, 1], 0.0) * n_crops * scale if n_splits == 3 else None

    label_totals, place_totals = counts.sum(axis=0), (counts > 0).sum(axis=0)
    can_cover = coverable(counts, allowed, n_splits)
    score_targets = scoring_targets(counts, val_frac, test_frac if n_splits == 3 else 0.0, tolerance)
    # Every sum of integers is exact in float64; the matrix products run on the eligible groups only.
    features = np.concatenate([counts, counts > 0], axis=1).astype(np.float64)
    n_labels = counts.shape[1]
    forced_sums = features[forced].sum(axis=0)
    width = len(eligible)
    if batch_size is None:
        batch_size = max(1, min(trials, _BATCH_ELEMENTS // max(width, 1)))

    best: tuple[float, int] | None = None
    best_assignment = np.zeros(n_groups, dtype=np.int8)
    for start in range(0, trials, batch_size):
        stop = min(trials, start + batch_size)
        rows = stop - start
        keys = key_rng.random((rows, width))
        order = np.argsort(keys, axis=1)
        ordered_size = sizes[eligible][order]
        val_ok = allowed[eligible, VAL][order]
        test_ok = allowed[eligible, TEST][order]
        batch_targets = (val_target[start:stop], None if test_target is None else test_target[start:stop])
        in_val, in_test = _cut(ordered_size, val_ok, test_ok, *batch_targets, targets, n_crops)
        # Back from shuffled positions to eligible-group columns.
        back = np.argsort(order, axis=1)
        rows_index = np.arange(rows)[:, None]
        val_mask = in_val[rows_index, back]
        test_mask = in_test[rows_index, back] if in_test is not None else np.zeros_like(val_mask)
        train_mask = ~(val_mask | test_mask)
        eligible_features = features[eligible]
        sums = [
            train_mask.astype(np.float64) @ eligible_features + forced_sums,
            val_mask.astype(np.float64) @ eligible_features,
        ]
        if n_splits == 3:
            sums.append(test_mask.astype(np.float64) @ eligible_features)
        terms = _score_sums(
            [s[:, :n_labels] for s in sums],
            [s[:, n_labels:] for s in sums],
            label_totals,
            place_totals,
            score_targets[:n_splits],
            tolerance,
            can_cover,
        )
        total = terms[0] + terms[1] + terms[2] + terms[3]
        winner = int(np.argmin(total))
        key = (float(total[winner]), start + winner)
        if best is None or key < best:
            best = key
            assignment = np.zeros(n_groups, dtype=np.int8)
            assignment[eligible[val_mask[winner]]] = VAL
            assignment[eligible[test_mask[winner]]] = TEST
            best_assignment = assignment
    log.debug("random split: best of %d trials scores %s", trials, best)
    return best_assignment


def _cut(
    size: np.ndarray,
    val_ok: np.ndarray,
    test_ok: np.ndarray,
    val_target: np.ndarray,
    test_target: np.ndarray | None,
    targets: np.ndarray,
    n_crops: float,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Val and test masks over shuffled positions: the prefix cuts closest to each trial's targets.

    Val takes the val-admissible groups of a prefix, test the test-admissible groups of a prefix among the rest.
    Of the two candidate cuts for each (just short of the target, just reaching it), the combination whose three
    overall shares land closest to the targets wins.
    """
    positions = np.arange(size.shape[1])[None, :]
    val_mass = np.cumsum(size * val_ok, axis=1)
    val_cuts = _closest_cut(val_mass, val_target)
    if test_target is None:
        best_val = _pick(val_mass, val_cuts, val_target)
        return val_ok & (positions < best_val[:, None]), None
    best_error = np.full(size.shape[0], np.inf)
    chosen_val = np.zeros(size.shape[0], dtype=np.int64)
    chosen_test = np.zeros(size.shape[0], dtype=np.int64)
    for val_length in val_cuts:
        in_val = val_ok & (positions < val_length[:, None])
        test_mass = np.cumsum(size * (test_ok & ~in_val), axis=1)
        for test_length in _closest_cut(test_mass, test_target):
            val_share = _prefix_mass(val_mass, val_length) / n_crops
            test_share = _prefix_mass(test_mass, test_length) / n_crops
            error = (
                (val_share - targets[VAL]) ** 2
                + (test_share - targets[TEST]) ** 2
                + (1.0 - val_share - test_share - targets[TRAIN]) ** 2
            )
            better = error < best_error
            best_error = np.where(better, error, best_error)
            chosen_val = np.where(better, val_length, chosen_val)
            chosen_test = np.where(better, test_length, chosen_test)
    in_val = val_ok & (positions < chosen_val[:, None])
    in_test = test_ok & ~in_val & (positions < chosen_test[:, None])
    return in_val, in_test


def _pick(cumulative: np.ndarray, cuts: tuple[np.ndarray, np.ndarray], target: np.ndarray) -> np.ndarray:
    short, reach = cuts
    short_gap = np.abs(target - _prefix_mass(cumulative, short))
    reach_gap = np.abs(_prefix_mass(cumulative, reach) - target)
    return np.where(reach_gap < short_gap, reach, short)


def split_smallest_first(
    counts: np.ndarray,
    val_frac: float,
    test_frac: float,
    priority: np.ndarray | None = None,
    fixed: np.ndarray | None = None,
    tolerance: float = 0.05,
) -> np.ndarray:
    """Greedy split, rarest labels first, with the crop-share rules of :func:`split_random` (module docstring).

    Labels are visited from fewest crops to most (ties by label order). For each label, its unassigned groups are
    visited by ``priority`` (lower first), then by the label's crop count there (ascending), then by group order.

    Args:
        counts: ``(groups, labels)`` crop counts.
        val_frac: target share of val.
        test_frac: target share of test; 0 for no test split.
        priority: per-group rank (e.g. the position of its dataset in the label spec's ``prioritize`` lists);
            lower ranks are visited first. Default: all equal.
        fixed: boolean mask of groups fixed in test (``split.reuse``); no other group goes to test then.
        tolerance: how far over its target a split may grow.

    Returns:
        ``int8`` assignment per group: 0 train, 1 val, 2 test.
    """
    counts = np.asarray(counts, dtype=np.int64)
    n_groups, n_labels = counts.shape
    rank = np.zeros(n_groups, dtype=np.int64) if priority is None else np.asarray(priority, dtype=np.int64)
    allowed = admissible(counts, val_frac, test_frac)
    sizes = counts.sum(axis=1)
    n_crops = max(int(sizes.sum()), 1)
    assignment = np.full(n_groups, -1, dtype=np.int8)
    split_crops = np.zeros((3, n_labels), dtype=np.int64)
    test_open = test_frac > 0
    if fixed is not None:
        fixed = np.asarray(fixed, dtype=bool)
        assignment[fixed] = TEST
        split_crops[TEST] = counts[fixed].sum(axis=0)
        test_open = False
    # Too large for every evaluation split: train, before anything else.
    for group in np.flatnonzero((assignment < 0) & ~allowed[:, VAL] & ~(allowed[:, TEST] & test_open)):
        assignment[group] = TRAIN
        split_crops[TRAIN] += counts[group]
    caps = {VAL: (val_frac + tolerance) * n_crops, TEST: (test_frac + tolerance) * n_crops}
    label_totals = counts.sum(axis=0)
    for label in np.lexsort((np.arange(n_labels), label_totals)):
        size = label_totals[label]
        where = np.flatnonzero(counts[:, label] > 0)
        free = where[assignment[where] < 0]
        if len(where) >= 2 and split_crops[TRAIN, label] == 0 and len(free):
            # A label seen at several groups keeps one in train: its largest free one.
            keep = free[np.lexsort((free, -counts[free, label]))[0]]
            assignment[keep] = TRAIN
            split_crops[TRAIN] += counts[keep]
        for group in where[np.lexsort((where, counts[where, label], rank[where]))]:
            if assignment[group] >= 0:
                continue
            split = TRAIN
            for candidate, share, is_open in ((TEST, test_frac, test_open), (VAL, val_frac, True)):
                fits = split_crops[candidate].sum() + sizes[group] <= caps[candidate]
                if is_open and allowed[group, candidate] and split_crops[candidate, label] < share * size and fits:
                    split = candidate
                    break
            assignment[group] = split
            split_crops[split] += counts[group]
    assignment[assignment < 0] = TRAIN  # groups without crops; none when counts come from a dataset frame
    return assignment
