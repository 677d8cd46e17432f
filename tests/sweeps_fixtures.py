"""Helpers for the sweep and DDP tests: ``python train.py ...`` in a subprocess, writing only under tmp dirs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.train_fixtures import REPO_ROOT

TRAIN_SCRIPT = REPO_ROOT / "train.py"

# model=tiny at 64 px on CPU, one epoch, no loader workers, no progress bar.
SCRIPT_OVERRIDES: tuple[str, ...] = (
    "model=tiny",
    "data.image_size=64",
    "data.num_workers=0",
    "data.batch_size=4",
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "callbacks.rich_progress_bar=null",
    "callbacks.error_galleries=null",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
)


def run_train_script(
    args: Sequence[str], cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``train.py`` with ``args`` from ``cwd`` (relative outputs land there); fail with its output on error."""
    environ = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    environ.update(env or {})
    # The child must not inherit a DDP rank of the test process (there is none, but be explicit).
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT"):
        environ.pop(name, None)
    result = subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"train.py {' '.join(args)} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n"
            f"--- stderr\n{result.stderr[-8000:]}"
        )
    return result
