"""Every deploy test gets its own user cache folder: ``classify.cache_dir=auto`` must never fill the real one."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _private_user_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path_factory.mktemp("xdg_cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder))
    return folder


@pytest.fixture(scope="session")
def dataset_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint whose ``data_dir`` names a prepared dataset with a val split of 24 crops."""
    from tests.fixtures.datasets import DEFAULT_LABELS, make_prepared_dataset
    from tests.fixtures.models import write_checkpoint

    root = tmp_path_factory.mktemp("dataset_checkpoint")
    data_dir = make_prepared_dataset(root / "prepared", per_label=8)
    # What train.py does: the classifier records where it was trained before its checkpoint is saved.
    return write_checkpoint(root / "model.ckpt", class_names=sorted(DEFAULT_LABELS), data_dir=data_dir)
