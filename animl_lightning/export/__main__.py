"""``python -m animl_lightning.export checkpoint=CKPT format=onnx|torchscript output=PATH``.

Settings: ``configs/export.yaml``. Bad inputs end the run with one message (exit status 2), never a traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from animl_lightning.export import ExportError, ExportResult, export_checkpoint
from animl_lightning.inference import CheckpointError

# The repository's configs/ folder, by absolute path so the entry also works when imported as a module.
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

log = logging.getLogger("animl_lightning.export")


def run(cfg: DictConfig) -> ExportResult:
    """Export the configured checkpoint; raises :class:`ExportError`/:class:`CheckpointError` for bad inputs."""
    for key in ("checkpoint", "output"):
        if OmegaConf.is_missing(cfg, key) or not cfg[key]:
            raise ExportError(f"{key}: must be set (e.g. {key}=PATH on the command line)")
    return export_checkpoint(str(cfg.checkpoint), str(cfg.format), str(cfg.output))


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="export")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    try:
        result = run(cfg)
    except (ExportError, CheckpointError) as error:
        log.error("%s", error)
        sys.exit(2)
    size = "dynamic batch and input size" if result.dynamic_size else "dynamic batch, fixed input size"
    print(f"wrote {result.model_file} ({result.format}, {size}) and {result.sidecar_file}")


if __name__ == "__main__":
    main()
