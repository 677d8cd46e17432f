"""``python -m animl_lightning.report run_dir=RUN``: rebuild ``report.html`` of a finished ``train.py`` run.

Settings: ``configs/report.yaml``. The Hydra edge only: the page is
:func:`animl_lightning.train.report.build_report`; a folder that is not a finished run ends with one line.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from animl_lightning.cli import refuse_unknown_keys, run_command
from animl_lightning.core.errors import require
from animl_lightning.hydra_entry import command_main


def report(cfg: DictConfig) -> None:
    """Build the page and say where it went."""
    refuse_unknown_keys(cfg)
    from animl_lightning.train.report import ReportSettings, build_report

    require(
        not OmegaConf.is_missing(cfg, "run_dir") and bool(cfg.run_dir),
        "run_dir",
        "must be set to a train.py run folder (e.g. run_dir=outputs/train/DATE/TIME)",
    )
    settings = ReportSettings(**OmegaConf.to_container(cfg.report, resolve=True))  # type: ignore[arg-type]
    path = build_report(str(cfg.run_dir), settings)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


@command_main("report", "report")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    run_command(lambda: report(cfg), "report")


if __name__ == "__main__":
    main()
