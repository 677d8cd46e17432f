"""Lossless crops (``crops.lossless``): MCU-grid geometry, cut pixels and quantization tables, every subsampling and
both partial-MCU edges, the fallbacks, and the same pixels in the crops stage and in the deployment path."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import simplejpeg
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import animl_lightning.core.imaging as imaging
from animl_lightning.core.crop_files import encode_crop
from animl_lightning.core.crop_rule import (
    CropRule,
    align_to_grid,
    crop_window,
    decode_scale,
    open_for_boxes,
    output_size,
    plan_window,
    render,
)
from animl_lightning.core.imaging import decode_image, lossless_grid, read_header
from animl_lightning.core.issues import PrepareReport
from animl_lightning.prepare.config import CropSettings
from animl_lightning.prepare.crop_stage import make_crops

pytest.importorskip("turbojpeg")
if imaging.turbojpeg() is None:
    pytest.skip("libturbojpeg is not installed (apt-get install libturbojpeg0)", allow_module_level=True)

# PIL's subsampling argument -> the MCU libjpeg uses.
SUBSAMPLINGS = {"444": (0, (8, 8)), "422": (1, (16, 8)), "420": (2, (16, 16))}
# Not multiples of 16: partial MCUs on the right and bottom edges.
SIZE = (203, 141)
# Boxes inside, touching the right edge, the bottom edge and the bottom-right corner (square strategy: unpadded).
BOXES = [(37.4, 21.2, 40.0, 30.0), (170.0, 50.0, 33.0, 20.0), (60.0, 120.0, 25.0, 21.0), (180.0, 125.0, 23.0, 16.0)]


def _photo(width: int = SIZE[0], height: int = SIZE[1], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    smooth = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], axis=-1)
    return np.clip(smooth + rng.normal(0, 25, smooth.shape), 0, 255).astype(np.uint8)


def _jpeg(path: Path, subsampling: int, **save: object) -> Path:
    Image.fromarray(_photo()).save(path, quality=88, subsampling=subsampling, **save)
    return path


def _rows(file_name: str, boxes: list[tuple[float, float, float, float]]) -> pd.DataFrame:
    frame = pd.DataFrame(
        [
            {"image_id": file_name, "file_name": file_name, "crop_path": f"{file_name}_{i}.jpg"}
            | dict(zip("xywh", box, strict=True))
            | {"width": SIZE[0], "height": SIZE[1]}
            for i, box in enumerate(boxes)
        ]
    )
    frame[["width", "height"]] = frame[["width", "height"]].astype("Int64")
    return frame


def _crops(tmp_path: Path, rows: pd.DataFrame, **settings: object) -> tuple[pd.DataFrame, PrepareReport]:
    report = PrepareReport()
    crop_settings = CropSettings(**{"workers": 1, "lossless": True, **settings})  # type: ignore[arg-type]
    return make_crops(rows, tmp_path / "images", tmp_path / "crops", crop_settings, report), report


# --- geometry ------------------------------------------------------------------------------------------------


@given(
    st.integers(1, 400),
    st.integers(1, 400),
    st.floats(0, 1),
    st.floats(0, 1),
    st.floats(0.01, 1),
    st.floats(0.01, 1),
    st.sampled_from([(8, 8), (16, 8), (16, 16), (8, 16), (32, 8)]),
    st.sampled_from(["square", "exact"]),
)
def test_aligned_window_is_on_the_grid_contains_the_box_and_grows_by_less_than_an_mcu(
    width: int, height: int, fx: float, fy: float, fw: float, fh: float, mcu: tuple[int, int], strategy: str
) -> None:
    box = (fx * width, fy * height, fw * width, fh * height)
    try:
        window = crop_window(box, (width, height), strategy)
    except ValueError:
        return
    planned = plan_window(box, (width, height), CropRule(strategy, lossless=True), mcu)
    if window.padded:
        assert planned == window
        return
    assert planned.left % mcu[0] == 0 and planned.top % mcu[1] == 0
    assert (planned.right, planned.bottom) == (window.right, window.bottom)
    assert 0 <= window.left - planned.left < mcu[0] and 0 <= window.top - planned.top < mcu[1]
    assert (planned.canvas_width, planned.canvas_height) == (planned.width, planned.height)
    assert not planned.padded
    assert plan_window(box, (width, height), CropRule(strategy), mcu) == window  # lossless=false: today's crop


def test_padded_window_is_not_aligned() -> None:
    window = crop_window((10, 10, 30, 10), (100, 100), "pad")
    assert window.padded
    with pytest.raises(ValueError, match="padded"):
        align_to_grid(window, (16, 16))
    assert plan_window((10, 10, 30, 10), (100, 100), CropRule("pad", lossless=True), (16, 16)) == window


def test_old_rules_load_as_not_lossless() -> None:
    assert CropRule.from_dict({"strategy": "square", "max_size": None}, "x") == CropRule("square", None, False)
    rule = CropRule("square", 300, True)
    assert CropRule.from_dict(rule.to_dict(), "x") == rule


# --- header --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SUBSAMPLINGS))
def test_mcu_is_read_from_the_header(tmp_path: Path, name: str) -> None:
    subsampling, mcu = SUBSAMPLINGS[name]
    header = read_header(_jpeg(tmp_path / "a.jpg", subsampling))
    assert (header.mcu, header.fallback, header.full_size) == (mcu, "", SIZE)


@pytest.mark.parametrize(
    ("save", "reason"),
    [
        ({"format": "JPEG", "progressive": True}, "progressive"),
        ({"format": "PNG"}, "not_jpeg"),
    ],
)
def test_unsupported_files_have_no_grid(tmp_path: Path, save: dict[str, object], reason: str) -> None:
    buffer = io.BytesIO()
    Image.fromarray(_photo()).save(buffer, **save)  # type: ignore[arg-type]
    assert lossless_grid(Image.open(buffer)) == (None, reason)
    cmyk = io.BytesIO()
    Image.fromarray(_photo()).convert("CMYK").save(cmyk, format="JPEG")
    assert lossless_grid(Image.open(cmyk)) == (None, "colour_mode")


# --- the crops stage -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SUBSAMPLINGS))
def test_lossless_crops_are_the_decoded_region_with_the_source_tables(tmp_path: Path, name: str) -> None:
    subsampling, mcu = SUBSAMPLINGS[name]
    (tmp_path / "images").mkdir()
    source = _jpeg(tmp_path / "images" / "a.jpg", subsampling)
    result, report = _crops(tmp_path, _rows("a.jpg", BOXES))
    assert result["crop_ok"].all()
    assert report.counts["crops"]["lossless"] == len(BOXES)
    with Image.open(source) as image:
        tables = image.quantization
        smooth = np.asarray(image.convert("RGB"), dtype=np.int16)
    fast = simplejpeg.decode_jpeg(source.read_bytes(), colorspace="RGB", fastupsample=True)
    for i, box in enumerate(BOXES):
        window = plan_window(box, SIZE, CropRule("square", lossless=True), mcu)
        assert window.left % mcu[0] == 0 and window.top % mcu[1] == 0
        crop_file = tmp_path / "crops" / f"a.jpg_{i}.jpg"
        with Image.open(crop_file) as crop:
            assert crop.size == (window.width, window.height)
            assert crop.quantization == tables  # no second generation: the source's coefficients and tables
            pixels = np.asarray(crop.convert("RGB"), dtype=np.int16)
        region = smooth[window.top : window.bottom, window.left : window.right]
        if name == "444":
            assert np.array_equal(pixels, region)
        else:
            # Smooth chroma upsampling sees no neighbours across the cut: only the outer one-pixel ring differs.
            assert np.array_equal(pixels[1:-1, 1:-1], region[1:-1, 1:-1])
        # With libjpeg-turbo's fast (replicating) upsampling every pixel is the same.
        cut_fast = simplejpeg.decode_jpeg(crop_file.read_bytes(), colorspace="RGB", fastupsample=True)
        assert np.array_equal(cut_fast, fast[window.top : window.bottom, window.left : window.right])
    assert window.right == SIZE[0] and window.bottom == SIZE[1]  # the last box reaches both partial-MCU edges


def test_capped_crops_are_cut_then_decoded_at_the_dct_scale(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    _jpeg(tmp_path / "images" / "a.jpg", 2)
    boxes = [(16.0, 16.0, 120.0, 100.0), (150.0, 100.0, 20.0, 20.0)]
    result, report = _crops(tmp_path, _rows("a.jpg", boxes), max_size=40)
    assert result["crop_ok"].all() and report.counts["crops"]["lossless"] == 2
    rule = CropRule("square", 40, True)
    source = open_for_boxes(tmp_path / "images" / "a.jpg", boxes, False, rule)
    assert source.decoded is None  # nothing decoded whole
    tables = Image.open(tmp_path / "images" / "a.jpg").quantization
    for i, box in enumerate(boxes):
        window = plan_window(box, SIZE, rule, (16, 16))
        crop_file = tmp_path / "crops" / f"a.jpg_{i}.jpg"
        with Image.open(crop_file) as crop:
            assert crop.size == output_size(window, 40)
            kept = crop.quantization == tables
        if i == 0:  # shrunk to 40 px: decoded at 1/2 scale, shrunk, encoded at crops.quality
            assert not kept and (window.width, window.height) == (120, 126)  # the square grew up onto the grid
            # The stage encoded exactly what the deployment path renders.
            assert crop_file.read_bytes() == encode_crop(source.crop(box), 90)
        else:  # 26x24 is under the cap: the cut itself
            assert kept and (window.width, window.height) == (26, 24)
            assert np.array_equal(np.asarray(Image.open(crop_file).convert("RGB")), source.crop(box)[..., :3])


@pytest.mark.parametrize(
    ("save", "reason"),
    [
        ({"format": "JPEG", "progressive": True, "quality": 90}, "progressive"),
        ({"format": "PNG"}, "not_jpeg"),
        ({"format": "JPEG", "quality": 90, "cmyk": True}, "colour_mode"),
    ],
)
def test_unsupported_files_fall_back_to_decode_and_encode(tmp_path: Path, save: dict[str, object], reason: str) -> None:
    (tmp_path / "images").mkdir()
    image = Image.fromarray(_photo())
    if save.pop("cmyk", False):
        image = image.convert("CMYK")
    image.save(tmp_path / "images" / "a.img", **save)  # type: ignore[arg-type]
    result, report = _crops(tmp_path, _rows("a.img", BOXES[:2]))
    assert result["crop_ok"].all()
    assert report.counts["crops"][f"lossless_fallback_{reason}"] == 2
    assert "lossless" not in report.counts["crops"]
    # Today's crop: the strategy's square, not grown onto a grid.
    window = crop_window(BOXES[0], SIZE, "square")
    assert Image.open(tmp_path / "crops" / "a.img_0.jpg").size == (window.width, window.height)


def test_padded_crops_fall_back_and_are_counted(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    _jpeg(tmp_path / "images" / "a.jpg", 2)
    wide = (10.0, 40.0, 160.0, 50.0)  # its square (160 px) is higher than the photo (141 px): padded
    result, report = _crops(tmp_path, _rows("a.jpg", [wide, BOXES[0]]))
    assert result["crop_ok"].all()
    assert report.counts["crops"]["lossless_fallback_padded"] == 1
    assert report.counts["crops"]["lossless"] == 1
    with Image.open(tmp_path / "crops" / "a.jpg_0.jpg") as crop:
        assert crop.size == (160, 160)


def test_missing_library_falls_back_says_so_once_and_keeps_the_geometry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import turbojpeg

    def missing(_path: str) -> object:
        raise OSError("libturbojpeg.so.0: cannot open shared object file: No such file or directory")

    (tmp_path / "images").mkdir()
    for name in ("a.jpg", "b.jpg"):
        _jpeg(tmp_path / "images" / name, 1)
    rows = pd.concat([_rows("a.jpg", BOXES[:2]), _rows("b.jpg", BOXES[2:])], ignore_index=True)
    imaging.turbojpeg.cache_clear()
    monkeypatch.setattr(turbojpeg.cdll, "LoadLibrary", missing)
    try:
        with caplog.at_level(logging.WARNING):
            result, report = _crops(tmp_path, rows)
    finally:
        monkeypatch.undo()
        imaging.turbojpeg.cache_clear()
    assert result["crop_ok"].all()
    assert report.counts["crops"]["lossless_fallback_library_missing"] == 4
    assert sum("libturbojpeg cannot be loaded" in r.message for r in caplog.records) == 1
    window = plan_window(BOXES[0], SIZE, CropRule("square", lossless=True), (16, 8))
    assert Image.open(tmp_path / "crops" / "a.jpg_0.jpg").size == (window.width, window.height)


def test_a_file_libjpeg_turbo_rejects_is_reported_like_a_damaged_image(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    data = _jpeg(tmp_path / "a.jpg", 2).read_bytes()
    (tmp_path / "images" / "a.jpg").write_bytes(data[: len(data) // 2])
    result, report = _crops(tmp_path, _rows("a.jpg", BOXES[:1]))
    assert not result["crop_ok"].any()
    assert report.counts["crops"]["failed"] == 1
    assert [i.kind for i in report.issues] == ["truncated_image"]
    assert not list((tmp_path / "crops").glob("*.jpg"))


def test_lossless_false_writes_todays_crops(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    source = _jpeg(tmp_path / "images" / "a.jpg", 1)
    for max_size in (None, 30):
        out = tmp_path / f"crops_{max_size}"
        report = PrepareReport()
        settings = CropSettings(workers=1, lossless=False, max_size=max_size)
        make_crops(_rows("a.jpg", BOXES), tmp_path / "images", out, settings, report)
        assert not any(k.startswith("lossless") for k in report.counts["crops"])
        for i, box in enumerate(BOXES):
            window = crop_window(box, SIZE, "square")
            size = output_size(window, max_size)
            # Today's code: one decode (at the DCT scale all the image's crops allow), render, encode.
            decoded = decode_image(source, lambda _s, m=max_size: decode_scale(SIZE, BOXES, CropRule("square", m)))
            expected = encode_crop(render(decoded.pixels, window, size, decoded.scale), 90)
            assert (out / f"a.jpg_{i}.jpg").read_bytes() == expected


# --- the deployment path -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*SUBSAMPLINGS, "gray"])
def test_deployment_pixels_are_the_training_crops_pixels(tmp_path: Path, name: str) -> None:
    (tmp_path / "images").mkdir()
    path = tmp_path / "images" / "a.jpg"
    if name == "gray":
        Image.fromarray(_photo()).convert("L").save(path, quality=88)
    else:
        _jpeg(path, SUBSAMPLINGS[name][0])
    boxes = [*BOXES, (0.0, 0.0, 203.0, 141.0)]  # the last one is padded (square wider than the photo is high)
    result, report = _crops(tmp_path, _rows("a.jpg", boxes))
    assert result["crop_ok"].all() and report.counts["crops"]["lossless"] == len(BOXES)
    normalized = [(x / SIZE[0], y / SIZE[1], w / SIZE[0], h / SIZE[1]) for x, y, w, h in boxes]
    source = open_for_boxes(path, normalized, True, CropRule("square", lossless=True), data=path.read_bytes())
    for i, box in enumerate(normalized[: len(BOXES)]):
        # What training reads (the datamodule opens the crop with PIL) is what classify/the servers crop.
        with Image.open(tmp_path / "crops" / f"a.jpg_{i}.jpg") as crop:
            trained = np.asarray(crop.convert("RGB"))
        pixel_box = (box[0] * SIZE[0], box[1] * SIZE[1], box[2] * SIZE[0], box[3] * SIZE[1])
        assert np.array_equal(source.crop(pixel_box)[..., :3], trained)
    assert source.decoded is not None  # the padded box is decoded as before


@pytest.mark.parametrize("name", list(SUBSAMPLINGS))
def test_classify_and_the_servers_feed_the_model_the_training_crops(tmp_path: Path, name: str) -> None:
    from animl_lightning.core.preprocessing import EvalTransform
    from animl_lightning.core.serving import AnimlRequest, request_probabilities
    from animl_lightning.deploy.inference import CropRequests, DetectionCrops

    (tmp_path / "images").mkdir()
    path = _jpeg(tmp_path / "images" / "a.jpg", SUBSAMPLINGS[name][0])
    rule = CropRule("square", None, True)
    _crops(tmp_path, _rows("a.jpg", BOXES))
    transform = EvalTransform((3, 32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bicubic", 0.9)
    normalized = [(x / SIZE[0], y / SIZE[1], w / SIZE[0], h / SIZE[1]) for x, y, w, h in BOXES]
    by_classify = DetectionCrops(CropRequests.build([(str(path), b, True) for b in normalized]), transform, rule)
    for i, box in enumerate(normalized):
        with Image.open(tmp_path / "crops" / f"a.jpg_{i}.jpg") as crop:
            trained = transform(crop.convert("RGB"))  # the datamodule's eval path
        served = request_probabilities(  # the ONNX server's and the TorchServe handler's path; predict = identity
            AnimlRequest(path.read_bytes(), box), lambda x: x.reshape(1, -1), transform, rule
        )
        classified, _, error = by_classify[i]
        assert error == ""
        assert np.abs(served - trained.ravel()).max() <= 1e-6
        assert np.abs(classified - trained).max() <= 1e-6
