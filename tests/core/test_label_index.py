"""LabelIndex: the one owner of the ``{"0": label, ...}`` shape."""

from __future__ import annotations

from typing import Any

import pytest

from animl_lightning.core.contract import DatasetError
from animl_lightning.core.errors import ConfigError
from animl_lightning.core.label_index import LabelIndex


def test_round_trip_and_order() -> None:
    index = LabelIndex.sorted_from(["skunk", "fox", "fox", "bird"])
    assert list(index) == ["bird", "fox", "skunk"] and len(index) == 3
    assert index.to_dict() == {"0": "bird", "1": "fox", "2": "skunk"}
    # Keys in any order, as JSON may hold them; the positions come from the keys.
    assert LabelIndex.from_dict({"2": "skunk", "0": "bird", "1": "fox"}, "f.json") == index
    assert index[1] == "fox"


def test_of_keeps_the_given_order_and_makes_strings() -> None:
    assert list(LabelIndex.of(["b", "a", 3])) == ["b", "a", "3"]


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({}, "expected a non-empty JSON object"),
        (["a", "b"], "expected a non-empty JSON object"),
        ({"a": "x"}, "keys must be integer strings"),
        ({"0": "x", "2": "y"}, r"keys must be 0\.\.1 without gaps"),
        ({"0": "x", "1": ""}, "key 1: label must be a non-empty string"),
        ({"0": "x", "1": 5}, "key 1: label must be a non-empty string"),
        ({"0": "x", "1": "x"}, r"labels appear more than once: \['x'\]"),
    ],
)
def test_a_bad_index_names_the_source_in_the_callers_error(raw: Any, match: str) -> None:
    with pytest.raises(DatasetError, match=match) as caught:
        LabelIndex.from_dict(raw, "data/label_index.json", DatasetError)
    assert str(caught.value).startswith("data/label_index.json: ")


@pytest.mark.parametrize(("labels", "match"), [((), "at least 1 label"), (("a", "a"), "more than once")])
def test_the_constructor_validates(labels: tuple[str, ...], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        LabelIndex(labels)
