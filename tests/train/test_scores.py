"""Per-label and overall table math."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support

from animl_lightning.train.scores import (
    OVERALL_COLUMNS,
    PER_LABEL_COLUMNS,
    confusion_frame,
    confusion_png,
    macro_scores,
    overall_table,
    per_label_table,
)

LABELS = ["bird", "fox", "skunk"]
# rows = true, columns = predicted
CONFUSION = np.array(
    [
        [8, 2, 0],  # bird: 10 crops, 8 right
        [1, 5, 4],  # fox: 10 crops, 5 right
        [0, 0, 0],  # skunk: absent from the split, but predicted 4 times
    ]
)


def test_hand_computed_table() -> None:
    table = per_label_table(CONFUSION, LABELS, "val")
    assert list(table.columns) == list(PER_LABEL_COLUMNS)
    assert list(table["split"]) == ["val"] * 3
    assert list(table["label"]) == LABELS
    bird, fox, skunk = (table.iloc[i] for i in range(3))
    # bird: predicted 9 times, 8 right; 10 crops
    assert bird["precision"] == pytest.approx(8 / 9)
    assert bird["recall"] == pytest.approx(0.8)
    assert bird["type_I_error"] == pytest.approx(1 / 9)
    assert bird["type_II_error"] == pytest.approx(0.2)
    assert (bird["support"], bird["tp"], bird["fp"], bird["fn"]) == (10, 8, 1, 2)
    # fox: predicted 7 times, 5 right
    assert fox["precision"] == pytest.approx(5 / 7)
    assert fox["recall"] == pytest.approx(0.5)
    assert (fox["support"], fox["tp"], fox["fp"], fox["fn"]) == (10, 5, 2, 5)
    # skunk: no crops -> recall undefined; predicted 4 times, never right -> precision 0
    assert skunk["precision"] == 0.0 and skunk["type_I_error"] == 1.0
    assert np.isnan(skunk["recall"]) and np.isnan(skunk["type_II_error"])
    assert (skunk["support"], skunk["tp"], skunk["fp"], skunk["fn"]) == (0, 0, 4, 0)


def test_label_never_predicted_has_nan_precision() -> None:
    table = per_label_table(np.array([[3, 0, 0], [2, 0, 0], [0, 0, 0]]), LABELS, "test")
    assert np.isnan(table.loc[1, "precision"]) and table.loc[1, "recall"] == 0.0
    assert np.isnan(table.loc[2, "precision"]) and np.isnan(table.loc[2, "recall"])


def test_macro_scores_hand_computed() -> None:
    scores = macro_scores(CONFUSION)
    assert scores["balanced_accuracy"] == pytest.approx((0.8 + 0.5) / 2)
    # macro averages include the predicted-but-absent skunk as 0 (scikit-learn, torchmetrics)
    assert scores["precision_macro"] == pytest.approx((8 / 9 + 5 / 7 + 0) / 3)
    assert scores["recall_macro"] == pytest.approx((0.8 + 0.5 + 0) / 3)
    assert all(np.isnan(v) for v in macro_scores(np.zeros((3, 3))).values())


@pytest.mark.parametrize("seed", range(5))
def test_matches_sklearn_on_random_predictions(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_labels = 6
    y_true = rng.integers(0, num_labels - 1, size=300)  # the last label never occurs in y_true
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, num_labels, size=300))
    confusion = confusion_matrix(y_true, y_pred, labels=range(num_labels))
    table = per_label_table(confusion, [f"l{i}" for i in range(num_labels)], "train")

    precision, recall, _, support = precision_recall_fscore_support(
        y_true, y_pred, labels=range(num_labels), zero_division=np.nan
    )
    np.testing.assert_allclose(table["precision"], precision, equal_nan=True)
    np.testing.assert_allclose(table["recall"], recall, equal_nan=True)
    np.testing.assert_array_equal(table["support"], support)

    macro_p, macro_r, _, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    scores = macro_scores(confusion)
    assert scores["precision_macro"] == pytest.approx(macro_p)
    assert scores["recall_macro"] == pytest.approx(macro_r)
    with pytest.warns(UserWarning):  # sklearn warns about the predicted-only label, and ignores it
        expected_balanced = balanced_accuracy_score(y_true, y_pred)
    assert scores["balanced_accuracy"] == pytest.approx(expected_balanced)
    assert scores["balanced_accuracy"] == pytest.approx(np.nanmean(table["recall"]))


def test_bad_confusion_matrix_raises() -> None:
    with pytest.raises(ValueError, match="square"):
        per_label_table(np.zeros((2, 3)), ["a", "b"], "val")
    with pytest.raises(ValueError, match="3 labels"):
        per_label_table(np.zeros((2, 2)), ["a", "b", "c"], "val")


def test_overall_table_orders_splits_and_fills_missing() -> None:
    table = overall_table({"train": {"n": 10, "loss": 0.5, "top1": 0.9}, "val": {"n": 4, "top3": 1.0}})
    assert list(table.columns) == list(OVERALL_COLUMNS)
    assert list(table["split"]) == ["train", "val"]
    assert table.loc[0, "loss"] == 0.5
    assert np.isnan(table.loc[1, "loss"])
    assert table.loc[1, "n"] == 4


def test_confusion_frame_and_png() -> None:
    frame = confusion_frame(CONFUSION, LABELS)
    assert frame.index.name == "true" and frame.columns.name == "predicted"
    assert frame.loc["fox", "skunk"] == 4
    png = confusion_png(CONFUSION, LABELS, "val")
    assert png.startswith(b"\x89PNG")
    with Image.open(io.BytesIO(png)) as image:
        assert image.size[0] > 100
