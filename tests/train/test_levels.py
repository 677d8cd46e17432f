"""Image / sequence / location tables on synthetic bursts with answers worked out by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from animl_lightning.core.sequences import sequence_keys
from animl_lightning.train.levels import group_units, level_tables, per_location_table, smoothed_top_labels

LABELS = ["deer", "elk", "fox"]
DEER, ELK, FOX = 0, 1, 2


def _probs(rows: list[tuple[float, float, float]]) -> np.ndarray:
    return np.asarray(rows, dtype=np.float64)


def test_a_burst_of_five_with_three_right_is_one_right_sequence() -> None:
    # 3 frames say deer (0.7), 2 say elk (0.6): the mean favours deer, the truth is deer.
    probs = _probs([(0.7, 0.2, 0.1)] * 3 + [(0.3, 0.6, 0.1)] * 2)
    target = np.full(5, DEER)
    units = group_units(probs, target, np.array(["s1"] * 5, dtype=object))
    assert units.target.tolist() == [DEER] and units.prediction.tolist() == [DEER]
    _, table, overall = level_tables(units, LABELS, "val")
    assert overall["n"] == 1 and overall["top1"] == 1.0
    assert table.set_index("label").loc["deer", ["tp", "fp", "fn"]].tolist() == [1, 0, 0]
    # Per crop, the same burst is 3 right and 2 wrong.
    assert (probs.argmax(axis=1) == target).sum() == 3


def test_a_two_species_sequence_counts_once_per_species() -> None:
    probs = _probs([(0.8, 0.1, 0.1), (0.7, 0.2, 0.1), (0.2, 0.1, 0.7)])
    target = np.array([DEER, DEER, FOX])
    units = group_units(probs, target, np.array(["s1"] * 3, dtype=object))
    assert units.target.tolist() == [DEER, FOX]
    assert units.prediction.tolist() == [DEER, DEER]  # one label for the event
    _, table, overall = level_tables(units, LABELS, "val")
    rows = table.set_index("label")
    assert rows.loc["deer", ["tp", "fp", "fn", "support"]].tolist() == [1, 1, 0, 1]
    assert rows.loc["fox", ["tp", "fp", "fn", "support"]].tolist() == [0, 0, 1, 1]
    assert overall["n"] == 2 and overall["top1"] == 0.5


def test_images_without_a_datetime_are_sequences_of_their_own() -> None:
    frame = pd.DataFrame(
        {
            "dataset": ["d"] * 4,
            "location": ["cam"] * 4,
            "image_id": ["a", "b", "c", "d"],
            "datetime": ["2024-01-01 10:00:00", "2024-01-01 10:00:02", None, ""],
            "seq_id": [None] * 4,
        }
    )
    keys = sequence_keys(frame, 3.0).to_numpy(dtype=object)
    assert keys[0] == keys[1] and len(set(keys)) == 3
    probs = _probs([(0.9, 0.05, 0.05), (0.4, 0.5, 0.1), (0.1, 0.8, 0.1), (0.1, 0.1, 0.8)])
    target = np.array([DEER, DEER, ELK, FOX])
    by_sequence = group_units(probs, target, keys)
    by_image = group_units(probs, target, frame["image_id"].to_numpy(dtype=object))
    assert by_sequence.prediction.tolist() == [DEER, ELK, FOX]  # a+b: mean deer 0.65 beats elk 0.275
    assert by_image.prediction.tolist() == [DEER, ELK, ELK, FOX]


def test_per_location_counts_a_location_with_one_sequence() -> None:
    probs = _probs([(0.9, 0.05, 0.05), (0.2, 0.7, 0.1), (0.1, 0.1, 0.8), (0.6, 0.3, 0.1), (0.1, 0.8, 0.1)])
    target = np.array([DEER, DEER, FOX, DEER, ELK])
    locations = np.array(["north", "north", "north", "south", "south"], dtype=object)
    sequences = np.array(["n1", "n1", "n1", "s1", "s2"], dtype=object)
    table = per_location_table(probs, target, locations, sequences, LABELS, "test").set_index("location")
    assert table.loc["north", "sequences"] == 1 and table.loc["north", "crops"] == 3
    assert table.loc["north", "top1"] == pytest.approx(2 / 3)
    assert table.loc["north", "recall_deer"] == 0.5 and table.loc["north", "recall_fox"] == 1.0
    assert np.isnan(table.loc["north", "recall_elk"])  # no elk there
    assert table.loc["north", "balanced_accuracy"] == pytest.approx(0.75)
    assert table.loc["south", "sequences"] == 2 and table.loc["south", "top1"] == 1.0


def test_smoothing_changes_the_group_prediction_by_vote() -> None:
    # Mean probability says elk (one very sure elk), 4 of 5 crops say deer: smoothing votes deer.
    probs = _probs([(0.55, 0.45, 0.0)] * 4 + [(0.0, 1.0, 0.0)])
    target = np.full(5, DEER)
    images = np.array(["i"] * 5, dtype=object)
    conf = np.ones(5)
    assert group_units(probs, target, images).prediction.tolist() == [ELK]
    smoothed = smoothed_top_labels(probs, images, images, conf, "image")
    assert smoothed.tolist() == [DEER] * 5  # 4 deer overwrite the 1 elk (MegaDetector's defaults)
    assert group_units(probs, target, images, smoothed).prediction.tolist() == [DEER]
    # Below the detection confidence threshold (0.15) a crop takes no part.
    low = smoothed_top_labels(probs, images, images, np.r_[np.ones(4), 0.1], "image")
    assert low.tolist() == [DEER] * 4 + [ELK]


def test_empty_split_gives_empty_tables() -> None:
    units = group_units(np.zeros((0, 3)), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=object))
    confusion, table, overall = level_tables(units, LABELS, "test")
    assert confusion.sum() == 0 and overall["n"] == 0 and np.isnan(overall["top1"])
    assert table["support"].tolist() == [0, 0, 0]


def test_real_shaped_data_one_huge_camera_many_tiny_ones() -> None:
    # One site with 89% of the crops in long bursts, 19 cameras of 1-3 photos, a label found at the big site only.
    rng = np.random.default_rng(11)
    sites = ["big"] * 890 + [f"tiny{i:02d}" for i in range(19) for _ in range(int(rng.integers(1, 4)))]
    n = len(sites)
    locations = np.array(sites, dtype=object)
    target = rng.integers(0, 2, n)
    target[:200] = FOX  # fox lives at the big site only
    bursts = np.concatenate([np.full(int(k), i) for i, k in enumerate(rng.integers(1, 11, n))])[:n]
    sequences = np.array([f"{loc}/{b}" for loc, b in zip(locations, bursts, strict=True)], dtype=object)
    probs = rng.dirichlet(np.ones(3), size=n)
    probs[np.arange(n), target] += rng.uniform(0, 1, n)  # informative but imperfect
    probs /= probs.sum(axis=1, keepdims=True)

    units = group_units(probs, target, sequences)
    frame = pd.DataFrame(probs, columns=LABELS).assign(sequence=sequences, target=target)
    predicted = frame.groupby("sequence")[LABELS].mean().to_numpy().argmax(axis=1)
    expected = frame[["sequence", "target"]].drop_duplicates()
    assert len(units.target) == len(expected)
    index = {key: i for i, key in enumerate(frame.groupby("sequence").groups)}
    by_pair = {(g, t): p for g, t, p in zip(units.group, units.target, units.prediction, strict=True)}
    for sequence, label in expected.itertuples(index=False):
        assert by_pair[(sequence, label)] == predicted[index[sequence]]

    table = per_location_table(probs, target, locations, sequences, LABELS, "val").set_index("location")
    assert table["crops"].sum() == n and table.loc["big", "crops"] == 890
    assert np.isnan(table.loc["tiny00", "recall_fox"])  # fox never seen there
    assert (table["sequences"] >= 1).all() and table.loc["big", "sequences"] > 50
