"""Crop geometry (pure), image decoding of awkward files, and the crops stage (resume, failures, workers)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from animl_lightning.core.crop_files import crop_is_valid
from animl_lightning.core.crop_rule import (
    CropRule,
    CropWindow,
    crop_decoded,
    crop_image,
    crop_window,
    draft_reduction,
    output_size,
    render,
)
from animl_lightning.core.imaging import (
    DecodedImage,
    ImageLoadError,
    decode_image,
    image_display_size,
    load_image,
    orient,
    to_rgb,
)
from animl_lightning.core.issues import PrepareReport
from animl_lightning.prepare.config import CropSettings
from animl_lightning.prepare.crop_stage import make_crops

RED = (220, 30, 30)
GREY = (90, 90, 90)

# --- geometry ------------------------------------------------------------------------------------------------


def test_square_inside_image_is_centred_on_the_box() -> None:
    window = crop_window((100, 100, 50, 30), (1000, 800), "square")
    assert window == CropWindow(100, 90, 150, 140, 50, 50, 0, 0)
    assert not window.padded


def test_square_at_top_left_corner_is_shifted_inward() -> None:
    window = crop_window((0, 0, 20, 60), (100, 100), "square")
    assert (window.left, window.top, window.right, window.bottom) == (0, 0, 60, 60)
    assert not window.padded


def test_square_at_bottom_right_corner_is_shifted_inward_not_padded() -> None:
    # The old rule let this square spill past the right/bottom edge and filled it with black (pipeline.md 2.6).
    window = crop_window((80, 95, 20, 5), (100, 100), "square")
    assert (window.left, window.top, window.right, window.bottom) == (80, 80, 100, 100)
    assert not window.padded


def test_square_edges_are_treated_symmetrically() -> None:
    size = (200, 100)
    left = crop_window((2, 40, 10, 30), size, "square")
    right = crop_window((200 - 2 - 10, 40, 10, 30), size, "square")
    assert left.left == 0 and right.right == 200
    assert left.width == right.width == 30
    top = crop_window((40, 1, 30, 10), size, "square")
    bottom = crop_window((40, 100 - 1 - 10, 30, 10), size, "square")
    assert top.top == 0 and bottom.bottom == 100
    assert top.height == bottom.height == 30


def test_square_larger_than_image_takes_whole_dimension_and_pads_centred() -> None:
    window = crop_window((0, 0, 100, 60), (100, 60), "square")
    assert (window.left, window.top, window.right, window.bottom) == (0, 0, 100, 60)
    assert (window.canvas_width, window.canvas_height) == (100, 100)
    assert (window.offset_x, window.offset_y) == (0, 20)
    assert window.padded


def test_pad_strategy_pads_exact_box_to_square() -> None:
    window = crop_window((10, 20, 40, 10), (100, 100), "pad")
    assert (window.left, window.top, window.right, window.bottom) == (10, 20, 50, 30)
    assert (window.canvas_width, window.canvas_height, window.offset_x, window.offset_y) == (40, 40, 0, 15)


def test_exact_strategy_is_the_box_clipped_to_the_image() -> None:
    window = crop_window((-5, 90, 20, 20), (100, 100), "exact")
    assert (window.left, window.top, window.right, window.bottom) == (0, 90, 15, 100)
    assert (window.canvas_width, window.canvas_height) == (15, 10)


@pytest.mark.parametrize(
    "box",
    [(10.2, 10, 0.2, 5), (10, 10, 5, 0), (200, 10, 5, 5), (-20, 10, 5, 5), (float("nan"), 0, 5, 5)],
)
def test_degenerate_or_outside_boxes_raise(box: tuple[float, float, float, float]) -> None:
    with pytest.raises(ValueError, match="box"):
        crop_window(box, (100, 100), "square")


def test_unknown_strategy_raises() -> None:
    with pytest.raises(ValueError, match="strategy"):
        crop_window((0, 0, 5, 5), (10, 10), "circle")


def test_output_size_caps_long_side_and_never_enlarges() -> None:
    big = crop_window((0, 0, 1200, 600), (2000, 2000), "exact")
    assert output_size(big, 600) == (600, 300)
    small = crop_window((0, 0, 100, 50), (2000, 2000), "exact")
    assert output_size(small, 600) == (100, 50)
    assert output_size(big, None) == (1200, 600)


def test_draft_reduction_is_limited_by_the_smallest_crop() -> None:
    large = crop_window((0, 0, 2400, 2400), (3000, 3000), "square")
    small = crop_window((0, 0, 500, 500), (3000, 3000), "square")
    assert draft_reduction([(large, output_size(large, 600))]) == 4
    assert draft_reduction([(large, output_size(large, 600)), (small, output_size(small, 600))]) == 1
    assert draft_reduction([(large, output_size(large, None))]) == 1


@st.composite
def _boxes_in_images(draw: st.DrawFn) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
    width = draw(st.integers(1, 3000))
    height = draw(st.integers(1, 3000))
    x = draw(st.floats(-100, width + 10, allow_nan=False))
    y = draw(st.floats(-100, height + 10, allow_nan=False))
    w = draw(st.floats(0.1, 2 * width + 10, allow_nan=False))
    h = draw(st.floats(0.1, 2 * height + 10, allow_nan=False))
    return (x, y, w, h), (width, height)


@settings(max_examples=400, deadline=None)
@given(_boxes_in_images(), st.sampled_from(["square", "pad", "exact"]))
def test_window_is_inside_image_contains_box_and_pads_only_when_needed(
    case: tuple[tuple[float, float, float, float], tuple[int, int]], strategy: str
) -> None:
    box, (width, height) = case
    try:
        window = crop_window(box, (width, height), strategy)
    except ValueError:
        x0 = min(max(math.floor(box[0] + 0.5), 0), width)
        x1 = min(max(math.floor(box[0] + box[2] + 0.5), 0), width)
        y0 = min(max(math.floor(box[1] + 0.5), 0), height)
        y1 = min(max(math.floor(box[1] + box[3] + 0.5), 0), height)
        assert x1 - x0 < 1 or y1 - y0 < 1
        return
    assert 0 <= window.left < window.right <= width
    assert 0 <= window.top < window.bottom <= height
    assert window.offset_x >= 0 and window.offset_x + window.width <= window.canvas_width
    assert window.offset_y >= 0 and window.offset_y + window.height <= window.canvas_height
    # padding is centred (to within one pixel)
    assert abs((window.canvas_width - window.width - window.offset_x) - window.offset_x) <= 1
    assert abs((window.canvas_height - window.height - window.offset_y) - window.offset_y) <= 1
    x0 = max(math.floor(box[0] + 0.5), 0)
    y0 = max(math.floor(box[1] + 0.5), 0)
    x1 = min(math.floor(box[0] + box[2] + 0.5), width)
    y1 = min(math.floor(box[1] + box[3] + 0.5), height)
    assert window.left <= x0 and window.right >= x1 and window.top <= y0 and window.bottom >= y1
    if strategy == "exact":
        assert (window.left, window.top, window.right, window.bottom) == (x0, y0, x1, y1)
        assert not window.padded
        return
    side = max(x1 - x0, y1 - y0)
    assert window.canvas_width == window.canvas_height == side
    if strategy == "square":
        # padded on an axis only when the side exceeds the image there
        assert (window.width < side) == (side > width)
        assert (window.height < side) == (side > height)


@settings(max_examples=200, deadline=None)
@given(st.integers(20, 400), st.integers(20, 400), st.data())
def test_square_window_of_mirrored_box_is_mirrored(width: int, height: int, data: st.DataObject) -> None:
    w = data.draw(st.integers(1, width))
    h = data.draw(st.integers(1, height))
    x = data.draw(st.integers(0, width - w))
    y = data.draw(st.integers(0, height - h))
    side = max(w, h)
    assume((side - w) % 2 == 0 and (side - h) % 2 == 0)  # no odd pixel to place on one side
    window = crop_window((x, y, w, h), (width, height), "square")
    mirror = crop_window((width - x - w, height - y - h, w, h), (width, height), "square")
    assert (mirror.left, mirror.right) == (width - window.right, width - window.left)
    assert (mirror.top, mirror.bottom) == (height - window.bottom, height - window.top)


# --- images on disk ------------------------------------------------------------------------------------------


def _scene(size: tuple[int, int], box: tuple[int, int, int, int], colour: tuple[int, int, int] = RED) -> Image.Image:
    image = Image.new("RGB", size, GREY)
    x, y, w, h = box
    image.paste(Image.new("RGB", (w, h), colour), (x, y))
    return image


def _mean(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=float).reshape(-1, 3).mean(axis=0)


def _close(actual: np.ndarray, expected: tuple[float, float, float], tol: float = 12.0) -> bool:
    return bool(np.all(np.abs(actual - np.asarray(expected)) <= tol))


def _boxes_frame(rows: list[dict[str, object]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    for column in ("width", "height"):
        frame[column] = frame[column].astype("Int64")
    return frame


def _row(
    file_name: str, box: tuple[float, float, float, float], size: tuple[int, int] | None, tag: str
) -> dict[str, object]:
    return {
        "image_id": file_name,
        "file_name": file_name,
        "crop_path": f"{file_name}___crop_{tag}.jpg",
        "x": box[0],
        "y": box[1],
        "w": box[2],
        "h": box[3],
        "width": size[0] if size else None,
        "height": size[1] if size else None,
    }


def _run(tmp_path: Path, rows: list[dict[str, object]], **crop_settings: object) -> tuple[pd.DataFrame, PrepareReport]:
    report = PrepareReport()
    # Today's decode-and-encode path; tests/core/test_lossless_crops.py covers crops.lossless=true.
    settings_ = CropSettings(**{"workers": 1, "lossless": False, **crop_settings})  # type: ignore[arg-type]
    result = make_crops(_boxes_frame(rows), tmp_path / "images", tmp_path / "crops", settings_, report)
    return result, report


def test_grayscale_jpeg_crop_is_rgb_with_right_content(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    image = Image.new("L", (200, 100), 0)
    image.paste(255, (50, 20, 90, 60))
    image.save(tmp_path / "images" / "gray.jpg", quality=95)
    result, _report = _run(tmp_path, [_row("gray.jpg", (50, 20, 40, 40), (200, 100), "a")], strategy="exact")
    assert result["crop_ok"].all()
    crop = Image.open(tmp_path / "crops" / "gray.jpg___crop_a.jpg")
    assert crop.mode == "RGB" and crop.size == (40, 40)
    assert _close(_mean(crop), (255, 255, 255))


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    _scene((200, 120), (20, 20, 60, 60)).convert("CMYK").save(tmp_path / "images" / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "images" / "cmyk.jpg").mode == "CMYK"
    result, _ = _run(tmp_path, [_row("cmyk.jpg", (20, 20, 60, 60), (200, 120), "a")], strategy="exact")
    crop = Image.open(tmp_path / "crops" / "cmyk.jpg___crop_a.jpg")
    assert result["crop_ok"].all() and crop.mode == "RGB"
    assert _close(_mean(crop), RED, tol=20)


def test_16bit_png_keeps_high_byte(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    array = np.full((100, 150), 1000, dtype=np.uint16)
    array[10:50, 20:80] = 60000
    Image.fromarray(array).save(tmp_path / "images" / "deep.png")
    assert Image.open(tmp_path / "images" / "deep.png").mode.startswith("I")
    result, _ = _run(tmp_path, [_row("deep.png", (20, 10, 60, 40), (150, 100), "a")], strategy="exact")
    crop = Image.open(tmp_path / "crops" / "deep.png___crop_a.jpg")
    assert result["crop_ok"].all()
    assert _close(_mean(crop), (60000 >> 8,) * 3, tol=4)


def test_palette_png(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    _scene((120, 80), (10, 10, 50, 40)).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "images" / "p.png")
    result, _ = _run(tmp_path, [_row("p.png", (10, 10, 50, 40), (120, 80), "a")], strategy="exact")
    assert result["crop_ok"].all()
    assert _close(_mean(Image.open(tmp_path / "crops" / "p.png___crop_a.jpg")), RED, tol=15)


def test_rgba_png_is_composited_on_black(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    image = Image.new("RGBA", (100, 100), (255, 255, 255, 0))  # fully transparent white
    image.paste(Image.new("RGBA", (40, 40), (*RED, 255)), (0, 0))
    image.save(tmp_path / "images" / "alpha.png")
    _run(tmp_path, [_row("alpha.png", (0, 0, 80, 40), (100, 100), "a")], strategy="exact")
    crop = np.asarray(Image.open(tmp_path / "crops" / "alpha.png___crop_a.jpg"), dtype=float)
    assert _close(crop[5:35, 5:35].reshape(-1, 3).mean(axis=0), RED, tol=15)
    assert crop[5:35, 45:75].max() < 20  # transparent part is black, not white


def _rotated_jpeg(path: Path, displayed: Image.Image, orientation: int = 6) -> None:
    """Store ``displayed`` so that applying EXIF ``orientation`` gives it back."""
    inverse = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270, 3: Image.Transpose.ROTATE_180}
    raw = displayed.transpose(inverse[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    raw.save(path, quality=95, exif=exif)


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_exif_rotated_jpeg_crops_the_displayed_region(tmp_path: Path, orientation: int) -> None:
    (tmp_path / "images").mkdir()
    box = (180, 30, 60, 50)
    _rotated_jpeg(tmp_path / "images" / "rot.jpg", _scene((300, 200), box), orientation)
    assert image_display_size(tmp_path / "images" / "rot.jpg") == (300, 200)
    result, _ = _run(tmp_path, [_row("rot.jpg", box, (300, 200), "a")], strategy="exact")
    crop = Image.open(tmp_path / "crops" / "rot.jpg___crop_a.jpg")
    assert result["crop_ok"].all() and crop.size == (60, 50)
    assert _close(_mean(crop), RED, tol=15)


def test_draft_decoding_with_exif_rotation_and_max_size(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    box = (700, 200, 800, 800)
    _rotated_jpeg(tmp_path / "images" / "big.jpg", _scene((1600, 1200), box), 6)
    reductions: list[int] = []
    decoded = decode_image(
        tmp_path / "images" / "big.jpg",
        lambda size: reductions.append(4) or 4,  # type: ignore[func-returns-value]
    )
    assert decoded.full_size == (1600, 1200) and decoded.image.size == (400, 300)
    result, _ = _run(tmp_path, [_row("big.jpg", box, (1600, 1200), "a")], strategy="square", max_size=200)
    crop = Image.open(tmp_path / "crops" / "big.jpg___crop_a.jpg")
    assert result["crop_ok"].all() and crop.size == (200, 200)
    assert _close(_mean(crop), RED, tol=15)


def test_max_size_keeps_aspect_and_never_enlarges(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    _scene((1000, 800), (100, 100, 500, 250)).save(tmp_path / "images" / "a.jpg", quality=95)
    rows = [_row("a.jpg", (100, 100, 500, 250), (1000, 800), "big"), _row("a.jpg", (10, 10, 30, 20), (1000, 800), "s")]
    _run(tmp_path, rows, strategy="exact", max_size=100)
    assert Image.open(tmp_path / "crops" / "a.jpg___crop_big.jpg").size == (100, 50)
    assert Image.open(tmp_path / "crops" / "a.jpg___crop_s.jpg").size == (30, 20)


def test_square_crop_at_edge_is_not_padded_and_large_box_is(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    Image.new("RGB", (100, 60), RED).save(tmp_path / "images" / "a.png")
    rows = [_row("a.png", (90, 20, 10, 30), (100, 60), "edge"), _row("a.png", (0, 0, 100, 60), (100, 60), "all")]
    _run(tmp_path, rows, strategy="square")
    edge = np.asarray(Image.open(tmp_path / "crops" / "a.png___crop_edge.jpg"), dtype=float)
    assert edge.shape == (30, 30, 3) and edge.min(axis=(0, 1))[0] > 150  # all red: shifted inward, no black band
    whole = np.asarray(Image.open(tmp_path / "crops" / "a.png___crop_all.jpg"), dtype=float)
    assert whole.shape == (100, 100, 3)
    assert whole[:15].max() < 25 and whole[-15:].max() < 25  # 20 black rows above and below
    assert _close(whole[25:75].reshape(-1, 3).mean(axis=0), RED, tol=15)


def test_crop_image_on_a_pil_image_matches_the_stage(tmp_path: Path) -> None:
    image = _scene((300, 200), (40, 50, 80, 40))
    crop = crop_image(image, (40, 50, 80, 40), "pad", None)
    assert crop.mode == "RGB" and crop.size == (80, 80)
    arr = np.asarray(crop, dtype=float)
    assert arr[:15].max() < 1 and _close(arr[25:55].reshape(-1, 3).mean(axis=0), RED, tol=1)
    assert crop_image(image, (40, 50, 80, 40), "square", 40).size == (40, 40)
    assert to_rgb(Image.new("LA", (4, 4), (200, 0))).getpixel((0, 0)) == (0, 0, 0)


@pytest.mark.parametrize(
    ("content", "kind"),
    [(None, "missing_image"), (b"this is not an image", "not_an_image"), ("truncated", "truncated_image")],
)
def test_bad_image_files_are_reported_and_other_images_still_cropped(
    tmp_path: Path, content: bytes | str | None, kind: str
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    _scene((400, 300), (10, 10, 50, 50)).save(images / "good.jpg", quality=90)
    if content == "truncated":
        data = (images / "good.jpg").read_bytes()
        (images / "bad.jpg").write_bytes(data[: len(data) * 6 // 10])
    elif isinstance(content, bytes):
        (images / "bad.jpg").write_bytes(content)
    rows = [_row("bad.jpg", (10, 10, 50, 50), (400, 300), "x"), _row("good.jpg", (10, 10, 50, 50), (400, 300), "y")]
    result, report = _run(tmp_path, rows)
    assert result["crop_ok"].tolist() == [False, True]
    [issue] = report.issues_of("crops")
    assert issue.kind == kind and issue.record == "bad.jpg___crop_x.jpg" and issue.file.endswith("bad.jpg")
    assert not (tmp_path / "crops" / "bad.jpg___crop_x.jpg").exists()
    assert report.counts["crops"]["failed"] == 1 and report.counts["crops"]["written"] == 1


def test_truncated_jpeg_is_refused_by_decoder(tmp_path: Path) -> None:
    path = tmp_path / "t.jpg"
    _scene((400, 300), (10, 10, 50, 50)).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:-400])
    with pytest.raises(ImageLoadError) as err:
        load_image(path)
    assert err.value.kind == "truncated_image"


def test_decompression_bomb_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "images").mkdir()
    _scene((100, 100), (10, 10, 20, 20)).save(tmp_path / "images" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # 10,000 px: over the limit, under twice the limit
    result, report = _run(tmp_path, [_row("bomb.png", (10, 10, 20, 20), (100, 100), "a")])
    assert not result["crop_ok"].any()
    assert [i.kind for i in report.issues_of("crops")] == ["decompression_bomb"]


def test_degenerate_and_unsafe_boxes_are_reported(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    _scene((100, 100), (10, 10, 20, 20)).save(tmp_path / "images" / "a.jpg")
    rows = [
        _row("a.jpg", (10, 10, 0.2, 20), (100, 100), "thin"),
        _row("a.jpg", (10, 10, 20, 20), (100, 100), "ok"),
        {**_row("a.jpg", (10, 10, 20, 20), (100, 100), "x"), "crop_path": "../escape.jpg"},
        {**_row("../up.jpg", (10, 10, 20, 20), (100, 100), "y")},
    ]
    result, report = _run(tmp_path, rows)
    assert result["crop_ok"].tolist() == [False, True, False, False]
    kinds = sorted(i.kind for i in report.issues_of("crops"))
    assert kinds == ["degenerate_box", "unsafe_path", "unsafe_path"]
    assert not (tmp_path / "escape.jpg").exists()


def test_recorded_size_mismatch_rescales_boxes(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    # The CCT file says 400x300 but the file on disk is a half-size copy.
    _scene((200, 150), (50, 25, 40, 40)).save(tmp_path / "images" / "small.png")
    result, report = _run(tmp_path, [_row("small.png", (100, 50, 80, 80), (400, 300), "a")], strategy="exact")
    crop = Image.open(tmp_path / "crops" / "small.png___crop_a.jpg")
    assert result["crop_ok"].all() and crop.size == (40, 40)
    assert _close(_mean(crop), RED, tol=15)
    assert [i.kind for i in report.issues_of("crops")] == ["image_size_mismatch"]


def test_second_run_does_no_work_and_corrupt_crop_is_redone(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    rows = []
    for i in range(3):
        _scene((300, 200), (20 * i, 10, 60, 60)).save(tmp_path / "images" / f"{i}.jpg")
        rows += [
            _row(f"{i}.jpg", (20 * i, 10, 60, 60), (300, 200), "a"),
            _row(f"{i}.jpg", (5, 5, 30, 90), (300, 200), "b"),
        ]
    _, first = _run(tmp_path, rows)
    assert first.counts["crops"]["written"] == 6
    crop = tmp_path / "crops" / "1.jpg___crop_b.jpg"
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "crops").iterdir()}

    result, second = _run(tmp_path, rows)
    assert result["crop_ok"].all()
    assert second.counts["crops"]["skipped"] == 6 and second.counts["crops"]["written"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "crops").iterdir()} == before

    crop.write_bytes(crop.read_bytes()[:200])  # damaged after it was written
    (tmp_path / "crops" / ".0.jpg___crop_a.jpg.tmp-zz").write_bytes(b"left by a killed run")
    result, third = _run(tmp_path, rows)
    assert result["crop_ok"].all()
    assert third.counts["crops"] == {
        "stale_temporaries_removed": 1,
        "written": 0,
        "redone": 1,
        "skipped": 5,
        "failed": 0,
    }
    assert crop_is_valid(crop, (90, 90))
    assert sorted(p.name for p in (tmp_path / "crops").iterdir() if p.name.startswith(".")) == []


def test_changed_max_size_redoes_crops(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    _scene((600, 400), (100, 100, 300, 200)).save(tmp_path / "images" / "a.jpg")
    rows = [_row("a.jpg", (100, 100, 300, 200), (600, 400), "a")]
    _run(tmp_path, rows)
    _, report = _run(tmp_path, rows, max_size=100)
    assert report.counts["crops"]["redone"] == 1
    assert Image.open(tmp_path / "crops" / "a.jpg___crop_a.jpg").size == (100, 100)


def test_process_pool_gives_the_same_crops_as_one_process(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    rows = []
    rng = np.random.default_rng(3)
    for i in range(12):
        array = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
        Image.fromarray(array).save(tmp_path / "images" / f"{i:02d} é.jpg", quality=90)
        rows.append(_row(f"{i:02d} é.jpg", (10 + i, 20, 100, 60), (320, 240), "a"))
        rows.append(_row(f"{i:02d} é.jpg", (200, 100, 120, 140), (320, 240), "b"))
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "images").symlink_to(tmp_path / "images")
    one, _ = _run(tmp_path / "one", rows)
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "images").symlink_to(tmp_path / "images")
    two, report = _run(tmp_path / "two", rows, workers=2)
    assert one["crop_ok"].all() and two["crop_ok"].all()
    assert report.counts["crops"]["written"] == 24
    for row in rows:
        name = str(row["crop_path"])
        assert (tmp_path / "one" / "crops" / name).read_bytes() == (tmp_path / "two" / "crops" / name).read_bytes()


def test_a_dying_worker_costs_only_its_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import multiprocessing
    import os

    import animl_lightning.prepare.crop_stage as crops
    import animl_lightning.prepare.crop_workers as workers

    (tmp_path / "images").mkdir()
    rows = []
    for i in range(6):
        _scene((120, 90), (10, 10, 40, 40)).save(tmp_path / "images" / f"{i}.jpg")
        rows.append(_row(f"{i}.jpg", (10, 10, 40, 40), (120, 90), "a"))
    real = workers.crop_one_image

    def crashing(job: workers.ImageJob, *args: object) -> list[workers.Outcome]:
        if job.file_name == "3.jpg":
            os._exit(3)  # what a segfaulting decoder or the OOM killer looks like from the pool
        return real(job, *args)  # type: ignore[arg-type]

    # fork, so that the children run the patched function
    monkeypatch.setattr(workers, "crop_one_image", crashing)
    monkeypatch.setattr(crops, "_pool_context", lambda: multiprocessing.get_context("fork"))
    result, report = _run(tmp_path, rows, workers=2)
    assert result["crop_ok"].tolist() == [True, True, True, False, True, True]
    [issue] = report.issues_of("crops")
    assert issue.kind == "worker_crashed" and issue.record == "3.jpg___crop_a.jpg"


# --- fast (simplejpeg) decode path against PIL's -------------------------------------------------------------------


def _textured(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Smooth colour gradients plus blocks: survives JPEG well, so pixel tolerances can be tight."""
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width].astype(float)
    rgb = np.stack([xx / width * 200 + 30, yy / height * 200 + 30, (xx + yy) / (width + height) * 150 + 50], axis=-1)
    rng = np.random.default_rng(seed)
    for _ in range(6):
        x, y = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        rgb[y : y + 20, x : x + 20] = rng.integers(0, 255, 3)
    return Image.fromarray(rgb.astype(np.uint8))


