"""Defaults in one place: a settings class is its block's schema, and the YAML file repeats none of its defaults."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from animl_lightning.cli import CONFIG_DIR
from animl_lightning.config_schemas import SCHEMAS, mutable_schema, settings_class
from animl_lightning.train.report import ReportSettings
from tests.fixtures.hydra import compose_config


def _package(config_name: str, schema_name: str) -> str:
    """Where the config's defaults list places ``schema_name``: ``""`` for the root, else the block's key."""
    raw = yaml.safe_load((CONFIG_DIR / f"{config_name}.yaml").read_text(encoding="utf-8"))
    for entry in raw["defaults"]:
        if isinstance(entry, str) and entry.split("@")[0] == schema_name:
            return entry.partition("@")[2]
    raise AssertionError(f"configs/{config_name}.yaml does not name {schema_name} in its defaults list")


def _defaults(settings: type[Any]) -> dict[str, Any]:
    """Every field's default, nested settings as dicts (as OmegaConf composes them)."""
    return OmegaConf.to_container(OmegaConf.structured(mutable_schema(settings)))  # type: ignore[return-value]


def _repeated(written: Any, defaults: Any, path: str = "") -> list[str]:
    """The keys of ``written`` whose value is the default's own (interpolations and other values are the file's)."""
    if isinstance(written, dict) and isinstance(defaults, dict):
        return [
            key
            for name, value in written.items()
            if name in defaults
            for key in _repeated(value, defaults[name], f"{path}{name}.")
        ]
    return [path.rstrip(".")] if written == defaults else []


SCHEMA_ENTRIES = [(config, schema, target) for config, entries in SCHEMAS.items() for schema, target in entries]


@pytest.mark.parametrize(("config_name", "schema_name", "target"), SCHEMA_ENTRIES)
def test_the_yaml_file_repeats_no_default_of_its_schema(config_name: str, schema_name: str, target: str) -> None:
    raw = yaml.safe_load((CONFIG_DIR / f"{config_name}.yaml").read_text(encoding="utf-8"))
    package = _package(config_name, schema_name)
    block = raw if not package else raw.get(package, {})
    assert _repeated(block or {}, _defaults(settings_class(target))) == []


@pytest.mark.parametrize(("config_name", "schema_name", "target"), SCHEMA_ENTRIES)
def test_the_composed_config_has_every_default_of_its_schema(config_name: str, schema_name: str, target: str) -> None:
    package = _package(config_name, schema_name)
    composed = compose_config(config_name, set_hydra=False)
    block = OmegaConf.to_container(composed[package] if package else composed, resolve=False)
    assert isinstance(block, dict)
    for key, default in _defaults(settings_class(target)).items():
        if isinstance(default, dict):
            continue
        assert key in block, f"{config_name}: {package or '<root>'} lacks {key}"
        value = block[key]
        # The file may set a key to something else (an interpolation); a plain value is the schema's.
        if not (isinstance(value, str) and value.startswith("${")) and (config_name, key) != ("prepare", "output_dir"):
            assert value == default, f"{config_name}: {package}.{key} is {value!r}, the schema says {default!r}"


@pytest.mark.parametrize(
    ("config_name", "override"),
    [
        ("classify", "int8.min_agrement=0.5"),
        ("export", "int8.calibration_crops=many"),
        ("review", "review.page_crops=lots"),
        ("report", "report.tabel_rows=3"),
        ("train", "thresholds.target_precison=0.9"),
        ("prepare", "split.val_frac=abc"),
    ],
)
def test_a_misspelt_key_or_a_wrong_type_is_refused_while_composing(config_name: str, override: str) -> None:
    with pytest.raises(ConfigCompositionException):
        compose_config(config_name, [override], set_hydra=False)


def test_a_frozen_settings_class_gets_a_mutable_twin_with_its_defaults() -> None:
    schema = mutable_schema(ReportSettings)
    assert schema is not ReportSettings and not schema.__dataclass_params__.frozen
    assert {f.name: f.default for f in dataclasses.fields(schema)} == {
        f.name: f.default for f in dataclasses.fields(ReportSettings)
    }
    node = OmegaConf.structured(schema)
    node.table_rows = 7  # a frozen class's node would refuse this
    assert ReportSettings(**OmegaConf.to_container(node)).table_rows == 7  # type: ignore[arg-type]


def test_classify_blocks_without_a_schema_say_the_settings_defaults() -> None:
    """classify.yaml's detections / classify / smoothing blocks map onto one flat ClassifySettings (and
    SmoothingOptions), so they are not its schema; their values must still be those classes' defaults."""
    from animl_lightning.core.smoothing import SmoothingOptions
    from animl_lightning.deploy.classify import ClassifySettings

    composed = OmegaConf.to_container(compose_config("classify", set_hydra=False), resolve=True)
    assert isinstance(composed, dict)
    written = {
        "threshold": composed["detections"]["threshold"],
        "category": composed["detections"]["category"],
        "resume": composed["resume"],
        "backend": composed["backend"],
        "precision": composed["precision"],
        **composed["classify"],
    }
    defaults = ClassifySettings()
    for key, value in written.items():
        assert value == getattr(defaults, key), f"classify.yaml: {key} is {value!r}, ClassifySettings says otherwise"
    smoothing = SmoothingOptions()
    for key, value in composed["smoothing"].items():
        expected = getattr(smoothing, key)
        assert (list(expected) if isinstance(expected, tuple) else expected) == value, f"smoothing.{key}"


@pytest.mark.slow  # a fresh interpreter composing every config: about 20 s
def test_composing_by_module_needs_no_registration_first(tmp_path: Path) -> None:
    """The README's notebook way in: Hydra imports animl_lightning.configs, which registers every schema."""
    probe = subprocess.run(
        [sys.executable, "-c", "import animl_lightning.configs"], cwd=tmp_path, capture_output=True, text=True
    )
    if probe.returncode != 0:
        pytest.skip("animl_lightning.configs is importable only once installed (pip install -e .)")
    notebook = (
        "from hydra import compose, initialize_config_module\n"
        "with initialize_config_module('animl_lightning.configs', version_base='1.3'):\n"
        "    for name in ('train', 'prepare', 'classify', 'export', 'review', 'report'):\n"
        "        cfg = compose(name)\n"
        "    print(compose('train').thresholds.target_precision, compose('export').int8.min_agreement)\n"
    )
    result = subprocess.run([sys.executable, "-c", notebook], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0.95", "0.99"]
