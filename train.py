"""Train a crop classifier on a ``prepare.py`` output folder (the same command as ``animl-train``).

    python train.py model=effnet_b3 trainer.devices=1            # configs/train.yaml + overrides
    python train.py train=false ckpt_path=outputs/.../best.ckpt  # evaluate a checkpoint, write the same tables
    python train.py ckpt_path=outputs/.../checkpoints/last.ckpt  # resume an interrupted run
    python train.py -m optimizer.lr=1e-4,3e-5                    # a sweep: one job and one folder per value

The command lives in :mod:`animl_lightning.train_command`; ``from train import train`` still gives its
``train(cfg)``.
"""

from __future__ import annotations

from animl_lightning.train_command import build_model, main, train

__all__ = ["build_model", "main", "train"]

if __name__ == "__main__":
    main()
