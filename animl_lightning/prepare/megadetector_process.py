"""The detect stage's child process: MegaDetector's own batch runner, kept out of the ``prepare.py`` process.

    python -m animl_lightning.prepare.megadetector_process run REQUEST.json
    python -m animl_lightning.prepare.megadetector_process weights-url MDV5A

Why a process of its own: importing the ``megadetector`` package changes the importing process for good. It sets
PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES = True`` (a truncated JPEG then decodes, grey at the bottom, instead of being
reported as damaged by the crops stage), loading a YOLOv5 model appends YOLOv5's folder to ``sys.path`` (top-level
``models`` and ``utils`` packages appear) and imports Ultralytics, which replaces ``PIL.Image.open`` with a wrapper of
its own, and it imports pytest. In a child none of that reaches prepare.

``run`` reads a :class:`DetectorRequest` written by :mod:`animl_lightning.prepare.detect`, calls
``megadetector.detection.run_detector_batch.load_and_run_detector_batch`` on the request's absolute image paths (with
its checkpointing, and the results already known passed in, which it skips) and writes the results with
``write_results_to_file`` (format 1.6; ``file`` relative to the images folder, ``info.detector`` the model file's
name) to a temporary file renamed over ``results_path``. A failure it can name is written as one line to
``status_path`` (exit status 2). The process dies with its parent (``prepare.py`` killed or interrupted), so that a
rerun never meets a detector still writing the checkpoint.

``weights-url`` prints the download address MegaDetector's own table gives a model name (exit status 1: no such name).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from animl_lightning.core.files import TMP_MARKER, atomic_write_json

CHECKPOINT_BACKUP_SUFFIX = "_tmp"  # MegaDetector copies the previous checkpoint here while it writes a new one
_PR_SET_PDEATHSIG = 1
_PARENT_POLL_S = 1.0


@dataclass
class DetectorRequest:
    """What one MegaDetector run is asked to do; written by the detect stage as JSON.

    Attributes:
        model_file: the model file, absolute.
        threshold: MegaDetector's ``confidence_threshold``: boxes with a lower confidence are not written.
        batch_size: images per forward pass (MegaDetector uses 1 without a GPU).
        device: ``auto`` (MegaDetector's choice: CUDA when present), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        checkpoint_path: MegaDetector's checkpoint file.
        checkpoint_every: images between checkpoints.
        results_path: where the results file goes.
        status_path: where a failure is described in one line.
        images: ``[absolute path, file_name, size, mtime_ns]`` of every image to have results for.
        seed: results already known (MegaDetector's per-image dicts, ``file`` absolute); they are not run again.
        custom_metadata: written as ``info.custom_metadata`` of the results file.
        run_key: identifies the model, threshold and MegaDetector version; a checkpoint is reused only under it.
        parent_pid: the process the child must not outlive.
    """

    model_file: str
    threshold: float
    batch_size: int
    device: str
    checkpoint_path: str
    checkpoint_every: int
    results_path: str
    status_path: str
    images: list[tuple[str, str, int, int]] = field(default_factory=list)
    seed: list[dict[str, Any]] = field(default_factory=list)
    custom_metadata: dict[str, Any] = field(default_factory=dict)
    run_key: str = ""
    parent_pid: int = 0

    def write(self, path: Path) -> None:
        """Write the request atomically."""
        atomic_write_json(path, asdict(self), indent=None)

    @classmethod
    def read(cls, path: Path) -> DetectorRequest:
        """Read a request written by :meth:`write` (KeyError/TypeError/ValueError if it is not one)."""
        data = json.loads(path.read_text(encoding="utf-8"))
        data["images"] = [(str(a), str(n), int(s), int(m)) for a, n, s, m in data["images"]]
        return cls(**data)


class _RunError(Exception):
    """A failure this process can describe in one line (written to the status file)."""


def _die_with_parent(parent_pid: int) -> None:
    """End this process when ``prepare.py`` ends, however it ends (a kill included).

    Linux delivers SIGKILL at the parent's death (``PR_SET_PDEATHSIG``); elsewhere a thread polls the parent id.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent_pid and os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(3)

    def watch() -> None:
        while True:
            time.sleep(_PARENT_POLL_S)
            if os.getppid() != parent_pid:
                os._exit(3)

    if parent_pid:
        threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _device_options(device: str) -> dict[str, Any]:
    # Without a device MegaDetector picks CUDA, then Apple's MPS, then DirectML, then the CPU.
    return {} if device == "auto" else {"device": device}


def _write_results(request: DetectorRequest, results: list[dict[str, Any]]) -> None:
    from megadetector.detection.run_detector_batch import write_results_to_file

    names = {absolute: name for absolute, name, _, _ in request.images}
    relative = []
    for result in results:
        entry = dict(result)
        # Back to the CCT file_name: exactly the string the boxes stage looks up (no path normalisation).
        entry["file"] = names[result["file"]]
        relative.append(entry)
    target = Path(request.results_path)
    temporary = target.with_name(f".{target.name}{TMP_MARKER}{os.getpid()}")
    try:
        write_results_to_file(
            relative,
            str(temporary),
            detector_file=request.model_file,
            custom_metadata=request.custom_metadata,
        )
        with temporary.open("rb") as handle:
            os.fsync(handle.fileno())
        temporary.replace(target)
    finally:
        temporary.unlink(missing_ok=True)


def run(request: DetectorRequest) -> None:
    """Run MegaDetector as ``request`` says and write its results file (see the module docstring).

    Raises:
        _RunError: MegaDetector stopped (the model could not be loaded or run, a file could not be written).
    """
    # YOLOv5 7.0 imports pkg_resources, whose deprecation warning would reach every prepare run's terminal.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    from megadetector.detection.run_detector_batch import load_and_run_detector_batch

    try:
        results = load_and_run_detector_batch(
            request.model_file,
            [absolute for absolute, _, _, _ in request.images],
            checkpoint_path=request.checkpoint_path,
            confidence_threshold=request.threshold,
            checkpoint_frequency=request.checkpoint_every,
            results=[dict(entry) for entry in request.seed],
            quiet=True,
            batch_size=request.batch_size,
            detector_options=_device_options(request.device),
        )
    except Exception as err:  # MegaDetector raises bare Exceptions, asserts and library errors alike
        traceback.print_exc()
        raise _RunError(
            f"detector.model_file: MegaDetector could not run {request.model_file}: {type(err).__name__}: {err}"
        ) from err
    try:
        _write_results(request, results)
    except OSError as err:
        raise _RunError(f"cannot write {request.results_path}: {err.strerror or err}") from err


def weights_url(name: str) -> str | None:
    """The address MegaDetector's own table gives the model called ``name``, or None."""
    from megadetector.detection import run_detector

    key = name.lower()
    version = run_detector.model_string_to_model_version.get(key, key)
    model = run_detector.known_models.get(version)
    url = model.get("url") if isinstance(model, dict) else None
    return str(url) if url else None


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; see the module docstring."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "weights-url":
        url = weights_url(args[1])
        if url is None:
            return 1
        print(url)
        return 0
    if len(args) != 2 or args[0] != "run":
        print("usage: megadetector_process run REQUEST.json | weights-url NAME", file=sys.stderr)
        return 64
    request = DetectorRequest.read(Path(args[1]))
    _die_with_parent(request.parent_pid)
    try:
        run(request)
    except _RunError as failure:
        atomic_write_json(request.status_path, {"error": str(failure)})
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
