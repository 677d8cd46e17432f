"""``python -m animl_lightning.classify checkpoint=CKPT detections_file=MD.json images_dir=DIR output_file=OUT.json``.

Settings: ``configs/classify.yaml``. The Hydra edge only: the work is
:func:`animl_lightning.deploy.classify.run_classify`; bad inputs end the run with one line naming the file, record
and field (exit status 2), never a traceback. ``output_file`` (and ``output_csv``) may not be an input file, and a
run in which every detection failed writes nothing and exits with status 2; the last line says how many failed.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from animl_lightning.cli import refuse_unknown_keys, run_command
from animl_lightning.core.errors import ConfigError
from animl_lightning.core.smoothing import SmoothingOptions
from animl_lightning.deploy.classify import ClassifySettings, run_classify
from animl_lightning.deploy.classify_job import ClassifySummary
from animl_lightning.deploy.int8_settings import Int8Settings
from animl_lightning.hydra_entry import command_main


def _required(cfg: DictConfig, key: str) -> Any:
    if OmegaConf.is_missing(cfg, key) or cfg[key] in (None, ""):
        raise ConfigError(f"{key}: must be set (e.g. {key}=PATH on the command line)")
    return cfg[key]


def classify(cfg: DictConfig) -> ClassifySummary:
    """Classify the configured input and print the summary."""
    refuse_unknown_keys(cfg)
    settings = ClassifySettings(
        threshold=float(cfg.detections.threshold),
        category=str(cfg.detections.category),
        resume=bool(cfg.resume),
        backend=str(cfg.backend),
        precision=str(cfg.precision),
        int8=Int8Settings(**OmegaConf.to_container(cfg.int8, resolve=True)),  # type: ignore[arg-type]
        smoothing_options=SmoothingOptions.from_mapping(
            OmegaConf.to_container(cfg.smoothing, resolve=True)  # type: ignore[arg-type]
        ),
        **OmegaConf.to_container(cfg.classify, resolve=True),  # type: ignore[arg-type]
    )
    summary = run_classify(
        _required(cfg, "checkpoint"),
        _required(cfg, "output_file"),
        detections_file=cfg.detections_file,
        cct_file=cfg.cct_file,
        crops_dir=cfg.crops_dir,
        images_dir=cfg.images_dir,
        device=str(cfg.device),
        settings=settings,
        output_csv=cfg.output_csv or None,
        classifier_name=cfg.classifier_name or None,
    )
    print(summary.table())
    wrote = f"wrote {cfg.output_file}" + (f" and {cfg.output_csv}" if cfg.output_csv else "")
    # The last line is what a user reads: a partly failed run must not look like a clean one.
    failed = summary.failure_note()
    print(f"{wrote}; {failed}" if failed else wrote)
    return summary


@command_main("classify", "classify")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    run_command(lambda: classify(cfg), "classify")


if __name__ == "__main__":
    main()
