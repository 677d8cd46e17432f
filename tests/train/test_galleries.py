"""Output-error galleries: selection of the most confident mistakes and the PNG grids."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from animl_lightning.train.galleries import (
    ERROR_COLUMNS,
    ErrorGalleries,
    gallery_filename,
    render_gallery,
    select_errors,
    write_error_galleries,
)
from animl_lightning.train.tables import MetricTables, SplitEvaluation
from tests.fixtures.files import write_jpeg

LABELS = ["cat", "dog", "fox/red"]


def _predictions() -> pd.DataFrame:
    rows = [
        # path, true label, p(cat), p(dog), p(fox/red)
        ("c1.jpg", "cat", 0.9, 0.05, 0.05),  # right
        ("c2.jpg", "cat", 0.2, 0.7, 0.1),  # false negative of cat, false positive of dog (0.7)
        ("c3.jpg", "cat", 0.1, 0.85, 0.05),  # same, more confident (0.85)
        ("d1.jpg", "dog", 0.6, 0.3, 0.1),  # false positive of cat (0.6)
        ("d2.jpg", "dog", 0.1, 0.8, 0.1),  # right
        ("f1.jpg", "fox/red", 0.3, 0.3, 0.4),  # right
        ("f2.jpg", "fox/red", 0.45, 0.1, 0.45),  # tie: arg-max picks cat -> false negative of fox
    ]
    frame = pd.DataFrame(rows, columns=["path", "label", *LABELS])
    frame.insert(2, "prediction", np.asarray(LABELS)[frame[LABELS].to_numpy().argmax(axis=1)])
    return frame


def test_select_errors_ranks_the_most_confident_mistakes() -> None:
    errors = select_errors(_predictions(), LABELS, k=5)
    assert list(errors.columns) == list(ERROR_COLUMNS)

    def picked(label: str, kind: str) -> list[str]:
        rows = errors[(errors["label"] == label) & (errors["kind"] == kind)].sort_values("rank")
        return rows["path"].tolist()

    assert picked("dog", "false_positive") == ["c3.jpg", "c2.jpg"]
    assert picked("cat", "false_negative") == ["c3.jpg", "c2.jpg"]
    assert picked("cat", "false_positive") == ["d1.jpg", "f2.jpg"]  # by p(cat): 0.6, 0.45
    assert picked("dog", "false_negative") == ["d1.jpg"]
    assert picked("fox/red", "false_negative") == ["f2.jpg"]
    assert picked("fox/red", "false_positive") == []
    # Correct predictions never appear.
    assert not set(errors["path"]) & {"c1.jpg", "d2.jpg", "f1.jpg"}
    row = errors[(errors["label"] == "dog") & (errors["path"] == "c3.jpg")].iloc[0]
    assert (row["true_label"], row["predicted"]) == ("cat", "dog")
    assert row["confidence"] == pytest.approx(0.85)


def test_select_errors_keeps_top_k() -> None:
    errors = select_errors(_predictions(), LABELS, k=1)
    assert errors.groupby(["label", "kind"]).size().max() == 1
    assert errors[(errors["label"] == "dog") & (errors["kind"] == "false_positive")]["path"].tolist() == ["c3.jpg"]


def test_select_errors_rejects_unknown_labels() -> None:
    frame = _predictions()
    frame.loc[0, "label"] = "wolf"
    with pytest.raises(ValueError, match="wolf"):
        select_errors(frame, LABELS)
    with pytest.raises(ValueError, match="lacks columns"):
        select_errors(frame.drop(columns=["dog"]), LABELS)


def test_render_gallery_draws_tiles_and_placeholders() -> None:
    from animl_lightning.train.galleries import Tile

    tile = Tile(Image.new("RGB", (50, 30), (255, 0, 0)), ("true: cat", "pred: dog 0.85"))
    image = render_gallery([("fp", [tile, Tile(None, ("x",))]), ("fn", [])], "title", tile_size=64, columns=4)
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    assert (pixels.reshape(-1, 3) == [255, 0, 0]).all(axis=1).sum() >= 50 * 30 * 0.9  # the red crop is pasted


def test_write_error_galleries_writes_one_png_per_label(tmp_path: Path) -> None:
    crops = tmp_path / "crops"
    for i, name in enumerate(["c2.jpg", "c3.jpg", "d1.jpg"]):
        write_jpeg(crops / name, 40 + i, 30, i)
    # f2.jpg is missing on disk: its tile becomes a placeholder instead of failing.
    written = write_error_galleries(_predictions(), LABELS, crops, tmp_path / "galleries", "val", k=4, tile_size=64)
    assert [p.name for p in written] == ["cat.png", "dog.png", "fox_red.png"]
    for path in written:
        assert path.parent == tmp_path / "galleries" / "val"
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width >= 4 * 64


def test_gallery_filename_is_safe() -> None:
    assert gallery_filename("fox/red") == "fox_red.png"
    assert gallery_filename("../..") == "label.png"


def test_callback_reads_the_metric_tables_predictions(tmp_path: Path) -> None:
    tables = MetricTables(dirpath=str(tmp_path / "metrics"))
    predictions = _predictions()
    confusion = np.zeros((len(LABELS), len(LABELS)), dtype=np.int64)
    tables._evaluations["test"] = SplitEvaluation("test", LABELS, confusion, {}, pd.DataFrame(), predictions)
    crops = tmp_path / "crops"
    write_jpeg(crops / "c3.jpg", 40, 30, 1)
    callback = ErrorGalleries(dirpath=str(tmp_path / "galleries"), top_k=2)
    trainer = SimpleNamespace(
        is_global_zero=True,
        datamodule=SimpleNamespace(prepared=SimpleNamespace(crops_dir=crops)),
        callbacks=[tables, callback],
    )
    module = SimpleNamespace(test_split="test", class_names=LABELS)
    callback.on_test_end(trainer, module)  # type: ignore[arg-type]
    assert sorted(p.name for p in (tmp_path / "galleries" / "test").iterdir()) == ["cat.png", "dog.png", "fox_red.png"]
