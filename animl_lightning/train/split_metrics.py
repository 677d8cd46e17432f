"""The metric state of one split during training and evaluation (torchmetrics, gathered across DDP ranks)."""

from __future__ import annotations

from typing import Any

from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassPrecision,
    MulticlassRecall,
)


class SplitMetrics(nn.Module):
    """Metric state of one split: scalar metrics, mean loss and the confusion matrix.

    Child modules of the LightningModule, so they follow its device and torchmetrics gathers their *states* across
    DDP ranks before computing (nothing is averaged per rank).
    """

    def __init__(self, num_classes: int, split: str) -> None:
        super().__init__()
        scalars: dict[str, Any] = {
            "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            "precision_macro": MulticlassPrecision(num_classes, average="macro"),
            "recall_macro": MulticlassRecall(num_classes, average="macro"),
        }
        # torchmetrics refuses top_k > num_classes; with fewer than 3 labels top-3 is left out (NaN in the tables).
        if num_classes >= 3:
            scalars["top3"] = MulticlassAccuracy(num_classes, top_k=3, average="micro")
        self.scalars = MetricCollection(scalars, prefix=f"{split}/", compute_groups=False)
        self.loss = MeanMetric()
        self.confusion = MulticlassConfusionMatrix(num_classes)

    def reset(self) -> None:
        """Clear all state (called at epoch start)."""
        self.scalars.reset()
        self.loss.reset()
        self.confusion.reset()


def metrics_key(split: str) -> str:
    # nn.ModuleDict refuses the key "train" (it is an nn.Module method).
    return f"{split}_metrics"
