"""Learning-rate schedules that torch composes but no single torch class names."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from animl_lightning.core.errors import require


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    max_epochs: int,
    warmup_epochs: int = 1,
    warmup_start_factor: float = 0.1,
    eta_min: float = 0.0,
) -> LRScheduler:
    """Linear warmup over ``warmup_epochs`` from ``warmup_start_factor`` x lr, then cosine decay to ``eta_min``.

    A fresh head's large early gradients would otherwise reach the pretrained backbone at the full rate.
    """
    require(max_epochs >= 1, "scheduler.max_epochs", f"must be >= 1, got {max_epochs}")
    require(
        0 <= warmup_epochs < max_epochs,
        "scheduler.warmup_epochs",
        f"must be in [0, max_epochs={max_epochs}), got {warmup_epochs}",
    )
    require(
        0.0 < warmup_start_factor <= 1.0,
        "scheduler.warmup_start_factor",
        f"must be in (0, 1], got {warmup_start_factor}",
    )
    if warmup_epochs == 0:
        return CosineAnnealingLR(optimizer, T_max=max_epochs, eta_min=eta_min)
    warmup = LinearLR(optimizer, start_factor=warmup_start_factor, total_iters=warmup_epochs)
    cosine = CosineAnnealingLR(optimizer, T_max=max_epochs - warmup_epochs, eta_min=eta_min)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_epochs])
