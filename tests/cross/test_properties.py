"""Property-based tests (hypothesis): the CCT parser, crop geometry and location splits.

* CCT parser: any JSON-shaped records, valid or not, either load (bad records reported) or raise :class:`CctError`;
  nothing else escapes. Valid records round-trip: every image and annotation comes back with its values.
* Crop geometry: the cut rectangle lies inside the image and contains the (rounded, clipped) box; ``square``
  gives a square canvas of the box's long side, shifted inside the image and padded only on an axis the side
  exceeds; the rendered crop has exactly :func:`output_size`.
* Splits: every location in exactly one split, splits disjoint, deterministic by seed, and numeric and string
  locations give the same split.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from animl_lightning.core.cct import CctError, load_cct
from animl_lightning.core.contract import SPLIT_NAMES
from animl_lightning.core.crop_rule import crop_image, crop_window, output_size
from animl_lightning.core.issues import PrepareReport
from animl_lightning.prepare.config import SplitSettings
from animl_lightning.prepare.split_search import split_random, split_smallest_first
from animl_lightning.prepare.splits import make_splits
from tests.fixtures.files import write_json

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# --- CCT parser --------------------------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=8,
)
bboxes = st.one_of(
    st.none(),
    st.lists(st.one_of(st.floats(-1e4, 1e4), st.integers(-1000, 5000)), min_size=4, max_size=4),
    json_values,
)
path_parts = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="/\\\x00"), min_size=1, max_size=8)
file_names = st.one_of(
    st.lists(path_parts, min_size=1, max_size=3).map("/".join),
    st.sampled_from(["../up.jpg", "/abs.jpg", "a//b.jpg", "./a.jpg", "a/../../b.jpg", "C:/x.jpg", ""]),
    json_values,
)


def image_records() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {},
        optional={
            "id": st.one_of(st.text(max_size=5), st.integers(0, 50), json_values),
            "file_name": file_names,
            "location": st.one_of(st.text(max_size=5), st.integers(0, 9), json_values),
            "datetime": st.one_of(st.text(max_size=5), json_values),
            "width": st.one_of(st.integers(-5, 4000), json_values),
            "height": st.one_of(st.integers(-5, 4000), json_values),
            "serving_bucket_key": st.one_of(st.text(max_size=5), json_values),
            "seq_id": json_values,
            "corrupt": json_values,
        },
    )


def annotation_records() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {},
        optional={
            "id": st.one_of(st.text(max_size=5), st.integers(0, 50), json_values),
            "image_id": st.one_of(st.text(max_size=5), st.integers(0, 50), json_values),
            "category_id": st.one_of(st.integers(0, 5), json_values),
            "bbox": bboxes,
        },
    )


@FAST
@given(
    images=st.lists(st.one_of(image_records(), json_values), max_size=6),
    annotations=st.lists(st.one_of(annotation_records(), json_values), max_size=8),
    categories=st.lists(
        st.one_of(st.fixed_dictionaries({"id": st.integers(0, 5), "name": st.text(max_size=4)}), json_values),
        max_size=4,
    ),
)
def test_cct_parser_never_crashes(
    tmp_path: Path, images: list[Any], annotations: list[Any], categories: list[Any]
) -> None:
    report = PrepareReport()
    try:
        data = {"images": images, "annotations": annotations, "categories": categories}
        project = load_cct(write_json(tmp_path / "cct.json", data, allow_nan=True), report)
    except CctError as err:
        assert "cct.json" in str(err)
        return
    kept = project.images
    assert kept["image_id"].is_unique and kept["file_name"].is_unique
    assert set(project.annotations["image_id"]) <= set(kept["image_id"])
    # every dropped image or annotation is explained in the report
    dropped = len(images) - len(kept) + len(annotations) - len(project.annotations)
    assert dropped == 0 or report.issues
    for issue in report.issues:
        assert issue.stage == "ingest" and issue.message
    boxes = project.annotations[["x", "y", "w", "h"]].to_numpy(dtype=float)
    has_box = ~np.isnan(boxes).any(axis=1)
    assert np.isnan(boxes[~has_box]).all()
    assert (boxes[has_box, 2] > 0).all() and (boxes[has_box, 3] > 0).all()
    assert (boxes[has_box, :2] >= 0).all()


@FAST
@given(st.binary(max_size=200))
def test_cct_parser_on_arbitrary_bytes(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "cct.json"
    path.write_bytes(raw)
    try:
        load_cct(path, PrepareReport())
    except CctError as err:
        assert str(path) in str(err)


@st.composite
def valid_projects(draw: st.DrawFn) -> dict[str, Any]:
    n_images = draw(st.integers(1, 6))
    names = draw(st.lists(path_parts, min_size=n_images, max_size=n_images, unique=True))
    images = []
    for i, name in enumerate(names):
        width, height = draw(st.integers(1, 3000)), draw(st.integers(1, 3000))
        images.append(
            {
                "id": f"img{i}",
                "file_name": f"cam {i % 2}/{name}.jpg",
                "location": draw(st.one_of(st.integers(0, 5), st.sampled_from(["a", "b", "Site 3"]))),
                "datetime": "2022-01-01 00:00:00",
                "width": width,
                "height": height,
            }
        )
    categories = [{"id": 1, "name": "fox"}, {"id": 2, "name": "bird"}]
    annotations = []
    for j in range(draw(st.integers(0, 8))):
        image = images[draw(st.integers(0, n_images - 1))]
        x = draw(st.integers(0, image["width"] - 1))
        y = draw(st.integers(0, image["height"] - 1))
        w = draw(st.integers(1, image["width"] - x))
        h = draw(st.integers(1, image["height"] - y))
        bbox = draw(st.one_of(st.just([x, y, w, h]), st.none()))
        annotations.append(
            {"id": f"ann{j}", "image_id": image["id"], "category_id": draw(st.sampled_from([1, 2])), "bbox": bbox}
        )
    return {"images": images, "annotations": annotations, "categories": categories}


@FAST
@given(valid_projects())
def test_valid_cct_round_trips(tmp_path: Path, data: dict[str, Any]) -> None:
    report = PrepareReport()
    project = load_cct(write_json(tmp_path / "cct.json", data, allow_nan=True), report)
    assert not report.issues, report.issues
    images = project.images.set_index("image_id")
    assert list(images.index) == [i["id"] for i in data["images"]]
    for record in data["images"]:
        row = images.loc[record["id"]]
        assert row["file_name"] == record["file_name"]
        assert row["location"] == str(record["location"])
        assert isinstance(row["location"], str)
        assert (int(row["width"]), int(row["height"])) == (record["width"], record["height"])
        assert row["s3_key"] == record["file_name"]  # no serving_bucket_key: the file name is the key
    annotations = project.annotations.set_index("annotation_id")
    assert list(annotations.index) == [a["id"] for a in data["annotations"]]
    names = {c["id"]: c["name"] for c in data["categories"]}
    for record in data["annotations"]:
        row = annotations.loc[record["id"]]
        assert row["image_id"] == record["image_id"]
        assert row["category"] == names[record["category_id"]]
        got = [row["x"], row["y"], row["w"], row["h"]]
        if record["bbox"] is None:
            assert all(math.isnan(v) for v in got)
        else:
            assert got == [float(v) for v in record["bbox"]]


# --- crop geometry -----------------------------------------------------------------------------------------------

sizes = st.tuples(st.integers(1, 400), st.integers(1, 400))
coords = st.floats(min_value=-500, max_value=900, allow_nan=False)
lengths = st.floats(min_value=0.0, max_value=1200, allow_nan=False)
strategies = st.sampled_from(["square", "pad", "exact"])


def _rounded_clipped(box: tuple[float, float, float, float], size: tuple[int, int]) -> tuple[int, int, int, int]:
    x, y, w, h = box
    width, height = size
    return (
        min(max(math.floor(x + 0.5), 0), width),
        min(max(math.floor(y + 0.5), 0), height),
        min(max(math.floor(x + w + 0.5), 0), width),
        min(max(math.floor(y + h + 0.5), 0), height),
    )


@settings(max_examples=400, deadline=None)
@given(box=st.tuples(coords, coords, lengths, lengths), size=sizes, strategy=strategies)
def test_crop_window_geometry(box: tuple[float, float, float, float], size: tuple[int, int], strategy: str) -> None:
    x0, y0, x1, y1 = _rounded_clipped(box, size)
    if x1 - x0 < 1 or y1 - y0 < 1:
        with pytest.raises(ValueError, match="smaller than one pixel"):
            crop_window(box, size, strategy)
        return
    window = crop_window(box, size, strategy)
    width, height = size
    # inside the image, and containing the box
    assert 0 <= window.left < window.right <= width
    assert 0 <= window.top < window.bottom <= height
    assert window.left <= x0 and window.top <= y0 and window.right >= x1 and window.bottom >= y1
    # the cut rectangle fits on the canvas at its offset
    assert window.offset_x >= 0 and window.offset_x + window.width <= window.canvas_width
    assert window.offset_y >= 0 and window.offset_y + window.height <= window.canvas_height
    side = max(x1 - x0, y1 - y0)
    if strategy == "exact":
        assert (window.left, window.top, window.right, window.bottom) == (x0, y0, x1, y1)
        assert not window.padded
    else:
        assert window.canvas_width == window.canvas_height == side
    if strategy == "square":
        # padded on an axis only when the side exceeds the image on that axis; then the whole axis is taken
        assert window.width == min(side, width) and window.height == min(side, height)
        # centred on the box unless an image edge pushed it inward
        if window.left > 0 and window.right < width:
            assert abs((window.left + window.right) - (x0 + x1)) <= 1
        if window.top > 0 and window.bottom < height:
            assert abs((window.top + window.bottom) - (y0 + y1)) <= 1


@st.composite
def boxes_in_images(draw: st.DrawFn) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
    """An image size and a box that keeps at least one pixel inside it (it may spill past any edge)."""
    size = draw(st.tuples(st.integers(1, 120), st.integers(1, 120)))
    edges = []
    for limit in size:
        start = draw(st.integers(0, limit - 1))
        end = draw(st.integers(start + 1, limit))
        before, after = draw(st.floats(0, 300)), draw(st.floats(0, 300))
        edges.append((start - before, (end - start) + before + after))
    (x, w), (y, h) = edges
    return (x, y, w, h), size


@settings(max_examples=150, deadline=None)
@given(placed=boxes_in_images(), strategy=strategies, max_size=st.one_of(st.none(), st.integers(8, 64)))
def test_crop_image_has_the_planned_size(
    placed: tuple[tuple[float, float, float, float], tuple[int, int]], strategy: str, max_size: int | None
) -> None:
    box, size = placed
    x0, y0, x1, y1 = _rounded_clipped(box, size)
    assume(x1 - x0 >= 1 and y1 - y0 >= 1)
    image = Image.new("RGB", size, (200, 100, 50))
    crop = crop_image(image, box, strategy, max_size)
    window = crop_window(box, size, strategy)
    assert crop.mode == "RGB"
    assert crop.size == output_size(window, max_size)
    if max_size is not None:
        assert max(crop.size) <= max(max_size, 1)
    # the box's own pixels are image pixels, never padding
    centre = np.asarray(crop)[crop.size[1] // 2, crop.size[0] // 2]
    if not window.padded:
        assert tuple(centre) == (200, 100, 50)


# --- splits ------------------------------------------------------------------------------------------------------


@st.composite
def count_matrices(draw: st.DrawFn) -> np.ndarray:
    n_locations = draw(st.integers(3, 14))
    n_labels = draw(st.integers(1, 4))
    counts = np.array(
        draw(
            st.lists(
                st.lists(st.integers(0, 30), min_size=n_labels, max_size=n_labels),
                min_size=n_locations,
                max_size=n_locations,
            )
        ),
        dtype=np.int64,
    )
    counts[counts.sum(axis=1) == 0, 0] = 1  # every location has a crop, as in a dataset frame
    return counts


@settings(max_examples=80, deadline=None)
@given(counts=count_matrices(), seed=st.integers(0, 2**31), test_frac=st.sampled_from([0.0, 0.2, 0.3]))
def test_split_assignments_cover_every_location_once(counts: np.ndarray, seed: int, test_frac: float) -> None:
    val_frac = 0.2
    random_a = split_random(counts, val_frac, test_frac, trials=50, seed=seed)
    random_b = split_random(counts, val_frac, test_frac, trials=50, seed=seed)
    greedy = split_smallest_first(counts, val_frac, test_frac)
    for assignment in (random_a, greedy):
        assert assignment.shape == (len(counts),)
        assert set(assignment.tolist()) <= ({0, 1, 2} if test_frac > 0 else {0, 1})
    np.testing.assert_array_equal(random_a, random_b)
    np.testing.assert_array_equal(greedy, split_smallest_first(counts, val_frac, test_frac))


def _frame(locations: list[Any], labels: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"dataset": "ds", "location": locations, "label": labels})


@st.composite
def dataset_frames(draw: st.DrawFn) -> tuple[list[int], list[str]]:
    n_locations = draw(st.integers(3, 12))
    rows = draw(
        st.lists(
            st.tuples(st.integers(0, n_locations - 1), st.sampled_from(["fox", "bird", "skunk"])),
            min_size=3,
            max_size=60,
        )
    )
    locations = [loc for loc, _ in rows] + list(range(n_locations))  # every location appears
    labels = [label for _, label in rows] + ["fox"] * n_locations
    return locations, labels


@settings(max_examples=40, deadline=None)
@given(data=dataset_frames(), seed=st.integers(0, 1000), method=st.sampled_from(["random", "smallest_first"]))
def test_make_splits_partitions_locations(data: tuple[list[int], list[str]], seed: int, method: str) -> None:
    locations, labels = data
    split_settings = SplitSettings(method=method, seed=seed, trials=40)
    numeric = make_splits(_frame(locations, labels), split_settings, PrepareReport()).splits
    again = make_splits(_frame(locations, labels), split_settings, PrepareReport()).splits
    assert numeric == again  # deterministic by seed
    assert set(numeric) == set(SPLIT_NAMES)
    assigned = [pair for name in SPLIT_NAMES for pair in numeric[name]]
    assert len(assigned) == len(set(assigned)), "a location is in two splits"
    assert set(assigned) == {("ds", str(loc)) for loc in locations}
    for pairs in numeric.values():
        assert all(isinstance(d, str) and isinstance(loc, str) for d, loc in pairs)
    # integer locations (an old CCT file) and the same locations as strings give the same split
    as_text = make_splits(_frame([f"{loc}" for loc in locations], labels), split_settings, PrepareReport()).splits
    assert as_text == numeric
