"""The wandb logger of ``logger=wandb``: Lightning's, without the one setting current wandb warns about."""

from __future__ import annotations

from lightning.pytorch.loggers.wandb import WandbLogger as LightningWandbLogger


class WandbLogger(LightningWandbLogger):
    """Lightning's ``WandbLogger`` with the keys of ``configs/logger/wandb.yaml``.

    Lightning always passes ``anonymous`` to ``wandb.init``, even as ``None``, and wandb 0.19 and later print a
    deprecation warning for it on every run ("The anonymous setting has no effect"); it is left out here.

    Args:
        save_dir: the run's files go to ``<save_dir>/wandb``.
        project: wandb project.
        group: group of runs (a sweep's jobs); None = ungrouped.
        name: run name; None = wandb's generated name.
        tags: run tags.
        job_type: job type shown in the wandb UI.
        offline: force offline mode; False leaves it to ``WANDB_MODE``.
        log_model: upload checkpoints as artifacts.
    """

    def __init__(
        self,
        save_dir: str,
        project: str = "animl-lightning",
        group: str | None = None,
        name: str | None = None,
        tags: list[str] | None = None,
        job_type: str | None = None,
        offline: bool = False,
        log_model: bool = False,
    ) -> None:
        super().__init__(
            save_dir=save_dir,
            project=project,
            group=group,
            name=name,
            tags=tags or [],
            job_type=job_type,
            offline=offline,
            log_model=log_model,
        )
        self._wandb_init.pop("anonymous", None)
