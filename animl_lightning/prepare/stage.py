"""What a prepare stage is: a name, the fingerprint of its inputs, its run and what it counted.

Each stage lives in the module that does its work (``ingest.py``, ``images.py``, ``crop_stage.py``, ...) and
:data:`animl_lightning.prepare.pipeline.STAGES` lists them in order, so a new stage is a class and a line there. The
pipeline owns everything between stages: the lock, the log, ``prepare_info.json``, the error wrapping and the
summary. A stage reads the settings and the earlier stages' artifacts from the :class:`PrepareRun` and leaves its own
there for the later ones.

Resuming across runs: :meth:`Stage.fingerprint` is what the pipeline records in ``prepare_info.json`` once the stage
has finished (asked after :meth:`Stage.run`, because some fingerprints are digests of what the stage wrote). A stage
whose outputs may be reused compares it, inside :meth:`Stage.run`, with the fingerprint of the last run
(:meth:`PrepareRun.is_current`) and says ``skipped (current)`` when it did not have to do its work again.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import pandas as pd

from animl_lightning.core.files import file_sha256

if TYPE_CHECKING:  # the stage modules import this one
    from animl_lightning.core.cct import CctProject
    from animl_lightning.core.issues import PrepareReport
    from animl_lightning.core.megadetector import DetectionResults
    from animl_lightning.prepare.config import PrepareSettings, SplitSettings
    from animl_lightning.prepare.split_diagnosis import SplitDiagnosis

Status = Literal["ran", "skipped (current)"]
RAN: Status = "ran"
SKIPPED: Status = "skipped (current)"
_T = TypeVar("_T")


@dataclass
class StageOutcome:
    """How one stage went: ``ran`` or ``skipped (current)``, the summary's detail text, and its headline counts."""

    status: Status = RAN
    detail: str = ""
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class PrepareRun:
    """One ``prepare.py`` run as the stages see it: settings, where things are, and what earlier stages made.

    Attributes:
        settings: the validated settings.
        output_dir: the prepared dataset's folder (locked for this run).
        report: the run's issues and counts (``prepare_report.json``).
        dataset: the dataset name written into every row.
        coco_file: the CCT file ingest reads (given, generated for the demo, or written by the folders stage).
        images_dir: where the full-size images are (or are downloaded to).
        split: ``settings.split``, or what the folders source changed of it (no locations to group by).
        previous: stage name -> fingerprint of the last run's finished stages (empty with ``force=true``).
        info: the ``prepare_info.json`` being written; a stage may add its own keys (the crops stage does).
        project, images, given, detected, boxes, labelled, frame, labels: the artifacts of ingest, images,
            the detections file, detect, boxes, labels and dataset, in that order; None until their stage ran.
        split_table, split_diagnosis: the splits stage's ``split_report.csv`` table and its diagnosis.
    """

    settings: PrepareSettings
    output_dir: Path
    report: PrepareReport
    dataset: str
    coco_file: Path
    images_dir: Path
    split: SplitSettings
    previous: dict[str, str]
    info: dict[str, Any]
    project: CctProject | None = None
    images: pd.DataFrame | None = None
    given: DetectionResults | None = None
    detected: DetectionResults | None = None
    detect_fingerprint: str | None = None
    boxes: pd.DataFrame | None = None
    labelled: pd.DataFrame | None = None
    frame: pd.DataFrame | None = None
    labels: list[str] | None = None
    split_table: pd.DataFrame | None = None
    split_diagnosis: SplitDiagnosis | None = None
    _coco_digest: str | None = field(default=None, init=False, repr=False)

    def is_current(self, stage: str, fingerprint: str | None) -> bool:
        """Whether the last run finished ``stage`` with this fingerprint."""
        return fingerprint is not None and self.previous.get(stage) == fingerprint

    def coco_digest(self) -> str:
        """SHA-256 of the CCT file (read once per run)."""
        if self._coco_digest is None:
            self._coco_digest = file_sha256(self.coco_file)
        return self._coco_digest


class Stage(ABC):
    """One step of ``prepare.py``; see the module docstring."""

    name: str

    def wanted(self, run: PrepareRun) -> bool:
        """Whether this run has the stage at all (the folders and detect stages depend on the settings)."""
        return True

    def fingerprint(self, run: PrepareRun) -> str | None:
        """The fingerprint to record for the outputs now on disk; None records nothing (the stage always runs)."""
        return None

    @abstractmethod
    def run(self, run: PrepareRun) -> StageOutcome:
        """Do the stage's work, or confirm that it is current, leaving its artifacts on ``run``."""


def need(value: _T | None, what: str) -> _T:
    """An earlier stage's artifact; a stage listed before the one that makes it is a programming error."""
    if value is None:
        raise RuntimeError(f"{what} is not there yet: the stage that makes it must come earlier in STAGES")
    return value


def fingerprint_of(*parts: object) -> str:
    """SHA-256 of ``parts`` as sorted-key JSON (anything not JSON by its ``str``)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def frame_digest(frame: pd.DataFrame, columns: list[str]) -> str:
    """SHA-256 of the values of ``columns``, row by row (the index left out)."""
    hashed = pd.util.hash_pandas_object(frame[columns], index=False)
    return hashlib.sha256(hashed.to_numpy().tobytes()).hexdigest()
