"""The typed settings that define a config's keys and defaults, registered with Hydra as that config's schema.

A settings class is the one place for the keys and defaults of its block: it is stored in Hydra's ConfigStore under
a schema name, the YAML file names that schema in its defaults list (``- int8_schema@int8``, or ``- prepare_schema``
for the whole file) and sets none of its defaults again. Hydra then refuses an unknown key or a value of the wrong
type while composing, and the class's own checks run when the command builds it. Each command registers the schemas
of its config before Hydra composes it; the classes are imported only then, so a command pays only for its own.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from typing import Any

from hydra.core.config_store import ConfigStore

# config name -> (schema name, "module:class") of every schema its defaults list names.
SCHEMAS: dict[str, tuple[tuple[str, str], ...]] = {
    "prepare": (("prepare_schema", "animl_lightning.prepare.config:PrepareSettings"),),
    "classify": (("int8_schema", "animl_lightning.deploy.int8_settings:Int8Settings"),),
    "export": (("int8_schema", "animl_lightning.deploy.int8_settings:Int8Settings"),),
    "review": (("review_schema", "animl_lightning.train.label_review:ReviewSettings"),),
    "report": (("report_schema", "animl_lightning.train.report:ReportSettings"),),
    "train": (
        ("thresholds_schema", "animl_lightning.train.thresholds:ThresholdSettings"),
        ("report_schema", "animl_lightning.train.report:ReportSettings"),
    ),
}


def register_schemas(config_name: str) -> None:
    """Store the schemas ``configs/<config_name>.yaml`` names (none for a config without any)."""
    store = ConfigStore.instance()
    for schema_name, target in SCHEMAS.get(config_name, ()):
        store.store(name=schema_name, node=mutable_schema(settings_class(target)))


def settings_class(target: str) -> type[Any]:
    """The class a :data:`SCHEMAS` entry names (``"module:class"``), imported now."""
    module, _, name = target.partition(":")
    cls: type[Any] = getattr(importlib.import_module(module), name)
    return cls


def register_all_schemas() -> None:
    """Store every schema any config names: what composing a config by hand (a notebook) needs first."""
    for config_name in SCHEMAS:
        register_schemas(config_name)


def mutable_schema(settings: type[Any]) -> type[Any]:
    """``settings`` itself, or for a frozen dataclass a mutable one with the same fields, types and defaults.

    OmegaConf makes a frozen dataclass's node read-only, and Hydra could then not merge the YAML file or the command
    line into it; the frozen class is still what the command builds from the composed values.
    """
    if not settings.__dataclass_params__.frozen:
        return settings
    hints = typing.get_type_hints(settings)
    fields = [
        (
            field.name,
            hints[field.name],
            dataclasses.field(default=field.default)
            if field.default is not dataclasses.MISSING
            else dataclasses.field(default_factory=field.default_factory),
        )
        for field in dataclasses.fields(settings)
    ]
    # The same name: Hydra's errors name the class ("Key 'x' not in 'Int8Settings'").
    schema: type[Any] = dataclasses.make_dataclass(settings.__name__, fields)
    return schema
