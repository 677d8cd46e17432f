"""Samplers for multi-process (DDP) training and evaluation.

Both are :class:`~torch.utils.data.DistributedSampler` subclasses, so Lightning uses them as they are instead of
wrapping the loader's sampler in its own (padding) distributed sampler.

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
            raise ValueError(
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
            raise ValueError(f"weights must be a non-empty 1-d sequence, got shape {values.shape}")
        if not np.isfinite(values).all() or (values < 0).any() or values.sum() <= 0:
            raise ValueError("weights must be finite, non-negative and not all zero")
        # DistributedSampler only needs len(dataset); the weights stand in for the dataset.
        super().__init__(values, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)  # type: ignore[arg-type]
        draws = len(values) if num_samples is None else int(num_samples)
        if draws < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
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
