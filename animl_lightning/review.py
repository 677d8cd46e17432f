"""``python -m animl_lightning.review run_dir=RUN``: the crops of a finished run whose given label is likely wrong.

Settings: ``configs/review.yaml``. The Hydra edge only: the review is
:func:`animl_lightning.train.label_review.review_run`, the folds of ``review.folds=K``
:func:`animl_lightning.train.review_folds.score_train_crops`; a bad input ends with one line.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from animl_lightning.cli import CONFIG_DIR, run_command
from animl_lightning.core.errors import require, require_known_keys
from animl_lightning.hydra_entry import command_main

# The folds are fits of this package's train command. A checkout's train.py imports the package next to it (an
# editable install of another checkout would answer `-m`); an installed package has only its module.
_CHECKOUT_TRAIN = CONFIG_DIR.parent / "train.py"
TRAIN_COMMAND = (
    (sys.executable, str(_CHECKOUT_TRAIN))
    if CONFIG_DIR.parent != Path(__file__).resolve().parent and _CHECKOUT_TRAIN.is_file()
    else (sys.executable, "-m", "animl_lightning.train_command")
)


def review(cfg: DictConfig) -> None:
    """Review the run, print the counts and say where the files went."""
    from animl_lightning.train.label_review import ReviewSettings, load_run_predictions, review_run

    require(
        not OmegaConf.is_missing(cfg, "run_dir") and bool(cfg.run_dir),
        "run_dir",
        "must be set to a train.py run folder (e.g. run_dir=outputs/train/DATE/TIME)",
    )
    values: Any = OmegaConf.to_container(cfg.review, resolve=True)
    require_known_keys(values, ReviewSettings.__dataclass_fields__, "review")
    settings = ReviewSettings(**values)
    run = load_run_predictions(str(cfg.run_dir))
    train_frames = None
    if settings.folds is not None:
        from animl_lightning.train.review_folds import score_train_crops

        train_frames = {"train": score_train_crops(run, settings.folds, settings.fold_seed, TRAIN_COMMAND)}
    result = review_run(run.run_dir, settings, train_frames, run)
    print(result.per_split.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {result.folder}: {result.issues} likely label errors, {result.uncertain} uncertain crops")
    _rebuild_report(run.run_dir)


def _rebuild_report(run_dir: Path) -> None:
    """Rebuild the run's report.html so that its label review section shows what was just written.

    The review's own files are complete by now: a report that cannot be rebuilt is a warning, not a failed review.
    """
    from animl_lightning.core.errors import AnimlError
    from animl_lightning.train.report import build_report, run_report_settings

    try:
        settings = run_report_settings(run_dir)
        if settings is None:
            print("report.html not rebuilt: the run has report.enabled=false")
            return
        path = build_report(run_dir, settings)
    except AnimlError as err:
        print(f"review: warning: report.html not rebuilt: {err}", file=sys.stderr)
        return
    print(f"rebuilt {path} with the label review section")


@command_main("review", "review")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    run_command(lambda: review(cfg), "review")


if __name__ == "__main__":
    main()
