"""Hydra callbacks of ``train.py`` (registered in ``configs/hydra/default.yaml``).

Part of the Hydra edge (with :mod:`animl_lightning.cli`): Hydra callbacks must subclass Hydra's ``Callback``; the
file logic lives in :mod:`animl_lightning.train.sweeps`.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from animl_lightning.cli import EXIT_ERROR
from animl_lightning.train.sweeps import (
    FAILED,
    SUMMARY_FILENAME,
    process_rank,
    read_run_results,
    read_sweep_rows,
    sweep_row,
    write_sweep_row,
    write_sweep_summary,
)

log = logging.getLogger(__name__)

# The exit status of a sweep in which one or more jobs failed (each job's error is in sweep_summary.csv).
EXIT_JOBS_FAILED = 1


class RunFolderCheck(Callback):
    """Refuse, in one line (exit status 2), a run or sweep folder that cannot be created or written.

    Hydra creates the folder and opens its log file there before the job starts, outside any error handling of
    ``train.py``: a read-only ``hydra.run.dir`` used to end in Hydra's traceback.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Check ``hydra.run.dir`` before Hydra creates it."""
        _check_folder(config, "run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Check ``hydra.sweep.dir`` before the launcher creates it."""
        _check_folder(config, "sweep.dir")


def _check_folder(config: DictConfig, key: str) -> None:
    try:
        # Resolved here as Hydra resolves it next (${now:...} is cached per config: the same folder).
        folder = Path(str(OmegaConf.select(config, f"hydra.{key}")))
    except OmegaConfBaseException:
        return  # an interpolation only a running job resolves: Hydra's own handling applies
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
        os.close(handle)
        Path(probe).unlink()
    except OSError as err:
        print(f"train.py: error: hydra.{key}: cannot write to {folder}: {err.strerror or err}", file=sys.stderr)
        sys.exit(EXIT_ERROR)


class SweepSummary(Callback):
    """Write ``sweep_row.json`` per job and ``sweep_summary.csv`` (one row per job) at the sweep root.

    Only multirun jobs write rows, and only on global rank 0 (the other DDP ranks of a job, e.g. SLURM tasks,
    run the same job function). Each job rebuilds the summary when it ends, so it grows while the sweep runs; the
    sweep's end (``on_multirun_end``, in the launching process) rebuilds it once more from every row file.
    """

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """Record this job's row and rebuild the summary."""
        # The job's own config first: JobReturn.hydra_cfg is a copy of the hydra node alone, in which the default
        # sweep.dir (outputs/${task_name}/...) does not resolve (InterpolationKeyError, and no summary).
        if "hydra" in config:
            hydra_cfg = config.hydra
        else:
            hydra_cfg = job_return.hydra_cfg.hydra if job_return.hydra_cfg is not None else None
        if hydra_cfg is None or hydra_cfg.mode != RunMode.MULTIRUN or process_rank(os.environ) != 0:
            return
        run_dir = str(hydra_cfg.runtime.output_dir)
        overrides = list(job_return.overrides or hydra_cfg.overrides.task)
        row = sweep_row(
            job=int(hydra_cfg.job.num),
            overrides=overrides,
            status=job_return.status.name,
            run_dir=run_dir,
            results=read_run_results(run_dir),
            monitor=config.get("monitor"),
        )
        write_sweep_row(run_dir, row)
        try:
            write_sweep_summary(hydra_cfg.sweep.dir)
        except OSError as err:  # the final rebuild in on_multirun_end tries again
            log.warning("cannot update %s in %s: %s", SUMMARY_FILENAME, hydra_cfg.sweep.dir, err)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Rebuild the summary from every job's row once all jobs are done; exit non-zero when any job failed."""
        path = write_sweep_summary(config.hydra.sweep.dir)
        log.info("sweep summary: %s", path)
        rows = read_sweep_rows(config.hydra.sweep.dir)
        failed = [row for row in rows if row.get("status") == FAILED]
        if failed:
            print(
                f"train.py: {len(failed)} of {len(rows)} sweep jobs failed (jobs {[row['job'] for row in failed]}); "
                f"see {path}",
                file=sys.stderr,
            )
            sys.exit(EXIT_JOBS_FAILED)
