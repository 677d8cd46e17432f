"""classify pays for the ONNX export once per checkpoint: the cache in use, and when ``backend=auto`` exports.

The exports are real (the tiny checkpoint through torch.onnx); hits are checked on the cache files (same inode, same
mtime) and on classify's log, not by mocking the exporter.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from animl_lightning.core.errors import ConfigError
from animl_lightning.deploy.classify import ClassifySettings, classify_detections
from animl_lightning.deploy.classify_inputs import read_detections_file
from animl_lightning.deploy.export import onnx_identity
from animl_lightning.deploy.inference import LoadedClassifier, load_classifier
from animl_lightning.deploy.onnx_cache import OnnxCache, identity_key
from animl_lightning.deploy.runtimes import resolve_backend
from tests.fixtures.hydra import REPO_ROOT
from tests.fixtures.models import write_checkpoint, write_megadetector_file
from tests.fixtures.scripts import command_env

pytest.importorskip("onnxruntime")

CACHE_LOGGER = "animl_lightning.deploy.onnx_cache"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("cache_classify") / "model.ckpt")


@pytest.fixture(scope="module")
def loaded(checkpoint: Path) -> LoadedClassifier:
    return load_classifier(checkpoint, device="cpu")


def _settings(cache: Path | None, **changes: Any) -> ClassifySettings:
    values: dict[str, Any] = {"threshold": 0.8, "min_conf": 0.0, "num_workers": 0, "backend": "onnxruntime"}
    return ClassifySettings(**(values | {"cache_dir": None if cache is None else str(cache)} | changes))


def _classified(path: Path) -> tuple[list[Any], dict[str, Any]]:
    """The images (with classifications) and the classifier metadata of an output, without the completion time."""
    written = json.loads(path.read_text())
    return written["images"], written["info"]["classifier_metadata"]


def _entry_state(cache: Path, loaded: LoadedClassifier) -> tuple[int, int, int]:
    model, sidecar, _ = OnnxCache(cache).paths(identity_key(onnx_identity(loaded)))
    return model.stat().st_ino, model.stat().st_mtime_ns, sidecar.stat().st_mtime_ns


def test_classify_exports_once_per_checkpoint_then_reads_the_cache(
    checkpoint: Path, loaded: LoadedClassifier, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    detections_file, images_dir, _ = write_megadetector_file(tmp_path)
    results = read_detections_file(detections_file)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger=CACHE_LOGGER):
        classify_detections(loaded, results, images_dir, tmp_path / "first.json", _settings(cache))
    assert "built the ONNX model" in caplog.text and "stored the ONNX model in the cache" in caplog.text
    state = _entry_state(cache, loaded)

    # Second run, backend=auto on a job far below auto_export_min_crops: the cached model makes it ONNX Runtime.
    caplog.clear()
    auto = _settings(cache, backend="auto")
    assert resolve_backend(loaded, auto, crops=5) == "onnxruntime"
    with caplog.at_level(logging.INFO, logger=CACHE_LOGGER):
        classify_detections(loaded, results, images_dir, tmp_path / "second.json", auto)
    assert "loaded the ONNX model from the cache" in caplog.text and "built" not in caplog.text
    assert _entry_state(cache, loaded) == state
    assert _classified(tmp_path / "second.json") == _classified(tmp_path / "first.json")
    assert _classified(tmp_path / "second.json")[1]["backend"] == "onnxruntime"

    # Another checkpoint is another entry; the first stays as it was.
    other = load_classifier(write_checkpoint(tmp_path / "other.ckpt", seed=1), device="cpu")
    assert other.checkpoint_sha256 != loaded.checkpoint_sha256
    assert not OnnxCache(cache).has(onnx_identity(other))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=CACHE_LOGGER):
        classify_detections(other, results, images_dir, tmp_path / "other.json", _settings(cache))
    assert "built the ONNX model" in caplog.text
    assert len(list(cache.glob("*.onnx"))) == 2
    assert _entry_state(cache, loaded) == state


def test_auto_exports_only_when_the_job_pays_for_it(loaded: LoadedClassifier, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    small = _settings(cache, backend="auto", auto_export_min_crops=1000)
    assert resolve_backend(loaded, small, crops=999) == "torch"
    assert resolve_backend(loaded, small, crops=1000) == "onnxruntime"
    assert resolve_backend(loaded, _settings(None, backend="auto"), crops=5) == "torch"
    assert resolve_backend(loaded, _settings(cache, backend="torch"), crops=10**6) == "torch"
    # A small job with nothing cached runs on PyTorch and exports nothing.
    detections_file, images_dir, _ = write_megadetector_file(tmp_path)
    output = tmp_path / "auto.json"
    classify_detections(loaded, read_detections_file(detections_file), images_dir, output, small)
    assert _classified(output)[1]["backend"] == "torch"
    assert not cache.exists() or not list(cache.glob("*.onnx"))


def test_int8_runs_on_onnx_runtime_only() -> None:
    with pytest.raises(ConfigError, match=r"^precision: int8 runs on ONNX Runtime"):
        ClassifySettings(backend="torch", precision="int8")
    with pytest.raises(ConfigError, match=r"^precision: must be one of \['fp32', 'int8'\]"):
        ClassifySettings(precision="fp16")


def _classify_cli(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = command_env({"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))})
    return subprocess.Popen(
        [sys.executable, "-m", "animl_lightning.classify", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
def test_two_classify_runs_racing_on_an_empty_cache_export_once_and_agree(
    checkpoint: Path, loaded: LoadedClassifier, tmp_path: Path
) -> None:
    detections_file, images_dir, _ = write_megadetector_file(tmp_path)
    cache = tmp_path / "cache"

    def args(name: str) -> list[str]:
        return [
            f"checkpoint={checkpoint}",
            f"detections_file={detections_file}",
            f"images_dir={images_dir}",
            f"output_file={tmp_path / name}",
            f"classify.cache_dir={cache}",
            "backend=onnxruntime",
            "device=cpu",
            "classify.num_workers=0",
        ]

    runs = [_classify_cli(args(f"race{i}.json"), tmp_path) for i in range(2)]
    logs = [run.communicate(timeout=1800)[0] for run in runs]
    for run, log in zip(runs, logs, strict=True):
        assert run.returncode == 0, log
    assert sum(log.count("built the ONNX model") for log in logs) == 1, logs
    assert sum("loaded the ONNX model from the cache" in log for log in logs) == 1, logs
    assert _classified(tmp_path / "race0.json") == _classified(tmp_path / "race1.json")
    assert len(list(cache.glob("*.onnx"))) == 1 and not list(cache.glob(".*tmp-*"))

    # The model file damaged on disk: the next run notices, exports again and classifies the same.
    model, _, _ = OnnxCache(cache).paths(identity_key(onnx_identity(loaded)))
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 3])
    rerun = _classify_cli(args("after_damage.json"), tmp_path)
    log = rerun.communicate(timeout=1800)[0]
    assert rerun.returncode == 0, log
    assert "is unusable" in log and "building it again" in log
    assert model.read_bytes() == data
    assert _classified(tmp_path / "after_damage.json") == _classified(tmp_path / "race0.json")
