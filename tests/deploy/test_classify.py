"""classify: MegaDetector / CCT / crops-folder input -> MegaDetector JSON with classifications (and CSV)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

import animl_lightning.deploy.classify as classify_module
from animl_lightning.core.crop_rule import CropRule, crop_image
from animl_lightning.core.imaging import load_image
from animl_lightning.deploy.classify import ClassifySettings, classify_detections
from animl_lightning.deploy.classify_inputs import (
    ClassifyInputError,
    detections_from_cct,
    detections_from_crops_folder,
    read_detections_file,
)
from animl_lightning.deploy.classify_job import FAILURE_PREFIX
from animl_lightning.deploy.inference import LoadedClassifier, load_classifier
from tests.fixtures.files import write_jpeg
from tests.fixtures.hydra import REPO_ROOT
from tests.fixtures.models import CLASS_NAMES, write_checkpoint, write_megadetector_file
from tests.fixtures.scripts import run_in_process

REPO = REPO_ROOT
SETTINGS = ClassifySettings(threshold=0.8, min_conf=0.05, batch_size=3, num_workers=0, top_k=3, backend="torch")
# (image index, detection index) of the detections at or above 0.8 in readable images.
CLASSIFIED = {(0, 0), (0, 3), (1, 0), (6, 0), (6, 1)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("classify") / "best.ckpt", crop_rule=CropRule("pad"))


@pytest.fixture(scope="module")
def loaded(checkpoint: Path) -> LoadedClassifier:
    return load_classifier(checkpoint, device="cpu")


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def test_megadetector_file_gets_classifications(loaded: LoadedClassifier, tmp_path: Path) -> None:
    detections_file, images_dir, original = write_megadetector_file(tmp_path)
    output = tmp_path / "out" / "classified.json"
    summary = classify_detections(loaded, read_detections_file(detections_file), images_dir, output, SETTINGS)
    result = _read(output)

    assert result["info"]["format_version"] == "1.6"  # MegaDetector's current output format
    assert result["info"]["classifier"] == "test_efficientnet/best.ckpt"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", result["info"]["classification_completion_time"])
    assert result["info"]["detector"] == "md_v5a.0.0.pt"
    assert result["classification_categories"] == {str(i): name for i, name in enumerate(CLASS_NAMES)}
    assert result["detection_categories"] == original["detection_categories"]
    assert len(result["images"]) == len(original["images"])

    for i, (before, after) in enumerate(zip(original["images"], result["images"], strict=True)):
        assert after["file"] == before["file"]
        if before["detections"] is None or "failure" in after:
            # MegaDetector's validator rejects a failed image that keeps detections.
            assert after["detections"] is None
            continue
        for j, (det_before, det_after) in enumerate(zip(before["detections"], after["detections"], strict=True)):
            assert {k: det_after[k] for k in ("category", "conf", "bbox")} == det_before  # boxes untouched
            if (i, j) in CLASSIFIED:
                classes = det_after["classifications"]
                assert classes, (i, j)
                ids = [c[0] for c in classes]
                confs = [c[1] for c in classes]
                assert all(isinstance(c, str) and c in result["classification_categories"] for c in ids)
                assert confs == sorted(confs, reverse=True)
                assert all(round(c, 4) == c and c >= SETTINGS.min_conf for c in confs)
                assert sum(confs) <= 1.0 + 1e-3
            else:
                assert "classifications" not in det_after, (i, j)  # below threshold, or not an animal

    by_file = {image["file"]: image for image in result["images"]}
    assert by_file["cam2/d_missing.jpg"]["failure"].startswith(FAILURE_PREFIX)
    assert "not found" in by_file["cam2/d_missing.jpg"]["failure"]
    assert by_file["cam2/corrupt.jpg"]["failure"].startswith(FAILURE_PREFIX)
    assert by_file["cam2/failed_by_md.jpg"]["failure"] == "Failure image access"
    assert "failure" not in by_file["cam1/a.jpg"]
    assert summary.detections_classified == len(CLASSIFIED)
    assert summary.detections_failed == 2 and summary.images_failed == 2
    assert {f["file"] for f in summary.failures} == {"cam2/d_missing.jpg", "cam2/corrupt.jpg"}
    assert not list(output.parent.glob(".*tmp-*"))


def test_probabilities_use_the_checkpoint_crop_rule_and_preprocessing(loaded: LoadedClassifier, tmp_path: Path) -> None:
    detections_file, images_dir, original = write_megadetector_file(tmp_path)
    output = tmp_path / "classified.json"
    settings = ClassifySettings(threshold=0.8, min_conf=0.0, batch_size=8, num_workers=0, backend="torch")
    classify_detections(loaded, read_detections_file(detections_file), images_dir, output, settings)
    detection = _read(output)["images"][0]["detections"][0]

    image = load_image(images_dir / "cam1" / "a.jpg")
    x, y, w, h = original["images"][0]["detections"][0]["bbox"]
    crop = crop_image(image, (x * 320, y * 240, w * 320, h * 240), "pad", None)
    assert crop.size[0] == crop.size[1]  # "pad" comes from the checkpoint
    expected = loaded.probabilities(loaded.transform(crop)[None]).numpy()[0]
    got = np.zeros(len(CLASS_NAMES))
    for class_id, conf in detection["classifications"]:
        got[int(class_id)] = conf
    assert np.abs(got - expected).max() < 1e-4


def test_min_conf_filters_classifications(loaded: LoadedClassifier, tmp_path: Path) -> None:
    detections_file, images_dir, _ = write_megadetector_file(tmp_path)
    output = tmp_path / "classified.json"
    settings = ClassifySettings(threshold=0.8, min_conf=0.26, num_workers=0, backend="torch")
    classify_detections(loaded, read_detections_file(detections_file), images_dir, output, settings)
    confs = [
        c[1]
        for image in _read(output)["images"]
        for d in image["detections"] or []
        for c in d.get("classifications", [])
    ]
    assert confs and min(confs) >= 0.26


def test_csv_has_one_row_per_detection_with_top_k(loaded: LoadedClassifier, tmp_path: Path) -> None:
    detections_file, images_dir, _ = write_megadetector_file(tmp_path)
    output_csv = tmp_path / "classified.csv"
    classify_detections(
        loaded, read_detections_file(detections_file), images_dir, tmp_path / "c.json", SETTINGS, output_csv
    )
    frame = pd.read_csv(output_csv, keep_default_na=False, na_values=[""])
    assert list(frame.columns[:9]) == ["file", "detection", "category", "conf", "x", "y", "w", "h", "failure"]
    assert list(frame.columns[9:11]) == ["decision", "decision_score"]
    assert list(frame.columns[11:]) == ["label_1", "score_1", "label_2", "score_2", "label_3", "score_3"]
    assert len(frame) == len(CLASSIFIED) + 2  # plus the missing and the corrupt image
    ok = frame[frame["failure"].isna()]
    assert len(ok) == len(CLASSIFIED)
    assert set(ok[["label_1", "label_2", "label_3"]].to_numpy().ravel()) <= set(CLASS_NAMES)
    scores = ok[["score_1", "score_2", "score_3"]].to_numpy()
    assert (np.diff(scores, axis=1) <= 0).all()
    failed = frame[frame["failure"].notna()]
    assert set(failed["file"]) == {"cam2/d_missing.jpg", "cam2/corrupt.jpg"}


def test_rerun_resumes_finished_images(loaded: LoadedClassifier, tmp_path: Path) -> None:
    detections_file, images_dir, original = write_megadetector_file(tmp_path)
    output, output_csv = tmp_path / "resumed.json", tmp_path / "resumed.csv"
    first_half = dict(original, images=original["images"][:2])
    first = classify_detections(loaded, first_half, images_dir, output, SETTINGS, output_csv)
    assert first.detections_classified == 3

    second = classify_detections(
        loaded, read_detections_file(detections_file), images_dir, output, SETTINGS, output_csv
    )
    assert second.detections_resumed == 3
    assert second.detections_classified == len(CLASSIFIED) - 3

    fresh = tmp_path / "fresh.json"
    classify_detections(loaded, read_detections_file(detections_file), images_dir, fresh, SETTINGS)
    resumed_images, fresh_images = _read(output)["images"], _read(fresh)["images"]
    assert resumed_images == fresh_images
    assert len(pd.read_csv(output_csv)) == len(CLASSIFIED) + 2

    # Failed images are retried; finished ones are not.
    third = classify_detections(loaded, read_detections_file(detections_file), images_dir, output, SETTINGS, output_csv)
    assert third.detections_resumed == len(CLASSIFIED)
    assert third.detections_classified == 0 and third.detections_failed == 2

    # Other settings give other classifications: nothing is kept.
    stricter = ClassifySettings(threshold=0.8, min_conf=0.2, batch_size=3, num_workers=0, top_k=3, backend="torch")
    fourth = classify_detections(loaded, read_detections_file(detections_file), images_dir, output, stricter)
    assert fourth.detections_resumed == 0 and fourth.detections_classified == len(CLASSIFIED)
    assert _read(output)["info"]["classifier_metadata"]["min_conf"] == 0.2


def test_interrupted_run_leaves_a_partial_output_that_resumes(
    loaded: LoadedClassifier, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    detections_file, images_dir, _ = write_megadetector_file(tmp_path)
    output = tmp_path / "partial.json"
    real_batches = classify_module._batches

    def interrupted(*args: Any) -> Iterator[Any]:
        batches = real_batches(*args)
        yield next(batches)
        yield next(batches)
        raise KeyboardInterrupt

    monkeypatch.setattr(classify_module, "_batches", interrupted)
    settings = ClassifySettings(
        threshold=0.8, min_conf=0.05, batch_size=2, num_workers=0, save_interval_s=0, backend="torch"
    )
    with pytest.raises(KeyboardInterrupt):
        classify_detections(loaded, read_detections_file(detections_file), images_dir, output, settings)
    partial = _read(output)
    assert "classification_completion_time" not in partial["info"]
    done = [d for image in partial["images"] for d in image["detections"] or [] if "classifications" in d]
    assert 1 <= len(done) < len(CLASSIFIED)

    monkeypatch.setattr(classify_module, "_batches", real_batches)
    summary = classify_detections(loaded, read_detections_file(detections_file), images_dir, output, settings)
    assert summary.detections_resumed >= 1
    assert summary.detections_resumed + summary.detections_classified == len(CLASSIFIED)
    assert "classification_completion_time" in _read(output)["info"]


def test_output_of_another_classifier_is_not_overwritten(loaded: LoadedClassifier, tmp_path: Path) -> None:
    detections_file, images_dir, original = write_megadetector_file(tmp_path)
    output = tmp_path / "other.json"
    output.write_text(json.dumps(dict(original, classification_categories={"0": "cat"})))
    with pytest.raises(ClassifyInputError, match="classification_categories differ"):
        classify_detections(loaded, read_detections_file(detections_file), images_dir, output, SETTINGS)


def test_dataloader_workers_give_the_same_results(loaded: LoadedClassifier, tmp_path: Path) -> None:
    detections_file, images_dir, _ = write_megadetector_file(tmp_path)
    results = read_detections_file(detections_file)
    classify_detections(loaded, results, images_dir, tmp_path / "w0.json", SETTINGS)
    with_workers = ClassifySettings(threshold=0.8, min_conf=0.05, batch_size=3, num_workers=2, backend="torch")
    classify_detections(loaded, results, images_dir, tmp_path / "w2.json", with_workers)
    assert _read(tmp_path / "w0.json")["images"] == _read(tmp_path / "w2.json")["images"]


def test_cct_ground_truth_boxes_are_classified(loaded: LoadedClassifier, tmp_path: Path) -> None:
    images_dir = tmp_path / "images"
    write_jpeg(images_dir / "loc1" / "x.jpg", 300, 200, 11)
    write_jpeg(images_dir / "loc1" / "y.jpg", 160, 120, 12)
    cct = {
        "images": [
            {"id": "x", "file_name": "loc1/x.jpg", "width": 300, "height": 200},
            {"id": "y", "file_name": "loc1/y.jpg"},  # size read from the file
            {"id": "z", "file_name": "loc1/z_missing.jpg"},
            {"id": "w", "file_name": "loc1/empty.jpg", "width": 10, "height": 10},
        ],
        "annotations": [
            {"id": "a1", "image_id": "x", "category_id": 1, "bbox": [30, 20, 90, 60]},
            {"id": "a2", "image_id": "x", "category_id": 2, "bbox": [150, 100, 100, 80]},
            {"id": "a3", "image_id": "y", "category_id": 1, "bbox": [16, 12, 80, 60]},
            {"id": "a4", "image_id": "z", "category_id": 1, "bbox": [1, 1, 5, 5]},
            {"id": "a5", "image_id": "w", "category_id": 0},
        ],
        "categories": [{"id": 0, "name": "empty"}, {"id": 1, "name": "deer"}, {"id": 2, "name": "fox"}],
    }
    cct_file = tmp_path / "cct.json"
    cct_file.write_text(json.dumps(cct))
    results = detections_from_cct(cct_file, images_dir)
    summary = classify_detections(loaded, results, images_dir, tmp_path / "cct_out.json", SETTINGS)
    out = {image["file"]: image for image in _read(tmp_path / "cct_out.json")["images"]}
    assert out["loc1/x.jpg"]["detections"][0]["bbox"] == pytest.approx([0.1, 0.1, 0.3, 0.3])
    assert out["loc1/y.jpg"]["detections"][0]["bbox"] == pytest.approx([0.1, 0.1, 0.5, 0.5])
    assert all(d["classifications"] for name in ("loc1/x.jpg", "loc1/y.jpg") for d in out[name]["detections"])
    assert "not found" in out["loc1/z_missing.jpg"]["failure"]
    assert out["loc1/empty.jpg"]["detections"] == []
    assert summary.detections_classified == 3
    assert summary.images_skipped_failed_input == 1


def test_folder_of_crops_is_classified(loaded: LoadedClassifier, tmp_path: Path) -> None:
    crops = tmp_path / "crops"
    for i, name in enumerate(["a/one.jpg", "a/two.jpg", "b/three.jpg"]):
        write_jpeg(crops / name, 80 + 10 * i, 60, 20 + i)
    (crops / "notes.txt").write_text("not an image")
    results = detections_from_crops_folder(crops)
    assert [image["file"] for image in results["images"]] == ["a/one.jpg", "a/two.jpg", "b/three.jpg"]
    csv_path = tmp_path / "crops.csv"
    summary = classify_detections(loaded, results, crops, tmp_path / "crops.json", SETTINGS, csv_path)
    assert summary.detections_classified == 3
    frame = pd.read_csv(csv_path)
    assert list(frame["file"]) == ["a/one.jpg", "a/two.jpg", "b/three.jpg"]
    assert frame["label_1"].isin(CLASS_NAMES).all()

    # A full-frame crop gives the same probabilities as classifying the crop file directly.
    image = load_image(crops / "a" / "one.jpg")
    crop = crop_image(image, (0, 0, image.width, image.height), "pad", None)
    expected = loaded.probabilities(loaded.transform(crop)[None]).numpy()[0]
    assert frame.loc[0, "score_1"] == pytest.approx(float(np.max(expected)), abs=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: d["images"][0]["detections"][0].update(bbox=[0.1, 0.2]),
            r"images\[0\] \(cam1/a.jpg\) detections\[0\]: field 'bbox'",
        ),
        (
            lambda d: d["images"][1]["detections"][0].update(conf="high"),
            r"images\[1\] \(cam1/b.jpg\) detections\[0\]: field 'conf'",
        ),
        (
            lambda d: d["images"][0]["detections"][0].update(category="9"),
            r"field 'category' '9' is not in detection_categories",
        ),
        (lambda d: d.pop("detection_categories"), r"field 'detection_categories'"),
        (lambda d: d["images"][2].pop("file"), r"images\[2\]: field 'file'"),
        (
            lambda d: d["images"][1]["detections"][0].update(conf=1.5),
            r"images\[1\] \(cam1/b.jpg\) detections\[0\]: field 'conf' must be a number in \[0, 1\]",
        ),
        (lambda d: d["images"].append({"file": "cam1/a.jpg"}), r"images\[7\] \(cam1/a.jpg\): field 'file' is listed"),
        # The output is written as format 1.x, so a file of another format is refused rather than mislabelled.
        (lambda d: d["info"].update(format_version="2.0"), r"info.format_version '2.0' is not a supported 1.x"),
    ],
)
def test_bad_detections_file_names_record_and_field(tmp_path: Path, change: Any, message: str) -> None:
    detections_file, _, original = write_megadetector_file(tmp_path)
    change(original)
    detections_file.write_text(json.dumps(original))
    with pytest.raises(ClassifyInputError, match=message) as caught:
        read_detections_file(detections_file)
    assert str(caught.value).startswith(f"detections_file: {detections_file}: ")


def test_settings_name_the_bad_key() -> None:
    with pytest.raises(ValueError, match=r"classify\.batch_size"):
        ClassifySettings(batch_size=0)
    with pytest.raises(ValueError, match=r"detections\.threshold"):
        ClassifySettings(threshold=1.5)


def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "animl_lightning.classify", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_cli_classifies_a_megadetector_file(checkpoint: Path, tmp_path: Path) -> None:
    detections_file, images_dir, _ = write_megadetector_file(tmp_path)
    output = tmp_path / "cli.json"
    args = [
        f"checkpoint={checkpoint}",
        f"detections_file={detections_file}",
        f"images_dir={images_dir}",
        f"output_file={output}",
        f"output_csv={tmp_path / 'cli.csv'}",
        "classify.num_workers=0",
        "device=cpu",
    ]
    done = _run_cli(args, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "classified now" in done.stdout
    result = _read(output)
    classified = sum("classifications" in d for image in result["images"] for d in image["detections"] or [])
    assert classified == len(CLASSIFIED)
    assert (tmp_path / "cli.csv").is_file()
    assert not (tmp_path / "outputs").exists()  # Hydra writes nothing next to the caller


def _main(args: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """Run the Hydra entry point in this process (as ``python -m animl_lightning.classify ARGS``)."""
    from animl_lightning.classify import main

    return run_in_process(main, ["animl_lightning.classify", *args], monkeypatch)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["detections_file=DIR/nope.json", "images_dir=DIR/images"], "nope.json does not exist"),
        (["images_dir=DIR/images"], "set exactly one of detections_file, cct_file, crops_dir"),
        (["detections_file=DIR/md.json", "images_dir=DIR/no_such_dir"], "images_dir: "),
        (["detections_file=DIR/md.json", "images_dir=DIR/images", "classify.batch_size=0"], "classify.batch_size"),
        (["detections_file=DIR/md.json", "images_dir=DIR/images", "checkpoint=DIR/md.json"], "cannot be read"),
    ],
)
def test_cli_reports_bad_input_without_traceback(
    checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    write_megadetector_file(tmp_path)
    monkeypatch.chdir(tmp_path)
    args = [f"checkpoint={checkpoint}", f"output_file={tmp_path / 'bad.json'}"]
    args += [a.replace("DIR", str(tmp_path)) for a in extra]
    assert _main(args, monkeypatch) == 2
    captured = capsys.readouterr()
    assert message in captured.out + captured.err
    assert "Traceback" not in captured.out + captured.err
    assert not (tmp_path / "bad.json").exists()


def test_torch_threads_untouched() -> None:
    # classify must not leave global torch state changed for the caller (guards against set_num_threads hacks).
    assert torch.get_num_threads() >= 1


def test_a_zero_width_box_fails_that_detection_only(loaded: LoadedClassifier, tmp_path: Path) -> None:
    detections_file, images_dir, original = write_megadetector_file(tmp_path)
    original["images"][0]["detections"][0]["bbox"] = [0.1, 0.2, 0.0, 0.25]  # rounded to zero width by the detector
    detections_file.write_text(json.dumps(original))
    output = tmp_path / "classified.json"
    settings = ClassifySettings(threshold=0.8, min_conf=0.0, num_workers=0, backend="torch")
    summary = classify_detections(loaded, read_detections_file(detections_file), images_dir, output, settings)
    first = _read(output)["images"][0]["detections"]
    assert "classifications" not in first[0]
    assert first[3]["classifications"]  # the other animal box of the same image is still classified
    assert any(f["file"] == "cam1/a.jpg" and f["detection"] == 0 for f in summary.failures)


def test_output_with_failures_passes_megadetectors_validator_and_names_a_typical_threshold(
    checkpoint: Path, tmp_path: Path
) -> None:
    validator = pytest.importorskip("megadetector.postprocessing.validate_batch_results")
    from animl_lightning.train.checkpointing import THRESHOLDS_KEY, update_checkpoint

    with_thresholds = tmp_path / "thresholds.ckpt"
    with_thresholds.write_bytes(checkpoint.read_bytes())
    update_checkpoint(with_thresholds, THRESHOLDS_KEY, {"per_label": {"deer": 0.6, "fox": 0.8, "bird": 0.7}})
    detections_file, images_dir, _ = write_megadetector_file(tmp_path)
    output = tmp_path / "classified.json"
    loaded = load_classifier(with_thresholds, device="cpu")
    summary = classify_detections(loaded, read_detections_file(detections_file), images_dir, output, SETTINGS)
    assert summary.images_failed == 2  # the missing and the corrupt image

    options = validator.ValidateBatchResultsOptions()
    results = validator.validate_batch_results(str(output), options)["validation_results"]
    assert results["errors"] == [] and results["warnings"] == []
    written = _read(output)
    failed = [image for image in written["images"] if "failure" in image]
    assert len(failed) == 3 and all(image["detections"] is None for image in failed)
    assert written["info"]["classifier_metadata"]["typical_classification_threshold"] == 0.7

    # Without thresholds in the checkpoint the key is left out (Timelapse then uses its own default).
    classify_detections(
        load_classifier(checkpoint), read_detections_file(detections_file), images_dir, output, SETTINGS
    )
    assert "typical_classification_threshold" not in _read(output)["info"]["classifier_metadata"]


def test_backend_auto_on_a_small_job_is_pytorch_and_a_wrong_backend_is_named(
    loaded: LoadedClassifier, tmp_path: Path
) -> None:
    from animl_lightning.core.errors import ConfigError
    from animl_lightning.deploy.runtimes import resolve_backend

    pytest.importorskip("onnxruntime")
    # Nothing in the (empty) ONNX cache and a job too small to pay for an export: auto must not be slower than torch.
    # The cache and the large-job rule: tests/deploy/test_classify_onnx_cache.py.
    small = ClassifySettings(backend="auto", cache_dir=str(tmp_path / "cache"))
    assert resolve_backend(loaded, small, crops=5) == "torch"
    assert resolve_backend(loaded, small, crops=small.auto_export_min_crops) == "onnxruntime"
    assert resolve_backend(loaded, ClassifySettings(backend="torch"), crops=10**6) == "torch"
    with pytest.raises(ConfigError, match=r"backend: must be one of \['auto', 'torch', 'onnxruntime'\]"):
        ClassifySettings(backend="tensorrt")
    detections_file, images_dir, _ = write_megadetector_file(tmp_path)
    output = tmp_path / "classified.json"
    settings = ClassifySettings(threshold=0.8, min_conf=0.0, batch_size=3, num_workers=0, backend="auto")
    classify_detections(loaded, read_detections_file(detections_file), images_dir, output, settings)
    assert _read(output)["info"]["classifier_metadata"]["backend"] == "torch"


# --- the user's files are never lost (issue 25, item 2) ---------------------------------------------------------

CLI_FAST = ["backend=torch", "device=cpu", "classify.num_workers=0"]


def _one_error_line(captured: pytest.CaptureResult[str]) -> str:
    assert "Traceback" not in captured.out + captured.err
    lines = [line for line in captured.err.splitlines() if line.startswith("classify: ")]
    assert len(lines) == 1, captured.err
    return lines[0]


@pytest.mark.parametrize("link", ["same path", "through ..", "symlink", "hard link"])
@pytest.mark.parametrize("resume", [True, False])
def test_output_file_that_is_the_detections_file_is_refused_whatever_resume_says(
    checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    link: str,
    resume: bool,
) -> None:
    detections_file, _, _ = write_megadetector_file(tmp_path)
    before = detections_file.read_bytes()
    output = {
        "same path": detections_file,
        "through ..": tmp_path / "images" / ".." / detections_file.name,
        "symlink": tmp_path / "link.json",
        "hard link": tmp_path / "hard.json",
    }[link]
    if link == "symlink":
        output.symlink_to(detections_file)
    elif link == "hard link":
        os.link(detections_file, output)
    # A wrong images_dir (every image missing) is how the user lost every detection.
    wrong_images = tmp_path / "empty"
    wrong_images.mkdir()
    args = [
        f"checkpoint={checkpoint}",
        f"detections_file={detections_file}",
        f"images_dir={wrong_images}",
        f"output_file={output}",
        f"resume={str(resume).lower()}",
        *CLI_FAST,
    ]
    assert _main(args, monkeypatch) == 2
    line = _one_error_line(capsys.readouterr())
    assert "is the detections_file" in line and "resume" not in line
    assert detections_file.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["md.json", "images", "empty", *([output.name] if link in {"symlink", "hard link"} else [])]
    )


def test_a_run_in_which_every_image_fails_exits_2_and_keeps_the_previous_output(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    detections_file, images_dir, _ = write_megadetector_file(tmp_path)
    output, table = tmp_path / "classified.json", tmp_path / "classified.csv"
    common = [f"checkpoint={checkpoint}", f"detections_file={detections_file}", *CLI_FAST]
    outputs = [f"output_file={output}", f"output_csv={table}"]
    assert _main([*common, f"images_dir={images_dir}", *outputs], monkeypatch) == 0
    capsys.readouterr()
    good = {path: path.read_bytes() for path in (output, table, detections_file)}

    moved = tmp_path / "moved_away"  # the right folder name, but the photos are elsewhere now
    moved.mkdir()
    # Another min_conf classifies every image again; save_interval_s=0 saves after every batch, which is when a run
    # used to write its failures over a good output.
    for extra in (["classify.min_conf=0.2"], ["resume=false", "classify.save_interval_s=0", "classify.batch_size=1"]):
        assert _main([*common, f"images_dir={moved}", *outputs, *extra], monkeypatch) == 2
        line = _one_error_line(capsys.readouterr())
        assert "every detection failed" in line
        assert "7 of 7 detections in 5 of 5 images could not be classified" in line
        assert "first: cam1/a.jpg: image unreadable" in line
        assert {path: path.read_bytes() for path in good} == good

    fresh = tmp_path / "fresh.json"
    assert _main([*common, f"images_dir={moved}", f"output_file={fresh}"], monkeypatch) == 2
    assert "every detection failed" in _one_error_line(capsys.readouterr())
    assert not fresh.exists() and not list(tmp_path.glob(".fresh.json*"))


def test_a_run_with_some_failures_says_how_many_in_its_last_line(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    detections_file, images_dir, _ = write_megadetector_file(tmp_path)  # a missing and a corrupt image among 5
    output = tmp_path / "classified.json"
    args = [
        f"checkpoint={checkpoint}",
        f"detections_file={detections_file}",
        f"images_dir={images_dir}",
        f"output_file={output}",
        *CLI_FAST,
    ]
    assert _main(args, monkeypatch) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"wrote {output}; 2 of 7 detections in 2 of 5 images could not be classified")
    assert "(first: cam2/d_missing.jpg: image unreadable" in last
    failed = [image["file"] for image in _read(output)["images"] if str(image.get("failure", "")).startswith("class")]
    assert failed == ["cam2/d_missing.jpg", "cam2/corrupt.jpg"]
