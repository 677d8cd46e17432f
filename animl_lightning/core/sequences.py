"""Sequences (bursts) and time blocks: which crops belong to one camera event (pure functions).

A sequence is the CCT ``seq_id`` when the export has one. Otherwise the images of one ``(dataset, location)`` are
sorted by ``datetime`` and consecutive images at most ``sequences.max_gap_s`` seconds apart are one sequence (three
seconds by default, as Animl's own sequence-level analysis groups them). An image without a usable ``datetime`` is a
sequence of its own. Every crop of an image gets its image's sequence key, written to ``classification_ds.csv`` as
the ``sequence`` column so that training, classify and any user see the same grouping:

- ``seq:<seq_id>`` for a CCT sequence,
- ``img:<image_id of the first image>`` for a sequence found from the times (an image alone is its own first image).

Datetimes are read as the camera's wall-clock time: a UTC offset or ``Z`` is ignored (every image of one camera has
the same one), and EXIF's ``YYYY:MM:DD HH:MM:SS`` is accepted as well as ISO 8601.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from animl_lightning.core.errors import DataError

_OFFSET = r"(?:[zZ]|[+-]\d{2}:?\d{2})$"
_EXIF_DATE = r"^(\d{4}):(\d{2}):(\d{2})"


def wall_clock_seconds(values: pd.Series) -> np.ndarray:
    """Seconds since the epoch of each datetime string, as wall-clock time (NaN where missing or unreadable)."""
    text = values.astype("string").fillna("").str.strip()
    text = text.str.replace(_OFFSET, "", regex=True).str.replace(_EXIF_DATE, r"\1-\2-\3", regex=True)
    parsed = pd.to_datetime(text.where(text != "", None), errors="coerce", format="ISO8601")
    seconds = (parsed - pd.Timestamp("1970-01-01")) / pd.Timedelta(seconds=1)
    return np.asarray(seconds.to_numpy(dtype=float, na_value=np.nan), dtype=np.float64)


def _images(frame: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """One row per ``(dataset, image_id)`` and, per crop row, the position of its image."""
    missing = [c for c in ("dataset", "location", "image_id", "datetime", "seq_id") if c not in frame.columns]
    if missing:
        raise DataError(f"sequence keys need the columns {missing} of the dataset frame")
    keys = frame["dataset"].astype(str) + "\x00" + frame["image_id"].astype(str)
    codes, _ = pd.factorize(keys)
    first = pd.Series(np.arange(len(frame))).groupby(codes).first().to_numpy()
    images = frame.iloc[first][["dataset", "location", "image_id", "datetime", "seq_id"]].reset_index(drop=True)
    return images, np.asarray(codes, dtype=np.int64)


def sequence_keys(frame: pd.DataFrame, max_gap_s: float) -> pd.Series:
    """The sequence key of every crop row (see the module docstring).

    Args:
        frame: one row per crop with ``dataset``, ``location``, ``image_id``, ``datetime`` and ``seq_id``.
        max_gap_s: the largest gap, in seconds, between consecutive images of one sequence.

    Returns:
        A string Series aligned with ``frame``.
    """
    if max_gap_s < 0:
        raise DataError(f"max_gap_s must be >= 0, got {max_gap_s}")
    if frame.empty:
        return pd.Series([], dtype=object, index=frame.index)
    images, image_of_row = _images(frame)
    seq_id = images["seq_id"].astype("string").fillna("").str.strip()
    keys = np.where(seq_id != "", "seq:" + seq_id.astype(str), "").astype(object)

    timed = (seq_id == "").to_numpy()
    seconds = wall_clock_seconds(images["datetime"])
    order = np.lexsort(
        (
            images["image_id"].astype(str).to_numpy(),
            seconds,
            images["location"].astype(str).to_numpy(),
            images["dataset"].astype(str).to_numpy(),
        )
    )
    order = order[timed[order]]
    if len(order):
        datasets = images["dataset"].astype(str).to_numpy()[order]
        place = datasets + "\x00" + images["location"].astype(str).to_numpy()[order]
        time = seconds[order]
        previous_time = np.r_[np.nan, time[:-1]]
        new_place = np.r_[True, place[1:] != place[:-1]]
        # NaN compares False: an image without a time, or after one, starts a sequence of its own.
        close = (time - previous_time) <= max_gap_s
        starts = new_place | ~close
        sequence = np.cumsum(starts) - 1
        first_image = images["image_id"].astype(str).to_numpy()[order][np.flatnonzero(starts)]
        keys[order] = "img:" + first_image[sequence].astype(object)
    return pd.Series(np.asarray(keys, dtype=object)[image_of_row], index=frame.index, dtype=object)


def time_block_keys(frame: pd.DataFrame, block_seconds: float) -> pd.Series:
    """``<location>@<block>``: contiguous ``block_seconds`` blocks of time at each location (pure).

    Block 0 starts at the location's first dated image; images without a usable datetime are in block 0.
    """
    if block_seconds <= 0:
        raise DataError(f"the time block must be positive, got {block_seconds} s")
    if frame.empty:
        return pd.Series([], dtype=object, index=frame.index)
    seconds = wall_clock_seconds(frame["datetime"])
    place = frame["dataset"].astype(str) + "\x00" + frame["location"].astype(str)
    start = pd.Series(seconds, index=frame.index).groupby(place.to_numpy()).transform("min").to_numpy()
    block = np.floor((seconds - start) / block_seconds)
    block = np.where(np.isfinite(block), block, 0).astype(np.int64)
    return frame["location"].astype(str) + "@" + pd.Series(block, index=frame.index).astype(str)
