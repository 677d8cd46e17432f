"""LastCheckpoint: constructor validation (the every-epoch behaviour is tested end to end in test_train.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from animl_lightning.checkpointing import LastCheckpoint


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"filename": "last.ckpt"}, "filename"), ({"filename": "a/b"}, "filename"), ({"every_n_epochs": 0}, "every")],
)
def test_last_checkpoint_refuses_bad_settings(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LastCheckpoint(tmp_path, **kwargs)


def test_last_checkpoint_state_key_differs_from_an_unmonitored_model_checkpoint(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    # Both unmonitored, as with callbacks.model_checkpoint.monitor=null: Lightning needs distinct state keys.
    assert LastCheckpoint(tmp_path).state_key != ModelCheckpoint(tmp_path, filename="best").state_key
