"""The label index: the model's output positions and their labels, ``{"0": label, ...}`` on disk.

One shape everywhere a label order is written or read: ``label_index.json`` of a prepared dataset, the checkpoint's
model record (:mod:`animl_lightning.core.model_file`), the export sidecar's ``label_index``, the Animl bundle's
``index_to_name.json`` and the ``classification_categories`` of ``classify``'s output. The position of a label is
the index of its logit, so the order is decided once (by ``prepare.py``) and never re-sorted.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from animl_lightning.core.errors import AnimlError, ConfigError, require


@dataclass(frozen=True)
class LabelIndex:
    """Labels in output order: non-empty, distinct strings.

    Raises:
        ConfigError: an empty list, a label that is not a non-empty string, or a label listed twice.
    """

    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        require(bool(self.labels), "class_names", "needs at least 1 label, got none")
        for position, label in enumerate(self.labels):
            require(
                isinstance(label, str) and bool(label),
                "class_names",
                f"label {position} must be a non-empty string, got {label!r}",
            )
        duplicates = sorted({label for label in self.labels if self.labels.count(label) > 1})
        require(not duplicates, "class_names", f"labels appear more than once: {duplicates}")

    @classmethod
    def of(cls, labels: Iterable[Any]) -> LabelIndex:
        """The labels in the order given (each made a string, as Hydra may hand over other scalars)."""
        return cls(tuple(str(label) for label in labels))

    @classmethod
    def sorted_from(cls, labels: Iterable[Any]) -> LabelIndex:
        """The distinct labels of ``labels`` in sorted order: how ``prepare.py`` decides the order."""
        return cls(tuple(sorted({str(label) for label in labels})))

    @classmethod
    def from_dict(cls, raw: object, source: str, error: type[AnimlError] = ConfigError) -> LabelIndex:
        """Read the form :meth:`to_dict` writes (keys ``"0"``..``"n-1"``, any order).

        Args:
            raw: the parsed JSON (or checkpoint) value.
            source: the file and field, named first in every message.
            error: the error type to raise (the caller's family: a dataset file, a checkpoint, ...).

        Raises:
            error: not a non-empty object, keys that are not ``0..n-1``, or labels that are empty or repeated.
        """
        if not isinstance(raw, Mapping) or not raw:
            raise error(f"{source}: expected a non-empty JSON object {{'0': label, ...}}")
        try:
            keyed = {int(k): v for k, v in raw.items()}
        except (TypeError, ValueError) as err:
            raise error(f"{source}: keys must be integer strings, got {list(raw)[:5]}") from err
        if sorted(keyed) != list(range(len(keyed))):
            raise error(f"{source}: keys must be 0..{len(keyed) - 1} without gaps, got {sorted(keyed)[:10]}")
        labels = [keyed[i] for i in range(len(keyed))]
        for i, label in enumerate(labels):
            if not isinstance(label, str) or not label:
                raise error(f"{source}: key {i!r}: label must be a non-empty string, got {label!r}")
        duplicates = sorted({x for x in labels if labels.count(x) > 1})
        if duplicates:
            raise error(f"{source}: labels appear more than once: {duplicates}")
        return cls(tuple(labels))

    def to_dict(self) -> dict[str, str]:
        """``{"0": label, ...}``: JSON-ready, in output order."""
        return {str(position): label for position, label in enumerate(self.labels)}

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[str]:
        return iter(self.labels)

    def __getitem__(self, position: int) -> str:
        return self.labels[position]
