"""Label mapping: label_spec.json semantics, the inline map, the default, max_count sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from animl_lightning.core.issues import PrepareReport
from animl_lightning.prepare.config import LabelSettings
from animl_lightning.prepare.labels import (
    LabelSpec,
    LabelSpecError,
    apply_labels,
    load_label_spec,
    resolve_categories,
    sample_with_priority,
)


def make_boxes(rows: list[tuple[str, str]]) -> pd.DataFrame:
    """Boxes frame from (image_id, dataset_class) pairs."""
    return pd.DataFrame(
        {
            "image_id": [r[0] for r in rows],
            "dataset_class": [r[1] for r in rows],
            "location": "loc1",
            "crop_path": [f"{r[0]}___crop_{i}.jpg" for i, r in enumerate(rows)],
        }
    )


def write_spec(tmp_path: Path, spec: object) -> Path:
    path = tmp_path / "label_spec.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path


BOXES = make_boxes(
    [("i1", "Fox"), ("i2", "gray fox"), ("i3", "empty"), ("i4", "bird"), ("i5", "raven"), ("i5", "bird")]
)


def test_default_every_category_is_a_label_except_empty() -> None:
    report = PrepareReport()
    out = apply_labels(BOXES, "ds", LabelSettings(), report)
    assert out["label"].tolist() == ["Fox", "gray fox", "bird", "raven", "bird"]
    assert (out["label"] == out["dataset_class"]).all()
    assert report.counts["labels"]["dropped_category:empty"] == 1
    assert [i.record for i in report.issues_of("labels", "category_without_label")] == ["empty"]
    assert list(out.index) == list(range(len(out)))


def test_default_exclude_is_case_insensitive_and_configurable() -> None:
    boxes = make_boxes([("a", "Empty"), ("b", "fox"), ("c", "human")])
    out = apply_labels(boxes, "ds", LabelSettings(exclude=["empty", "Human"]), PrepareReport())
    assert out["label"].tolist() == ["fox"]


def test_inline_map_drops_unnamed_categories_and_counts_them() -> None:
    report = PrepareReport()
    settings = LabelSettings(map={"Fox": "fox", "gray fox": "fox", "bird": "bird"})
    out = apply_labels(BOXES, "anything", settings, report)
    assert out["label"].tolist() == ["fox", "fox", "bird", "bird"]
    assert report.counts["labels"]["dropped_category:raven"] == 1
    assert report.counts["labels"]["dropped_category:empty"] == 1
    assert report.counts["labels"]["boxes_out"] == 4


def test_spec_file_with_exclude(tmp_path: Path) -> None:
    spec = {
        "fox": {"dataset_labels": {"ds": ["Fox", "gray fox"]}},
        "bird": {"dataset_labels": {"ds": ["bird", "raven"]}, "exclude": {"dataset_labels": {"ds": ["raven"]}}},
    }
    settings = LabelSettings(spec_file=str(write_spec(tmp_path, spec)))
    report = PrepareReport()
    out = apply_labels(BOXES, "ds", settings, report)
    assert out["label"].tolist() == ["fox", "fox", "bird", "bird"]
    assert "raven" not in set(out["dataset_class"])


def test_spec_names_other_dataset_reports_it(tmp_path: Path) -> None:
    settings = LabelSettings(spec_file=str(write_spec(tmp_path, {"fox": {"dataset_labels": {"other": ["Fox"]}}})))
    report = PrepareReport()
    out = apply_labels(BOXES, "ds", settings, report)
    assert out.empty
    (issue,) = report.issues_of("labels", "dataset_not_in_spec")
    assert "'ds'" in issue.message and "other" in issue.message


def test_case_insensitive_fallback_after_exact_match() -> None:
    mapping = {"fox": "canid", "Fox": "fox_exact"}
    resolved = resolve_categories(["Fox", "fox", "BIRD"], {**mapping, "bird": "bird"})
    assert resolved == {"Fox": "fox_exact", "fox": "canid", "BIRD": "bird"}
    with pytest.raises(LabelSpecError, match="FOX"):
        resolve_categories(["FOX"], mapping)


def test_category_mapped_to_two_labels_names_both(tmp_path: Path) -> None:
    spec = {"fox": {"dataset_labels": {"ds": ["Fox"]}}, "canid": {"dataset_labels": {"ds": ["Fox", "coyote"]}}}
    with pytest.raises(LabelSpecError) as info:
        load_label_spec(write_spec(tmp_path, spec))
    message = str(info.value)
    assert "'fox'" in message and "'canid'" in message and "'Fox'" in message and "label_spec.json" in message


@pytest.mark.parametrize(
    ("spec", "label", "key"),
    [
        ({"fox": {"taxa": [{"level": "genus", "name": "vulpes"}]}}, "fox", "taxa"),
        ({"fox": {"dataset_labels": {"ds": ["Fox"]}, "exclude": {"taxa": []}}}, "fox", "exclude.taxa"),
        ({"fox": {"dataset_labels": {"ds": ["Fox"]}, "max_count": 0}}, "fox", "max_count"),
        ({"fox": {"dataset_labels": {"ds": ["Fox"]}, "max_count": True}}, "fox", "max_count"),
        ({"fox": {"dataset_labels": {"ds": ["Fox"]}, "prioritize": [["ds"]]}}, "fox", "prioritize"),
        ({"fox": {"dataset_labels": {"ds": ["Fox"]}, "max_count": 3, "prioritize": ["ds"]}}, "fox", "prioritize"),
        ({"fox": {"dataset_labels": {"ds": "Fox"}}}, "fox", "dataset_labels"),
        ({"fox": {"dataset_labels": {"ds": ["Fox"]}, "colour": "red"}}, "fox", "colour"),
        (
            {"fox": {"dataset_labels": {"ds": ["Fox"]}, "exclude": {"dataset_labels": {"ds": ["Fox"]}}}},
            "fox",
            "dataset_labels",
        ),
        ({"fox": {}}, "fox", "dataset_labels"),
        ({"fox": ["Fox"]}, "fox", "expected an object"),
    ],
)
def test_spec_validation_names_file_label_and_key(tmp_path: Path, spec: object, label: str, key: str) -> None:
    path = write_spec(tmp_path, spec)
    with pytest.raises(LabelSpecError) as info:
        load_label_spec(path)
    message = str(info.value)
    assert str(path) in message
    assert repr(label) in message
    assert key in message


def test_spec_file_not_json(tmp_path: Path) -> None:
    path = tmp_path / "label_spec.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(LabelSpecError, match="not valid JSON"):
        load_label_spec(path)
    with pytest.raises(LabelSpecError, match="non-empty JSON object"):
        LabelSpec.from_dict([], source="x.json")


def test_inline_map_validation() -> None:
    with pytest.raises(LabelSpecError, match="Fox"):
        LabelSpec.from_map({"Fox": ""})
    with pytest.raises(LabelSpecError, match="at least one"):
        LabelSpec.from_map({})


def many_images(n_images: int, boxes_per_image: int = 2) -> pd.DataFrame:
    rows = [(f"img{i:03d}", "Fox") for i in range(n_images) for _ in range(boxes_per_image)]
    rows += [(f"bird{i:03d}", "bird") for i in range(5)]
    return make_boxes(rows)


def test_max_count_samples_images_not_crops_and_is_seeded(tmp_path: Path) -> None:
    spec = {"fox": {"dataset_labels": {"ds": ["Fox"]}, "max_count": 10}, "bird": {"dataset_labels": {"ds": ["bird"]}}}
    path = str(write_spec(tmp_path, spec))
    boxes = many_images(40)
    first = apply_labels(boxes, "ds", LabelSettings(spec_file=path, seed=5), PrepareReport())
    again = apply_labels(boxes, "ds", LabelSettings(spec_file=path, seed=5), PrepareReport())
    other = apply_labels(boxes, "ds", LabelSettings(spec_file=path, seed=6), PrepareReport())
    fox = first[first["label"] == "fox"]
    assert fox["image_id"].nunique() == 10
    assert len(fox) == 20  # all boxes of a chosen image are kept
    assert (first["label"] == "bird").sum() == 5
    pd.testing.assert_frame_equal(first, again)
    assert set(other.loc[other["label"] == "fox", "image_id"]) != set(fox["image_id"])
    # Row order of the input does not change the chosen images.
    shuffled = boxes.sample(frac=1.0, random_state=1).reset_index(drop=True)
    reordered = apply_labels(shuffled, "ds", LabelSettings(spec_file=path, seed=5), PrepareReport())
    assert set(reordered.loc[reordered["label"] == "fox", "image_id"]) == set(fox["image_id"])


def test_sample_with_priority_takes_prioritised_datasets_first() -> None:
    ids = [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(5)] + [f"c{i}" for i in range(5)]
    datasets = ["a"] * 5 + ["b"] * 5 + ["c"] * 5
    for seed in range(20):
        chosen = sample_with_priority(ids, datasets, 7, [["b"], ["c"]], np.random.default_rng(seed))
        assert len(chosen) == 7
        assert sum(c.startswith("b") for c in chosen) == 5
        assert sum(c.startswith("c") for c in chosen) == 2
    everything = sample_with_priority(ids, datasets, 100, [["b"]], np.random.default_rng(0))
    assert sorted(everything) == sorted(ids)


def test_priority_datasets_in_first_mention_order(tmp_path: Path) -> None:
    spec = {
        "fox": {"dataset_labels": {"a": ["Fox"]}, "max_count": 5, "prioritize": [["c", "a"], ["b"]]},
        "bird": {"dataset_labels": {"a": ["bird"]}, "max_count": 5, "prioritize": [["b", "d"]]},
    }
    assert load_label_spec(write_spec(tmp_path, spec)).priority_datasets() == ["c", "a", "b", "d"]


def test_spellings_that_differ_in_case_or_spaces_are_one_label() -> None:
    variants = [("t1", "Striped Skunk"), ("t2", "Striped Skunk "), ("f", "fox")]
    boxes = make_boxes([(f"s{i}", "Striped skunk") for i in range(5)] + variants)
    report = PrepareReport()
    out = apply_labels(boxes, "ds", LabelSettings(), report)
    assert out["label"].value_counts().to_dict() == {"Striped skunk": 7, "fox": 1}
    assert (out["dataset_class"] == boxes["dataset_class"]).all()  # the original category is kept
    (fold,) = report.issues_of("labels", "label_folded")
    assert "'Striped skunk' (5 boxes)" in fold.message and "'Striped Skunk' (1 boxes)" in fold.message
    assert "labels.case_sensitive=true" in fold.message
    kept = apply_labels(boxes, "ds", LabelSettings(case_sensitive=True), PrepareReport())
    assert sorted(kept["label"].unique()) == ["Striped Skunk", "Striped Skunk ", "Striped skunk", "fox"]


def test_folding_applies_to_mapped_labels_too() -> None:
    boxes = make_boxes([("a", "gray fox"), ("b", "island fox"), ("c", "island fox")])
    out = apply_labels(boxes, "ds", LabelSettings(map={"gray fox": "Fox", "island fox": "fox"}), PrepareReport())
    assert out["label"].tolist() == ["fox", "fox", "fox"]


def test_map_keys_that_match_no_category_are_named() -> None:
    boxes = make_boxes([("a", "gray fox"), ("b", "bird")])
    report = PrepareReport()
    apply_labels(boxes, "ds", LabelSettings(map={"Gray Fox": "fox", "grey fox": "fox", "bird": "bird"}), report)
    unmatched = report.issues_of("labels", "map_key_unmatched")
    assert [(i.record, i.field) for i in unmatched] == [("grey fox", "labels.map")]
