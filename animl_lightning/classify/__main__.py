"""``python -m animl_lightning.classify checkpoint=CKPT detections_file=MD.json images_dir=DIR output_file=OUT.json``.

Settings: ``configs/classify.yaml``. Bad inputs end the run with one message naming the file, record and field
(exit status 2), never a traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from animl_lightning.classify import (
    ClassifyInputError,
    ClassifySettings,
    ClassifySummary,
    classify_detections,
    detections_from_cct,
    detections_from_crops_folder,
    read_detections_file,
)
from animl_lightning.files import UnsafePathError
from animl_lightning.inference import CheckpointError, load_classifier

# The repository's configs/ folder, by absolute path so the entry also works when imported as a module.
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

log = logging.getLogger("animl_lightning.classify")


def _required(cfg: DictConfig, key: str) -> Any:
    if OmegaConf.is_missing(cfg, key) or cfg[key] in (None, ""):
        raise ClassifyInputError(f"{key}: must be set (e.g. {key}=PATH on the command line)")
    return cfg[key]


def run(cfg: DictConfig) -> ClassifySummary:
    """Classify the configured input; raises :class:`ClassifyInputError`/:class:`CheckpointError` for bad inputs."""
    checkpoint = _required(cfg, "checkpoint")
    output_file = Path(_required(cfg, "output_file"))
    sources = {key: cfg.get(key) for key in ("detections_file", "cct_file", "crops_dir") if cfg.get(key)}
    if len(sources) != 1:
        raise ClassifyInputError(
            f"set exactly one of detections_file, cct_file, crops_dir; got {sorted(sources) or 'none'}"
        )
    settings = ClassifySettings(
        threshold=float(cfg.detections.threshold),
        category=str(cfg.detections.category),
        min_conf=float(cfg.classify.min_conf),
        batch_size=int(cfg.classify.batch_size),
        num_workers=int(cfg.classify.num_workers),
        top_k=int(cfg.classify.top_k),
        save_interval_s=float(cfg.classify.save_interval_s),
        resume=bool(cfg.resume),
    )
    if "crops_dir" in sources:
        images_dir = Path(str(sources["crops_dir"]))
        results = detections_from_crops_folder(images_dir)
    else:
        images_dir = Path(str(_required(cfg, "images_dir")))
        if not images_dir.is_dir():
            raise ClassifyInputError(f"images_dir: {images_dir} is not a folder")
        if "cct_file" in sources:
            results = detections_from_cct(str(sources["cct_file"]), images_dir)
        else:
            results = read_detections_file(str(sources["detections_file"]))
    loaded = load_classifier(checkpoint, device=str(cfg.device))
    return classify_detections(
        loaded,
        results,
        images_dir,
        output_file,
        settings,
        output_csv=cfg.output_csv or None,
        classifier_name=cfg.classifier_name or None,
    )


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="classify")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    try:
        summary = run(cfg)
    except (ClassifyInputError, CheckpointError, UnsafePathError, ValueError) as error:
        log.error("%s", error)
        sys.exit(2)
    print(summary.table())
    print(f"wrote {cfg.output_file}" + (f" and {cfg.output_csv}" if cfg.output_csv else ""))


if __name__ == "__main__":
    main()