def _pil_decode(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        image.load()
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def _exif_jpeg(path: Path, raw: Image.Image, orientation: int, **save: object) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    raw.save(path, exif=exif, **save)  # type: ignore[arg-type]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_view_matches_pil_exif_transpose(orientation: int) -> None:
    raw = np.random.default_rng(orientation).integers(0, 255, (5, 7, 4), dtype=np.uint8)
    raw[..., 3] = 255
    image = Image.fromarray(raw[..., :3])
    image.getexif()[0x0112] = orientation
    expected = np.asarray(ImageOps.exif_transpose(image))
    assert np.array_equal(orient(raw, orientation)[..., :3], expected)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_fast_decode_of_rotated_jpeg_equals_pil_and_crops_the_same_region(tmp_path: Path, orientation: int) -> None:
    (tmp_path / "images").mkdir()
    path = tmp_path / "images" / "r.jpg"
    _exif_jpeg(path, _textured((320, 240)), orientation, quality=95)
    decoded = decode_image(path)
    expected = _pil_decode(path)
    assert decoded.decoder == "simplejpeg" and decoded.full_size == expected.shape[1::-1]
    assert np.array_equal(decoded.pixels[..., :3], expected)  # same libjpeg-turbo settings: identical pixels
    width, height = decoded.full_size
    box = (width * 0.55, height * 0.1, width * 0.3, height * 0.5)  # off-centre, square crop shifted at an edge
    rows = [_row("r.jpg", box, (width, height), "a"), _row("r.jpg", box, (width, height), "b")]
    rows[1]["crop_path"] = "capped/r.jpg"
    for row, max_size in ((rows[0], None), (rows[1], 50)):
        result, _ = _run(tmp_path, [row], strategy="square", max_size=max_size)
        assert result["crop_ok"].all()
        saved = np.asarray(Image.open(tmp_path / "crops" / str(row["crop_path"])), dtype=float)
        reference = np.asarray(crop_image(Image.fromarray(expected), box, "square", max_size), dtype=float)
        shifted = (box[0] - width * 0.1, *box[1:])
        elsewhere = np.asarray(crop_image(Image.fromarray(expected), shifted, "square", max_size), dtype=float)
        assert saved.shape == reference.shape
        # Only the JPEG encoding of the crop differs; a crop 10% to the left is well off (6-12 on these images).
        assert np.abs(saved - reference).mean() < 3 and np.abs(saved - elsewhere).mean() > 5


def test_dct_scaled_fast_decode_equals_pil_draft(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    _textured((803, 601)).save(path, quality=90)  # odd sizes: libjpeg rounds the scaled size up
    decoded = decode_image(path, lambda size: 4)
    with Image.open(path) as image:
        image.draft("RGB", (200, 150))  # PIL's way of asking for 1/4: at least 803 // 200 = 601 // 150 = 4
        image.load()
        expected = np.asarray(image.convert("RGB"))
    assert decoded.decoder == "simplejpeg" and decoded.size == (201, 151) and decoded.full_size == (803, 601)
    assert np.array_equal(decoded.pixels[..., :3], expected)


def test_grayscale_jpeg_takes_the_fast_path_as_rgb(tmp_path: Path) -> None:
    path = tmp_path / "g.jpg"
    _textured((64, 48)).convert("L").save(path, quality=90)
    decoded = decode_image(path)
    gray = np.asarray(Image.open(path))
    assert decoded.decoder == "simplejpeg"
    assert all(np.array_equal(decoded.pixels[..., c], gray) for c in range(3))


@pytest.mark.parametrize(
    ("name", "save"),
    [
        ("p.jpg", {"quality": 90, "progressive": True}),
        ("c.jpg", {"quality": 90}),  # CMYK
        ("a.png", {}),
    ],
)
def test_progressive_cmyk_and_png_fall_back_to_pil(tmp_path: Path, name: str, save: dict[str, object]) -> None:
    path = tmp_path / name
    image = _textured((96, 64))
    (image.convert("CMYK") if name == "c.jpg" else image).save(path, **save)  # type: ignore[arg-type]
    decoded = decode_image(path)
    assert decoded.decoder == "pil"
    assert np.array_equal(decoded.pixels[..., :3], np.asarray(load_image(path)))
    assert np.array_equal(np.asarray(load_image(path)), _pil_decode(path)) or name == "c.jpg"


def test_truncated_jpeg_is_refused_on_the_fast_path(tmp_path: Path) -> None:
    path = tmp_path / "t.jpg"
    _textured((400, 300)).save(path, quality=90)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 7 // 10])
    for reduction in (None, lambda size: 2):
        with pytest.raises(ImageLoadError) as err:
            decode_image(path, reduction)
        assert err.value.kind == "truncated_image"


def test_jpeg_with_damage_pil_tolerates_is_still_accepted(tmp_path: Path) -> None:
    # libjpeg-turbo (strict) refuses extraneous bytes before a marker; PIL has always accepted such files.
    path = tmp_path / "d.jpg"
    _textured((200, 150)).save(path, quality=90)
    data = bytearray(path.read_bytes())
    data[-2:-2] = b"\x00" * 16
    path.write_bytes(bytes(data))
    decoded = decode_image(path)
    assert decoded.decoder == "pil" and decoded.size == (200, 150)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 8),
    st.tuples(st.floats(0, 150), st.floats(0, 100), st.floats(2, 200), st.floats(2, 150)),
    st.sampled_from(["square", "pad", "exact"]),
    st.sampled_from([None, 8, 33, 64]),
    st.sampled_from([1, 2]),
)
def test_every_entry_renders_the_same_pixels(
    orientation: int, box: tuple[float, float, float, float], strategy: str, max_size: int | None, divisor: int
) -> None:
    raw = np.random.default_rng(orientation).integers(0, 255, (120, 160, 4), dtype=np.uint8)
    pixels = orient(raw, orientation) if orientation else raw
    rgb = Image.fromarray(np.ascontiguousarray(pixels[..., :3]))
    window = crop_window(box, rgb.size, strategy) if _valid(box, rgb.size) else None
    assume(window is not None)
    assert window is not None
    size = output_size(window, max_size)
    scale = (1.0 / divisor, 1.0 / divisor)
    # A stand-in for a DCT-scaled decode: the reduced pixels, as the crops stage and classify get them.
    contiguous = np.ascontiguousarray(pixels)
    small = pixels if divisor == 1 else np.asarray(Image.fromarray(contiguous, "RGBX").reduce(divisor))
    stage = render(small, window, size, scale)
    assert stage.shape == (size[1], size[0], 4)
    decoded = DecodedImage(small, rgb.size)
    assert np.array_equal(crop_decoded(decoded, box, CropRule(strategy, max_size)), stage)
    if divisor == 1:
        # The PIL entry (galleries, tests, notebooks) gives the same pixels as the array path.
        assert np.array_equal(np.asarray(crop_image(rgb, box, strategy, max_size)), stage[..., :3])


def _valid(box: tuple[float, float, float, float], size: tuple[int, int]) -> bool:
    try:
        crop_window(box, size, "exact")
    except ValueError:
        return False
    return True
