"""How training and evaluation draw crops: label-balanced weights and the samplers for several processes.

The old pipeline (pipeline.md 3.5) balanced labels by weighting every crop so that each label's crops add up to the
same total; the weight functions are pure numpy so they can be tested without a loader.

Samplers for multi-process (DDP) training and evaluation. Both are :class:`~torch.utils.data.DistributedSampler`
subclasses, so Lightning uses them as they are instead of wrapping the loader's sampler in its own (padding)
distributed sampler.

- :class:`UnpaddedDistributedSampler` (val/test/evaluation loaders): rank ``r`` of ``n`` gets rows ``r, r+n, ...``
  and nothing else. PyTorch's ``DistributedSampler`` instead pads every shard to the same length by repeating
  rows, and those repeats would be counted twice in the gathered confusion matrix and the per-label tables.
  Shards then differ by at most one row, so ranks may run a different number of batches; evaluation has no
  per-batch collective (metric states are gathered once at epoch end), so that is safe.
- :class:`DistributedWeightedSampler` (training loader): every rank draws the *same* weighted sequence from a
  generator seeded with ``seed + epoch`` and keeps positions ``r, r+n, ...``, so the ranks' shares are disjoint
  parts of one weighted draw and the draw changes every epoch (Lightning calls ``set_epoch``). Wrapping a
  ``WeightedRandomSampler`` instead would draw from each rank's global torch RNG, whose state differs between
  ranks as soon as augmentation has consumed a different number of random numbers. Shards are equally long
  (training needs the same number of steps on every rank).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence, Sized

import numpy as np
import torch
from torch.utils.data import DistributedSampler
from typing_extensions import override

from animl_lightning.core.errors import DataError


def label_balanced_weights(labels: np.ndarray, num_labels: int, confidence: np.ndarray | None = None) -> np.ndarray:
    """Weight each crop so that every present label gets the same total weight.

    With ``confidence``, each crop's weight is first multiplied by its box confidence, so inside a label the
    confident boxes are drawn more often, while the label's total stays equal to every other label's.

    The weights sum to ``n = len(labels)`` (each of the ``k`` present labels gets ``n / k``). The old pipeline used
    ``n = sum(confidence)`` instead; a ``WeightedRandomSampler`` only sees relative weights, so both draw the same.
    A label whose crops all have confidence 0 counts as absent and its crops get weight 0.

    Args:
        labels: integer label index per crop, in ``[0, num_labels)``.
        num_labels: size of the label index (labels missing from ``labels`` are fine).
        confidence: optional non-negative weight per crop (the ``confidence`` column).

    Returns:
        ``float64`` array of the same length as ``labels``.

    Raises:
        ValueError: on out-of-range labels, a length mismatch, negative or non-finite confidences, or when every
            weight would be zero.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"labels must be a 1-D array, got shape {labels.shape}")
    if num_labels < 1:
        raise DataError(f"num_labels must be >= 1, got {num_labels}")
    n = labels.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= num_labels:
        raise DataError(f"labels must be in [0, {num_labels}), got values in [{labels.min()}, {labels.max()}]")

    if confidence is None:
        base = np.ones(n, dtype=np.float64)
    else:
        base = np.asarray(confidence, dtype=np.float64)
        if base.shape != (n,):
            raise DataError(f"confidence has shape {base.shape}, expected ({n},) to match labels")
        if not np.isfinite(base).all() or (base < 0).any():
            raise DataError("confidence must be finite and >= 0 for every crop")

    totals = np.bincount(labels, weights=base, minlength=num_labels)
    present = totals > 0
    if not present.any():
        raise DataError("every crop has weight 0; nothing to sample")
    per_label_total = n / int(present.sum())
    # Absent labels have total 0; dividing by 1 there keeps their (zero) weights at zero without a warning.
    scale = np.where(present, per_label_total / np.where(present, totals, 1.0), 0.0)
    weights: np.ndarray = base * scale[labels]
    return weights


def confidence_weights(confidence: np.ndarray) -> np.ndarray:
    """Weight each crop by its box confidence alone, rescaled so that the weights sum to the number of crops.

    Raises:
        ValueError: on negative or non-finite confidences, or when all are zero.
    """
    base = np.asarray(confidence, dtype=np.float64)
    if base.ndim != 1:
        raise DataError(f"confidence must be a 1-D array, got shape {base.shape}")
    if base.size == 0:
        return base
    if not np.isfinite(base).all() or (base < 0).any():
        raise DataError("confidence must be finite and >= 0 for every crop")
    total = base.sum()
    if total <= 0:
        raise DataError("every crop has confidence 0; nothing to sample")
    weights: np.ndarray = base * (base.size / total)
    return weights


class UnpaddedDistributedSampler(DistributedSampler[int]):
    """Rank ``r`` of ``num_replicas`` gets rows ``r::num_replicas`` in order, without padding or shuffling.

    Raises:
        ValueError: when a rank would get no row at all (fewer rows than ranks): it would run no batch and skip the
            end-of-epoch metric gathering the other ranks wait for.
    """

    def __init__(self, dataset: Sized, num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)  # type: ignore[arg-type]
        size = len(dataset)
        self.total_size = size
        self.num_samples = len(range(self.rank, size, self.num_replicas))
        if 0 < size < self.num_replicas:
            raise DataError(
                f"cannot evaluate {size} crops on {self.num_replicas} processes: every process needs at least one; "
                "evaluate with trainer.devices=1"
            )

    @override
    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    @override
    def __len__(self) -> int:
        return self.num_samples


class DistributedWeightedSampler(DistributedSampler[int]):
    """A weighted draw with replacement, shared out disjointly over the ranks and redrawn every epoch.

    Args:
        weights: one non-negative sampling weight per row (need not sum to 1).
        num_replicas: number of ranks (default: the process group's world size).
        rank: this rank (default: the process group's rank).
        seed: base seed; must be the same on every rank (the draw of epoch ``e`` uses ``seed + e``).
        num_samples: rows drawn per epoch over all ranks (default: ``len(weights)``), rounded up to a multiple of
            ``num_replicas`` so that every rank gets ``ceil(num_samples / num_replicas)`` rows.
    """

    def __init__(
        self,
        weights: Sequence[float] | np.ndarray,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        num_samples: int | None = None,
    ) -> None:
        values = np.asarray(weights, dtype=np.float64)
        if values.ndim != 1 or len(values) == 0:
            raise DataError(f"weights must be a non-empty 1-d sequence, got shape {values.shape}")
        if not np.isfinite(values).all() or (values < 0).any() or values.sum() <= 0:
            raise DataError("weights must be finite, non-negative and not all zero")
        # DistributedSampler only needs len(dataset); the weights stand in for the dataset.
        super().__init__(values, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)  # type: ignore[arg-type]
        draws = len(values) if num_samples is None else int(num_samples)
        if draws < 1:
            raise DataError(f"num_samples must be >= 1, got {num_samples}")
        self.weights = torch.as_tensor(values, dtype=torch.double)
        self.num_samples = math.ceil(draws / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    @override
    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        drawn = torch.multinomial(self.weights, self.total_size, replacement=True, generator=generator)
        return iter(drawn[self.rank : self.total_size : self.num_replicas].tolist())

    @override
    def __len__(self) -> int:
        return self.num_samples
