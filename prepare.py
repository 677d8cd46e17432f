"""Build a classification dataset from a COCO Camera Traps export (the same command as ``animl-prepare``).

    python prepare.py                                   # the generated demo project -> data/demo
    python prepare.py coco_file=export.json images_dir=images output_dir=data/mine s3.bucket=animl-images-serving-prod

The command lives in :mod:`animl_lightning.prepare_command`; every key and its default are in
animl_lightning/prepare/config.py.
"""

from __future__ import annotations

from animl_lightning.prepare_command import main, prepare, settings_from_config

__all__ = ["main", "prepare", "settings_from_config"]

if __name__ == "__main__":
    main()
