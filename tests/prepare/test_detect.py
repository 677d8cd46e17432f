"""The detect stage (``detector.model_file``): MegaDetector's own batch runner on a random MDv5-layout model.

A folder tree of a few 320x240 JPEGs (one of them truncated, one in an ``empty`` folder) goes through the whole of
prepare with the detector built in :mod:`tests.fixtures.detector`; the default run runs MegaDetector once (module
fixture) and checks its results, the crops made from them, the truncated JPEG and a cached rerun. Killing a run and
resuming it, and a changed image, are slow.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from animl_lightning.core.contract import load_prepared_dataset
from animl_lightning.core.errors import ConfigError
from animl_lightning.core.issues import REPORT_FILENAME
from animl_lightning.prepare.detect import (
    CHECKPOINT_FILENAME,
    RESULTS_FILENAME,
    RUN_DIRNAME,
    STAGE,
)
from animl_lightning.prepare.detector_file import check_model_file, pickle_globals
from animl_lightning.prepare.pipeline import PrepareSummary, run_prepare
from tests.fixtures.detector import build_random_megadetector
from tests.fixtures.hydra import REPO_ROOT, prepare_settings
from tests.fixtures.scripts import command_env

# find_spec, not importorskip: importing yolov5 imports ultralytics, which replaces PIL.Image.open for the whole
# process (and the tests after these would see it).
pytestmark = pytest.mark.skipif(
    find_spec("megadetector") is None or find_spec("yolov5") is None,
    reason="the detect extra is not installed (README: detect install command)",
)

SIZE = (320, 240)
# Random weights give every box a confidence of about 0.02: all of them are written (0.005) and cropped (0.01).
CROP_THRESHOLD = "detections.threshold=0.01"
TRUNCATED = "Bobcat/img 2.jpg"


def _photo(path: Path, seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 255, size=(SIZE[1], SIZE[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=85)
    return path


def _tree(root: Path, per_species: int = 3) -> Path:
    """``Species/img N.jpg`` for two species; one Bobcat image cut in half (``img 2``); one in an ``empty`` folder."""
    for s, species in enumerate(("Red Fox", "Bobcat")):
        for i in range(per_species):
            _photo(root / species / f"img {i}.jpg", 10 * s + i)
    if per_species > 2:
        data = (root / TRUNCATED).read_bytes()
        (root / TRUNCATED).write_bytes(data[: len(data) // 2])
    _photo(root / "empty" / "img 0.jpg", 99)
    return root


def _overrides(root: Path, out: Path, model: Path, *more: str) -> list[str]:
    return [
        f"folders.root={root}",
        f"output_dir={out}",
        f"detector.model_file={model}",
        CROP_THRESHOLD,
        "crops.workers=1",  # crops in this process: the one that also started MegaDetector
        *more,
    ]


def _report(out: Path) -> dict[str, Any]:
    report: dict[str, Any] = json.loads((out / REPORT_FILENAME).read_text(encoding="utf-8"))
    return report


def _results(out: Path) -> dict[str, Any]:
    results: dict[str, Any] = json.loads((out / RESULTS_FILENAME).read_text(encoding="utf-8"))
    return results


def _detect_logs(out: Path) -> list[Path]:
    return sorted((out / "logs").glob("detect_*.log"))


@dataclass(frozen=True)
class DetectedRun:
    root: Path
    out: Path
    model: Path
    summary: PrepareSummary
    truncated_flag_after: bool
    imported: set[str]  # detector packages this process imported while prepare ran
    image_open_replaced: bool


@pytest.fixture(scope="session")
def detector_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_megadetector(tmp_path_factory.mktemp("detector") / "md_random_v5layout.pt")


@pytest.fixture(scope="module")
def detected(tmp_path_factory: pytest.TempPathFactory, detector_model: Path) -> DetectedRun:
    base = tmp_path_factory.mktemp("detect")
    root, out = _tree(base / "photos"), base / "out"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    modules, image_open = set(sys.modules), Image.open
    summary = run_prepare(prepare_settings(_overrides(root, out, detector_model)))
    imported = {m.split(".")[0] for m in set(sys.modules) - modules} & {"megadetector", "yolov5", "ultralytics"}
    return DetectedRun(
        root,
        out,
        detector_model,
        summary,
        ImageFile.LOAD_TRUNCATED_IMAGES,
        imported,
        Image.open is not image_open,
    )


def test_results_are_megadetector_1_6_and_pass_its_validator(detected: DetectedRun) -> None:
    from megadetector.postprocessing.validate_batch_results import validate_batch_results

    validation = validate_batch_results(str(detected.out / RESULTS_FILENAME))["validation_results"]
    assert validation["errors"] == [] and validation["warnings"] == []
    results = _results(detected.out)
    assert results["info"]["format_version"] == "1.6"
    assert results["info"]["detector"] == detected.model.name
    assert results["detection_categories"] == {"1": "animal", "2": "person", "3": "vehicle"}
    files = [entry["file"] for entry in results["images"]]
    # Every image that needs detector boxes, once, by its CCT file_name; the empty folder's image needs none.
    assert sorted(files) == sorted(f"{s}/img {i}.jpg" for s in ("Red Fox", "Bobcat") for i in range(3))
    confidences = [d["conf"] for entry in results["images"] for d in entry["detections"]]
    assert confidences and min(confidences) >= 0.005 and max(confidences) < 0.1


def test_detector_boxes_become_crops_named_after_the_model(detected: DetectedRun) -> None:
    stages = {stage.name: stage for stage in detected.summary.stages}
    assert [s.name for s in detected.summary.stages][:4] == ["folders", "ingest", "images", "detect"]
    assert stages["detect"].status == "ran"
    counts = _report(detected.out)["counts"]
    assert counts[STAGE] == {"images": 6, "reused": 0, "detected": 6}
    frame = load_prepared_dataset(detected.out).frame
    assert set(frame["label"]) == {"Red Fox", "Bobcat"}
    assert frame["path"].str.endswith(f"_{detected.model.name}.jpg").all()
    assert set(frame["image_id"]) == {f"{s}/img {i}.jpg" for s in ("Red Fox", "Bobcat") for i in range(3)} - {TRUNCATED}
    assert (frame.groupby("image_id").size() > 1).all()  # random weights: many boxes per image
    assert not (detected.out / RUN_DIRNAME / CHECKPOINT_FILENAME).exists()  # a finished run leaves no checkpoint


def test_a_truncated_jpeg_is_still_reported_after_detection(detected: DetectedRun) -> None:
    # MegaDetector decodes it (its process allows truncated images); prepare's own process must not.
    assert TRUNCATED in {entry["file"] for entry in _results(detected.out)["images"]}
    assert detected.truncated_flag_after is False
    assert not detected.imported and not detected.image_open_replaced  # MegaDetector ran in its own process
    truncated = [i for i in _report(detected.out)["issues"] if i["kind"] == "truncated_image"]
    assert truncated and all(i["stage"] == "crops" and TRUNCATED in i["file"] for i in truncated)


def test_a_rerun_with_the_same_model_threshold_and_images_does_not_run_the_detector(
    detected: DetectedRun, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(detected.out, out)
    logs = _detect_logs(out)
    written = (out / RESULTS_FILENAME).stat().st_mtime_ns
    summary = run_prepare(prepare_settings(_overrides(detected.root, out, detected.model)))
    assert {s.name: s.status for s in summary.stages}["detect"] == "skipped (current)"
    assert _report(out)["counts"][STAGE] == {"images": 6, "reused": 6, "detected": 0}
    assert _detect_logs(out) == logs  # MegaDetector was not started
    assert (out / RESULTS_FILENAME).stat().st_mtime_ns == written


def test_a_model_name_is_refused_with_where_to_get_the_weights(tmp_path: Path) -> None:
    root = _tree(tmp_path / "photos", per_species=1)
    with pytest.raises(ConfigError) as caught:
        prepare_settings(_overrides(root, tmp_path / "out", Path("MDV5A")))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("detector.model_file: 'MDV5A' is a MegaDetector model name")
    assert "https://github.com/agentmorris/MegaDetector/releases/download/" in message and "md_v5a" in message


def _state_dict_file(path: Path) -> Path:
    torch.save({"state_dict": OrderedDict(weight=torch.zeros(2))}, path)
    return path


def _text_file(path: Path) -> Path:
    path.write_text("not a model", encoding="utf-8")
    return path


def _nothing(path: Path) -> Path:
    return path


@pytest.mark.parametrize(
    ("name", "make", "says"),
    [
        ("weights.pt", _state_dict_file, "holds no YOLO detection model"),
        ("notes.pt", _text_file, "not a PyTorch .pt archive"),
        ("model.ckpt", _state_dict_file, "not a MegaDetector model file"),
        ("absent.pt", _nothing, "does not exist"),
    ],
)
def test_a_file_that_is_not_a_detector_is_refused_with_one_line_naming_it(
    tmp_path: Path, name: str, make: Any, says: str
) -> None:
    model = make(tmp_path / name)
    root = _tree(tmp_path / "photos", per_species=1)
    with pytest.raises(ConfigError) as caught:
        prepare_settings(_overrides(root, tmp_path / "out", model))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"detector.model_file: {model}") and says in message


def test_the_random_detector_passes_the_file_check(detector_model: Path) -> None:
    assert check_model_file(str(detector_model)).family == "yolov5"


def test_pickle_globals_reads_both_opcodes_without_running_anything() -> None:
    value = {"a": OrderedDict(x=1), "b": Counter("ab")}
    for protocol in (2, 4):  # GLOBAL, then STACK_GLOBAL with memoised strings
        found = pickle_globals(pickle.dumps(value, protocol=protocol))
        assert {("collections", "OrderedDict"), ("collections", "Counter")} <= found


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["detector.threshold=0"], "detector.threshold"),
        (["detector.batch_size=0"], "detector.batch_size"),
        (["detector.device=gpu"], "detector.device"),
        (["detector.device=cpu:1"], "detector.device"),
        (["detector.checkpoint_every=0"], "detector.checkpoint_every"),
    ],
)
def test_bad_detector_settings_are_refused(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}: "):
        prepare_settings(overrides)


def test_a_crop_threshold_below_the_detector_threshold_is_refused(detector_model: Path, tmp_path: Path) -> None:
    root = _tree(tmp_path / "photos", per_species=1)
    overrides = _overrides(root, tmp_path / "out", detector_model, "detector.threshold=0.2", "detections.threshold=0.1")
    with pytest.raises(ConfigError, match=r"^detections\.threshold: 0\.1 is below detector\.threshold \(0\.2\)"):
        prepare_settings(overrides)


# --- slow: a killed run, a changed image -----------------------------------------------------------------------------


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find MegaDetector's process")
def test_a_run_killed_mid_stage_resumes_and_runs_each_image_once(detector_model: Path, tmp_path: Path) -> None:
    root, out = _tree(tmp_path / "photos", per_species=5), tmp_path / "out"
    checkpoint = out / RUN_DIRNAME / CHECKPOINT_FILENAME
    args = [*_overrides(root, out, detector_model), "detector.checkpoint_every=2"]
    log = (tmp_path / "killed.log").open("wb")
    prepare = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "prepare.py"), *args], cwd=REPO_ROOT, env=command_env(), stdout=log, stderr=log
    )
    child: list[int] = []
    deadline = time.monotonic() + 1800
    while not checkpoint.exists():
        assert prepare.poll() is None, (tmp_path / "killed.log").read_text()
        assert time.monotonic() < deadline
        child = _children_of(prepare.pid) or child
        time.sleep(0.05)
    prepare.send_signal(signal.SIGKILL)  # prepare.py only: its MegaDetector process must follow by itself
    prepare.wait()
    for pid in child:
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"MegaDetector's process {pid} outlived prepare.py")
    time.sleep(0.5)
    done_before = {entry["file"] for entry in json.loads(checkpoint.read_text())["checkpoint"]}
    assert 2 <= len(done_before) < 10 and not (out / RESULTS_FILENAME).exists()

    run_prepare(prepare_settings(args))
    counts = _report(out)["counts"][STAGE]
    assert counts == {"images": 10, "reused": len(done_before), "detected": 10 - len(done_before)}
    files = [entry["file"] for entry in _results(out)["images"]]
    assert len(files) == len(set(files)) == 10
    assert not checkpoint.exists()


@pytest.mark.slow
def test_a_changed_image_is_run_again_and_the_others_reused(detected: DetectedRun, tmp_path: Path) -> None:
    root, out = tmp_path / "photos", tmp_path / "out"
    shutil.copytree(detected.root, root)  # copy2: same sizes and modification times
    shutil.copytree(detected.out, out)
    changed = root / "Red Fox" / "img 1.jpg"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    run_prepare(prepare_settings(_overrides(root, out, detected.model)))
    assert _report(out)["counts"][STAGE] == {"images": 6, "reused": 5, "detected": 1}
    assert len(_results(out)["images"]) == 6
