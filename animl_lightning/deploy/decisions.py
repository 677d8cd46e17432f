"""What ``classify`` reports for a detection when the checkpoint has thresholds: the label, a taxon, or unknown.

With the checkpoint's per-label thresholds (``train.py``'s ``thresholds.*``, chosen on val) and
``classify.thresholds=true`` (the default when the checkpoint has them), a detection whose best label L has a
probability of at least L's threshold keeps L. Otherwise:

- with a taxonomy, the detection is rolled up along L's lineage: at each rank from species up to class, the
  probability of L's taxon is the sum over the labels under it, and the first (lowest) rank where it reaches that
  taxon's threshold is reported (a "canidae" where "gray fox" was not sure enough);
- else, or when no rank passes, it is ``unknown``.

Categories: the labels keep ids ``"0"..."n-1"``; ``unknown`` is ``"n"`` (:func:`decision_categories`), and the taxa
follow, rank by rank. The reported category goes first in ``classifications`` with its probability (the label's
own for unknown, the taxon's sum for a taxon), followed by the model's list, so nothing the model said is lost and
the list stays sorted. ``classification_category_descriptions`` gives every category SpeciesNet's seven-part
string ``id;class;order;family;genus;species;name``, which MegaDetector's tools parse.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from animl_lightning.core.label_index import LabelIndex
from animl_lightning.core.taxonomy import RANKS, Taxonomy

UNKNOWN = "unknown"


@dataclass(frozen=True)
class DecisionCategories:
    """Category ids and names beyond the labels: ``unknown`` and the taxa."""

    names: dict[str, str]
    descriptions: dict[str, str]
    unknown_id: str
    taxon_ids: dict[tuple[str, str], str]
    label_count: int

    def is_decision(self, category_id: str) -> bool:
        """Whether an id is one of these (not a label of the model)."""
        return int(category_id) >= self.label_count


def decision_categories(labels: LabelIndex, taxonomy: Taxonomy | None) -> DecisionCategories:
    """The ids of ``unknown`` and of every taxon (module docstring), with their names and descriptions."""
    n = len(labels)
    names = labels.to_dict()
    descriptions = {key: _seven(name, taxonomy.description(name) if taxonomy else "") for key, name in names.items()}
    unknown_id = str(n)
    names[unknown_id] = UNKNOWN if UNKNOWN not in labels else f"{UNKNOWN} (below threshold)"
    descriptions[unknown_id] = _seven(UNKNOWN, "")
    taxon_ids: dict[tuple[str, str], str] = {}
    if taxonomy is not None:
        used = set(names.values())
        for rank in RANKS:
            for taxon in taxonomy.taxa(rank):
                if rank == "species" and taxon in labels:
                    continue  # the label itself
                category_id = str(n + 1 + len(taxon_ids))
                name = taxon if taxon not in used else f"{taxon} ({rank})"
                used.add(name)
                taxon_ids[(rank, taxon)] = category_id
                names[category_id] = name
                descriptions[category_id] = _seven(name, taxonomy.taxon_description(rank, taxon))
    return DecisionCategories(names, descriptions, unknown_id, taxon_ids, n)


def _seven(name: str, ranks: str) -> str:
    fields = ranks.split(";") if ranks else [""] * len(RANKS)
    return ";".join([name, *fields, name])


@dataclass(frozen=True)
class LineageStep:
    """One rank of a label's lineage that has a threshold: its taxon and the labels under it."""

    rank: str
    taxon: str
    threshold: float
    members: np.ndarray


@dataclass(frozen=True)
class ThresholdRule:
    """The per-label thresholds (NaN where a label has none) and each label's lineage, lowest rank first.

    The lineages are worked out once per run, not once per detection below its threshold.
    """

    per_label: np.ndarray
    lineages: tuple[tuple[LineageStep, ...], ...]

    @classmethod
    def from_record(cls, record: Mapping[str, Any], labels: Sequence[str], taxonomy: Taxonomy | None) -> ThresholdRule:
        """From the checkpoint's thresholds record."""
        per_label = record.get("per_label") or {}
        values = np.array([np.nan if per_label.get(n) is None else float(per_label[n]) for n in labels])
        per_taxon: Mapping[str, Mapping[str, float | None]] = record.get("per_taxon") or {}
        lineages = [() if taxonomy is None else _lineage(taxonomy, per_taxon, i) for i in range(len(labels))]
        return cls(per_label=values, lineages=tuple(lineages))

    def decide(self, probabilities: np.ndarray, categories: DecisionCategories) -> tuple[str, float] | None:
        """None when the best label passes its threshold; else the (category id, probability) to report."""
        best = int(np.argmax(probabilities))
        confidence = float(probabilities[best])
        limit = self.per_label[best]
        if not np.isnan(limit) and confidence >= limit:
            return None
        for step in self.lineages[best]:
            total = float(np.sum(probabilities[step.members]))
            if total >= step.threshold:
                category = categories.taxon_ids.get((step.rank, step.taxon))
                if category is None:  # a species taxon that is the label itself
                    continue
                return category, total
        return categories.unknown_id, confidence


def _lineage(
    taxonomy: Taxonomy, per_taxon: Mapping[str, Mapping[str, float | None]], label: int
) -> tuple[LineageStep, ...]:
    steps = []
    for rank in reversed(RANKS):
        column = taxonomy.ranks[rank]
        taxon = column[label]
        threshold = (per_taxon.get(rank) or {}).get(taxon) if taxon else None
        if threshold is not None:
            members = np.array([i for i, t in enumerate(column) if t == taxon], dtype=np.int64)
            steps.append(LineageStep(rank, taxon, float(threshold), members))
    return tuple(steps)
