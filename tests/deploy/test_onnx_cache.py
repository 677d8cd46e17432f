"""The ONNX model cache itself: hits, damaged and stale entries rebuilt, an unusable folder, racing processes.

The models are real (a small ONNX graph ONNX Runtime opens); the builds are the tests' own functions, counted, so a
hit is a build that did not run and a file that was not rewritten.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from animl_lightning.deploy.onnx_cache import OnnxCache, default_cache_dir, identity_key, resolve_cache_dir
from animl_lightning.deploy.onnx_runtime import OnnxClassifier
from tests.fixtures.hydra import REPO_ROOT

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

IDENTITY: dict[str, Any] = {"checkpoint_sha256": "ab" * 32, "precision": "fp32", "versions": {"torch": "x"}}


def softmax_model(scale: float) -> bytes:
    """A real ONNX model: ``softmax(images.mean(H, W) * scale)``, (N, 3, H, W) -> (N, 3)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["images", "axes"], ["pooled"], keepdims=0),
            helper.make_node("Mul", ["pooled", "scale"], ["scaled"]),
            helper.make_node("Softmax", ["scaled"], ["probabilities"], axis=1),
        ],
        "softmax",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
        initializer=[
            helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3]),
            helper.make_tensor("scale", TensorProto.FLOAT, [], [scale]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return bytes(model.SerializeToString())


class CountedBuild:
    """A build that says how often it ran."""

    def __init__(self, scale: float = 2.0) -> None:
        self.calls = 0
        self.scale = scale

    def __call__(self) -> tuple[bytes, dict[str, Any]]:
        self.calls += 1
        return softmax_model(self.scale), {"dynamic_size": True}


def open_session(data: bytes) -> OnnxClassifier:
    return OnnxClassifier(data, "images", threads=1)


def _probabilities(session: OnnxClassifier) -> np.ndarray:
    images = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    return session(images)


def test_a_second_use_is_a_hit_that_neither_builds_nor_rewrites(tmp_path: Path) -> None:
    cache = OnnxCache(tmp_path / "cache")
    build = CountedBuild()
    first, entry = cache.get_or_build(IDENTITY, build, open_session)
    assert build.calls == 1 and not entry.from_cache
    model, sidecar, _ = cache.paths(identity_key(IDENTITY))
    before = (model.stat().st_ino, model.stat().st_mtime_ns, sidecar.stat().st_mtime_ns)
    assert cache.has(IDENTITY)

    second, again = cache.get_or_build(IDENTITY, build, open_session)
    assert build.calls == 1 and again.from_cache and again.record == {"dynamic_size": True}
    assert (model.stat().st_ino, model.stat().st_mtime_ns, sidecar.stat().st_mtime_ns) == before
    np.testing.assert_array_equal(_probabilities(first), _probabilities(second))
    written = json.loads(sidecar.read_text())
    assert written["identity"] == IDENTITY and written["model_bytes"] == model.stat().st_size


def test_another_identity_gets_its_own_entry(tmp_path: Path) -> None:
    cache = OnnxCache(tmp_path)
    other = {**IDENTITY, "checkpoint_sha256": "cd" * 32}
    cache.get_or_build(IDENTITY, CountedBuild(2.0), open_session)
    build = CountedBuild(3.0)
    assert not cache.has(other)
    cache.get_or_build(other, build, open_session)
    assert build.calls == 1
    assert len(list(tmp_path.glob("*.onnx"))) == 2


@pytest.mark.parametrize(
    "damage",
    [
        "flip a byte of the model",
        "truncate the model",
        "truncate the sidecar",
        "sidecar of another build",
        "no sidecar",
    ],
)
def test_a_damaged_or_stale_entry_is_built_again(tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    cache = OnnxCache(tmp_path)
    cache.get_or_build(IDENTITY, CountedBuild(), open_session)
    model, sidecar, _ = cache.paths(identity_key(IDENTITY))
    good = model.read_bytes()
    if damage == "flip a byte of the model":
        model.write_bytes(good[:-5] + bytes([good[-5] ^ 0xFF]) + good[-4:])
    elif damage == "truncate the model":
        model.write_bytes(good[: len(good) // 2])
    elif damage == "truncate the sidecar":
        sidecar.write_text(sidecar.read_text()[:20])
    elif damage == "sidecar of another build":
        record = json.loads(sidecar.read_text())
        record["identity"]["versions"] = {"torch": "older"}
        sidecar.write_text(json.dumps(record))
    else:
        sidecar.unlink()
    if damage != "flip a byte of the model":  # has() is the cheap check: sizes and identity, not the digest
        assert not cache.has(IDENTITY)
    build = CountedBuild()
    with caplog.at_level(logging.INFO, logger="animl_lightning.deploy.onnx_cache"):
        session, entry = cache.get_or_build(IDENTITY, build, open_session)
    assert build.calls == 1 and not entry.from_cache
    assert "unusable" in caplog.text and "building it again" in caplog.text
    assert model.read_bytes() == good
    _probabilities(session)
    assert cache.get_or_build(IDENTITY, build, open_session)[1].from_cache and build.calls == 1


def test_a_model_onnx_runtime_cannot_load_is_built_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = OnnxCache(tmp_path)

    def garbage() -> tuple[bytes, dict[str, Any]]:
        return b"not an onnx model", {}

    # Stored with a matching digest: only loading it shows it is unusable.
    cache.get_or_build(IDENTITY, garbage, lambda data: data)
    build = CountedBuild()
    with caplog.at_level(logging.WARNING, logger="animl_lightning.deploy.onnx_cache"):
        session, _ = cache.get_or_build(IDENTITY, build, open_session)
    assert build.calls == 1 and "ONNX Runtime cannot load it" in caplog.text
    _probabilities(session)


def test_a_folder_that_cannot_be_used_only_costs_the_cache(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "a_file"
    blocked.write_text("in the way")
    cache = OnnxCache(blocked / "onnx")
    build = CountedBuild()
    with caplog.at_level(logging.WARNING, logger="animl_lightning.deploy.onnx_cache"):
        session, entry = cache.get_or_build(IDENTITY, build, open_session)
    assert build.calls == 1 and entry.path is None and "without it" in caplog.text
    _probabilities(session)


def test_cache_dir_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir("auto") == default_cache_dir() == tmp_path / "xdg" / "animl-lightning" / "onnx"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "animl-lightning" / "onnx"
    assert resolve_cache_dir(None) is None and resolve_cache_dir("") is None
    assert resolve_cache_dir(str(tmp_path / "mine")) == tmp_path / "mine"


RACER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from animl_lightning.deploy.onnx_cache import OnnxCache
    from tests.deploy.test_onnx_cache import IDENTITY, softmax_model

    folder, builds, out, start = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])

    def build():
        with builds.open("a") as log:
            log.write("built\\n")
        time.sleep(2.0)  # long enough that the other process arrives while this one builds
        return softmax_model(2.0), {}

    while time.time() < start:
        time.sleep(0.01)
    _, entry = OnnxCache(folder).get_or_build(IDENTITY, build, lambda data: data)
    out.write_bytes(entry.data)
    """
)


def test_processes_racing_on_an_empty_cache_build_once_and_read_the_same_model(tmp_path: Path) -> None:
    import time

    folder, builds = tmp_path / "cache", tmp_path / "builds.txt"
    start = time.time() + 8.0  # both interpreters are up by then, even on a loaded machine
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(folder), str(builds), str(tmp_path / f"out{i}"), str(start)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    for racer in racers:
        output, _ = racer.communicate(timeout=300)
        assert racer.returncode == 0, output
    assert builds.read_text() == "built\n"
    assert (tmp_path / "out0").read_bytes() == (tmp_path / "out1").read_bytes() == softmax_model(2.0)
    assert sorted(p.suffix for p in folder.iterdir()) == [".json", ".lock", ".onnx"]
