"""The package as a new user installs it (issue 21): the wheel built from this checkout, installed into a fresh
virtual environment outside the repository (no editable link), builds the demo and trains it from another folder
with the console commands alone.

The environment sees the system's site-packages for the dependencies (torch, lightning, ...) but not the checkout;
the wheel installed in it comes first on its path, ahead of any editable install of animl-lightning there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from tests.fixtures.hydra import REPO_ROOT
from tests.fixtures.scripts import command_env

pytestmark = pytest.mark.slow

# What the wheel is built from: a copy of these, so that the checkout's build/ (stale files of an earlier build)
# and git-ignored local files never reach the wheel, and the checkout gets no build/ or *.egg-info of its own.
SOURCES = ("pyproject.toml", "README.md", "animl_lightning", "configs")


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(command)} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n"
        f"--- stderr\n{result.stderr[-8000:]}"
    )
    return result


def build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, source / name)
    # One machine's git-ignored overrides (configs/local/) must not ship with the package.
    (source / "configs" / "local").mkdir(exist_ok=True)
    (source / "configs" / "local" / "default.yaml").write_text("seed: 99\n", encoding="utf-8")
    wheels = tmp_path / "wheels"
    # No build isolation: the build backend (setuptools) comes from this environment, so no index is needed.
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), "."],
        source,
        command_env(),
    )
    (wheel,) = wheels.glob("animl_lightning-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert "animl_lightning/configs/train.yaml" in names
    assert "animl_lightning/configs/hydra/launcher/slurm.yaml" in names
    assert "animl_lightning/train/templates/report.html.j2" in names
    assert not [name for name in names if name.startswith("animl_lightning/configs/local/")]
    return wheel


def test_wheel_installed_elsewhere_builds_and_trains_the_demo(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    venv = tmp_path / "venv"
    # Dependencies from the system; pip too (the venv's python runs the system's pip, which installs into the venv).
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], tmp_path, command_env())
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    env = command_env({"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"})
    # The checkout must not be importable: no PYTHONPATH (a test run may set it to the checkout) and a cwd elsewhere.
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], tmp_path, env)

    user = tmp_path / "user folder"
    user.mkdir()
    probe = "import animl_lightning.cli as cli; print(cli.__file__); print(cli.CONFIG_DIR)"
    where = run([str(python), "-c", probe], user, env)
    module_file, config_dir = (Path(line) for line in where.stdout.splitlines())
    assert module_file.resolve().is_relative_to(venv.resolve()), module_file
    assert config_dir.resolve() == module_file.resolve().parent / "configs"

    # The configs are a package too: Hydra composes them by module (a notebook's way in), here from the wheel.
    compose = (
        "from hydra import compose, initialize_config_module\n"
        "with initialize_config_module('animl_lightning.configs', version_base='1.3'):\n"
        "    cfg = compose('train', overrides=['experiment=demo'])\n"
        "import animl_lightning.configs\n"
        "print(cfg.task_name, cfg.model.model_name, animl_lightning.configs.__file__)\n"
    )
    task_name, model_name, package_file = run([str(python), "-c", compose], user, env).stdout.split()
    assert (task_name, model_name) == ("demo", "test_efficientnet")
    assert Path(package_file).resolve().parent == config_dir.resolve()

    for script in ("animl-prepare", "animl-train", "animl-classify", "animl-export", "animl-report", "animl-review"):
        assert (bin_dir / script).is_file(), script

    prepared = run([str(bin_dir / "animl-prepare")], user, env)
    data = user / "data" / "demo"
    assert "error" not in prepared.stderr.lower(), prepared.stderr[-4000:]
    crops = list((data / "crops").rglob("*.jpg"))
    assert len(crops) > 50
    label_index = json.loads((data / "label_index.json").read_text(encoding="utf-8"))
    assert len(label_index) >= 2
    assert (data / "splits.json").is_file() and (data / "classification_ds.csv").is_file()

    run(
        [
            str(bin_dir / "animl-train"),
            "experiment=demo",
            "trainer.max_epochs=1",
        ],
        user,
        env,
    )
    (run_dir,) = (user / "outputs" / "demo").glob("*/*")
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert (run_dir / "train.log").is_file()
    per_label = pd.read_csv(run_dir / "metrics" / "per_label.csv")
    assert set(per_label["split"]) >= {"train", "val"}
    assert set(per_label["label"]) == set(label_index.values())
    # report.html needs the package's templates (package data of animl_lightning.train).
    assert "</html>" in (run_dir / "report.html").read_text(encoding="utf-8")
