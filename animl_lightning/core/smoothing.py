"""Classification smoothing within an image or a sequence, by MegaDetector's rules (pure functions).

MegaDetector's ``postprocessing.classification_postprocessing`` is the tool camera-trap users smooth classifier
output with; this module applies the same rules, under the same option names and defaults
(``ClassificationSmoothingOptions``), to the detections of one group (an image, or every image of a sequence):

1. Only *relevant* detections take part: they have a classification, a detection confidence of at least
   ``detection_confidence_threshold`` and a detection category in ``detection_category_names_to_smooth``; and only
   their top classification, when its confidence is at least ``classification_confidence_threshold``, is counted.
2. The counted classes are ranked by count (first seen first among equals). With fewer than two, nothing changes.
   If the top class is an "other" class (``other_category_names``) tied with a non-other second, they swap.
3. If the dominant class is not an "other" class and has at least ``min_detections_to_overwrite_other``
   detections, every counted "other" classification becomes the dominant class.
4. Counted again: if the dominant class is not "other" and has at least ``min_detections_to_overwrite_secondary``
   detections, every counted classification of a class with fewer detections than the dominant one and at most
   ``max_detections_nondominant_class`` of them becomes the dominant class (700 cows and one deer are 701 cows).

Only the class changes; the confidence stays. MegaDetector's further rules use SpeciesNet's seven-part taxonomy
strings (taxonomic propagation, within-family flips) and are not applied: this project's labels carry none.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from animl_lightning.core.errors import require, require_known_keys

SMOOTHING_LEVELS = ("none", "image", "sequence")


@dataclass(frozen=True)
class SmoothingOptions:
    """MegaDetector's ``ClassificationSmoothingOptions`` that apply here, with its defaults (module docstring)."""

    min_detections_to_overwrite_secondary: int = 4
    max_detections_nondominant_class: int = 1
    min_detections_to_overwrite_other: int = 2
    other_category_names: tuple[str, ...] = ("other", "unknown", "no cv result", "animal", "blank", "mammal")
    classification_confidence_threshold: float = 0.5
    detection_confidence_threshold: float = 0.15
    detection_category_names_to_smooth: tuple[str, ...] = field(default=("animal",))

    def __post_init__(self) -> None:
        for name in ("classification_confidence_threshold", "detection_confidence_threshold"):
            value = getattr(self, name)
            require(0.0 <= value <= 1.0, f"smoothing.{name}", f"must be in [0, 1], got {value}")
        for name in (
            "min_detections_to_overwrite_secondary",
            "max_detections_nondominant_class",
            "min_detections_to_overwrite_other",
        ):
            require(
                isinstance(getattr(self, name), int),
                f"smoothing.{name}",
                f"must be an integer, got {getattr(self, name)!r}",
            )

    @classmethod
    def from_mapping(cls, values: dict[str, Any] | None) -> SmoothingOptions:
        """From a config mapping (lists become tuples); unknown keys are named."""
        values = dict(values or {})
        require_known_keys(values, cls.__dataclass_fields__, "smoothing", what="option")
        for key in ("other_category_names", "detection_category_names_to_smooth"):
            if key in values:
                values[key] = tuple(str(v) for v in values[key])
        return cls(**values)


def _ranked_counts(classes: Sequence[Hashable], confidences: Sequence[float], threshold: float) -> dict[Any, int]:
    counts: dict[Any, int] = {}
    for label, confidence in zip(classes, confidences, strict=True):
        if confidence >= threshold:
            counts[label] = counts.get(label, 0) + 1
    # sorted() is stable: equal counts keep the order in which their classes were first seen, as MegaDetector's.
    return dict(sorted(counts.items(), key=lambda item: item[1], reverse=True))


def smooth_group(
    classes: Sequence[Hashable],
    confidences: Sequence[float],
    other_classes: frozenset[Hashable] | set[Hashable],
    options: SmoothingOptions,
) -> list[Hashable]:
    """The top classes of one group's relevant detections after smoothing (module docstring, steps 2-4).

    Args:
        classes: top class of each relevant detection, in the group's order (image order, then detection order).
        confidences: its classification confidence.
        other_classes: the classes named in ``other_category_names``.
        options: the thresholds and counts.

    Returns:
        The classes, same length and order; only counted classifications may have changed.
    """
    out = list(classes)
    threshold = options.classification_confidence_threshold
    counts = _ranked_counts(out, confidences, threshold)
    if len(counts) <= 1:
        return out
    keys = list(counts)
    if keys[0] in other_classes and keys[1] not in other_classes and counts[keys[0]] == counts[keys[1]]:
        keys[0], keys[1] = keys[1], keys[0]
    dominant, dominant_count = keys[0], counts[keys[0]]
    if dominant not in other_classes and dominant_count >= options.min_detections_to_overwrite_other:
        for i, (label, confidence) in enumerate(zip(out, confidences, strict=True)):
            if confidence >= threshold and label in other_classes:
                out[i] = dominant

    counts = _ranked_counts(out, confidences, threshold)
    dominant = next(iter(counts))
    dominant_count = counts[dominant]
    if dominant not in other_classes and dominant_count >= options.min_detections_to_overwrite_secondary:
        for i, (label, confidence) in enumerate(zip(out, confidences, strict=True)):
            if label == dominant or confidence < threshold:
                continue
            if dominant_count > counts[label] and counts[label] <= options.max_detections_nondominant_class:
                out[i] = dominant
    return out
