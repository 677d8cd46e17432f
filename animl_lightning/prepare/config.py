"""Typed settings for ``prepare.py``.

These dataclasses are the schema of ``configs/prepare.yaml``: ``prepare.py`` registers them with Hydra's
ConfigStore, so an unknown key or a value of the wrong type fails at composition time, and the value checks in
``__post_init__`` run when the composed config is turned into these objects. Nothing here imports Hydra: the same
objects can be built by hand in a notebook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from animl_lightning.core.crop_rule import CROP_STRATEGIES, MIN_MAX_SIZE
from animl_lightning.core.errors import ConfigError, require
from animl_lightning.core.machine import usable_cores
from animl_lightning.prepare.detector_file import check_model_file

SPLIT_METHODS = ("random", "smallest_first")
DETECTOR_DEVICES = ("auto", "cpu", "cuda", "mps")
GROUP_UNITS = ("location", "sequence", "location_time")


@dataclass
class S3Settings:
    """Where to download missing images from (``s3.*``)."""

    bucket: str | None = None
    prefix: str = ""
    key_field: str = "serving_bucket_key"
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    workers: int = 16
    max_attempts: int = 6
    connect_timeout: float = 10.0
    read_timeout: float = 60.0

    def __post_init__(self) -> None:
        require(self.bucket is None or bool(self.bucket.strip()), "s3.bucket", "must not be empty")
        require(self.workers >= 1, "s3.workers", f"must be >= 1, got {self.workers}")
        require(self.max_attempts >= 1, "s3.max_attempts", f"must be >= 1, got {self.max_attempts}")
        require(self.connect_timeout > 0, "s3.connect_timeout", f"must be > 0, got {self.connect_timeout}")
        require(self.read_timeout > 0, "s3.read_timeout", f"must be > 0, got {self.read_timeout}")
        require(bool(self.key_field), "s3.key_field", "must name an image field")


@dataclass
class DetectionSettings:
    """How MegaDetector boxes are used for images without a ground-truth box (``detections.*``)."""

    threshold: float = 0.8
    category: str = "animal"
    single_animal_only: bool = False

    def __post_init__(self) -> None:
        require(0.0 <= self.threshold <= 1.0, "detections.threshold", f"must be in [0, 1], got {self.threshold}")
        require(bool(self.category), "detections.category", "must not be empty")


@dataclass
class DetectorSettings:
    """MegaDetector run by prepare itself on the images that need boxes (``detector.*``); null model: none is run."""

    model_file: str | None = None
    threshold: float = 0.005
    batch_size: int = 1
    device: str = "auto"
    checkpoint_every: int = 1000

    def __post_init__(self) -> None:
        # Above 0: MegaDetector writes every box at or above the threshold, and at 0 that is every candidate box.
        require(0.0 < self.threshold <= 1.0, "detector.threshold", f"must be in (0, 1], got {self.threshold}")
        require(self.batch_size >= 1, "detector.batch_size", f"must be >= 1, got {self.batch_size}")
        require(
            self.checkpoint_every >= 1, "detector.checkpoint_every", f"must be >= 1 images, got {self.checkpoint_every}"
        )
        device, _, index = self.device.partition(":")
        require(
            device in DETECTOR_DEVICES and (not index or (device == "cuda" and index.isdigit())),
            "detector.device",
            f"must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}",
        )
        if self.model_file is not None:
            check_model_file(self.model_file)


@dataclass
class CropSettings:
    """How boxes become crop files (``crops.*``)."""

    strategy: str = "square"
    max_size: int | None = None
    workers: int | None = None
    quality: int = 90
    lossless: bool = False

    @property
    def resolved_workers(self) -> int:
        """``workers``, or every usable core when it is unset."""
        return self.workers if self.workers is not None else usable_cores()

    def __post_init__(self) -> None:
        require(
            self.strategy in CROP_STRATEGIES,
            "crops.strategy",
            f"must be one of {list(CROP_STRATEGIES)}, got {self.strategy!r}",
        )
        require(
            self.max_size is None or self.max_size >= MIN_MAX_SIZE,
            "crops.max_size",
            f"must be null or >= {MIN_MAX_SIZE} pixels, got {self.max_size}",
        )
        require(self.workers is None or self.workers >= 1, "crops.workers", f"must be null or >= 1, got {self.workers}")
        require(1 <= self.quality <= 100, "crops.quality", f"must be in [1, 100], got {self.quality}")


@dataclass
class LabelSettings:
    """How CCT categories become output labels (``labels.*``)."""

    spec_file: str | None = None
    # Empty means "not set": OmegaConf cannot merge a command-line dict into an Optional[Dict] that is None.
    map: dict[str, str] = field(default_factory=dict)
    exclude: list[str] = field(default_factory=lambda: ["empty"])
    seed: int = 123
    case_sensitive: bool = False
    taxonomy_file: str | None = None

    def __post_init__(self) -> None:
        require(
            not (self.spec_file and self.map),
            "labels.spec_file",
            "set either labels.spec_file or labels.map, not both",
        )


@dataclass
class SplitSettings:
    """How (dataset, location) pairs are assigned to train/val/test (``split.*``)."""

    method: str = "random"
    val_frac: float = 0.2
    test_frac: float = 0.2
    seed: int = 0
    trials: int = 10000
    jitter: float = 0.03
    min_locs: int | None = 3
    reuse: str | None = None
    tolerance: float = 0.05
    strict: bool = False
    group_by: str = "location"
    time_block: str | None = None

    @property
    def time_block_seconds(self) -> float | None:
        """``time_block`` in seconds (``group_by=location_time``), else None."""
        if self.time_block is None:
            return None
        return parse_duration_seconds(self.time_block, "split.time_block")

    def __post_init__(self) -> None:
        require(
            self.method in SPLIT_METHODS,
            "split.method",
            f"must be one of {list(SPLIT_METHODS)}, got {self.method!r}",
        )
        require(0.0 < self.val_frac < 1.0, "split.val_frac", f"must be in (0, 1), got {self.val_frac}")
        require(0.0 <= self.test_frac < 1.0, "split.test_frac", f"must be in [0, 1), got {self.test_frac}")
        require(
            self.val_frac + self.test_frac < 1.0,
            "split.val_frac",
            f"split.val_frac + split.test_frac must be < 1 to leave a train split, got "
            f"{self.val_frac} + {self.test_frac}",
        )
        require(self.trials >= 1, "split.trials", f"must be >= 1, got {self.trials}")
        require(0.0 <= self.jitter < 0.5, "split.jitter", f"must be in [0, 0.5), got {self.jitter}")
        require(
            self.min_locs is None or self.min_locs >= 1,
            "split.min_locs",
            f"must be null or >= 1, got {self.min_locs}",
        )
        require(0.0 < self.tolerance < 0.5, "split.tolerance", f"must be in (0, 0.5), got {self.tolerance}")
        require(
            self.group_by in GROUP_UNITS,
            "split.group_by",
            f"must be one of {list(GROUP_UNITS)}, got {self.group_by!r}",
        )
        require(
            (self.group_by == "location_time") == (self.time_block is not None),
            "split.time_block",
            "is needed with split.group_by=location_time (e.g. split.time_block=30d), and only with it",
        )
        if self.time_block is not None:
            self.time_block_seconds  # noqa: B018 (validates the duration)


def parse_duration_seconds(text: str, key: str) -> float:
    """``30d``, ``12h``, ``90min``, ``2w``... in seconds (pandas' ``Timedelta`` grammar); ConfigError otherwise."""
    import pandas as pd

    try:
        seconds = float(pd.Timedelta(str(text)).total_seconds())
    except ValueError as err:
        raise ConfigError(f"{key}: {text!r} is not a duration such as 30d, 12h or 90min") from err
    require(seconds > 0, key, f"must be a positive duration, got {text!r}")
    return seconds


@dataclass
class SequenceSettings:
    """How images are grouped into sequences (bursts) when the CCT has no ``seq_id`` (``sequences.*``)."""

    max_gap_s: float = 3.0

    def __post_init__(self) -> None:
        require(self.max_gap_s >= 0, "sequences.max_gap_s", f"must be >= 0 seconds, got {self.max_gap_s}")


@dataclass
class DemoSettings:
    """The generated demo project used when ``coco_file`` is not set (``demo.*``)."""

    seed: int = 7
    locations: int = 10
    images_per_location: int = 24
    width: int = 640
    height: int = 480

    def __post_init__(self) -> None:
        require(self.locations >= 3, "demo.locations", f"must be >= 3, got {self.locations}")
        require(self.images_per_location >= 1, "demo.images_per_location", "must be >= 1")
        require(self.width >= 64 and self.height >= 64, "demo.width", "demo images must be at least 64x64")


@dataclass
class FolderSettings:
    """Images sorted into one folder per label, read instead of a CCT export (``folders.*``)."""

    root: str | None = None
    location_level: int | None = None

    def __post_init__(self) -> None:
        if self.root is None:
            # Without a root the demo project would run, which is never what a user who set a level meant.
            require(self.location_level is None, "folders.location_level", "is only used with folders.root")
            return
        require(bool(self.root), "folders.root", "must not be empty")
        require(Path(self.root).is_dir(), "folders.root", f"{self.root} is not a folder")
        require(
            self.location_level is None or self.location_level >= 0,
            "folders.location_level",
            f"must be null or >= 0 (0: the first folder level under folders.root), got {self.location_level}",
        )


@dataclass
class PathSettings:
    """The shared folders of ``configs/paths/`` (``paths.*``); prepare.py uses ``data_dir`` as its default output."""

    data_dir: str = "data/demo"
    output_dir: str | None = None


@dataclass
class PrepareSettings:
    """All of ``prepare.py``'s settings; see ``configs/prepare.yaml`` for documentation of each key."""

    output_dir: str = "data/demo"
    coco_file: str | None = None
    images_dir: str | None = None
    dataset: str | None = None
    detections_file: str | None = None
    s3: S3Settings = field(default_factory=S3Settings)
    detections: DetectionSettings = field(default_factory=DetectionSettings)
    detector: DetectorSettings = field(default_factory=DetectorSettings)
    crops: CropSettings = field(default_factory=CropSettings)
    labels: LabelSettings = field(default_factory=LabelSettings)
    split: SplitSettings = field(default_factory=SplitSettings)
    sequences: SequenceSettings = field(default_factory=SequenceSettings)
    demo: DemoSettings = field(default_factory=DemoSettings)
    folders: FolderSettings = field(default_factory=FolderSettings)
    paths: PathSettings = field(default_factory=PathSettings)
    force: bool = False

    def __post_init__(self) -> None:
        require(bool(self.output_dir), "output_dir", "must be set")
        if self.folders.root is not None:
            self._check_folder_source(self.folders.root)
        if self.coco_file is not None:
            require(Path(self.coco_file).is_file(), "coco_file", f"{self.coco_file} does not exist")
            require(
                self.images_dir is not None,
                "images_dir",
                "must be set when coco_file is set (the folder that holds, or receives, the full-size images)",
            )
        if self.detections_file is not None:
            require(Path(self.detections_file).is_file(), "detections_file", f"{self.detections_file} does not exist")
        if self.detector.model_file is not None:
            # Boxes below the detector's threshold are never written, so a lower crop threshold would silently act
            # as the detector's.
            require(
                self.detections.threshold >= self.detector.threshold,
                "detections.threshold",
                f"{self.detections.threshold} is below detector.threshold ({self.detector.threshold}), under which "
                "MegaDetector writes no box; lower detector.threshold or raise detections.threshold",
            )
        if self.labels.spec_file is not None:
            require(
                Path(self.labels.spec_file).is_file(), "labels.spec_file", f"{self.labels.spec_file} does not exist"
            )
        if self.split.reuse is not None:
            require(Path(self.split.reuse).is_file(), "split.reuse", f"{self.split.reuse} does not exist")
        if self.dataset is not None:
            require(
                bool(self.dataset) and "/" not in self.dataset,
                "dataset",
                f"must be a non-empty name without '/', got {self.dataset!r}",
            )

    def _check_folder_source(self, root: str) -> None:
        require(
            self.coco_file is None,
            "folders.root",
            "set either coco_file (a CCT export) or folders.root (images sorted into folders), not both",
        )
        require(
            self.images_dir is None,
            "images_dir",
            "is not used with folders.root (the images are read where they are, under folders.root)",
        )
        require(
            self.s3.bucket is None,
            "s3.bucket",
            "is not used with folders.root (the images are read where they are, under folders.root)",
        )
        # The crops would land among the images, and the next run would read them as photos.
        require(
            Path(self.output_dir).resolve() != Path(root).resolve(),
            "output_dir",
            f"must not be folders.root ({root}); choose a folder of its own",
        )
