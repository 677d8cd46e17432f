"""Typed settings for ``prepare.py``.

These dataclasses define every key of ``prepare.py`` and its default, in this one place: ``prepare.py`` registers
them with Hydra's ConfigStore as the schema ``configs/prepare.yaml`` extends (that file sets only what depends on other
configs), so an unknown key or a value of the wrong type fails at composition time, and the value checks in
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

    # e.g. animl-images-serving-prod; null: images must already be in images_dir
    bucket: str | None = None
    # prepended to each key
    prefix: str = ""
    # image field holding the S3 key; falls back to file_name when missing
    key_field: str = "serving_bucket_key"
    # S3-compatible endpoint (MinIO, moto, ...)
    endpoint_url: str | None = None
    region: str | None = None
    # AWS profile; otherwise the standard credential chain
    profile: str | None = None
    # concurrent downloads
    workers: int = 16
    # tries per S3 request for transient errors (throttling, 5xx, resets, timeouts)
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

    # keep detector boxes with conf >= threshold
    threshold: float = 0.8
    # detection category name to keep
    category: str = "animal"
    # true: old md_to_queried_images behaviour (drop images with several boxes)
    single_animal_only: bool = False

    def __post_init__(self) -> None:
        require(0.0 <= self.threshold <= 1.0, "detections.threshold", f"must be in [0, 1], got {self.threshold}")
        require(bool(self.category), "detections.category", "must not be empty")


@dataclass
class DetectorSettings:
    """MegaDetector run by prepare itself on the images that need boxes (``detector.*``); null model: none is run.

    The detect stage runs it on every image that needs detector boxes: no ground-truth box, one category other than
    empty, not listed in detections_file. Results: <output_dir>/megadetector_results.json (format
    1.6), used like a detections_file; a rerun reuses them, a killed run resumes from its checkpoint. Needs the detect
    extra (README). The model file is unpickled with torch.load(weights_only=False): name only files you trust.
    """

    # a MegaDetector .pt file (e.g. md_v5a.0.0.pt); null: no detect stage. Names such as MDV5A are refused: prepare
    # never downloads weights
    model_file: str | None = None
    # MegaDetector writes boxes with conf >= this (detections.threshold picks the crops)
    threshold: float = 0.005
    # images per forward pass; MegaDetector uses 1 without a GPU
    batch_size: int = 1
    # auto (CUDA when present) | cpu | cuda | cuda:N | mps
    device: str = "auto"
    # images between checkpoints of a run (the work a kill can lose)
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

    # square | pad | exact
    strategy: str = "square"
    # cap on the saved side in pixels; null keeps full resolution
    max_size: int | None = None
    # crop processes; null: every usable core
    workers: int | None = None
    # JPEG quality of crops that are encoded (capped, or not cut losslessly)
    quality: int = 90
    # true: cut baseline JPEGs' crops out of the compressed data (libturbojpeg; no second JPEG generation), each grown
    # left/up by < 1 MCU (8-16 px) onto the photo's grid; other files and padded crops are decoded and encoded again
    # (counted in prepare_report.json). false (default): decode and encode every crop, the strategy's exact square. Off
    # by default: on real trail-camera photos the cut cost more than decoding (docs/benchmarks.md).
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

    # old-format label_spec.json (dataset_labels, exclude, max_count, prioritize)
    spec_file: str | None = None
    # inline {CCT category name: output label}; unnamed categories are dropped. Empty means "not set": OmegaConf
    # cannot merge a command-line dict into an Optional[Dict] that is None.
    map: dict[str, str] = field(default_factory=dict)
    # categories never used as labels (default mapping only)
    exclude: list[str] = field(default_factory=lambda: ["empty"])
    # seed of max_count sampling
    seed: int = 123
    # false: labels that differ only in case or spaces are one label (reported)
    case_sensitive: bool = False
    # CSV: label, class, order, family, genus, species (checked against the labels)
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

    # random | smallest_first
    method: str = "random"
    # share of the crops in val (overall and per label)
    val_frac: float = 0.2
    # share of the crops in test; 0: no test split
    test_frac: float = 0.2
    seed: int = 0
    # random partitions scored by method=random
    trials: int = 10000
    # +/- jitter of the split fractions between trials
    jitter: float = 0.03
    # drop labels seen at fewer (dataset, location) pairs; null: keep all
    min_locs: int | None = 3
    # an earlier splits.json whose test groups stay in test
    reuse: str | None = None
    # an overall share further than this from its target is a warning
    tolerance: float = 0.05
    # true: such a split is an error instead
    strict: bool = False
    # location | sequence | location_time (the last two let backgrounds leak)
    group_by: str = "location"
    # group_by=location_time: length of a block, e.g. 30d
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

    # without a CCT seq_id, images at one location at most this far apart are a burst
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
    """Images sorted into one folder per label, read instead of a CCT export (``folders.*``).

    Species/photo.jpg or Station/Species/photo.jpg. prepare derives a CCT file from the tree
    (<output_dir>/folders_cct.json: one whole-image box per image, or none with detections_file or detector.model_file,
    whose boxes are then used; datetime from EXIF DateTimeOriginal) and runs every stage on it as on an Animl export
    with images_dir=folders.root. Unusable files and empty folders are listed in the report.
    """

    # the tree; an image's label is the name of the folder it is in
    root: str | None = None
    # folder level naming the camera (0: first level under root); null: no locations, so split.group_by=location becomes
    # sequence (with a warning saying why)
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
    """All of ``prepare.py``'s settings (the README's prepare.py table says what each key does)."""

    # Folder that receives crops/, classification_ds.csv, label_index.json, splits.json, split_report.csv,
    # prepare_report.json and prepare_info.json. Default: paths.data_dir, which is also train.py's data_dir.
    output_dir: str = "data/demo"
    # CCT (COCO Camera Traps) JSON exported from Animl. null: generate the demo project into output_dir/demo_source.
    coco_file: str | None = None
    # Folder holding the full-size images at <images_dir>/<file_name>; with s3.bucket set, missing images are downloaded
    # here first.
    images_dir: str | None = None
    # Dataset name used in classification_ds.csv and splits.json. null: the stem of coco_file (with folders.root: the
    # root folder's name).
    dataset: str | None = None
    # Optional MegaDetector results file (format 1.x) giving boxes for images that have no ground-truth box.
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
    # Ignore what earlier runs finished and redo every stage.
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
