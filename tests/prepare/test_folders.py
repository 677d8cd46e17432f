"""The folders source (``folders.root``): label-folder trees of real JPEGs through the whole of prepare."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from animl_lightning.core.cct import UNKNOWN_LOCATION
from animl_lightning.core.contract import CSV_FILENAME, SPLITS_FILENAME, load_prepared_dataset, read_splits
from animl_lightning.core.errors import ConfigError
from animl_lightning.core.issues import REPORT_FILENAME
from animl_lightning.prepare.config import SplitSettings
from animl_lightning.prepare.folders import (
    FOLDERS_CCT_FILENAME,
    FolderImage,
    ImageFacts,
    folders_cct,
    parse_exif_datetime,
    place_image,
    split_without_locations,
)
from animl_lightning.prepare.pipeline import PrepareSummary, format_summary, run_prepare
from tests.fixtures.hydra import prepare_settings

STATIONS = ("Forêt Nord", "North Gate", "Ridge", "Creek", "Meadow")
SPECIES = ("Red Fox", "Bobcat")


def _photo(path: Path, seed: int, when: str | None = None, size: tuple[int, int] = (64, 48)) -> Path:
    """A real JPEG of noise; ``when`` (EXIF ``YYYY:MM:DD HH:MM:SS``) is written as DateTimeOriginal."""
    pixels = np.random.default_rng(seed).integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    exif = Image.Exif()
    if when is not None:
        exif.get_ifd(0x8769)[36867] = when
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=85, exif=exif)
    return path


def _station_tree(root: Path) -> Path:
    """``Station/Species/img N.jpg``: every species at every station; the second image of each folder has no EXIF."""
    seed = 0
    for day, station in enumerate(STATIONS, start=1):
        for species in SPECIES:
            _photo(root / station / species / "img 1.jpg", seed, when=f"2023:05:{day:02d} 06:30:00")
            _photo(root / station / species / "img 2.jpg", seed + 1)
            seed += 2
    return root


def _species_tree(root: Path, species: tuple[str, ...] = SPECIES, per_species: int = 6) -> Path:
    """``Species/img N.jpg``; images an hour apart, except that each folder's first two form a 2-second burst.

    Each species has a day of its own: without locations, images of two folders seconds apart are one burst.
    """
    seed = 100
    for day, species_name in enumerate(species, start=1):
        for i in range(per_species):
            hour, second = (6, 2 * i) if i < 2 else (6 + i, 0)
            _photo(root / species_name / f"img {i}.jpg", seed, when=f"2023:06:{day:02d} {hour:02d}:00:{second:02d}")
            seed += 1
    return root


def _run(root: Path, out: Path, *overrides: str) -> PrepareSummary:
    return run_prepare(prepare_settings([f"folders.root={root}", f"output_dir={out}", "crops.workers=1", *overrides]))


def _report(out: Path) -> dict[str, Any]:
    report: dict[str, Any] = json.loads((out / REPORT_FILENAME).read_text(encoding="utf-8"))
    return report


def _issues(out: Path, kind: str) -> list[dict[str, Any]]:
    return [issue for issue in _report(out)["issues"] if issue["kind"] == kind]


def test_station_species_tree_gives_locations_labels_and_a_location_split(tmp_path: Path) -> None:
    root = _station_tree(tmp_path / "camtrap")
    out = tmp_path / "out"
    summary = _run(root, out, "folders.location_level=0")

    assert [s.name for s in summary.stages][:2] == ["folders", "ingest"]
    assert summary.dataset == "camtrap" and not summary.warnings
    cct = json.loads((out / FOLDERS_CCT_FILENAME).read_text(encoding="utf-8"))
    assert [c["name"] for c in cct["categories"]] == ["Bobcat", "Red Fox"]
    images = {image["file_name"]: image for image in cct["images"]}
    first = images["Forêt Nord/Red Fox/img 1.jpg"]
    assert first["location"] == "Forêt Nord"
    assert (first["width"], first["height"]) == (64, 48)
    assert first["datetime"] == "2023-05-01 06:30:00"
    assert "datetime" not in images["Forêt Nord/Red Fox/img 2.jpg"]
    assert all(a["bbox"] == [0, 0, 64, 48] for a in cct["annotations"])

    prepared = load_prepared_dataset(out)  # the usual contract checks: labels, splits, crop files
    frame = prepared.frame
    assert len(frame) == 2 * len(STATIONS) * len(SPECIES)
    assert set(frame["label"]) == set(SPECIES)
    assert set(frame["location"]) == set(STATIONS)
    assert (frame["location"] == frame["image_id"].str.split("/").str[0]).all()
    assert "split_group" not in frame.columns  # split by location
    splits = read_splits(out / SPLITS_FILENAME)
    assert {name for name, groups in splits.items() if groups} == {"train", "val", "test"}
    assert {location for groups in splits.values() for _, location in groups} == set(STATIONS)
    assert frame.groupby("location")["split"].nunique().max() == 1
    with Image.open(prepared.crops_dir / frame["path"].iloc[0]) as crop:
        assert crop.width == crop.height  # a whole-image box through crops.strategy=square
    assert _report(out)["counts"]["folders"]["with_datetime"] == len(STATIONS) * len(SPECIES)


def test_species_tree_falls_back_to_a_sequence_split_and_says_why(tmp_path: Path) -> None:
    root = _species_tree(tmp_path / "sorted")
    out = tmp_path / "out"
    summary = _run(root, out)

    assert any("folders.location_level is null" in w and "sequence" in w for w in summary.warnings)
    assert any("split.min_locs=3 is ignored" in w for w in summary.warnings)
    assert "WARNING: folders.location_level is null" in format_summary(summary)
    assert {i["field"] for i in _issues(out, "split_without_locations")} == {"folders.location_level"}

    frame = load_prepared_dataset(out).frame
    assert set(frame["label"]) == set(SPECIES)  # min_locs would have dropped both
    assert set(frame["location"]) == {UNKNOWN_LOCATION}
    assert (frame["split_group"] == frame["sequence"]).all()
    burst = frame.loc[frame["image_id"].isin(["Red Fox/img 0.jpg", "Red Fox/img 1.jpg"])]
    assert burst["sequence"].nunique() == 1 and burst["split"].nunique() == 1
    assert frame["sequence"].nunique() == 2 * (6 - 1)
    assert set(frame["split"]) == {"train", "val", "test"}


def test_a_chosen_unit_that_needs_no_location_is_kept() -> None:
    kept, warnings = split_without_locations(SplitSettings(group_by="location_time", time_block="30D", min_locs=None))
    assert kept.group_by == "location_time" and not warnings
    changed, warnings = split_without_locations(SplitSettings())
    assert (changed.group_by, changed.min_locs) == ("sequence", None) and len(warnings) == 2


def test_unicode_and_spaces_in_folder_names(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    # "Forêt" spelled decomposed (as macOS writes names) still gives the composed label.
    decomposed = "Fore\u0302t Nord"
    for i, station in enumerate((decomposed, "Zone B", "Zone C", "Zone D")):
        _photo(root / station / "Red Fox" / "img 1.jpg", i)
        _photo(root / station / "Écureuil roux" / "img 1.jpg", 10 + i)
    out = tmp_path / "out"
    _run(root, out, "folders.location_level=0")

    frame = pd.read_csv(out / CSV_FILENAME, dtype=str, keep_default_na=False)
    assert set(frame["label"]) == {"Red Fox", "Écureuil roux"}
    assert "Forêt Nord" in set(frame["location"])
    assert f"{decomposed}/Red Fox/img 1.jpg" in set(frame["image_id"])  # the file name stays as on disk
    assert (out / "crops" / decomposed / "Red Fox").is_dir()


def test_unusable_files_and_folders_are_counted_and_listed(tmp_path: Path) -> None:
    root = _species_tree(tmp_path / "sorted", per_species=5)
    (root / "Red Fox" / "notes.txt").write_text("field notes", encoding="utf-8")
    (root / "Bobcat" / "broken.jpg").write_bytes(b"\xff\xd8 this is no JPEG")
    whole = _photo(tmp_path / "whole.jpg", 7).read_bytes()
    (root / "Bobcat" / "truncated.JPG").write_bytes(whole[: len(whole) // 2])
    (root / "Badger" / "night").mkdir(parents=True)
    _photo(root / "loose.jpg", 8)
    (root / "Red Fox" / ".DS_Store").write_bytes(b"\x00")
    try:  # a name that is not UTF-8 (Linux file systems allow it; APFS does not)
        with open(os.fsencode(root / "Red Fox") + b"/bad \xff.jpg", "wb") as handle:
            handle.write(whole)
        undecodable = 1
    except OSError:
        undecodable = 0
    out = tmp_path / "out"
    _run(root, out)

    def listed(kind: str) -> list[tuple[str, str]]:
        return [(i["record"], i["field"]) for i in _issues(out, kind)]

    assert listed("non_image_file") == [("Red Fox/notes.txt", "file_name")]
    assert listed("not_an_image") == [("Bobcat/broken.jpg", "file_name")]
    assert listed("empty_folder") == [("Badger", "folder")]  # the topmost folder without images only
    assert listed("no_label_folder") == [("loose.jpg", "file_name")]
    assert _issues(out, "not_an_image")[0]["file"] == str(root / "Bobcat" / "broken.jpg")
    assert [i["record"] for i in _issues(out, "undecodable_name")] == ["'Red Fox/bad \\udcff.jpg'"] * undecodable
    # A header that reads but data that stop half-way: the crops stage refuses it, as for a CCT export.
    truncated = [i for i in _report(out)["issues"] if "truncated.JPG" in str(i["record"]) + str(i["file"])]
    assert truncated and truncated[0]["stage"] == "crops"
    counts = _report(out)["counts"]["folders"]
    assert counts["non_image_file"] == counts["empty_folder"] == counts["unreadable_images"] == 1
    assert counts["hidden_skipped"] == 1 and counts["images"] == 2 * 5 + 1
    frame = load_prepared_dataset(out).frame
    assert len(frame) == 2 * 5 and set(frame["label"]) == set(SPECIES)


def test_labels_map_and_exclude_apply_to_folder_names(tmp_path: Path) -> None:
    root = _species_tree(tmp_path / "sorted", species=("Red Fox", "Gray Fox", "Bobcat", "Empty"), per_species=5)
    _run(root, tmp_path / "default")
    assert set(load_prepared_dataset(tmp_path / "default").frame["label"]) == {"Red Fox", "Gray Fox", "Bobcat"}

    mapped = tmp_path / "mapped"
    _run(root, mapped, "+labels.map={Red Fox: fox, Gray Fox: fox}")
    frame = load_prepared_dataset(mapped).frame
    assert set(frame["label"]) == {"fox"} and set(frame["dataset_class"]) == {"Red Fox", "Gray Fox"}
    assert {i["record"] for i in _issues(mapped, "category_without_label")} == {"Bobcat", "Empty"}

    excluded = tmp_path / "excluded"
    _run(root, excluded, "labels.exclude=[empty, bobcat]")
    assert set(load_prepared_dataset(excluded).frame["label"]) == {"Red Fox", "Gray Fox"}


def test_symlinked_images_are_read(tmp_path: Path) -> None:
    store = tmp_path / "store"
    root = tmp_path / "links"
    try:
        for i, species in enumerate(SPECIES * 3):
            target = _photo(store / f"{i}.jpg", i, when=f"2023:07:0{i + 1} 12:00:00")
            (root / species).mkdir(parents=True, exist_ok=True)
            os.symlink(target, root / species / f"link {i}.jpg")
    except OSError as err:  # no symlink permission (Windows without developer mode)
        pytest.skip(f"cannot create symbolic links here: {err}")
    out = tmp_path / "out"
    _run(root, out)

    frame = load_prepared_dataset(out).frame
    assert sorted(frame["image_id"]) == sorted(f"{s}/link {i}.jpg" for i, s in enumerate(SPECIES * 3))
    assert set(frame["datetime"]) == {f"2023-07-0{i + 1} 12:00:00" for i in range(6)}


def test_rerun_reads_no_header_and_skips_the_finished_stages(tmp_path: Path) -> None:
    root = _species_tree(tmp_path / "sorted", per_species=5)
    out = root / "_prepared"  # inside the tree: never read back as photos
    _run(root, out)
    first = (out / CSV_FILENAME).read_bytes()

    again = _run(root, out)
    status = {s.name: s.status for s in again.stages}
    assert status["folders"].startswith("skipped") and status["crops"].startswith("skipped")
    assert status["splits"].startswith("skipped")
    assert (out / CSV_FILENAME).read_bytes() == first
    assert _report(out)["counts"]["folders"]["headers_read"] == 0

    _photo(root / "Bobcat" / "img 9.jpg", 99, when="2023:06:02 12:00:00")
    grown = _run(root, out)
    assert {s.name: s.status for s in grown.stages}["folders"] == "ran"
    assert _report(out)["counts"]["folders"]["headers_read"] == 1
    assert len(load_prepared_dataset(out).frame) == 2 * 5 + 1


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["coco_file={cct}"], "folders.root"),
        (["images_dir={root}"], "images_dir"),
        (["s3.bucket=animl-images-serving-prod"], "s3.bucket"),
        (["output_dir={root}"], "output_dir"),
        (["folders.location_level=-1"], "folders.location_level"),
        (["folders.root={root}/absent"], "folders.root"),
    ],
)
def test_conflicting_or_bad_folder_settings_are_refused(tmp_path: Path, overrides: list[str], key: str) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    cct = tmp_path / "export.json"
    cct.write_text("{}", encoding="utf-8")
    filled = [o.format(root=root, cct=cct) for o in overrides]
    with pytest.raises(ConfigError, match="^" + re.escape(f"{key}: ")):
        prepare_settings([f"folders.root={root}", f"output_dir={tmp_path / 'out'}", *filled])


def test_a_level_without_a_root_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"folders\.location_level: is only used with folders\.root"):
        prepare_settings(["folders.location_level=0"])


def test_a_tree_without_usable_images_is_one_line_error(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "Red Fox").mkdir(parents=True)
    (root / "Red Fox" / "readme.txt").write_text("no photos yet", encoding="utf-8")
    with pytest.raises(Exception, match=r"folders\.root: no usable image under .*1 non_image_file") as caught:
        _run(root, tmp_path / "out")
    assert "\n" not in str(caught.value)


def test_places_in_the_layout() -> None:
    assert place_image(("Red Fox",), None) == ("Red Fox", UNKNOWN_LOCATION)
    assert place_image(("Site A", "Cam 1", "Red Fox"), 1) == ("Red Fox", "Site A/Cam 1")
    assert place_image(("Site A", "Red Fox"), 0) == ("Red Fox", "Site A")
    assert "needs a location folder" in str(place_image(("Red Fox",), 0))
    assert "directly in folders.root" in str(place_image((), None))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2023:05:01 06:30:00", "2023-05-01 06:30:00"),
        (b"2023:05:01 06:30:00\x00", "2023-05-01 06:30:00"),
        ("0000:00:00 00:00:00", None),
        ("    :  :     :  :  ", None),
        ("2023:13:01 06:30:00", None),
        (None, None),
    ],
)
def test_exif_datetimes_become_cct_datetimes(value: object, expected: str | None) -> None:
    assert parse_exif_datetime(value) == expected


def test_with_detections_the_annotations_carry_no_box() -> None:
    image = FolderImage("Red Fox/a.jpg", "Red Fox", UNKNOWN_LOCATION, 1, 1)
    cct = folders_cct([image], {image.file_name: ImageFacts(64, 48)}, "test", whole_image_boxes=False)
    assert "bbox" not in cct["annotations"][0] and cct["annotations"][0]["category_id"] == 1
