"""The ingest stage: read and validate the CCT file (:func:`animl_lightning.core.cct.load_cct`)."""

from __future__ import annotations

from animl_lightning.core.cct import load_cct
from animl_lightning.prepare.stage import PrepareRun, Stage, StageOutcome

STAGE = "ingest"


class IngestStage(Stage):
    """Always runs: reading the file is what tells whether it changed."""

    name = STAGE

    def run(self, run: PrepareRun) -> StageOutcome:
        """Leave the validated project on ``run.project``."""
        project = load_cct(run.coco_file, run.report, key_field=run.settings.s3.key_field)
        run.project = project
        counts = {"images": len(project.images), "annotations": len(project.annotations)}
        return StageOutcome(detail=f"{counts['images']} images, {counts['annotations']} annotations", counts=counts)
