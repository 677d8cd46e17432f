"""Which files ``prepare.py`` hands to MegaDetector (``detector.model_file``), checked without running them.

MegaDetector v5 files are PyTorch archives whose pickle holds the YOLOv5 model object itself (``{'model': <Model>}``),
and MegaDetector loads them with ``torch.load(weights_only=False)``: loading one runs whatever code its pickle names.
So prepare only ever loads the file the user named, and before that it reads the pickle's opcodes (never executing
them) to check that the file names a YOLO detection model: a classifier checkpoint, a state dict or any other file is
refused with one line naming it, before any stage runs.

A MegaDetector model *name* (``MDV5A``, ``MDV1000-REDWOOD``) is what MegaDetector's own tools download; prepare never
downloads weights (the machines it runs on may have no internet), so a name is refused with the address of the file
to download, taken from the installed ``megadetector`` package's own table (looked up in a child process, see
:mod:`animl_lightning.prepare.megadetector_process`).
"""

from __future__ import annotations

import pickletools
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from animl_lightning.core.errors import ConfigError

KEY = "detector.model_file"
RELEASES_URL = "https://github.com/agentmorris/MegaDetector/releases"
# (module, class) of the detection model objects MegaDetector's PyTorch loader accepts: the YOLOv5 repository layout
# (MDv5a/b, and yolov9-based MDv1000 models), the pip yolov5 package, and Ultralytics.
YOLO_MODEL_CLASSES: dict[tuple[str, str], str] = {
    ("models.yolo", "Model"): "yolov5",
    ("models.yolo", "DetectionModel"): "yolov5",
    ("yolov5.models.yolo", "Model"): "yolov5",
    ("yolov5.models.yolo", "DetectionModel"): "yolov5",
    ("ultralytics.nn.tasks", "DetectionModel"): "ultralytics",
}
# The packages a family needs to be unpickled; their absence is one line before any stage runs.
FAMILY_PACKAGES = {"yolov5": ("megadetector", "yolov5"), "ultralytics": ("megadetector", "ultralytics")}
INSTALL_HINT = (
    "install the detect extra as the README says (pip install -e '.[detect]' plus MegaDetector with --no-deps)"
)
_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING"})
_MEMO_GETS = frozenset({"BINGET", "LONG_BINGET", "GET"})
_MEMO_PUTS = frozenset({"BINPUT", "LONG_BINPUT", "PUT"})
_WEIGHTS_LOOKUP_TIMEOUT_S = 300.0


class DetectorFileError(ConfigError):
    """``detector.model_file`` cannot be run: missing, a model name, or not a MegaDetector model; one line naming it."""


@dataclass(frozen=True)
class DetectorFile:
    """A model file that passed the checks.

    Attributes:
        path: the file.
        family: ``yolov5`` or ``ultralytics`` (the library MegaDetector unpickles it with).
    """

    path: Path
    family: str


def pickle_globals(data: bytes) -> set[tuple[str, str]]:
    """The ``(module, name)`` pairs a pickle imports, read from its opcodes without running any of them.

    ``GLOBAL`` carries both names; protocol 4's ``STACK_GLOBAL`` takes the two strings pushed before it, possibly
    fetched back from the memo, which is followed for strings only.
    """
    found: set[tuple[str, str]] = set()
    memo: dict[int, object] = {}
    recent: list[object] = [None, None]  # the last two values pushed
    for opcode, arg, _ in pickletools.genops(data):
        name = opcode.name
        if name == "GLOBAL" and isinstance(arg, str):
            module, _, attribute = arg.partition(" ")
            found.add((module, attribute))
            recent = [recent[-1], None]
        elif name == "STACK_GLOBAL":
            pushed_module, pushed_name = recent
            if isinstance(pushed_module, str) and isinstance(pushed_name, str):
                found.add((pushed_module, pushed_name))
            recent = [None, None]
        elif name in _STRING_OPS:
            recent = [recent[-1], arg.decode("latin-1") if isinstance(arg, bytes) else arg]
        elif name == "MEMOIZE":
            memo[len(memo)] = recent[-1]
        elif name in _MEMO_PUTS and isinstance(arg, int):
            memo[arg] = recent[-1]
        elif name in _MEMO_GETS and isinstance(arg, int):
            recent = [recent[-1], memo.get(arg)]
        elif opcode.stack_after:
            recent = [recent[-1], None]
    return found


