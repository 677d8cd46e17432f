"""animl-lightning: train camera-trap species classifiers from COCO Camera Traps exports."""

__version__ = "0.1.0"
