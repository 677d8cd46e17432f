"""MegaDetector's smoothing rules: hand-worked groups, and agreement with the megadetector package itself."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from animl_lightning.core.errors import ConfigError
from animl_lightning.core.smoothing import SmoothingOptions, smooth_group
from animl_lightning.deploy.smoothing import (
    BEFORE_SMOOTHING,
    ImageSequence,
    sequences_from_cct,
    sequences_from_times,
    smooth_results,
)
from tests.fixtures.files import write_jpeg

DEFAULTS = SmoothingOptions()
OTHER = frozenset({"other"})


def test_defaults_are_megadetectors() -> None:
    module = pytest.importorskip("megadetector.postprocessing.classification_postprocessing")
    theirs = vars(module.ClassificationSmoothingOptions())
    for name, value in vars(DEFAULTS).items():
        assert theirs[name] == (list(value) if isinstance(value, tuple) else value), name


@pytest.mark.parametrize(
    ("classes", "confidences", "expected"),
    [
        # 4 deer and 1 elk: the elk is outvoted (min_detections_to_overwrite_secondary 4, max nondominant 1).
        (["deer"] * 4 + ["elk"], [0.9] * 5, ["deer"] * 5),
        # 3 deer are not enough to overwrite a secondary class.
        (["deer"] * 3 + ["elk"], [0.9] * 4, ["deer"] * 3 + ["elk"]),
        # 4 deer and 2 elk: two elk are too many to overwrite (max_detections_nondominant_class 1).
        (["deer"] * 4 + ["elk"] * 2, [0.9] * 6, ["deer"] * 4 + ["elk"] * 2),
        # 'other' is overwritten by a dominant class with 2 detections...
        (["fox", "fox", "other"], [0.9, 0.8, 0.7], ["fox"] * 3),
        # ...not by one (cow/other stays).
        (["fox", "other"], [0.9, 0.7], ["fox", "other"]),
        # 'other' tied first with a real class: they swap, and the real class takes the others.
        (["other", "other", "fox", "fox"], [0.9] * 4, ["fox"] * 4),
        # A classification below 0.5 neither counts nor changes.
        (["deer"] * 4 + ["elk"], [0.9] * 4 + [0.4], ["deer"] * 4 + ["elk"]),
        # One class only: nothing to do.
        (["deer", "deer"], [0.9, 0.2], ["deer", "deer"]),
        # Equal counts: the first seen leads, but does not outnumber (max_count > count is required).
        (["elk", "deer", "deer", "elk"], [0.9] * 4, ["elk", "deer", "deer", "elk"]),
    ],
)
def test_hand_worked_groups(classes: list[str], confidences: list[float], expected: list[str]) -> None:
    assert smooth_group(classes, confidences, OTHER, DEFAULTS) == expected


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="classification_confidence_threshold"):
        SmoothingOptions(classification_confidence_threshold=1.5)
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['min_detections'\]"):
        SmoothingOptions.from_mapping({"min_detections": 3})


def _results(rng: np.random.Generator, images: int, labels: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A random classify output and its CCT sequence information (2-6 images per sequence, in time order)."""
    out_images, cct_images = [], []
    sequence = 0
    i = 0
    while i < images:
        length = int(rng.integers(2, 7))
        for frame in range(length):
            file = f"cam{sequence % 3}/img_{i:04d}.jpg"
            detections = []
            for _ in range(int(rng.integers(0, 6))):
                order = rng.permutation(len(labels))[:3]
                confs = sorted(rng.uniform(0.05, 1.0, 3).round(4).tolist(), reverse=True)
                detection: dict[str, Any] = {
                    "category": "1" if rng.random() < 0.9 else "2",
                    "conf": round(float(rng.uniform(0.05, 1.0)), 3),
                    "bbox": [0.1, 0.1, 0.2, 0.2],
                }
                if rng.random() < 0.9:
                    detection["classifications"] = [[str(c), p] for c, p in zip(order, confs, strict=True)]
                detections.append(detection)
            out_images.append({"file": file, "detections": detections})
            cct_images.append({"id": file, "file_name": file, "seq_id": f"s{sequence}", "frame_num": frame})
            i += 1
        sequence += 1
    results = {
        "info": {"format_version": "1.6"},
        "detection_categories": {"1": "animal", "2": "person"},
        "classification_categories": {str(k): name for k, name in enumerate(labels)},
        "images": out_images,
    }
    return results, {"images": cct_images}


def _tops(results: dict[str, Any]) -> list[str | None]:
    return [
        d["classifications"][0][0] if d.get("classifications") else None
        for image in results["images"]
        for d in image.get("detections") or []
    ]


