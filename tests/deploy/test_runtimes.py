"""The classify runtimes are one table: a new runtime is one entry, checked, chosen by ``auto`` and run."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from animl_lightning.core.errors import ConfigError
from animl_lightning.deploy.classify import ClassifySettings
from animl_lightning.deploy.inference import LoadedClassifier, Predictor, load_classifier
from animl_lightning.deploy.runtimes import (
    RUNTIMES,
    AutoVerdict,
    Runtime,
    RuntimeSettings,
    make_predictor,
    resolve_backend,
)
from tests.fixtures.models import write_checkpoint


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedClassifier:
    return load_classifier(write_checkpoint(tmp_path_factory.mktemp("runtimes") / "best.ckpt"), device="cpu")


def _uniform(loaded: LoadedClassifier, settings: RuntimeSettings | None) -> Predictor:
    def predict(images: NDArray[np.float32]) -> NDArray[np.float32]:
        return np.full((len(images), len(loaded.class_names)), 1 / len(loaded.class_names), dtype=np.float32)

    return predict


def _big_jobs(loaded: LoadedClassifier, settings: RuntimeSettings, crops: int) -> AutoVerdict:
    return AutoVerdict(crops >= 10, f"{crops} crops")


def test_a_new_runtime_is_one_entry(loaded: LoadedClassifier, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Runtime("uniform", "Uniform", ("fp32", "fp16"), ("cpu",), "", (), _uniform, auto=_big_jobs)
    with pytest.raises(ConfigError, match=r"^backend: must be one of \['auto', 'torch', 'onnxruntime'\]"):
        ClassifySettings(backend="uniform")
    # First in the table, so backend=auto asks it before ONNX Runtime.
    monkeypatch.setattr("animl_lightning.deploy.runtimes.RUNTIMES", {"uniform": fake, **RUNTIMES})
    settings = ClassifySettings(backend="uniform", cache_dir=None)
    assert resolve_backend(loaded, settings, crops=1) == "uniform"
    probabilities = make_predictor(loaded, "uniform", settings)(np.zeros((2, 3, 8, 8), dtype=np.float32))
    assert probabilities.shape == (2, len(loaded.class_names))
    auto = ClassifySettings(backend="auto", cache_dir=None, auto_export_min_crops=10**6)
    assert resolve_backend(loaded, auto, crops=10) == "uniform"
    assert resolve_backend(loaded, auto, crops=9) == "torch"
    # A precision only the new runtime runs names it, under auto too; another backend is refused.
    assert resolve_backend(loaded, ClassifySettings(precision="fp16", cache_dir=None), crops=1) == "uniform"
    with pytest.raises(ConfigError, match=r"^precision: fp16 runs on Uniform: use backend=auto or backend=uniform"):
        ClassifySettings(backend="torch", precision="fp16")


def test_a_runtime_that_cannot_run_here_is_named(loaded: LoadedClassifier, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = Runtime("gpuonly", "GPU Only", ("fp32",), ("cuda",), "gpu", ("no_such_module_xyz",), _uniform)
    monkeypatch.setitem(RUNTIMES, "gpuonly", missing)
    settings = ClassifySettings(backend="gpuonly", cache_dir=None)
    with pytest.raises(ConfigError, match=r"^backend=gpuonly: runs on CUDA only; use device=cuda or backend=torch"):
        resolve_backend(loaded, settings, crops=1)
    monkeypatch.setitem(
        RUNTIMES, "gpuonly", Runtime("gpuonly", "GPU Only", ("fp32",), (), "gpu", missing.modules, _uniform)
    )
    with pytest.raises(
        ConfigError, match=r"^backend=gpuonly: GPU Only is not installed \(pip install -e '\.\[gpu\]'\)$"
    ):
        resolve_backend(loaded, settings, crops=1)
    # Under auto a runtime that cannot run here is skipped, not an error.
    assert resolve_backend(loaded, ClassifySettings(backend="auto", cache_dir=None), crops=1) == "torch"


def test_the_shipped_table() -> None:
    assert {name: (r.precisions, r.extra, r.modules) for name, r in RUNTIMES.items()} == {
        "torch": (("fp32",), "", ()),
        "onnxruntime": (("fp32", "int8"), "deploy", ("onnxruntime",)),
    }
