"""The recipe keys' checks and the label prior of the logit-adjusted loss (``configs/recipe/``)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from animl_lightning.core.errors import ConfigError, require
from animl_lightning.core.model_file import TTA_MODES


def log_label_prior(counts: np.ndarray) -> Tensor:
    """log of each label's share of the train crops; a label with no crop counts as one, so the log stays finite."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    return torch.from_numpy(np.log(counts / counts.sum())).float()


def check_recipe_settings(
    *,
    drop_path_rate: float,
    mixup_alpha: float,
    cutmix_alpha: float,
    mixup_prob: float,
    mixup_switch_prob: float,
    ema_decay: float,
    backbone_lr_scale: float,
    logit_adjustment: float,
    tta: str,
) -> None:
    """Refuse recipe settings outside their ranges, naming the key."""
    ranges = (
        ("drop_path_rate", drop_path_rate, 0.0, 1.0, False),
        ("mixup_alpha", mixup_alpha, 0.0, None, True),
        ("cutmix_alpha", cutmix_alpha, 0.0, None, True),
        ("mixup_prob", mixup_prob, 0.0, 1.0, True),
        ("mixup_switch_prob", mixup_switch_prob, 0.0, 1.0, True),
        ("ema_decay", ema_decay, 0.0, 1.0, False),
        ("logit_adjustment", logit_adjustment, 0.0, None, True),
    )
    for key, value, low, high, high_inclusive in ranges:
        above = high is not None and (value > high if high_inclusive else value >= high)
        if value < low or above:
            bound = "]" if high_inclusive else ")"
            raise ConfigError(
                f"model.{key}: must be in [{low}, {high if high is not None else 'inf'}{bound}, got {value}"
            )
    require(backbone_lr_scale > 0, "model.backbone_lr_scale", f"must be > 0, got {backbone_lr_scale}")
    require(tta in TTA_MODES, "eval.tta", f"must be one of {list(TTA_MODES)}, got {tta!r}")
