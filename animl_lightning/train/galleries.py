"""Output-error galleries: the most confident mistakes per label, as image grids, to find label noise.

For each label and split, a PNG shows the top-k false positives (crops of other labels that the model calls this
label, most confident first) and the top-k false negatives (crops of this label that the model calls something
else, most confident wrong prediction first). Confident mistakes are where mislabelled training data shows up.

:func:`select_errors` is pure (a predictions table in, a table of picked rows out); :func:`render_gallery` draws;
:func:`write_error_galleries` ties them to files and wandb; :class:`ErrorGalleries` runs it after each test loop,
reading the ``predictions_<split>.csv`` written by :class:`~animl_lightning.train.tables.MetricTables`
(columns ``path, label, prediction`` then one probability column per label name).
"""

from __future__ import annotations

import io
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from PIL import Image, ImageDraw, ImageFont
from typing_extensions import override

from animl_lightning.core.errors import ConfigError, DataError, require
from animl_lightning.core.files import UnsafePathError, atomic_write_bytes, safe_join
from animl_lightning.train.tables import MetricTables

log = logging.getLogger(__name__)

ERROR_COLUMNS: tuple[str, ...] = ("label", "kind", "rank", "path", "true_label", "predicted", "confidence", "p_label")
# report.html's content width (templates/report.html.j2: 1200 px less margins): a gallery no wider is shown unscaled.
GALLERY_MAX_WIDTH = 1100
# Space between tiles and around sections, in pixels.
_PAD = 6
KINDS = ("false_positive", "false_negative")


def select_errors(predictions: pd.DataFrame, labels: list[str], k: int = 8) -> pd.DataFrame:
    """Pick the ``k`` most confident false positives and false negatives of every label.

    Args:
        predictions: one row per crop with ``path``, ``label`` (true label name) and one probability column per
            name in ``labels``; the predicted label is the arg-max of those columns.
        labels: label names in index order.
        k: crops per label and kind.

    Returns:
        Columns :data:`ERROR_COLUMNS`: ``label`` (the gallery's label), ``kind`` (``false_positive`` /
        ``false_negative``), ``rank`` (0 = most confident), ``path``, ``true_label``, ``predicted``,
        ``confidence`` (probability of the predicted label) and ``p_label`` (probability of the gallery's label).
        False positives of ``L`` are ranked by p(L), false negatives by the probability of the wrong prediction.
    """
    require(k >= 1, "callbacks.error_galleries.top_k", f"must be >= 1, got {k}")
    missing = [c for c in ("path", "label", *labels) if c not in predictions.columns]
    if missing:
        raise DataError(f"predictions table lacks columns {missing}")
    probs = predictions[list(labels)].to_numpy(dtype=np.float64)
    index = {name: i for i, name in enumerate(labels)}
    true_names = predictions["label"].astype(str).to_numpy()
    unknown = sorted(set(true_names) - set(index))
    if unknown:
        raise DataError(f"predictions table has true labels not in the label list: {unknown[:5]}")
    true = np.array([index[name] for name in true_names], dtype=np.int64)
    predicted = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
    confidence = probs.max(axis=1) if len(probs) else np.zeros(0)
    paths = predictions["path"].astype(str).to_numpy()
    names = np.asarray(labels, dtype=object)
    wrong = predicted != true
    records: list[dict[str, Any]] = []
    for c, name in enumerate(labels):
        for kind, mask, score in (
            ("false_positive", wrong & (predicted == c), probs[:, c] if len(probs) else confidence),
            ("false_negative", wrong & (true == c), confidence),
        ):
            rows = np.flatnonzero(mask)
            # Stable sort on -score keeps file order among ties, so galleries are reproducible.
            picked = rows[np.argsort(-score[rows], kind="stable")[:k]]
            records.extend(
                {
                    "label": name,
                    "kind": kind,
                    "rank": rank,
                    "path": paths[r],
                    "true_label": names[true[r]],
                    "predicted": names[predicted[r]],
                    "confidence": float(confidence[r]),
                    "p_label": float(probs[r, c]),
                }
                for rank, r in enumerate(picked)
            )
    return pd.DataFrame.from_records(records, columns=list(ERROR_COLUMNS))


