"""Build a classification dataset from a COCO Camera Traps export.

    python prepare.py                                   # the generated demo project -> data/demo
    python prepare.py coco_file=export.json images_dir=images output_dir=data/mine s3.bucket=animl-images-serving-prod

Stages: ingest -> images -> boxes -> crops -> labels -> dataset -> splits. See configs/prepare.yaml for every key.
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from animl_lightning.pipeline import PrepareError, format_summary, run_prepare
from animl_lightning.prepare_config import ConfigError, PrepareSettings

log = logging.getLogger("prepare")

ConfigStore.instance().store(name="prepare_schema", node=PrepareSettings)


def settings_from_config(cfg: DictConfig) -> PrepareSettings:
    """Turn the composed Hydra config into validated settings (runs every ``__post_init__`` check)."""
    settings = OmegaConf.to_object(cfg)
    if not isinstance(settings, PrepareSettings):
        raise ConfigError(f"<root>: expected the prepare schema, got {type(settings).__name__}")
    return settings


@hydra.main(version_base="1.3", config_path="configs", config_name="prepare")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: validate the config, run the stages, print the summary."""
    try:
        settings = settings_from_config(cfg)
        summary = run_prepare(settings)
    except (ConfigError, PrepareError) as err:
        log.debug("prepare failed", exc_info=True)
        print(f"prepare.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(format_summary(summary))


if __name__ == "__main__":
    main()
