"""The labels' taxonomy: ``labels.taxonomy_file``, its checks, and rolling probabilities up to a rank (pure).

The file is a CSV with a ``label`` column and the rank columns ``class, order, family, genus, species`` (the layout
AddaxAI uses; a rank left empty is unknown for that label). Names are compared case-insensitively and stored in
lower case. Checks, each failing with one line naming the file, row and field:

- the columns exist; every label of the dataset has exactly one row; rows for labels the dataset does not have
  are named (a mistyped label would otherwise silently get no taxonomy);
- the ranks nest: a taxon has one parent (two rows giving the genus ``canis`` different families is an error).

Rolling up: at a rank, a taxon's probability is the sum of the probabilities of the labels under it; a label with
no taxon at that rank is left out there. ``prepare.py`` validates the file against the final label list and writes
it to the dataset folder as ``taxonomy.csv``; ``train.py`` stores it in the checkpoint, where ``classify`` and
``export`` read it.
"""

from __future__ import annotations

import csv
import io
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from animl_lightning.core.errors import InputFileError

RANKS: tuple[str, ...] = ("class", "order", "family", "genus", "species")
TAXONOMY_FILENAME = "taxonomy.csv"
TAXONOMY_KEY = "taxonomy"  # the checkpoint's top-level key


class TaxonomyError(InputFileError):
    """The taxonomy file does not fit the labels; the message names the file, row and field."""


@dataclass(frozen=True)
class Taxonomy:
    """Each label's taxon at every rank (``""`` where unknown), for the labels in model order."""

    labels: tuple[str, ...]
    ranks: Mapping[str, tuple[str, ...]]

    def taxa(self, rank: str) -> list[str]:
        """The distinct taxa at ``rank``, sorted."""
        return sorted({t for t in self.ranks[rank] if t})

    def rollup_matrix(self, rank: str) -> tuple[list[str], np.ndarray]:
        """``(taxa, M)`` with ``M[i, j] = 1`` when label ``i`` is under taxon ``j``: ``probs @ M`` rolls up."""
        taxa = self.taxa(rank)
        column = {t: j for j, t in enumerate(taxa)}
        matrix = np.zeros((len(self.labels), len(taxa)), dtype=np.float64)
        for i, taxon in enumerate(self.ranks[rank]):
            if taxon:
                matrix[i, column[taxon]] = 1.0
        return taxa, matrix

    def label_taxon(self, rank: str) -> np.ndarray:
        """Each label's taxon index at ``rank`` in :meth:`taxa` order (-1 where unknown)."""
        column = {t: j for j, t in enumerate(self.taxa(rank))}
        return np.array([column.get(t, -1) for t in self.ranks[rank]], dtype=np.int64)

    def description(self, label: str) -> str:
        """``class;order;family;genus;species`` of a label (empty fields where unknown)."""
        i = self.labels.index(label)
        return ";".join(self.ranks[rank][i] for rank in RANKS)

    def taxon_description(self, rank: str, taxon: str) -> str:
        """The ranks down to ``rank`` of a taxon (from any label under it), the lower ones empty."""
        i = self.ranks[rank].index(taxon)
        depth = RANKS.index(rank)
        return ";".join(self.ranks[r][i] if k <= depth else "" for k, r in enumerate(RANKS))

    def to_dict(self) -> dict[str, Any]:
        """Plain types, for a checkpoint loaded with ``weights_only=True``."""
        return {"labels": list(self.labels), "ranks": {rank: list(self.ranks[rank]) for rank in RANKS}}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "taxonomy") -> Taxonomy:
        """Inverse of :meth:`to_dict`."""
        try:
            labels = tuple(str(v) for v in raw["labels"])
            ranks = {rank: tuple(str(v) for v in raw["ranks"][rank]) for rank in RANKS}
        except (KeyError, TypeError) as err:
            raise TaxonomyError(f"{source}: field {err} is missing or malformed") from err
        if any(len(v) != len(labels) for v in ranks.values()):
            raise TaxonomyError(f"{source}: every rank must list one taxon per label")
        return cls(labels=labels, ranks=ranks)

    def to_csv(self) -> str:
        """The ``taxonomy.csv`` text (``label`` then the ranks)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["label", *RANKS])
        for i, label in enumerate(self.labels):
            writer.writerow([label, *(self.ranks[rank][i] for rank in RANKS)])
        return buffer.getvalue()


def read_taxonomy(path: str | Path, labels: Sequence[str]) -> Taxonomy:
    """Read and check a taxonomy CSV against ``labels`` (module docstring).

    Raises:
        TaxonomyError: unreadable, columns missing, a label missing or repeated, unknown labels, ranks that do
            not nest; one line naming the file, row and field.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError as err:
        raise TaxonomyError(f"labels.taxonomy_file: {file} does not exist") from err
    except (OSError, UnicodeDecodeError) as err:
        raise TaxonomyError(f"labels.taxonomy_file: {file} cannot be read: {err}") from err
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip().lower() for h in reader.fieldnames or []]
    missing = [c for c in ("label", *RANKS) if c not in header]
    if missing:
        raise TaxonomyError(f"{file}: columns {missing} are missing (need label, {', '.join(RANKS)})")
    wanted = {label.lower(): label for label in labels}
    rows: dict[str, dict[str, str]] = {}
    unknown: list[str] = []
    for number, raw in enumerate(reader, start=2):
        row = {str(k).strip().lower(): (v or "").strip().lower() for k, v in raw.items() if k is not None}
        name = row.get("label", "")
        if not name:
            raise TaxonomyError(f"{file}, row {number}: field 'label' is empty")
        if name not in wanted:
            unknown.append(name)
            continue
        if name in rows:
            raise TaxonomyError(f"{file}, row {number}: label {name!r} appears twice")
        rows[name] = row
    if unknown:
        raise TaxonomyError(f"{file}: labels {sorted(unknown)[:10]} are not labels of this dataset ({sorted(wanted)})")
    absent = [label for key, label in wanted.items() if key not in rows]
    if absent:
        raise TaxonomyError(f"{file}: labels {absent[:10]} have no row; every label needs one (empty ranks allowed)")
    ranks = {rank: tuple(rows[label.lower()][rank] for label in labels) for rank in RANKS}
    _check_nesting(file, tuple(labels), ranks)
    return Taxonomy(labels=tuple(labels), ranks=ranks)


def _check_nesting(file: Path, labels: tuple[str, ...], ranks: Mapping[str, tuple[str, ...]]) -> None:
    for upper, lower in itertools.pairwise(RANKS):
        parent: dict[str, tuple[str, str]] = {}
        for i, taxon in enumerate(ranks[lower]):
            if not taxon:
                continue
            seen = parent.setdefault(taxon, (ranks[upper][i], labels[i]))
            if seen[0] != ranks[upper][i]:
                raise TaxonomyError(
                    f"{file}: {lower} {taxon!r} has {upper} {seen[0]!r} for label {seen[1]!r} but "
                    f"{ranks[upper][i]!r} for label {labels[i]!r}"
                )
