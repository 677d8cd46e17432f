"""The generated demo project: Animl-shaped CCT, boxes inside images, species spread, real JPEGs, idempotence."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from animl_lightning.core.files import safe_relative
from animl_lightning.prepare.config import DemoSettings
from animl_lightning.prepare.demo import MARKER_FILENAME, SPECIES, generate_demo_project

SMALL = DemoSettings(seed=3, locations=6, images_per_location=12, width=320, height=240)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("demo")
    coco_file, images_dir = generate_demo_project(root, SMALL)
    return coco_file, images_dir, json.loads(coco_file.read_text(encoding="utf-8"))


def test_cct_has_animl_shape(demo: tuple[Path, Path, dict[str, Any]]) -> None:
    _, _, cct = demo
    assert set(cct) == {"info", "images", "categories", "annotations"}
    assert cct["info"]["version"] == "1.0"
    assert cct["categories"][0] == {"id": 0, "name": "empty"}
    names = [c["name"] for c in cct["categories"]]
    assert set(SPECIES) <= set(names)
    assert [c["id"] for c in cct["categories"]] == list(range(len(names)))
    assert len(cct["images"]) == SMALL.locations * SMALL.images_per_location
    ids = [img["id"] for img in cct["images"]]
    assert len(set(ids)) == len(ids)
    for img in cct["images"]:
        project, _ = img["id"].split(":")
        parts = img["file_name"].split("/")
        assert len(parts) == 4 and parts[0] == project
        assert parts[3] == img["id"].replace(":", "-", 1) + ".jpg"
        assert parts[2] == img["location"].lower().replace(" ", "_")
        safe_relative(img["file_name"])
        assert img["serving_bucket_key"] == f"original/{img['id']}-original.jpg"
        assert (img["width"], img["height"]) == (SMALL.width, SMALL.height)
        assert img["datetime"][:2] == "20" and "T" in img["datetime"]
    assert len({img["location"] for img in cct["images"]}) == SMALL.locations


def test_boxes_are_integer_and_inside_images(demo: tuple[Path, Path, dict[str, Any]]) -> None:
    _, _, cct = demo
    images = {img["id"]: img for img in cct["images"]}
    assert {a["image_id"] for a in cct["annotations"]} <= set(images)
    for ann in cct["annotations"]:
        x, y, w, h = ann["bbox"]
        assert all(isinstance(v, int) for v in ann["bbox"])
        img = images[ann["image_id"]]
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= img["width"] and y + h <= img["height"]
    per_image = defaultdict(list)
    for ann in cct["annotations"]:
        per_image[ann["image_id"]].append(ann["category_id"])
    assert any(cats == [0] for cats in per_image.values())  # empty frames
    assert any(len(cats) == 2 for cats in per_image.values())  # two animals
    assert len(per_image) == len(images)


def test_every_species_at_four_locations(demo: tuple[Path, Path, dict[str, Any]]) -> None:
    _, _, cct = demo
    location = {img["id"]: img["location"] for img in cct["images"]}
    name = {c["id"]: c["name"] for c in cct["categories"]}
    where = defaultdict(set)
    for ann in cct["annotations"]:
        where[name[ann["category_id"]]].add(location[ann["image_id"]])
    for species in SPECIES:
        assert len(where[species]) >= 4, (species, where[species])


def test_images_are_real_jpegs_with_day_and_night(demo: tuple[Path, Path, dict[str, Any]]) -> None:
    _, images_dir, cct = demo
    grey = 0
    for img in cct["images"]:
        path = images_dir / img["file_name"]
        with Image.open(path) as im:
            assert im.format == "JPEG"
            assert im.size == (img["width"], img["height"])
            pixels = np.asarray(im.convert("RGB"), dtype=np.int16)
        spread = np.abs(pixels[..., 0] - pixels[..., 2]).mean()
        grey += spread < 3
    assert 0 < grey < len(cct["images"])  # night frames are grey, day frames are not


def test_animals_differ_in_colour(demo: tuple[Path, Path, dict[str, Any]]) -> None:
    _, images_dir, cct = demo
    images = {img["id"]: img for img in cct["images"]}
    name = {c["id"]: c["name"] for c in cct["categories"]}
    colours: dict[str, list[np.ndarray]] = defaultdict(list)
    for ann in cct["annotations"]:
        species = name[ann["category_id"]]
        if species == "empty":
            continue
        x, y, w, h = ann["bbox"]
        with Image.open(images_dir / images[ann["image_id"]]["file_name"]) as im:
            crop = np.asarray(im.convert("RGB").crop((x, y, x + w, y + h)), dtype=np.float32)
        if np.abs(crop[..., 0] - crop[..., 2]).mean() > 3:  # day frames only
            colours[species].append(crop.reshape(-1, 3).mean(axis=0))
    means = {s: np.mean(v, axis=0) for s, v in colours.items()}
    assert means["fox"][0] > means["fox"][2] + 20  # orange
    assert means["bird"][2] > means["bird"][0]  # blue
    assert means["skunk"].mean() < means["fox"].mean()  # dark


def test_idempotent_and_settings_sensitive(tmp_path: Path) -> None:
    settings = DemoSettings(seed=1, locations=3, images_per_location=4, width=96, height=64)
    coco_file, images_dir = generate_demo_project(tmp_path, settings)
    first = coco_file.read_bytes()
    mtime = coco_file.stat().st_mtime_ns
    assert json.loads((tmp_path / MARKER_FILENAME).read_text())["settings"]["seed"] == 1
    again = generate_demo_project(tmp_path, settings)
    assert again == (coco_file, images_dir)
    assert coco_file.stat().st_mtime_ns == mtime  # skipped
    # Deterministic: a fresh folder gives the same bytes.
    other, _ = generate_demo_project(tmp_path / "fresh", settings)
    assert other.read_bytes() == first
    # A deleted image or other settings regenerate.
    some_image = images_dir / json.loads(first)["images"][0]["file_name"]
    some_image.unlink()
    generate_demo_project(tmp_path, settings)
    assert some_image.is_file()
    generate_demo_project(tmp_path, DemoSettings(seed=2, locations=3, images_per_location=4, width=96, height=64))
    assert coco_file.read_bytes() != first
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_default_demo_size(tmp_path: Path) -> None:
    coco_file, _ = generate_demo_project(tmp_path, DemoSettings())
    assert len(json.loads(coco_file.read_text())["images"]) == 240
