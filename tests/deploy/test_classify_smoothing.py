"""classify.smoothing=image|sequence: the command smooths its own output as MegaDetector's package does, keeps the
model's classifications, resumes from them, and still passes MegaDetector's validator."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from animl_lightning.deploy.smoothing import BEFORE_SMOOTHING
from tests.fixtures.files import write_jpeg
from tests.fixtures.models import write_checkpoint
from tests.fixtures.scripts import run_command

# Lowered so that a random tiny model (near-uniform probabilities over 4 labels) has classifications to smooth.
SMOOTHING = [
    "smoothing.classification_confidence_threshold=0.2",
    "smoothing.min_detections_to_overwrite_secondary=2",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("smoothing") / "best.ckpt", class_names=["deer", "elk", "fox"])


@pytest.fixture(scope="module")
def bursts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """8 sequences of 3 frames, 4 detections each, on 2 cameras; a CCT file with their seq_ids."""
    root = tmp_path_factory.mktemp("bursts")
    rng = np.random.default_rng(5)
    images, cct_images = [], []
    for sequence in range(8):
        for frame in range(3):
            file = f"cam{sequence % 2}/s{sequence}_f{frame}.jpg"
            write_jpeg(root / "images" / file, 160, 120, seed=sequence * 10 + frame)
            detections = []
            for _ in range(4):
                w, h = rng.uniform(0.2, 0.5, 2)
                x, y = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
                detections.append({"category": "1", "conf": 0.9, "bbox": [round(float(v), 4) for v in (x, y, w, h)]})
            images.append({"file": file, "detections": detections})
            cct_images.append(
                {"id": file, "file_name": file, "seq_id": f"seq{sequence}", "location": f"cam{sequence % 2}"}
            )
    md = root / "md.json"
    md.write_text(
        json.dumps(
            {
                "info": {"format_version": "1.4", "detector": "md_v5a.0.0.pt"},
                "detection_categories": {"1": "animal"},
                "images": images,
            }
        )
    )
    cct = root / "cct.json"
    cct.write_text(json.dumps({"images": cct_images, "annotations": [], "categories": []}))
    return md, cct, root / "images"


def _classify(checkpoint: Path, md: Path, images: Path, output: Path, *extra: str) -> dict[str, Any]:
    args = [
        f"checkpoint={checkpoint}",
        f"detections_file={md}",
        f"images_dir={images}",
        f"output_file={output}",
        "classify.num_workers=0",
        "device=cpu",
        "classify.min_conf=0.0",
        "backend=torch",  # no ONNX export at start: these tests are about smoothing
        *extra,
    ]
    result = run_command("classify", args)
    assert result.returncode == 0, result.stderr[-3000:]
    data: dict[str, Any] = json.loads(output.read_text())
    return data


def _tops(results: dict[str, Any]) -> list[str]:
    return [d["classifications"][0][0] for image in results["images"] for d in image["detections"]]


def test_sequence_smoothing_matches_megadetectors_and_keeps_the_models_classifications(
    checkpoint: Path, bursts: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    module = pytest.importorskip("megadetector.postprocessing.classification_postprocessing")
    validator = pytest.importorskip("megadetector.postprocessing.validate_batch_results")
    md, cct, images = bursts
    raw = _classify(checkpoint, md, images, tmp_path / "raw.json")
    smoothed = _classify(
        checkpoint,
        md,
        images,
        tmp_path / "smoothed.json",
        "classify.smoothing=sequence",
        f"classify.sequence_file={cct}",
        *SMOOTHING,
    )

    options = module.ClassificationSmoothingOptions()
    options.classification_confidence_threshold = 0.2
    options.min_detections_to_overwrite_secondary = 2
    theirs = module.smooth_classification_results_image_level(copy.deepcopy(raw), options=options)
    theirs = module.smooth_classification_results_sequence_level(theirs, str(cct), options=options)
    assert _tops(smoothed) == _tops(theirs)
    changed = [
        (before, after)
        for before, after in zip(_all(raw), _all(smoothed), strict=True)
        if before["classifications"][0][0] != after["classifications"][0][0]
    ]
    assert changed, "the data must exercise the rules"
    for before, after in changed:
        assert after[BEFORE_SMOOTHING] == before["classifications"]
    metadata = smoothed["info"]["classifier_metadata"]["smoothing"]
    assert metadata["level"] == "sequence" and metadata["options"]["min_detections_to_overwrite_secondary"] == 2
    assert metadata["detections_changed_image"] + metadata["detections_changed_sequence"] == len(changed)
    results = validator.validate_batch_results(str(tmp_path / "smoothed.json"))["validation_results"]
    assert results["errors"] == [] and results["warnings"] == []


@pytest.mark.slow
def test_a_rerun_resumes_from_the_models_classifications(
    checkpoint: Path, bursts: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    md, _, images = bursts
    output = tmp_path / "out.json"
    smoothed = _classify(checkpoint, md, images, output, "classify.smoothing=image", *SMOOTHING)
    assert any(BEFORE_SMOOTHING in d for d in _all(smoothed))
    # Without smoothing, the resumed output is the model's own classifications again, not the smoothed ones.
    raw_again = _classify(checkpoint, md, images, output)
    fresh = _classify(checkpoint, md, images, tmp_path / "fresh.json")
    assert _tops(raw_again) == _tops(fresh)
    assert not any(BEFORE_SMOOTHING in d for d in _all(raw_again))


@pytest.mark.slow
def test_folder_and_time_rule_without_sequence_information(
    checkpoint: Path, bursts: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    md, _, images = bursts
    data = json.loads(md.read_text())
    for i, image in enumerate(data["images"]):
        sequence, frame = divmod(i, 3)
        image["datetime"] = f"2024-05-0{1 + sequence // 2} 10:{sequence:02d}:0{frame}"
    dated = tmp_path / "dated.json"
    dated.write_text(json.dumps(data))
    by_time = _classify(checkpoint, dated, images, tmp_path / "time.json", "classify.smoothing=sequence", *SMOOTHING)
    by_cct = _classify(
        checkpoint,
        md,
        images,
        tmp_path / "cct.json",
        "classify.smoothing=sequence",
        f"classify.sequence_file={bursts[1]}",
        *SMOOTHING,
    )
    assert _tops(by_time) == _tops(by_cct)  # the datetimes put the frames in the same bursts as the seq_ids


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["classify.smoothing=video"], "classify.smoothing: must be one of ['none', 'image', 'sequence']"),
        (["+smoothing.min_count=3", "classify.smoothing=image"], "smoothing.min_count: unknown key; smoothing has"),
        (["classify.smoothing=sequence", "classify.sequence_file=DIR/missing.json"], "missing.json does not exist"),
    ],
)
def test_bad_smoothing_settings_get_one_line(
    checkpoint: Path,
    bursts: tuple[Path, Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    from animl_lightning.classify import main

    md, _, images = bursts
    args = [f"checkpoint={checkpoint}", f"detections_file={md}", f"images_dir={images}"]
    args += [f"output_file={tmp_path / 'o.json'}", *(a.replace("DIR", str(tmp_path)) for a in extra)]
    monkeypatch.setattr(sys, "argv", ["animl_lightning.classify", *args])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.out + captured.err
    assert not (tmp_path / "o.json").exists()


def _all(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [d for image in results["images"] for d in image["detections"]]
