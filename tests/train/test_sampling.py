"""Label-balanced sampling weights (pipeline.md 3.5)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from animl_lightning.train.sampling import confidence_weights, label_balanced_weights


def test_each_label_gets_equal_total_and_total_stays_n() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 0])
    weights = label_balanced_weights(labels, num_labels=3)
    totals = np.bincount(labels, weights=weights, minlength=3)
    np.testing.assert_allclose(totals, [8 / 3] * 3)
    assert weights.sum() == pytest.approx(len(labels))
    # a crop of the rare label 2 is drawn 5x as often as one of label 0 (5 crops)
    assert weights[6] / weights[0] == pytest.approx(5.0)


def test_absent_labels_get_no_share() -> None:
    labels = np.array([0, 0, 3, 3, 3, 3])
    weights = label_balanced_weights(labels, num_labels=5)
    np.testing.assert_allclose(np.bincount(labels, weights=weights, minlength=5), [3, 0, 0, 3, 0])


def test_confidence_is_multiplied_in_within_a_label() -> None:
    labels = np.array([0, 0, 1])
    confidence = np.array([0.9, 0.3, 0.5])
    weights = label_balanced_weights(labels, num_labels=2, confidence=confidence)
    np.testing.assert_allclose(np.bincount(labels, weights=weights), [1.5, 1.5])
    assert weights[0] / weights[1] == pytest.approx(3.0)


def test_label_with_only_zero_confidence_counts_as_absent() -> None:
    weights = label_balanced_weights(np.array([0, 1, 1]), 2, confidence=np.array([0.0, 1.0, 1.0]))
    np.testing.assert_allclose(weights, [0.0, 1.5, 1.5])


@pytest.mark.parametrize(
    ("labels", "num_labels", "confidence", "message"),
    [
        (np.array([0, 3]), 3, None, r"\[0, 3\)"),
        (np.array([-1, 0]), 3, None, r"\[0, 3\)"),
        (np.array([0.5, 1.0]), 3, None, "integers"),
        (np.array([0, 1]), 2, np.array([1.0]), "shape"),
        (np.array([0, 1]), 2, np.array([1.0, -0.1]), ">= 0"),
        (np.array([0, 1]), 2, np.array([1.0, np.nan]), "finite"),
        (np.array([0, 1]), 2, np.array([0.0, 0.0]), "weight 0"),
    ],
)
def test_bad_input_raises(labels: np.ndarray, num_labels: int, confidence: np.ndarray | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        label_balanced_weights(labels, num_labels, confidence)


def test_empty_split_gives_empty_weights() -> None:
    assert label_balanced_weights(np.array([], dtype=np.int64), 3).shape == (0,)


def test_confidence_weights_rescale_to_n() -> None:
    weights = confidence_weights(np.array([0.5, 1.0, 0.5]))
    np.testing.assert_allclose(weights, [0.75, 1.5, 0.75])
    with pytest.raises(ValueError, match="confidence 0"):
        confidence_weights(np.zeros(3))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=6), min_size=1, max_size=200))
def test_property_equal_totals(labels_list: list[int]) -> None:
    labels = np.array(labels_list, dtype=np.int64)
    weights = label_balanced_weights(labels, num_labels=7)
    totals = np.bincount(labels, weights=weights, minlength=7)
    present = np.bincount(labels, minlength=7) > 0
    np.testing.assert_allclose(totals[present], len(labels) / present.sum())
    assert (totals[~present] == 0).all()
    assert (weights > 0).all()