def _not_pytorch(path: Path) -> DetectorFileError:
    return DetectorFileError(f"{KEY}: {path} is not a MegaDetector model (not a PyTorch .pt archive)")


def _archive_pickle(path: Path) -> bytes:
    """The ``data.pkl`` of a PyTorch zip archive (the only format MegaDetector's loader reads)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
            if len(names) != 1:
                raise _not_pytorch(path)
            return archive.read(names[0])
    except (zipfile.BadZipFile, EOFError) as err:
        raise _not_pytorch(path) from err
    except OSError as err:
        raise DetectorFileError(f"{KEY}: cannot read {path}: {err.strerror or err}") from err


def check_model_file(model_file: str) -> DetectorFile:
    """Check ``detector.model_file`` before any stage runs; see the module docstring.

    Raises:
        DetectorFileError: a model name (with where to download its weights), a missing file, a file other than a
            ``.pt`` PyTorch archive, one whose pickle names no YOLO detection model, or a model whose library is not
            installed; each one line naming the file.
    """
    path = Path(model_file)
    if not path.is_file():
        if path.exists():
            raise DetectorFileError(f"{KEY}: {model_file} is a folder, not a model file")
        if "/" not in model_file and "\\" not in model_file:
            url = weights_url(model_file)
            if url is not None:
                raise DetectorFileError(
                    f"{KEY}: {model_file!r} is a MegaDetector model name, and prepare.py never downloads weights: "
                    f"download {url} (or another release from {RELEASES_URL}) and set {KEY} to the file's path"
                )
        raise DetectorFileError(f"{KEY}: {model_file} does not exist (give the path of a MegaDetector .pt file)")
    if path.suffix.lower() != ".pt":
        raise DetectorFileError(
            f"{KEY}: {path} is not a MegaDetector model file: MegaDetector runs YOLO-based .pt files "
            f"(MDv5a/b and later, from {RELEASES_URL})"
        )
    try:
        imported = pickle_globals(_archive_pickle(path))
    except ValueError as err:  # pickletools' word for an opcode stream that is damaged or cut short
        raise DetectorFileError(f"{KEY}: {path} is not a MegaDetector model (its pickle is damaged: {err})") from err
    families = {YOLO_MODEL_CLASSES[pair] for pair in imported if pair in YOLO_MODEL_CLASSES}
    if not families:
        modules = sorted({module.split(".")[0] for module, _ in imported})
        raise DetectorFileError(
            f"{KEY}: {path} is not a MegaDetector model: it holds no YOLO detection model "
            f"(its pickle imports from {', '.join(modules) or 'nothing'})"
        )
    family = sorted(families)[0]
    missing = [p for p in FAMILY_PACKAGES[family] if find_spec(p) is None]
    if missing:
        raise DetectorFileError(
            f"{KEY}: running {path} ({family} model) needs the {', '.join(missing)} package(s): {INSTALL_HINT}"
        )
    return DetectorFile(path=path, family=family)


def weights_url(name: str) -> str | None:
    """The download address of the MegaDetector model called ``name`` (``MDV5A``), or None if it is no model name.

    Read from the installed ``megadetector`` package's table in a child process: importing it changes PIL's
    process-wide settings (see :mod:`animl_lightning.prepare.megadetector_process`). Without the package there is
    no table, and the caller says only that the file does not exist.
    """
    if find_spec("megadetector") is None:
        return None
    try:
        done = subprocess.run(
            [sys.executable, "-m", "animl_lightning.prepare.megadetector_process", "weights-url", name],
            capture_output=True,
            text=True,
            timeout=_WEIGHTS_LOOKUP_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[-1] if done.returncode == 0 and lines and lines[-1].startswith("http") else None
