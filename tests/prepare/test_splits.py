"""Location splits: invariants (property tests), the random search against a plain reference, smallest_first,
test_frac=0, split.reuse, coverage reports and byte-identical outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from animl_lightning.core.contract import read_splits, write_splits
from animl_lightning.core.issues import PrepareReport
from animl_lightning.prepare.config import SplitSettings
from animl_lightning.prepare.splits import (
    coverage_problems,
    location_label_counts,
    make_splits,
    score_assignment,
    split_random,
    split_report,
    split_smallest_first,
    split_targets,
    write_split_files,
)


def frame_from_counts(counts: np.ndarray, locations: list[object] | None = None, dataset: str = "ds") -> pd.DataFrame:
    """One row per crop for a (locations, labels) count matrix; labels are ``l0``, ``l1``, ..."""
    n_locations, n_labels = counts.shape
    locations = locations if locations is not None else [f"loc{i:03d}" for i in range(n_locations)]
    loc_idx, label_idx = np.nonzero(counts)
    repeats = counts[loc_idx, label_idx]
    return pd.DataFrame(
        {
            "dataset": dataset,
            "location": np.repeat(np.asarray(locations, dtype=object)[loc_idx], repeats),
            "label": np.repeat(np.array([f"l{j}" for j in range(n_labels)])[label_idx], repeats),
        }
    )


def random_counts(rng: np.random.Generator, n_locations: int, n_labels: int, density: float = 0.4) -> np.ndarray:
    counts = rng.integers(1, 60, size=(n_locations, n_labels)) * (rng.random((n_locations, n_labels)) < density)
    counts[counts.sum(axis=1) == 0, 0] = 3  # every location has crops
    return counts.astype(np.int64)


count_matrices = st.integers(3, 40).flatmap(
    lambda n_loc: st.integers(1, 6).flatmap(
        lambda n_lab: arrays(np.int64, (n_loc, n_lab), elements=st.integers(0, 30)).map(_ensure_nonempty_rows)
    )
)


def _ensure_nonempty_rows(counts: np.ndarray) -> np.ndarray:
    counts = counts.copy()
    counts[counts.sum(axis=1) == 0, 0] = 1
    return counts


fractions = st.tuples(st.sampled_from([0.1, 0.2, 0.25, 0.3]), st.sampled_from([0.0, 0.1, 0.2, 0.3]))


# --- invariants ----------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(counts=count_matrices, fracs=fractions, seed=st.integers(0, 2**32 - 1))
def test_random_split_invariants(counts: np.ndarray, fracs: tuple[float, float], seed: int) -> None:
    val_frac, test_frac = fracs
    assignment = split_random(counts, val_frac, test_frac, trials=40, seed=seed)
    n_splits = 3 if test_frac > 0 else 2
    assert assignment.shape == (len(counts),)
    assert set(np.unique(assignment)) == set(range(n_splits))  # every split gets a location, and only those
    again = split_random(counts, val_frac, test_frac, trials=40, seed=seed, batch_size=7)
    np.testing.assert_array_equal(assignment, again)


@settings(max_examples=60, deadline=None)
@given(counts=count_matrices, fracs=fractions)
def test_smallest_first_invariants(counts: np.ndarray, fracs: tuple[float, float]) -> None:
    val_frac, test_frac = fracs
    assignment = split_smallest_first(counts, val_frac, test_frac)
    assert assignment.shape == (len(counts),)
    assert set(np.unique(assignment)) <= ({0, 1, 2} if test_frac > 0 else {0, 1})
    np.testing.assert_array_equal(assignment, split_smallest_first(counts, val_frac, test_frac))
    # The rarest label is placed first, on unassigned locations: it always reaches its test share.
    totals = counts.sum(axis=0)
    rarest = int(np.lexsort((np.arange(counts.shape[1]), totals))[0])
    if test_frac > 0:
        assert counts[assignment == 2, rarest].sum() >= test_frac * totals[rarest]


@settings(max_examples=30, deadline=None)
@given(
    counts=count_matrices,
    fracs=fractions,
    seed=st.integers(0, 1000),
    numeric=st.booleans(),
    method=st.sampled_from(["random", "smallest_first"]),
)
def test_make_splits_partitions_locations(
    counts: np.ndarray, fracs: tuple[float, float], seed: int, numeric: bool, method: str
) -> None:
    locations: list[object] = (
        [int(x) for x in np.random.default_rng(seed).permutation(len(counts)) * 7]
        if numeric
        else [f"cam {i}" for i in range(len(counts))]
    )
    frame = frame_from_counts(counts, locations)
    cfg = SplitSettings(method=method, val_frac=fracs[0], test_frac=fracs[1], seed=seed, trials=30)
    splits = make_splits(frame, cfg, PrepareReport())
    assert set(splits) == {"train", "val", "test"}
    every = [pair for name in splits for pair in splits[name]]
    assert len(every) == len(set(every)) == len(counts)  # disjoint, each location exactly once
    assert set(every) == {("ds", str(loc)) for loc in locations}
    for pairs in splits.values():
        assert pairs == sorted(pairs)
        assert all(isinstance(d, str) and isinstance(loc, str) for d, loc in pairs)
    if fracs[1] == 0:
        assert splits["test"] == []


# --- the random search ---------------------------------------------------------------------------------------------


def reference_random(
    counts: np.ndarray, val_frac: float, test_frac: float, trials: int, seed: int, jitter: float
) -> tuple[int, float]:
    """Plain per-trial loop with the documented draw protocol; returns the best (missing, score)."""
    n_locations = len(counts)
    n_splits = 3 if test_frac > 0 else 2
    targets = split_targets(val_frac, test_frac)
    size_rng, key_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    offsets = size_rng.uniform(-jitter, jitter, size=(trials, 2))
    best: tuple[int, float] | None = None
    for t in range(trials):
        n_train = int(np.clip(np.floor(n_locations * (targets[0] + offsets[t, 0])), 1, n_locations - n_splits + 1))
        if n_splits == 3:
            n_val = int(np.clip(np.floor(n_locations * (targets[1] + offsets[t, 1])), 1, n_locations - n_train - 1))
        else:
            n_val = n_locations - n_train
        order = np.argsort(key_rng.random(n_locations))
        assignment = np.full(n_locations, 2)
        assignment[order[:n_train]] = 0
        assignment[order[n_train : n_train + n_val]] = 1
        key = score_assignment(counts, assignment, val_frac, test_frac)
        if best is None or key < best:
            best = key
    assert best is not None
    return best


@pytest.mark.parametrize(("test_frac", "seed"), [(0.2, 0), (0.1, 3), (0.0, 11)])
def test_vectorised_search_matches_plain_loop(test_frac: float, seed: int) -> None:
    counts = random_counts(np.random.default_rng(seed), 37, 5)
    assignment = split_random(counts, 0.2, test_frac, trials=300, seed=seed, jitter=0.03, batch_size=64)
    missing, score = score_assignment(counts, assignment, 0.2, test_frac)
    ref_missing, ref_score = reference_random(counts, 0.2, test_frac, 300, seed, 0.03)
    assert missing == ref_missing
    assert score == pytest.approx(ref_score, rel=1e-9, abs=1e-12)


def test_more_trials_never_worse_and_seed_matters() -> None:
    counts = random_counts(np.random.default_rng(5), 60, 8)
    keys = [score_assignment(counts, split_random(counts, 0.2, 0.2, trials=t, seed=9), 0.2, 0.2) for t in (1, 10, 200)]
    assert keys[0] >= keys[1] >= keys[2]
    a = split_random(counts, 0.2, 0.2, trials=50, seed=1)
    b = split_random(counts, 0.2, 0.2, trials=50, seed=2)
    assert not np.array_equal(a, b)


def test_fractions_within_tolerance_when_data_allow() -> None:
    # 60 locations, 3 labels, every location 20 crops of one label: a 60/20/20 split is reachable exactly.
    counts = np.zeros((60, 3), dtype=np.int64)
    counts[np.arange(60), np.arange(60) % 3] = 20
    assignment = split_random(counts, 0.2, 0.2, trials=2000, seed=0)
    totals = counts.sum(axis=0)
    for split, target in enumerate((0.6, 0.2, 0.2)):
        fraction = counts[assignment == split].sum(axis=0) / totals
        assert np.all(np.abs(fraction - target) <= 0.1), (split, fraction)


def test_coverage_preferred_over_score() -> None:
    # Label 1 lives at only three locations; a split that leaves it out of a split must lose even to a worse score.
    counts = np.zeros((30, 2), dtype=np.int64)
    counts[:, 0] = 10
    counts[[3, 14, 25], 1] = [50, 2, 2]
    assignment = split_random(counts, 0.2, 0.2, trials=500, seed=4)
    present = assignment[counts[:, 1] > 0]
    assert sorted(present.tolist()) == [0, 1, 2]
    assert coverage_problems(counts, ["common", "rare"], assignment) == []


def test_too_few_locations_raise_clear_error() -> None:
    with pytest.raises(ValueError, match="2 location"):
        split_random(np.ones((2, 1), dtype=np.int64), 0.2, 0.2, trials=5, seed=0)
    assert set(split_random(np.ones((2, 1), dtype=np.int64), 0.2, 0.0, trials=5, seed=0)) == {0, 1}


def test_large_search_assigns_every_location() -> None:
    # Speed is measured in benchmarks/bench_scale.py; here only that a large batched search is complete and valid.
    counts = random_counts(np.random.default_rng(0), 2000, 20, density=0.2)
    assignment = split_random(counts, 0.2, 0.2, trials=2000, seed=0)
    assert assignment.shape == (2000,)
    assert set(np.unique(assignment)) == {0, 1, 2}


# --- smallest_first ------------------------------------------------------------------------------------------------


def test_smallest_first_constructed_case() -> None:
    # One label at 10 locations of 10 crops: test until 20 crops, then val until 20, then train.
    counts = np.full((10, 1), 10, dtype=np.int64)
    assignment = split_smallest_first(counts, 0.2, 0.2)
    assert np.bincount(assignment, minlength=3).tolist() == [6, 2, 2]
    # Ascending crop count: the two smallest locations go to test.
    counts = np.arange(1, 11, dtype=np.int64)[:, None] * 10
    assignment = split_smallest_first(counts, 0.2, 0.2)
    assert assignment[:2].tolist() == [2, 2]
    # Priority: prioritised locations are visited first, whatever their size.
    priority = np.array([1] * 8 + [0, 0])
    assignment = split_smallest_first(counts, 0.2, 0.2, priority=priority)
    assert assignment[8] == 2


def test_smallest_first_rare_label_first() -> None:
    # The rare label (column 1) is placed first: its two locations go to test and val.
    counts = np.array([[10, 0], [10, 0], [10, 0], [10, 0], [10, 0], [10, 0], [0, 5], [0, 5], [10, 0], [10, 0]])
    assignment = split_smallest_first(counts, 0.2, 0.2)
    assert sorted(assignment[[6, 7]].tolist()) == [1, 2]
    totals = counts.sum(axis=0)
    assert (counts[assignment == 2].sum(axis=0) >= 0.2 * totals).all()
    assert (counts[assignment == 1].sum(axis=0) >= 0.2 * totals).all()


def test_make_splits_smallest_first_uses_priority_datasets() -> None:
    counts = np.full((6, 1), 10, dtype=np.int64)
    frame = pd.concat([frame_from_counts(counts[:3], dataset="a"), frame_from_counts(counts[3:], dataset="b")])
    cfg = SplitSettings(method="smallest_first", val_frac=0.1, test_frac=0.1)
    splits = make_splits(frame, cfg, PrepareReport(), priority_datasets=["b"])
    assert len(splits["test"]) == len(splits["val"]) == 1
    assert all(d == "b" for d, _ in splits["test"] + splits["val"])
    splits = make_splits(frame, cfg, PrepareReport())
    assert all(d == "a" for d, _ in splits["test"] + splits["val"])


# --- make_splits: test_frac=0, reuse, coverage, files ----------------------------------------------------------------


def demo_frame(n_locations: int = 24, seed: int = 0) -> pd.DataFrame:
    counts = random_counts(np.random.default_rng(seed), n_locations, 4, density=0.7)
    return frame_from_counts(counts)


def test_test_frac_zero_gives_empty_test_and_valid_files(tmp_path: Path) -> None:
    frame = demo_frame()
    splits = make_splits(frame, SplitSettings(test_frac=0.0, trials=100), PrepareReport())
    assert splits["test"] == []
    assert splits["train"] and splits["val"]
    table = write_split_files(frame, splits, tmp_path)
    assert read_splits(tmp_path / "splits.json")["test"] == []
    assert set(table["split"]) == {"train", "val"}


def test_reuse_keeps_test_fixed_and_disjoint(tmp_path: Path) -> None:
    frame = demo_frame(30)
    first = make_splits(frame, SplitSettings(trials=200, seed=1), PrepareReport())
    earlier = tmp_path / "old_splits.json"
    # The earlier split also had a test location that is gone now.
    write_splits({**first, "test": [*first["test"], ("ds", "gone")]}, earlier)
    grown = pd.concat([frame, frame_from_counts(np.full((6, 4), 5, dtype=np.int64), [f"new{i}" for i in range(6)])])
    report = PrepareReport()
    second = make_splits(grown, SplitSettings(trials=200, seed=2, reuse=str(earlier)), report)
    assert second["test"] == first["test"]
    every = [p for name in second for p in second[name]]
    assert len(every) == len(set(every)) == 36
    assert not any(loc.startswith("new") for _, loc in second["test"])
    (issue,) = report.issues_of("splits", "reused_test_location_absent")
    assert "gone" in issue.message
    assert report.counts["splits"]["reused_test_locations"] == len(first["test"])


def test_reuse_with_smallest_first_keeps_test(tmp_path: Path) -> None:
    frame = demo_frame(20)
    first = make_splits(frame, SplitSettings(trials=50), PrepareReport())
    earlier = tmp_path / "splits.json"
    write_splits(first, earlier)
    second = make_splits(frame, SplitSettings(method="smallest_first", reuse=str(earlier)), PrepareReport())
    assert second["test"] == first["test"]


def test_coverage_problems_reported_by_name() -> None:
    counts = np.zeros((12, 3), dtype=np.int64)
    counts[:, 0] = 10
    counts[:, 1] = 4
    counts[5, 2] = 7  # "l2" lives at one location only
    frame = frame_from_counts(counts)
    report = PrepareReport()
    make_splits(frame, SplitSettings(trials=100), report)
    issues = report.issues_of("splits", "label_missing_from_split")
    assert [i.record for i in issues] == ["l2"]
    assert "1 location" in issues[0].message
    assert report.counts["splits"]["labels_missing_a_split"] == 1
    upfront = coverage_problems(counts, ["l0", "l1", "l2"])
    assert [(p.label, p.too_few_locations, p.missing_splits) for p in upfront] == [
        ("l2", True, ("train", "val", "test"))
    ]


def test_numeric_and_string_locations_give_same_splits() -> None:
    counts = random_counts(np.random.default_rng(3), 15, 3)
    numeric = frame_from_counts(counts, list(range(100, 115)))
    strings = frame_from_counts(counts, [str(i) for i in range(100, 115)])
    cfg = SplitSettings(trials=100, seed=4)
    assert make_splits(numeric, cfg, PrepareReport()) == make_splits(strings, cfg, PrepareReport())


def test_same_seed_byte_identical_outputs(tmp_path: Path) -> None:
    frame = demo_frame(25, seed=8)
    shuffled = frame.sample(frac=1.0, random_state=3).reset_index(drop=True)
    cfg = SplitSettings(trials=300, seed=17)
    write_split_files(frame, make_splits(frame, cfg, PrepareReport()), tmp_path / "a")
    write_split_files(shuffled, make_splits(shuffled, cfg, PrepareReport()), tmp_path / "b")
    for name in ("splits.json", "split_report.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_location_label_counts_sorted_and_exact() -> None:
    frame = pd.DataFrame(
        {
            "dataset": ["d2", "d1", "d1", "d1", "d2"],
            "location": ["10", "9", "10", "10", "10"],
            "label": ["fox", "fox", "bird", "fox", "fox"],
        }
    )
    locations, labels, counts = location_label_counts(frame)
    assert locations == [("d1", "10"), ("d1", "9"), ("d2", "10")]
    assert labels == ["bird", "fox"]
    assert counts.tolist() == [[1, 1], [0, 1], [0, 2]]


def test_split_report_contents() -> None:
    counts = np.array([[10, 0], [5, 5], [0, 10], [5, 5]])
    frame = frame_from_counts(counts)
    splits = {
        "train": [("ds", "loc000"), ("ds", "loc001")],
        "val": [("ds", "loc002")],
        "test": [("ds", "loc003")],
    }
    table = split_report(frame, splits)
    assert list(table.columns) == ["split", "label", "crops", "locations", "crop_frac", "location_frac"]
    row = table[(table["split"] == "train") & (table["label"] == "l0")].iloc[0]
    assert (row["crops"], row["locations"], row["crop_frac"]) == (15, 2, 0.75)
    row = table[(table["split"] == "val") & (table["label"] == "l0")].iloc[0]
    assert (row["crops"], row["locations"]) == (0, 0)
    assert table.groupby("label")["crops"].sum().tolist() == [20, 20]
