"""``prepare.py``, ``animl-prepare`` and ``python -m animl_lightning.prepare_command``: build a classification
dataset from a COCO Camera Traps export.

    python prepare.py                                   # the generated demo project -> data/demo
    python prepare.py coco_file=export.json images_dir=images output_dir=data/mine s3.bucket=animl-images-serving-prod

Stages: ingest -> images -> [detect] -> boxes -> crops -> labels -> dataset -> splits (detect: with
detector.model_file). Every key and its default: animl_lightning/prepare/config.py.
The Hydra edge only: compose and validate the settings, run :func:`animl_lightning.prepare.pipeline.run_prepare`,
print the summary; errors become one line (:func:`animl_lightning.cli.run_command`).
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from animl_lightning.cli import command_name, refuse_unknown_keys, run_command
from animl_lightning.core.errors import ConfigError
from animl_lightning.hydra_entry import command_main
from animl_lightning.prepare.config import PrepareSettings
from animl_lightning.prepare.pipeline import format_summary, run_prepare


def settings_from_config(cfg: DictConfig) -> PrepareSettings:
    """Turn the composed Hydra config into validated settings (runs every ``__post_init__`` check)."""
    settings = OmegaConf.to_object(cfg)
    if not isinstance(settings, PrepareSettings):
        raise ConfigError(f"<root>: expected the prepare schema, got {type(settings).__name__}")
    return settings


def prepare(cfg: DictConfig) -> None:
    """Validate the config, run the stages, print the summary."""
    refuse_unknown_keys(cfg)
    print(format_summary(run_prepare(settings_from_config(cfg), command=command_name("prepare.py"))))


@command_main("prepare", "prepare.py")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    run_command(lambda: prepare(cfg), "prepare.py")


if __name__ == "__main__":
    main()
