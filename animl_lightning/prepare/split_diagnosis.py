"""What a split achieved against its targets, and why it falls short where it does (made by
:func:`animl_lightning.prepare.splits.diagnose`, reported by the splits stage and in ``prepare_report.json``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from animl_lightning.core.contract import LocationKey
from animl_lightning.prepare.split_search import Score


@dataclass(frozen=True)
class DominantGroup:
    """A group too large for some evaluation split: where it may not go, and its share of all crops."""

    group: LocationKey
    crops: int
    share: float
    excluded_from: tuple[str, ...]


@dataclass(frozen=True)
class LabelProblem:
    """A label absent from some split, and the true reason."""

    label: str
    crops: int
    groups: int
    missing_splits: tuple[str, ...]
    reason: str

    def message(self) -> str:
        """One sentence naming the label, the splits it misses and why."""
        where = f"has no crop in split(s) {list(self.missing_splits)}"
        return f"label {self.label!r} ({self.crops} crops) {where}: {self.reason}"


@dataclass
class SplitDiagnosis:
    """What a split achieved against its targets, and why it falls short where it does."""

    group_by: str
    split_names: tuple[str, ...]
    targets: dict[str, float]
    tolerance: float
    shares: dict[str, float]
    groups: dict[str, int]
    dominant: list[DominantGroup] = field(default_factory=list)
    only_dominant_labels: list[str] = field(default_factory=list)
    label_problems: list[LabelProblem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    score: Score | None = None

    @property
    def off_target(self) -> dict[str, float]:
        """Splits whose overall share is further than the tolerance from the target: split -> deviation."""
        deviations = {s: self.shares[s] - self.targets[s] for s in self.split_names}
        return {s: d for s, d in deviations.items() if abs(d) > self.tolerance + 1e-12}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for ``prepare_report.json``."""
        return {
            "group_by": self.group_by,
            "targets": self.targets,
            "tolerance": self.tolerance,
            "achieved": {s: round(v, 6) for s, v in self.shares.items()},
            "groups": self.groups,
            "off_target": {s: round(d, 6) for s, d in self.off_target.items()},
            "dominant_groups": [
                {
                    "group": list(d.group),
                    "crops": d.crops,
                    "share": round(d.share, 6),
                    "excluded_from": list(d.excluded_from),
                }
                for d in self.dominant
            ],
            "labels_only_at_dominant_groups": self.only_dominant_labels,
            "label_problems": [p.message() for p in self.label_problems],
            "warnings": self.warnings,
            "score": None if self.score is None else _score_dict(self.score),
        }


def _score_dict(score: Score) -> dict[str, Any]:
    return {
        "total": round(score.total, 9),
        "overall": round(score.overall, 9),
        "labels": round(score.labels, 9),
        "coverage": round(score.coverage, 9),
        "places": round(score.places, 9),
        "missing_label_split_pairs": score.missing_pairs,
    }