@pytest.mark.parametrize("seed", range(6))
def test_same_classes_as_the_megadetector_package(seed: int) -> None:
    module = pytest.importorskip("megadetector.postprocessing.classification_postprocessing")
    labels = ["deer", "elk", "fox", "other", "unknown", "coyote"]
    results, cct = _results(np.random.default_rng(seed), 60, labels)

    theirs_image = module.smooth_classification_results_image_level(copy.deepcopy(results))
    theirs_sequence = module.smooth_classification_results_sequence_level(theirs_image, cct)

    ours_image = copy.deepcopy(results)
    smooth_results(ours_image, "image", DEFAULTS)
    ours_sequence = copy.deepcopy(results)
    summary = smooth_results(ours_sequence, "sequence", DEFAULTS, sequences_from_cct(cct))

    assert _tops(ours_image) == _tops(theirs_image)
    assert _tops(ours_sequence) == _tops(theirs_sequence)
    assert summary.detections_changed_image + summary.detections_changed_sequence > 0  # the data exercise the rules
    # Nothing lost: each changed detection keeps its original list.
    for before, after in zip(_all(results), _all(ours_sequence), strict=True):
        if before.get("classifications") and after["classifications"][0][0] != before["classifications"][0][0]:
            assert after[BEFORE_SMOOTHING] == before["classifications"]
            assert after["classifications"][0][1] == before["classifications"][0][1]
        else:
            assert BEFORE_SMOOTHING not in after


def _all(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [d for image in results["images"] for d in image.get("detections") or []]


def test_hand_made_file_smooths_as_written_out(tmp_path: Path) -> None:
    def det(top: str, conf: float = 0.9, category: str = "1", score: float = 0.95) -> dict[str, Any]:
        return {"category": category, "conf": score, "bbox": [0, 0, 0.1, 0.1], "classifications": [[top, conf]]}

    results = {
        "detection_categories": {"1": "animal", "2": "person"},
        "classification_categories": {"0": "deer", "1": "elk", "2": "other"},
        "images": [
            # a: 4 deer, 1 elk -> 5 deer at image level
            {"file": "a.jpg", "detections": [det("0"), det("0"), det("0"), det("0"), det("1")]},
            # b, c: one sequence; b has 1 elk + 1 other, c has 2 elk and a weak deer, a person
            {"file": "b.jpg", "detections": [det("1"), det("2")]},
            {"file": "c.jpg", "detections": [det("1"), det("1"), det("0", 0.3), det("0", category="2")]},
            # d: a low-confidence detection is left out of smoothing
            {"file": "d.jpg", "detections": [det("0"), det("0"), det("2", score=0.1)]},
        ],
    }
    sequences = {
        "a.jpg": ImageSequence("s1", 0),
        "b.jpg": ImageSequence("s2", 0),
        "c.jpg": ImageSequence("s2", 1),
        "d.jpg": ImageSequence("s3", 0),
    }
    image_level = copy.deepcopy(results)
    smooth_results(image_level, "image", DEFAULTS)
    assert _tops(image_level) == ["0"] * 5 + ["1", "2"] + ["1", "1", "0", "0"] + ["0", "0", "2"]
    sequence_level = copy.deepcopy(results)
    summary = smooth_results(sequence_level, "sequence", DEFAULTS, sequences)
    # Across b+c: elk x3 dominates, 'other' becomes elk; the weak deer (0.3) and the person stay.
    assert _tops(sequence_level) == ["0"] * 5 + ["1", "1"] + ["1", "1", "0", "0"] + ["0", "0", "2"]
    assert (summary.detections_changed_image, summary.detections_changed_sequence) == (1, 1)
    assert sequence_level["info"]["classifier_metadata"]["smoothing"]["level"] == "sequence"


def test_sequences_from_times_follow_the_folder_and_gap_rule(tmp_path: Path) -> None:
    from PIL import Image

    def exif_jpeg(path: Path, when: str | None) -> None:
        write_jpeg(path, 32, 24, 1)
        if when is not None:
            image = Image.open(path)
            exif = image.getexif()
            exif.get_ifd(0x8769)[36867] = when
            image.save(path, exif=exif)

    exif_jpeg(tmp_path / "camA" / "1.jpg", "2024:05:01 10:00:00")
    exif_jpeg(tmp_path / "camA" / "2.jpg", "2024:05:01 10:00:02")
    exif_jpeg(tmp_path / "camA" / "3.jpg", "2024:05:01 10:00:09")
    exif_jpeg(tmp_path / "camB" / "4.jpg", "2024:05:01 10:00:01")
    exif_jpeg(tmp_path / "camB" / "5.jpg", None)
    results = {
        "images": [
            {"file": "camA/1.jpg"},
            {"file": "camA/2.jpg"},
            {"file": "camA/3.jpg"},
            {"file": "camB/4.jpg"},
            {"file": "camB/5.jpg"},
            {"file": "camB/6.jpg", "datetime": "2024-05-01 10:00:03"},  # the results' own datetime wins
        ]
    }
    keys = {file: s.key for file, s in sequences_from_times(results, tmp_path, 3.0).items()}
    assert keys["camA/1.jpg"] == keys["camA/2.jpg"] != keys["camA/3.jpg"]
    assert keys["camB/4.jpg"] == keys["camB/6.jpg"]
    assert len({keys["camB/5.jpg"], keys["camB/4.jpg"], keys["camA/1.jpg"]}) == 3
    assert json.dumps(keys)  # plain strings
