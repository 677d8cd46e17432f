"""The package as pyproject.toml builds it: every package folder listed, the configs shipped inside it, and one
console command per command (``animl-train --help`` and the others exit 0). The wheel itself, installed outside the
repository, is tests/cross/test_installed_wheel.py (slow)."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import sys
import tomllib
from pathlib import Path

import pytest

import animl_lightning
from animl_lightning.cli import CONFIG_DIR, find_config_dir
from tests.fixtures.hydra import REPO_ROOT
from tests.fixtures.scripts import run_in_process

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]
# The commands of the README, by the console command that runs each.
COMMANDS = {
    "animl-prepare",
    "animl-train",
    "animl-classify",
    "animl-export",
    "animl-serve",
    "animl-report",
    "animl-review",
}


def test_every_command_has_a_console_script() -> None:
    assert set(SCRIPTS) == COMMANDS


def test_the_package_list_names_every_package_folder() -> None:
    """pyproject.toml lists the packages (configs/ is mapped in, which discovery cannot see): a new subpackage
    missing from the list would be absent from the wheel while every test in the checkout still passes."""
    setuptools = PYPROJECT["tool"]["setuptools"]
    package_dir = Path(animl_lightning.__file__).resolve().parent
    folders = {
        ".".join(("animl_lightning", *init.parent.relative_to(package_dir).parts))
        for init in package_dir.rglob("__init__.py")
    }
    assert set(setuptools["packages"]) == folders | {"animl_lightning.configs"}
    assert setuptools["package-dir"] == {"animl_lightning.configs": "configs"}


def test_configs_are_found_in_the_package_then_in_the_checkout(tmp_path: Path) -> None:
    installed = tmp_path / "site-packages" / "animl_lightning"
    (installed / "configs").mkdir(parents=True)
    checkout = tmp_path / "checkout" / "animl_lightning"
    checkout.mkdir(parents=True)
    # A wheel: the configs shipped inside the package.
    (installed / "configs" / "train.yaml").write_text("seed: 1\n")
    assert find_config_dir(installed) == installed / "configs"
    # A checkout (editable install or PYTHONPATH): configs/ next to the package.
    assert find_config_dir(checkout) == tmp_path / "checkout" / "configs"
    # This checkout's configs, the ones its tests compose.
    assert (CONFIG_DIR / "train.yaml").is_file()
    assert CONFIG_DIR.resolve() == (REPO_ROOT / "configs").resolve()


@pytest.mark.parametrize("script", sorted(COMMANDS))
def test_console_script_resolves_and_its_help_exits_zero(
    script: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The function behind each console command, run in this process as that command would run it (``--help``)."""
    module_name, _, function_name = SCRIPTS[script].partition(":")
    main = getattr(importlib.import_module(module_name), function_name)
    assert callable(main)
    status = run_in_process(main, [script, "--help"], monkeypatch)
    out = capsys.readouterr().out
    assert status == 0
    # Hydra's help: the command's name and its config groups, composed from the package's configs.
    assert f"{script.removeprefix('animl-')} is powered by Hydra" in out
    assert "== Configuration groups ==" in out
    if script == "animl-train":
        assert "model: " in out and "tiny" in out


def _installed_from_this_checkout() -> importlib.metadata.Distribution | None:
    """The installed distribution whose ``direct_url.json`` names this checkout, or None.

    Every distribution of the name is looked at: the checkout's own ``animl_lightning.egg-info`` (which
    ``pip install -e .`` can leave beside the sources, and which pytest's ``pythonpath`` puts first) has no
    ``direct_url.json``.
    """
    for distribution in importlib.metadata.distributions(name="animl-lightning"):
        direct_url = distribution.read_text("direct_url.json")
        if not direct_url:
            continue
        url = json.loads(direct_url).get("url", "")
        if url.startswith("file://") and Path(url.removeprefix("file://")).resolve() == REPO_ROOT.resolve():
            return distribution
    return None


def test_installed_console_scripts_are_the_pyproject_ones() -> None:
    """After ``pip install -e .`` of this checkout (the README's install, .ci/run's), the console commands exist."""
    distribution = _installed_from_this_checkout()
    if distribution is None:
        pytest.skip("animl-lightning is not installed from this checkout (pip install -e . installs the commands)")
    installed = {entry.name: entry.value for entry in distribution.entry_points if entry.group == "console_scripts"}
    assert installed == SCRIPTS
    scripts_dir = Path(sys.executable).parent
    for script in COMMANDS:
        assert (scripts_dir / script).is_file() or (scripts_dir / f"{script}.exe").is_file(), script
