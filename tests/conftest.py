"""Test-wide settings: no network for loggers, headless plotting, a clean Hydra between tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# The loopback S3 server (s3_server) and headless Chromium (browser) fixtures for every test module.
pytest_plugins = ["tests.fixtures.s3", "tests.fixtures.browser"]

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")
# Hugging Face hub must never be contacted by tests; a pretrained download fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _clean_hydra() -> Iterator[None]:
    """Tests that compose configs must not leak Hydra's global state into the next test."""
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


@pytest.fixture(autouse=True)
def _pil_reads_truncated_images_as_damaged() -> Iterator[None]:
    """Importing the megadetector package sets PIL's process-wide ``LOAD_TRUNCATED_IMAGES = True`` (its
    visualization_utils does, at import); the tests that compare with it must not change what later tests see."""
    from PIL import ImageFile

    before = ImageFile.LOAD_TRUNCATED_IMAGES
    yield
    ImageFile.LOAD_TRUNCATED_IMAGES = before


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A command run in-process (``main()`` under Hydra) installs log handlers on the test's captured streams;
    they must not outlive the test, or a later test logs into a closed stream."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
