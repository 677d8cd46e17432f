"""The prepare report: counts per stage and every record that was skipped, with why.

Stages add to one :class:`PrepareReport`; ``prepare.py`` writes it to ``prepare_report.json`` at the end of each run
(and after a failing stage, so a crash still leaves an explanation).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from animl_lightning.core.files import atomic_write_json

log = logging.getLogger(__name__)

REPORT_FILENAME = "prepare_report.json"


@dataclass(frozen=True)
class Issue:
    """One problem with one input record.

    Attributes:
        stage: pipeline stage that found it (``ingest``, ``images``, ``boxes``, ``crops``, ``labels``, ...).
        kind: short machine-readable reason, e.g. ``dangling_image_id`` or ``download_failed``.
        message: human-readable sentence naming the value that is wrong.
        file: input file the record comes from (CCT path, detections file, image path), if any.
        record: id of the record (image id, annotation id, file name), if any.
        field: the field of the record that is wrong, if any.
        action: what was done about it: ``skipped``, ``dropped``, ``clamped``, ``filled``, ``failed``.
    """

    stage: str
    kind: str
    message: str
    file: str | None = None
    record: str | None = None
    field: str | None = None
    action: str = "skipped"


@dataclass
class PrepareReport:
    """Thread-safe accumulator of stage counts and issues."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    issues: list[Issue] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, stage: str, name: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``name`` of ``stage``."""
        with self._lock:
            stage_counts = self.counts.setdefault(stage, {})
            stage_counts[name] = stage_counts.get(name, 0) + n

    def set_count(self, stage: str, name: str, n: int) -> None:
        """Set the counter ``name`` of ``stage`` to ``n`` (for totals computed at the end of a stage)."""
        with self._lock:
            self.counts.setdefault(stage, {})[name] = int(n)

    def add(
        self,
        stage: str,
        kind: str,
        message: str,
        *,
        file: str | Path | None = None,
        record: str | None = None,
        field: str | None = None,
        action: str = "skipped",
    ) -> None:
        """Record one issue and log it at warning level."""
        issue = Issue(
            stage=stage,
            kind=kind,
            message=message,
            file=None if file is None else str(file),
            record=None if record is None else str(record),
            field=field,
            action=action,
        )
        with self._lock:
            self.issues.append(issue)
        log.debug("%s: %s (%s)", stage, message, action)

    def issues_of(self, stage: str | None = None, kind: str | None = None) -> list[Issue]:
        """Issues filtered by stage and/or kind."""
        with self._lock:
            return [i for i in self.issues if (stage is None or i.stage == stage) and (kind is None or i.kind == kind)]

    def issue_summary(self) -> dict[str, dict[str, int]]:
        """Number of issues per stage and kind."""
        summary: dict[str, dict[str, int]] = {}
        with self._lock:
            for issue in self.issues:
                by_kind = summary.setdefault(issue.stage, {})
                by_kind[issue.kind] = by_kind.get(issue.kind, 0) + 1
        return summary

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``counts``, ``issue_summary``, ``issues`` and ``info``."""
        with self._lock:
            issues = [asdict(i) for i in self.issues]
            counts = {stage: dict(c) for stage, c in self.counts.items()}
            info = dict(self.info)
        return {"counts": counts, "issue_summary": self.issue_summary(), "issues": issues, "info": info}

    def write(self, path: str | Path) -> None:
        """Write the report atomically as JSON."""
        atomic_write_json(path, self.to_dict())
