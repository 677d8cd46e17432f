"""Per-label thresholds on hand-made probability tables whose answers are worked out by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from animl_lightning.core.errors import ConfigError
from animl_lightning.core.taxonomy import Taxonomy
from animl_lightning.train.thresholds import (
    ThresholdSettings,
    choose_for_run,
    choose_threshold,
    choose_thresholds,
    rank_per_label_table,
    threshold_figures,
)

LABELS = ["deer", "elk", "fox"]


def _rows(*rows: tuple[float, float, float]) -> np.ndarray:
    return np.asarray(rows, dtype=np.float64)


def test_lowest_threshold_reaching_the_target() -> None:
    # Crops predicted "deer" with their deer probability and whether they are deer, highest first:
    # 0.95 T, 0.9 T, 0.8 F, 0.7 T, 0.6 T, 0.5 F -> precision at 0.9: 1.0; at 0.8: 2/3; at 0.6: 4/5; at 0.5: 4/6.
    confidence = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.5])
    correct = np.array([True, True, False, True, True, False])
    assert choose_threshold(confidence, correct, 0.95, 1).threshold == 0.9
    assert choose_threshold(confidence, correct, 0.8, 1).threshold == 0.6  # lowest, though 0.8 does not reach it
    assert choose_threshold(confidence, correct, 0.75, 1).threshold == 0.6
    assert choose_threshold(confidence, correct, 0.6, 1).threshold == 0.5
    # min_support: at 0.9 only 2 crops are labelled; with 3 required, 0.95 precision is never reached.
    choice = choose_threshold(confidence, correct, 0.95, 3)
    assert choice.threshold is None and "never reaches 0.95 with >= 3 crops" in choice.reason
    assert choose_threshold(confidence, correct, 0.8, 5).threshold == 0.6


def test_ties_count_together() -> None:
    # Two crops at 0.8, one right and one wrong: a threshold of 0.8 takes both (precision 2/3 with the 0.9 one).
    confidence = np.array([0.9, 0.8, 0.8])
    correct = np.array([True, True, False])
    assert choose_threshold(confidence, correct, 0.9, 1).threshold == 0.9
    assert choose_threshold(confidence, correct, 0.6, 1).threshold == 0.8


def test_labels_without_support_or_predictions_get_none_with_a_reason() -> None:
    probs = _rows((0.9, 0.1, 0.0), (0.8, 0.2, 0.0), (0.3, 0.6, 0.1), (0.7, 0.2, 0.1))
    target = np.array([0, 0, 1, 1])  # no fox on val; elk predicted once (right), deer 3 times (2 right)
    choices = choose_thresholds(probs, target, LABELS, ThresholdSettings(0.95, 1))
    assert choices["fox"].threshold is None and choices["fox"].reason == "no val crops"
    assert choices["elk"].threshold == 0.6
    assert choices["deer"].threshold == 0.8
    # Without the one crop the model calls elk, elk has val crops but is never predicted.
    never = choose_thresholds(probs[[0, 1, 3]], np.array([0, 0, 1]), LABELS, ThresholdSettings(0.95, 1))
    assert never["elk"].threshold is None and never["elk"].reason == "never the best label on val"


def test_figures_at_the_thresholds() -> None:
    probs = _rows((0.9, 0.1, 0.0), (0.6, 0.4, 0.0), (0.2, 0.7, 0.1), (0.1, 0.3, 0.6), (0.5, 0.45, 0.05))
    target = np.array([0, 1, 1, 2, 0])
    thresholds = np.array([0.8, 0.65, np.nan])
    figures = threshold_figures(probs, target, thresholds).set_index(pd.Index(LABELS))
    # deer: labelled only the 0.9 crop (right) -> precision 1, recall 1/2; deer crops covered: 1 of 2.
    assert figures.loc["deer"].tolist() == [2, 1.0, 0.5, 0.5]
    # elk: the 0.7 crop labelled (right); the 0.6-deer crop of an elk is below deer's 0.8: elk coverage 1/2.
    assert figures.loc["elk"].tolist() == [2, 1.0, 0.5, 0.5]
    # fox has no threshold: never labelled on its own.
    assert figures.loc["fox", "support"] == 1 and np.isnan(figures.loc["fox", "precision"])
    assert figures.loc["fox", "coverage"] == 0.0


def test_test_rows_never_influence_the_choice() -> None:
    rng = np.random.default_rng(0)
    val_probs = rng.dirichlet(np.ones(3) * 0.5, size=200)
    # Right when confident, random otherwise: high thresholds reach the target.
    val_target = np.where(val_probs.max(axis=1) > 0.7, val_probs.argmax(axis=1), rng.integers(0, 3, 200))
    test_a = (rng.dirichlet(np.ones(3), size=50), rng.integers(0, 3, 50))
    test_b = (rng.dirichlet(np.ones(3) * 3, size=80), rng.integers(0, 3, 80))
    settings = ThresholdSettings(0.9, 5)
    a = choose_for_run((val_probs, val_target), test_a, LABELS, settings)
    b = choose_for_run((val_probs, val_target), test_b, LABELS, settings)
    none = choose_for_run((val_probs, val_target), None, LABELS, settings)
    assert a.record == b.record == none.record
    assert any(v is not None for v in a.record["per_label"].values())
    assert not a.table["test_precision"].equals(b.table["test_precision"])  # the test figures do differ


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"thresholds\.target_precision"):
        ThresholdSettings(1.5)
    with pytest.raises(ConfigError, match=r"thresholds\.min_support"):
        ThresholdSettings(0.9, 0)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['precision'\]"):
        ThresholdSettings.from_mapping({"precision": 0.9})


TAXONOMY = Taxonomy(
    labels=("coyote", "deer", "fox"),
    ranks={
        "class": ("mammalia", "mammalia", "mammalia"),
        "order": ("carnivora", "artiodactyla", "carnivora"),
        "family": ("canidae", "cervidae", "canidae"),
        "genus": ("canis", "odocoileus", "vulpes"),
        "species": ("canis latrans", "", "vulpes vulpes"),
    },
)


def test_rollup_sums_probabilities_of_a_taxon() -> None:
    probs = _rows((0.4, 0.35, 0.25), (0.1, 0.6, 0.3), (0.3, 0.1, 0.6))
    target = np.array([0, 1, 2])  # coyote, deer, fox
    table = rank_per_label_table(probs, target, TAXONOMY, "family", "val").set_index("label")
    # canidae sums: 0.65, 0.4, 0.9 ; cervidae: 0.35, 0.6, 0.1 -> predictions canidae, cervidae, canidae.
    assert table.loc["canidae", ["support", "tp", "fp", "fn"]].tolist() == [2, 2, 0, 0]
    assert table.loc["cervidae", ["support", "tp", "fp", "fn"]].tolist() == [1, 1, 0, 0]
    species = rank_per_label_table(probs, target, TAXONOMY, "species", "val").set_index("label")
    assert list(species.index) == ["canis latrans", "vulpes vulpes"]  # deer has no species: left out there
    assert species["support"].tolist() == [1, 1]


def test_taxa_get_thresholds_on_rolled_up_probabilities() -> None:
    # Coyote and fox are confused with each other but always canidae.
    probs = _rows(*[(0.5, 0.05, 0.45)] * 6, *[(0.45, 0.05, 0.5)] * 6, *[(0.05, 0.9, 0.05)] * 6)
    target = np.array([0, 2] * 3 + [2, 0] * 3 + [1] * 6)
    result = choose_for_run((probs, target), None, list(TAXONOMY.labels), ThresholdSettings(0.95, 3), TAXONOMY)
    assert result.record["per_label"]["coyote"] is None and result.record["per_label"]["fox"] is None
    assert result.record["per_label"]["deer"] == 0.9
    assert result.record["per_taxon"]["family"]["canidae"] == 0.95
    ranks = result.table.groupby("rank")["label"].apply(list).to_dict()
    assert ranks["family"] == ["canidae", "cervidae"] and "label" in ranks
