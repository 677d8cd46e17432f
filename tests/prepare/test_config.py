from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from animl_lightning.core.errors import ConfigError
from animl_lightning.prepare.config import PrepareSettings
from tests.fixtures.hydra import prepare_settings


def _settings(*overrides: str) -> PrepareSettings:
    return prepare_settings(overrides)


def test_defaults_compose_into_typed_settings() -> None:
    settings = _settings()
    assert settings.coco_file is None
    assert settings.crops.strategy == "square"
    assert settings.detections.threshold == 0.8
    assert settings.split.trials == 10000
    assert settings.labels.exclude == ["empty"]
    assert settings.crops.resolved_workers >= 1


def test_command_line_names_reach_the_settings(tmp_path: Path) -> None:
    coco = tmp_path / "export.json"
    coco.write_text("{}")
    settings = _settings(
        f"coco_file={coco}",
        f"images_dir={tmp_path}",
        "output_dir=out",
        "s3.bucket=animl-images-serving-prod",
        "s3.prefix=original/",
        "s3.endpoint_url=http://127.0.0.1:9000",
        "crops.strategy=pad",
        "crops.max_size=600",
        "split.method=smallest_first",
        "split.test_frac=0",
        "+labels.map={gray fox: fox}",
    )
    assert settings.s3.bucket == "animl-images-serving-prod"
    assert settings.s3.endpoint_url == "http://127.0.0.1:9000"
    assert settings.crops.max_size == 600
    assert settings.split.test_frac == 0.0
    assert settings.labels.map == {"gray fox": "fox"}


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("crops.strategy=circle", "crops.strategy"),
        ("split.val_frac=0.9", "split.val_frac"),
        ("split.method=stratified", "split.method"),
        ("detections.threshold=1.5", "detections.threshold"),
        ("crops.max_size=2", "crops.max_size"),
        ("coco_file=/nonexistent/export.json", "coco_file"),
    ],
)
def test_bad_values_fail_early_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _settings(override)


def test_unknown_key_and_wrong_type_fail_at_composition() -> None:
    with pytest.raises(ConfigCompositionException):
        _settings("crops.strategyy=square")
    with pytest.raises((ConfigCompositionException, ValidationError)):
        _settings("split.trials=many")