@dataclass(frozen=True)
class Tile:
    """One gallery cell: a crop (None when it cannot be read) and its caption lines."""

    image: Image.Image | None
    caption: tuple[str, ...]


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def caption_font_size(tile_size: int) -> int:
    """Pixel size of a gallery's caption text for ``tile_size`` tiles."""
    return max(10, tile_size // 12)


def gallery_columns(k: int, tile_size: int) -> int:
    """Tiles per gallery row: ``k``, at most 8, and no more than fit in :data:`GALLERY_MAX_WIDTH` px, so report.html
    shows a gallery at its own size (a wider one is scaled down, and its captions with it)."""
    return max(1, min(k, 8, (GALLERY_MAX_WIDTH - _PAD) // (tile_size + _PAD)))


def render_gallery(
    sections: list[tuple[str, list[Tile]]], title: str, tile_size: int = 160, columns: int = 8
) -> Image.Image:
    """Draw titled sections of captioned tiles as one RGB image (an empty section says "none")."""
    if tile_size < 16 or columns < 1:
        raise DataError(f"a gallery needs tiles of >= 16 px and >= 1 column, got {tile_size} px and {columns}")
    font_size = caption_font_size(tile_size)
    font, title_font = _font(font_size), _font(font_size + 4)
    line = font_size + 3
    caption_lines = max((len(t.caption) for _, tiles in sections for t in tiles), default=1)
    cell_h = tile_size + caption_lines * line + 6
    header = font_size + 12
    pad = _PAD
    height = header + pad
    for _, tiles in sections:
        rows = max(1, -(-len(tiles) // columns))
        height += header + rows * cell_h + pad
    width = pad + columns * (tile_size + pad)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), title, fill=(0, 0, 0), font=title_font)
    y = header + pad
    for name, tiles in sections:
        draw.text((pad, y + 2), f"{name} ({len(tiles)})" if tiles else f"{name}: none", fill=(40, 40, 40), font=font)
        y += header
        for i, tile in enumerate(tiles):
            x = pad + (i % columns) * (tile_size + pad)
            top = y + (i // columns) * cell_h
            if tile.image is None:
                draw.rectangle((x, top, x + tile_size - 1, top + tile_size - 1), fill=(200, 200, 200))
                draw.text((x + 4, top + tile_size // 2), "unreadable", fill=(120, 0, 0), font=font)
            else:
                thumb = tile.image.convert("RGB")
                thumb.thumbnail((tile_size, tile_size))
                canvas.paste(thumb, (x + (tile_size - thumb.width) // 2, top + (tile_size - thumb.height) // 2))
            for j, text in enumerate(tile.caption):
                draw.text((x, top + tile_size + 3 + j * line), text, fill=(0, 0, 0), font=font)
        y += max(1, -(-len(tiles) // columns)) * cell_h + pad
    return canvas


def _load_tile_image(crops_dir: Path, path: str) -> Image.Image | None:
    try:
        with Image.open(safe_join(crops_dir, path)) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, ValueError, UnsafePathError) as error:
        log.warning("gallery: cannot read crop %s: %s", path, error)
        return None


def _tiles(errors: pd.DataFrame, crops_dir: Path, width: int) -> list[Tile]:
    def short(text: str) -> str:
        return text if len(text) <= width else text[: width - 1] + "…"

    return [
        Tile(
            image=_load_tile_image(crops_dir, str(row.path)),
            caption=(short(f"true: {row.true_label}"), short(f"pred: {row.predicted} {row.confidence:.2f}")),
        )
        for row in errors.itertuples(index=False)
    ]


def gallery_filename(label: str) -> str:
    """A file name for a label: characters outside ``[A-Za-z0-9._-]`` become ``_``."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "label"
    return f"{cleaned}.png"


def write_error_galleries(
    predictions: pd.DataFrame,
    labels: list[str],
    crops_dir: str | Path,
    output_dir: str | Path,
    split: str,
    k: int = 8,
    tile_size: int = 160,
    log_to_wandb: bool = True,
) -> list[Path]:
    """Write one PNG per label (``<output_dir>/<split>/<label>.png``) and return their paths.

    With ``log_to_wandb`` and an active wandb run, each gallery is also logged as ``galleries/<split>/<label>``.
    """
    errors = select_errors(predictions, labels, k)
    folder = Path(output_dir) / split
    crops = Path(crops_dir)
    columns = gallery_columns(k, tile_size)
    caption_width = max(12, tile_size // 7)
    written: list[Path] = []
    used: set[str] = set()
    images: dict[str, Image.Image] = {}
    for name in labels:
        mine = errors[errors["label"] == name]
        sections = [
            (
                f"false positives: predicted {name}, true label differs",
                _tiles(mine[mine["kind"] == "false_positive"], crops, caption_width),
            ),
            (
                f"false negatives: true {name}, predicted otherwise",
                _tiles(mine[mine["kind"] == "false_negative"], crops, caption_width),
            ),
        ]
        gallery = render_gallery(sections, f"{split} / {name}: most confident errors", tile_size, columns)
        filename = gallery_filename(name)
        if filename in used:  # two labels that differ only in punctuation
            filename = f"{Path(filename).stem}_{len(used)}.png"
        used.add(filename)
        buffer = io.BytesIO()
        gallery.save(buffer, format="PNG", optimize=True)
        target = folder / filename
        atomic_write_bytes(target, buffer.getvalue())
        written.append(target)
        images[name] = gallery
    if log_to_wandb:
        _log_wandb(images, split)
    log.info("wrote %d error galleries to %s", len(written), folder)
    return written


def _log_wandb(images: dict[str, Image.Image], split: str) -> None:
    # Only when the caller already uses wandb: importing it just to find no run costs seconds.
    wandb = sys.modules.get("wandb")
    if wandb is None or getattr(wandb, "run", None) is None:
        return
    wandb.log({f"galleries/{split}/{name}": wandb.Image(image, caption=name) for name, image in images.items()})


class ErrorGalleries(Callback):
    """After each test loop, draw the error galleries of the evaluated split from its predictions table.

    Must come after :class:`~animl_lightning.train.tables.MetricTables` in the callback list: it reads the predictions
    that callback collected in the same hook. Crops are read from the datamodule's prepared dataset
    (``trainer.datamodule.prepared.crops_dir``).

    Args:
        dirpath: output folder (``<run>/galleries``).
        top_k: crops per label and kind.
        tile_size: side of one tile in pixels.
        log_to_wandb: also log to the active wandb run.
    """

    def __init__(self, dirpath: str, top_k: int = 8, tile_size: int = 160, log_to_wandb: bool = True) -> None:
        super().__init__()
        require(bool(dirpath), "callbacks.error_galleries.dirpath", "must be set")
        require(top_k >= 1, "callbacks.error_galleries.top_k", f"must be >= 1, got {top_k}")
        self.dirpath = Path(dirpath)
        self.top_k = top_k
        self.tile_size = tile_size
        self.log_to_wandb = log_to_wandb

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        split = str(getattr(pl_module, "test_split", "test"))
        tables = next((c for c in trainer.callbacks if isinstance(c, MetricTables)), None)  # type: ignore[attr-defined]
        if tables is None:
            raise ConfigError(
                "callbacks.error_galleries: needs callbacks.metric_tables (it draws from its predictions)"
            )
        evaluation = tables.evaluations.get(split)
        datamodule = getattr(trainer, "datamodule", None)
        prepared = getattr(datamodule, "prepared", None)
        if evaluation is None or prepared is None:
            log.warning("no error galleries for %s: no predictions or no prepared dataset", split)
            return
        write_error_galleries(
            evaluation.predictions,
            evaluation.labels,
            prepared.crops_dir,
            self.dirpath,
            split,
            k=self.top_k,
            tile_size=self.tile_size,
            log_to_wandb=self.log_to_wandb,
        )
