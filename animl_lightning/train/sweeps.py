"""Per-run results and the one-row-per-job summary of a Hydra sweep (pure file logic, no Hydra imports).

``train.py`` writes ``<run dir>/results.json`` (the monitored metric's value on the best checkpoint and every
evaluated metric). At the end of each sweep job, ``animl_lightning.hydra_callbacks.SweepSummary`` turns it into
``<run dir>/sweep_row.json`` and rebuilds ``<sweep dir>/sweep_summary.csv`` from all row files found under the
sweep dir. Every job writes only its own row file, and every write is atomic, so parallel launchers (joblib,
SLURM) cannot corrupt the summary; a rebuild racing another job's row may miss that row, which is why the sweep's
end rebuilds the summary once more.

Summary columns: :data:`SUMMARY_COLUMNS` (``best_val`` = the monitored metric, e.g. ``val/balanced_accuracy``, on
the best checkpoint; ``test`` = the same metric on the test split, e.g. ``test/balanced_accuracy``), then one
column per swept key (``optimizer.lr``, ``model``, ...) holding the override's value as written.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from animl_lightning.core.errors import AnimlError
from animl_lightning.core.files import atomic_write, atomic_write_json, read_json_file

log = logging.getLogger(__name__)

RESULTS_FILENAME = "results.json"
ROW_FILENAME = "sweep_row.json"
SUMMARY_FILENAME = "sweep_summary.csv"
SUMMARY_COLUMNS: tuple[str, ...] = ("job", "status", "overrides", "monitor", "best_val", "test", "run_dir", "error")
FAILED = "FAILED"
# Environment variables holding a process's global rank (torchrun / Lightning, SLURM); the first one set wins.
RANK_VARIABLES: tuple[str, ...] = ("RANK", "SLURM_PROCID")


def write_run_results(
    output_dir: str | Path,
    monitor: str,
    monitor_value: float | None,
    metrics: Mapping[str, float],
    data_dir: str | Path | None = None,
    checkpoint: str | Path | None = None,
) -> Path:
    """Write ``<output_dir>/results.json``: ``monitor``, ``monitor_value`` (null when unknown) and ``metrics``.

    ``data_dir`` and ``checkpoint`` (the dataset and the checkpoint evaluated, null when the final weights were)
    tell ``report.html`` what the run used, also when the run folder holds no checkpoint (``train=false``).
    """
    payload = {
        "monitor": str(monitor),
        "monitor_value": _finite_or_none(monitor_value),
        "metrics": {str(k): _finite_or_none(v) for k, v in sorted(metrics.items())},
        "data_dir": str(Path(data_dir).resolve()) if data_dir else None,
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
    }
    path = Path(output_dir) / RESULTS_FILENAME
    atomic_write_json(path, payload)
    return path


def write_failed_run(output_dir: str | Path, error: str) -> Path:
    """Record in ``<output_dir>/results.json`` that the run failed, and why (the sweep summary's ``FAILED`` row)."""
    path = Path(output_dir) / RESULTS_FILENAME
    atomic_write_json(path, {"status": FAILED, "error": str(error), "monitor_value": None, "metrics": {}})
    return path


def read_run_results(output_dir: str | Path) -> dict[str, Any] | None:
    """The ``results.json`` of a run, or None when the run wrote none (failed, or not a train run)."""
    path = Path(output_dir) / RESULTS_FILENAME
    if not path.is_file():
        return None
    try:
        payload = read_json_file(path)
    except AnimlError as err:
        log.warning("cannot read run results: %s", err)
        return None
    return payload if isinstance(payload, dict) else None


def metric_on_test_split(monitor: str) -> str | None:
    """The test-split counterpart of a monitored val metric (``val/x`` -> ``test/x``), else None."""
    split, sep, name = str(monitor).partition("/")
    return f"test/{name}" if sep and split == "val" and name else None


def override_items(overrides: Iterable[str]) -> dict[str, str]:
    """``key=value`` command-line overrides as a dict (``+``/``++``/``~`` prefixes dropped; no ``=``: empty)."""
    items: dict[str, str] = {}
    for override in overrides:
        key, _, value = str(override).partition("=")
        items[key.lstrip("+~")] = value
    return items


def sweep_row(
    job: int,
    overrides: Sequence[str],
    status: str,
    run_dir: str | Path,
    results: Mapping[str, Any] | None,
    monitor: str | None = None,
) -> dict[str, Any]:
    """One summary row for a finished (or failed) job.

    Args:
        job: the job's number in the sweep (``hydra.job.num``).
        overrides: the job's task overrides (``hydra.overrides.task``), e.g. ``["optimizer.lr=0.0001"]``.
        status: ``COMPLETED`` or ``FAILED`` (Hydra's job status name); a ``status`` in ``results`` wins (a job that
            failed with one of the project's errors returns normally, so that the sweep goes on).
        run_dir: the job's output folder.
        results: the job's ``results.json`` (:func:`read_run_results`), or None.
        monitor: the monitored metric's name when ``results`` does not give it.
    """
    metrics: Mapping[str, Any] = (results or {}).get("metrics") or {}
    monitor_name = str((results or {}).get("monitor") or monitor or "")
    test_name = metric_on_test_split(monitor_name)
    return {
        "job": int(job),
        "status": str((results or {}).get("status") or status),
        "overrides": " ".join(str(o) for o in overrides),
        "monitor": monitor_name,
        "best_val": _number((results or {}).get("monitor_value")),
        "test": _number(metrics.get(test_name)) if test_name else math.nan,
        "run_dir": str(run_dir),
        "error": str((results or {}).get("error") or ""),
        "override_items": override_items(overrides),
    }


def write_sweep_row(run_dir: str | Path, row: Mapping[str, Any]) -> Path:
    """Write ``<run_dir>/sweep_row.json`` atomically (NaN stored as null)."""
    path = Path(run_dir) / ROW_FILENAME
    atomic_write_json(path, {k: _finite_or_none(v) if isinstance(v, float) else v for k, v in row.items()})
    return path


def read_sweep_rows(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``sweep_row.json`` under ``sweep_dir`` (any depth), ordered by job number; unreadable ones skipped."""
    rows = []
    for path in sorted(Path(sweep_dir).rglob(ROW_FILENAME)):
        try:
            row = read_json_file(path)
        except AnimlError as err:
            log.warning("skipping unreadable sweep row: %s", err)
            continue
        if isinstance(row, dict) and "job" in row:
            rows.append(row)
        else:
            log.warning("%s: skipping sweep row without a job number", path)
    return sorted(rows, key=lambda r: (int(r["job"]), str(r.get("run_dir", ""))))


def summary_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The summary table: :data:`SUMMARY_COLUMNS`, then one column per swept key (first-seen order).

    A key is swept when its value differs between the rows (or some rows lack it); overrides shared by every job
    (``data_dir=...``) stay in the ``overrides`` column only.
    """
    keys: list[str] = []
    for row in rows:
        for key in row.get("override_items") or {}:
            if key not in keys and key not in SUMMARY_COLUMNS:
                keys.append(key)
    keys = [key for key in keys if len({(row.get("override_items") or {}).get(key) for row in rows}) > 1]
    records = []
    for row in rows:
        record = {column: row.get(column) for column in SUMMARY_COLUMNS}
        for column in ("best_val", "test"):
            record[column] = _number(record[column])
        items = row.get("override_items") or {}
        record.update({key: items.get(key, "") for key in keys})
        records.append(record)
    frame = pd.DataFrame.from_records(records, columns=[*SUMMARY_COLUMNS, *keys])
    return frame.astype({"best_val": "float64", "test": "float64"})


def write_sweep_summary(sweep_dir: str | Path) -> Path:
    """Rebuild ``<sweep_dir>/sweep_summary.csv`` from the row files under ``sweep_dir`` (atomic replace)."""
    frame = summary_frame(read_sweep_rows(sweep_dir))
    path = Path(sweep_dir) / SUMMARY_FILENAME
    with atomic_write(path, "w") as handle:
        frame.to_csv(handle, index=False, lineterminator="\n")
    return path


def process_rank(environ: Mapping[str, str]) -> int:
    """This process's global rank from the launcher's environment (0 when none is set)."""
    for name in RANK_VARIABLES:
        value = environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def _number(value: Any) -> float:
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _finite_or_none(value: Any) -> float | None:
    number = _number(value)
    return number if math.isfinite(number) else None
